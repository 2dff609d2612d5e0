"""Starts a small simulated multi-node Ray cluster on 127.0.0.1 for the operator-tool tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, TypeVar

import ray
from ray.cluster_utils import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_IP = "127.0.0.1"
# bench/local_cluster.py's helpers (free_port) serve the tests too.
sys.path.insert(0, os.path.join(ROOT, "bench"))
T = TypeVar("T")


# Ray waits a fixed 30 s for a new raylet to register; two test shards on 2 cores can exceed
# that while an engine loads, so a cluster that fails to come up is ended and built once more.
STARTUP_ATTEMPTS = 2


def started_with_retry(start: Callable[[], T], what: str,
                       retry_on: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """start(), once more if it raises one of `retry_on` (it ends what it started first)."""
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            return start()
        except retry_on as e:
            if attempt == STARTUP_ATTEMPTS:
                raise
            print(f"{what} did not start ({str(e)[-300:]}); starting it again", file=sys.stderr)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def simulated_cluster(gpu_nodes: int = 2, head_cpus: float = 2, worker_cpus: float = 1,
                      worker_resources: list[dict] | None = None, ingress: str | None = None,
                      worker_labels: list[dict] | None = None):
    """Head (no GPU) + `gpu_nodes` nodes with 8 logical GPUs each; the driver is connected and
    Serve started with the scripts' `--ingress` (None: their default)."""
    from ray import serve
    from common.deploy import start_serve
    from common.ray_connect import NAMESPACE

    c, workers, temp_dir = started_with_retry(
        lambda: started_cluster(gpu_nodes, head_cpus, worker_cpus,
                                worker_resources or [{}] * gpu_nodes,
                                worker_labels or [{}] * gpu_nodes), "simulated cluster")
    try:
        ray.init(address=c.address, _node_ip_address=LOCAL_IP, namespace=NAMESPACE,
                 logging_level="WARNING", log_to_driver=False)
        start_serve(LOCAL_IP, 8000, "HeadOnly", **({"ingress": ingress} if ingress else {}))
        yield c, workers
    finally:
        with ended_after(temp_dir):
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
            c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def started_cluster(gpu_nodes: int, head_cpus: float, worker_cpus: float,
                    worker_resources: list[dict],
                    worker_labels: list[dict]) -> tuple[Cluster, list, str]:
    """The cluster and its worker nodes, all registered, and the temp dir that holds its
    session (its own, so that a failed start's processes are found and ended). The dir is
    directly under /tmp: Ray's socket paths in it must stay within 107 bytes."""
    from ray._common.utils import get_default_ray_temp_dir

    # Ray writes the cluster's address there (ray_current_cluster); a head with a temp dir of
    # its own does not create it.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="sim-", dir="/tmp")
    with ended_on_error(temp_dir):
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": head_cpus, "node_ip_address": LOCAL_IP,
                                    "include_dashboard": False, "temp_dir": temp_dir})
        workers = [add_gpu_node(c, worker_cpus, extra, labels)
                   for extra, labels in zip(worker_resources[:gpu_nodes], worker_labels)]
        c.wait_for_nodes()
    return c, workers, temp_dir


def add_gpu_node(c: Cluster, cpus: float, resources: dict | None = None,
                 labels: dict | None = None):
    """A node with 8 logical GPUs (and the operator's `ray start --labels`, if any)."""
    return c.add_node(num_cpus=cpus, num_gpus=8, node_ip_address=LOCAL_IP,
                      resources={"accelerator_type:H100": 1, **(resources or {})},
                      **({"labels": labels} if labels else {}))


@contextlib.contextmanager
def ended_on_error(temp_dir: str):
    """Ends every process of the sessions under `temp_dir` if the block raises."""
    from common.demo import end_processes, session_processes

    try:
        yield
    except BaseException:
        end_processes(session_processes(temp_dir), grace_s=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def ended_after(session_dir: str):
    """Ends, after the block (a cluster's shutdown), the processes still running of the
    sessions under `session_dir` (a session or the temp dir holding it):
    Serve's HAProxy, a child of its proxy actor, can outlive the raylets and keep holding the
    next test cluster's ports (8000, 9101, 8404)."""
    from common.demo import end_processes, session_processes

    procs = session_processes(session_dir)
    try:
        yield
    finally:
        end_processes([p for p in procs if p.is_running()], grace_s=5.0)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["RAY_ENABLE_AUTO_CONNECT"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    return env


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout:.0f} s")
