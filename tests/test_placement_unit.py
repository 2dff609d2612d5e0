"""Unit tests: what pins a deployment to its node (a label, the IP, the node ID) and the options it sets."""
from __future__ import annotations

import pytest

from common import cli
from common.placement import NODE_ID_LABEL, pin_to_node, pin_warning, stable_pins
from common.cluster import NodeInfo


def node(node_id: str, ip: str, **labels: str) -> NodeInfo:
    return NodeInfo(node_id, ip, True, False, 8, 8, 8, 8, labels=labels)


def test_distinct_ips_pin_by_the_node_ip_resource():
    nodes = [node("a" * 56, "10.0.0.1"), node("b" * 56, "10.0.0.2")]
    pins = stable_pins(["b" * 56, "a" * 56], nodes)
    assert [(p.kind, p.key) for p in pins] == [("ip", "node:10.0.0.2"), ("ip", "node:10.0.0.1")]
    assert pin_warning(pins) == ""
    actor = pin_to_node({"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}, pins[0])
    assert actor["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1,
                                          "resources": {"node:10.0.0.2": 0.001}}
    group = pin_to_node({"placement_group_bundles": [{"CPU": 1, "GPU": 1}, {"GPU": 1}]}, pins[1])
    assert group["placement_group_bundles"] == [{"CPU": 1, "GPU": 1, "node:10.0.0.1": 0.001},
                                                {"GPU": 1, "node:10.0.0.1": 0.001}]


def test_an_operator_label_pins_by_label_and_must_tell_the_nodes_apart():
    nodes = [node("a", "10.0.0.1", slot="x"), node("b", "10.0.0.1", slot="y"),
             node("c", "10.0.0.3")]
    pins = stable_pins(["a", "b"], nodes, pin_label="slot")
    assert [(p.kind, p.value) for p in pins] == [("label", "x"), ("label", "y")]
    options = pin_to_node({"ray_actor_options": {}}, pins[1])
    assert options["ray_actor_options"]["label_selector"] == {"slot": "y"}
    with pytest.raises(cli.ScriptError, match="--pin-label slot"):
        stable_pins(["a", "c"], nodes, pin_label="slot")


def test_nodes_sharing_an_ip_fall_back_to_node_ids_with_a_warning():
    nodes = [node("a", "127.0.0.1"), node("b", "127.0.0.1")]
    pins = stable_pins(["a", "b"], nodes)
    assert [(p.kind, p.key, p.value) for p in pins] == [("node-id", NODE_ID_LABEL, "a"),
                                                        ("node-id", NODE_ID_LABEL, "b")]
    assert "--pin-label" in pin_warning(pins) and "new ID" in pin_warning(pins)
    group = pin_to_node({"placement_group_bundles": [{"GPU": 1}, {"GPU": 1}]}, pins[0])
    assert group["placement_group_bundle_label_selector"] == [{NODE_ID_LABEL: "a"}] * 2
