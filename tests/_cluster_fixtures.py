"""Starts a small simulated multi-node Ray cluster on 127.0.0.1 for the operator-tool tests."""
from __future__ import annotations

import contextlib
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import ray
from ray.cluster_utils import Cluster

LOCAL_IP = "127.0.0.1"


@contextlib.contextmanager
def simulated_cluster(gpu_nodes: int = 2, head_cpus: float = 2, worker_cpus: float = 1,
                      worker_resources: list[dict] | None = None, ingress: str | None = None):
    """Head (no GPU) + `gpu_nodes` nodes with 8 logical GPUs each; the driver is connected and
    Serve started with the scripts' `--ingress` (None: their default)."""
    from ray import serve
    from common.deploy import start_serve
    from common.ray_connect import NAMESPACE

    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": head_cpus, "node_ip_address": LOCAL_IP,
                                "include_dashboard": False})
    try:
        workers = []
        for i in range(gpu_nodes):
            extra = (worker_resources or [{}] * gpu_nodes)[i]
            workers.append(c.add_node(num_cpus=worker_cpus, num_gpus=8,
                                      node_ip_address=LOCAL_IP,
                                      resources={"accelerator_type:H100": 1, **extra}))
        c.wait_for_nodes()
        ray.init(address=c.address, _node_ip_address=LOCAL_IP, namespace=NAMESPACE,
                 logging_level="WARNING", log_to_driver=False)
        start_serve(LOCAL_IP, 8000, "HeadOnly", **({"ingress": ingress} if ingress else {}))
        yield c, workers
    finally:
        with ended_after(c.head_node.get_session_dir_path()):
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
            c.shutdown()


@contextlib.contextmanager
def ended_after(session_dir: str):
    """Ends, after the block (a cluster's shutdown), that session's processes still running:
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
