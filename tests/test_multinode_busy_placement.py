"""A replica over several nodes on a simulated 3 x 8-GPU cluster where one node's GPUs are partly taken: each pipeline stage lands whole on a node with room (Ray placement only, tests/_placement_probe.py stands in for the engine)."""
from __future__ import annotations

from _cluster_fixtures import LOCAL_IP, wait_until

import pytest
import ray
import requests
from ray import serve
from ray.util.placement_group import placement_group, remove_placement_group

import _placement_probe
from _serve_fixtures import deploy_script
from common import cluster

SIMULATED_CLUSTER = {"gpu_nodes": 3, "head_cpus": 1, "worker_cpus": 16}


@pytest.fixture(autouse=True)
def probe(monkeypatch):
    _placement_probe.install(monkeypatch)


def test_stages_avoid_the_node_whose_gpus_are_partly_taken(sim, capsys):
    _, workers = sim
    busy = workers[1].node_id
    # Other work holds 3 GPUs of one node: PACK alone could put 5 + 3 of a stage there and
    # elsewhere, since 16 GPUs are free in all.
    blocker = placement_group([{"GPU": 3}], strategy="STRICT_PACK",
                              bundle_label_selector=[{"ray.io/node-id": busy}])
    ray.get(blocker.ready(), timeout=30)
    # The script plans from the cluster's reported free GPUs, which follow a moment later.
    wait_until(lambda: next(n for n in cluster.list_nodes()
                            if n.node_id == busy).gpus_available == 5,
               timeout=30, what="the blocker's GPUs reported as taken")
    try:
        code = deploy_script("ray-force-multi.py", "--app-name", "busy", "--route-prefix",
                             "/busy", "--host", LOCAL_IP, "--port", "8000", "--proxy-location",
                             "HeadOnly", "--timeout", "60", "--model", "unused-by-probe",
                             "--num-replicas", "1", "--pipeline-parallel-size", "2")
        if code != 0:
            import sys

            import check_cluster
            check_cluster.main(["--address", "auto"])
            captured = capsys.readouterr()
            sys.__stderr__.write(captured.out[-6000:] + captured.err[-3000:])
        assert code == 0
        info = requests.post(f"http://{LOCAL_IP}:8000/busy/", json={}, timeout=60).json()
        stages = [set(info["worker_nodes"][:8]), set(info["worker_nodes"][8:])]
        assert all(len(nodes) == 1 for nodes in stages) and stages[0] != stages[1]
        assert busy not in stages[0] | stages[1]
        replica = next(r for r in cluster.list_replicas("busy") if r.state == "RUNNING")
        per_node = {}
        for node in replica.bundle_nodes:
            per_node[node] = per_node.get(node, 0) + 1
        assert sorted(per_node.values()) == [8, 8] and busy not in per_node
        print(capsys.readouterr().out)
    finally:
        serve.delete("busy")
        remove_placement_group(blocker)
