"""Starts a small simulated multi-node Ray cluster on 127.0.0.1 for the operator-tool tests."""
from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
import time

# Set before ray is imported anywhere: otherwise a Serve handle's metrics thread reconnects
# after ray.shutdown() and the cluster cannot be torn down.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
# A local ray.init() turns token auth on and writes a token where Ray looks by default
# (~/.ray/auth_token, shared by everything on the machine): the tests keep theirs apart.
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    _token = os.path.join(tempfile.mkdtemp(prefix="ray-test-token-"), "auth_token")
    with open(os.open(_token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as _file:
        _file.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = _token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Ray workers (replicas) inherit this from the raylets the tests start: they must be able to
# import the project's modules and the tests' own deployments.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT, os.path.join(ROOT, "tests")] +
    [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

LOCAL_IP = "127.0.0.1"


@contextlib.contextmanager
def simulated_cluster(gpu_nodes: int = 2, head_cpus: float = 2, worker_cpus: float = 1,
                      worker_resources: list[dict] | None = None, ingress: str | None = None):
    """Head (no GPU) + `gpu_nodes` nodes with 8 logical GPUs each; the driver is connected and
    Serve started with the scripts' `--ingress` (None: their default)."""
    from ray import serve
    from common import cluster as cluster_mod
    from common.deploy import start_serve

    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": head_cpus, "node_ip_address": LOCAL_IP,
                                "include_dashboard": False})
    workers = []
    for i in range(gpu_nodes):
        extra = (worker_resources or [{}] * gpu_nodes)[i]
        workers.append(c.add_node(num_cpus=worker_cpus, num_gpus=8, node_ip_address=LOCAL_IP,
                                  resources={"accelerator_type:H100": 1, **extra}))
    c.wait_for_nodes()
    ray.init(address=c.address, _node_ip_address=LOCAL_IP, namespace=cluster_mod.NAMESPACE,
             logging_level="WARNING", log_to_driver=False)
    start_serve(LOCAL_IP, 8000, "HeadOnly", **({"ingress": ingress} if ingress else {}))
    try:
        yield c, workers
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        c.shutdown()


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
