"""A node holding a pinned pipeline stage restarts with a new ID: the replica comes back by itself (Ray placement only).

The engine is the placement stand-in (tests/_placement_probe.py): a CPU cannot run pipeline
parallelism over 16 GPUs. Like vLLM's engine when a rank dies, the stand-in fails its health
check once a worker's node is gone, and Serve replaces the replica.
"""
from __future__ import annotations

import time

import pytest
import ray
import requests
from ray import serve

import _placement_probe
from _cluster_fixtures import LOCAL_IP, add_gpu_node, wait_until
from _serve_fixtures import deploy_script
from common import cluster

URL = f"http://{LOCAL_IP}:8000"
LABEL = "deepseek-serve/node"
WORKER_CPUS = 16
SIMULATED_CLUSTER = {"gpu_nodes": 2, "head_cpus": 1, "worker_cpus": WORKER_CPUS,
                     "worker_labels": [{LABEL: "a"}, {LABEL: "b"}]}


@pytest.fixture(autouse=True)
def probe(monkeypatch):
    _placement_probe.install(monkeypatch)


def describe(app: str) -> dict | None:
    try:
        response = requests.post(f"{URL}/{app}/", json={}, timeout=30)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def serving_on(app: str, node_id: str) -> dict | None:
    """The replica's answer once one of its workers is on `node_id`."""
    answer = describe(app)
    return answer if answer and node_id in answer["worker_nodes"] else None


def restart(c, workers: list, node_id: str):
    """The node dies and the operator's `ray start --labels ...` brings it back: a new node ID."""
    victim = next(w for w in workers if w.node_id == node_id)
    index = workers.index(victim)
    c.remove_node(victim, allow_graceful=False)
    workers[index] = new = add_gpu_node(c, WORKER_CPUS, labels=SIMULATED_CLUSTER[
        "worker_labels"][index])
    assert new.node_id != node_id
    return new


def test_pipeline_stages_pinned_by_label_come_back_after_their_nodes_restart(sim, capsys):
    c, workers = sim
    assert deploy_script(
        "ray-force-multi.py", "--app-name", "pp", "--route-prefix", "/pp", "--host", LOCAL_IP,
        "--port", "8000", "--proxy-location", "HeadOnly", "--timeout", "120",
        "--model", "unused-by-probe", "--num-replicas", "1", "--pipeline-parallel-size", "2",
        "--pin-label", LABEL) == 0
    assert "by node label (kept across a node restart)" in capsys.readouterr().out
    # Stage 1's node first (the replica actor lives on): its workers die and the health check
    # fails; then stage 0's node, which holds the replica actor itself.
    for stage in (1, 0):
        before = describe("pp")
        assert before["node"] in before["worker_nodes"][:8]  # the replica actor sits with stage 0
        killed_at = time.monotonic()
        new = restart(c, workers, before["worker_nodes"][8 * stage])
        after = wait_until(lambda node=new.node_id: serving_on("pp", node),
                           timeout=300, interval=2,
                           what=f"the replica serving with stage {stage} on the restarted node")
        print(f"stage {stage}'s node restarted: the replica served again "
              f"{time.monotonic() - killed_at:.0f} s after, with no script rerun")
        kept = 1 - stage
        assert set(after["worker_nodes"][8 * stage:8 * stage + 8]) == {new.node_id}
        assert after["worker_nodes"][8 * kept:8 * kept + 8] == \
            before["worker_nodes"][8 * kept:8 * kept + 8]
        assert len([r for r in cluster.list_replicas("pp") if r.state == "RUNNING"]) == 1
        assert ray.available_resources().get("GPU", 0) == 0
    serve.delete("pp")
