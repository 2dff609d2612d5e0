"""ray-placement-group.py's redeploy: what a backend records in Serve, which pins it keeps, its stages."""
from __future__ import annotations

from common.backend_stages import (backend_record, current_pin, kept_pins, running_backend,
                                   stage_versions)
from common.cluster import NodeInfo
from common.placement import NodePin


def node(node_id: str, ip: str, alive: bool = True, **labels: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, ip=ip, alive=alive, is_head=False, cpus_total=8,
                    cpus_available=0, gpus_total=8, gpus_available=0, labels=labels)


BY_IP = [NodePin("a1", "ip", "node:10.0.0.1", "10.0.0.1"),
         NodePin("b1", "ip", "node:10.0.0.2", "10.0.0.2")]


def test_a_backend_reads_back_what_it_recorded():
    record = backend_record("v1", BY_IP[0])
    assert running_backend(record) == running_backend({**record, "other": 1})
    backend = running_backend(record)
    assert backend is not None and backend.version == "v1" and backend.pin == BY_IP[0]
    for nothing in (None, {}, {"deployed": None}, {"deployed": {"version": "v1"}}, "text"):
        assert running_backend(nothing) is None


def test_a_pin_follows_a_restarted_node_by_what_it_keeps():
    nodes = [node("a2", "10.0.0.1", name="gpu-a"), node("a1", "10.0.0.1", alive=False)]
    assert current_pin(BY_IP[0], nodes) == NodePin("a2", "ip", "node:10.0.0.1", "10.0.0.1")
    by_label = NodePin("a1", "label", "name", "gpu-a")
    assert current_pin(by_label, nodes).node_id == "a2"
    # A node ID does not survive the restart: nothing alive matches it.
    assert current_pin(NodePin("a1", "node-id", "ray.io/node-id", "a1"), nodes) is None


def test_running_backends_keep_their_nodes_only_when_each_has_one_alive():
    nodes = [node("a1", "10.0.0.1"), node("b1", "10.0.0.2")]
    running = [running_backend(backend_record("v1", pin)) for pin in BY_IP]
    assert kept_pins(running, nodes) == BY_IP
    assert kept_pins([], nodes) is None
    assert kept_pins([running[0], None], nodes) is None                # one without a record
    assert kept_pins(running, nodes[:1]) is None                       # its node is gone
    assert kept_pins([running[0], running[0]], nodes) is None          # two on one node
    # --pin-label now asked for: the backends pinned by IP are placed afresh.
    assert kept_pins(running, nodes, pin_label="name") is None


def test_a_redeploy_moves_each_changed_backend_in_its_own_stage():
    assert stage_versions(["v1", "v1"], "v2") == [(0, ["v2", "v1"]), (1, ["v2", "v2"])]
    assert stage_versions(["v2", "v1", "v1"], "v2") == [(1, ["v2", "v2", "v1"]),
                                                        (2, ["v2", "v2", "v2"])]
    assert stage_versions(["v2", "v2"], "v2") == []
