"""Fixtures for tests that deploy the project's scripts on a real Ray (one node or simulated many)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading

from _cluster_fixtures import (LOCAL_IP, ended_after, ended_on_error, started_with_retry,
                               wait_until)
from local_cluster import free_port  # noqa: F401 - the tests' port picker (bench/ is on the path)

import ray
import requests

from common.demo import load_script
from common.demo_model import ensure_demo_model


def clean_env(home, temp_dir, **extra: str) -> dict[str, str]:
    """What an operator's login shell with the venv activated has: no PYTHONPATH, no RAY_AUTH_*,
    its own HOME (Ray's token) and RAY_TMPDIR (Ray's sessions and ray_current_cluster)."""
    import sys
    from pathlib import Path

    return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home), "LANG": "C.UTF-8", "RAY_TMPDIR": str(temp_dir),
            "TMPDIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def demo_model() -> str:
    return str(ensure_demo_model(quiet=True))


# DEEPSEEK_SERVE_TEST_DEVICE=cuda runs the engine tests' deployments on a GPU with the CUDA build of
# vLLM (the same demo model; one replica per GPU), to check the replica path against that build.
TEST_DEVICE = os.environ.get("DEEPSEEK_SERVE_TEST_DEVICE", "cpu")


def cpu_args(port: int, *extra: str) -> list[str]:
    """Flags every engine deployment in the tests shares: demo model, loopback, one proxy, the
    CPU build (or TEST_DEVICE)."""
    return ["--device", TEST_DEVICE, "--model", demo_model(), "--host", LOCAL_IP,
            "--port", str(port), "--proxy-location", "HeadOnly", "--timeout", "300", *extra]


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, dashboard: bool = False):
    """A one-node Ray on 127.0.0.1 for the API tests (with the dashboard, which serves Ray's
    state API, for tests that read replicas' logs)."""
    from ray import serve

    def start():
        # A temp dir of its own, directly under /tmp (Ray's socket paths stay short): a start
        # that fails is ended by its processes there, and started once more.
        temp_dir = tempfile.mkdtemp(prefix="local-", dir="/tmp")
        with ended_on_error(temp_dir):
            try:
                # address="local": a new cluster even when another Ray on this machine left its
                # address in /tmp/ray/ray_current_cluster (ray.init would join that one).
                return ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOCAL_IP,
                                include_dashboard=dashboard, namespace="serve",
                                logging_level="WARNING", log_to_driver=False,
                                _temp_dir=temp_dir), temp_dir
            except BaseException:
                ray.shutdown()
                raise

    context, temp_dir = started_with_retry(start, "local Ray")
    try:
        yield
    finally:
        with ended_after(context.address_info["session_dir"]):
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy_script(script: str, *argv: str) -> int:
    return load_script(script).main(list(argv))


def send_and_hang_up(url: str, body: dict, stream: bool, generating) -> None:
    """POST `body` to `url` over a raw socket and hang up: for a stream once its first bytes
    came, else once `generating()` says the engine runs it (a client gone before that leaves
    nothing to abort, and a test would prove nothing)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST " + (parts.path or "/").encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        if stream:
            sock.recv(64)
        else:
            wait_until(generating, timeout=60, what="the request reached the engine")


def health(base_url: str) -> dict:
    """The replica's own status (GET /nodes): its node, engine counters, the app's nodes."""
    return requests.get(f"{base_url}/nodes", timeout=30).json()


@contextlib.contextmanager
def background_load(send, workers: int):
    """Keep `workers` threads calling send() back to back until the block exits; a failed
    send is raised when the block ends."""
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            send()

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(keep_busy) for _ in range(workers)]
        try:
            yield
        finally:
            stop.set()
        for future in futures:
            future.result()


def wait_for_replicas(list_running, count: int, timeout: float) -> list:
    return wait_until(lambda: (lambda r: r if len(r) == count else None)(list_running()),
                      timeout=timeout, what=f"{count} running replicas")


def read_sse(response: requests.Response) -> list:
    """The events of a server-sent-events response: JSON payloads, and "[DONE]" as text."""
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events
