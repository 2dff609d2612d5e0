"""Why a replica is PENDING, on made-up clusters: common.cluster.explain is a pure function of the
nodes' total and free resources."""
from __future__ import annotations

from common.cluster import explain

TP8 = [{"CPU": 1, "GPU": 1}] + [{"GPU": 1}] * 7   # one tensor-parallel-8 replica's group


def pools(totals: dict[str, dict], frees: dict[str, dict]) -> tuple[list, list]:
    return list(totals.items()), list(frees.items())


TWO_NODES = {"nodeA" + "0" * 51: {"CPU": 64, "GPU": 8}, "nodeB" + "0" * 51: {"CPU": 64, "GPU": 8}}


def test_tp8_group_waits_when_no_node_has_8_free_gpus():
    frees = {"nodeA" + "0" * 51: {"CPU": 60, "GPU": 3}, "nodeB" + "0" * 51: {"CPU": 60, "GPU": 5}}
    why = explain(TP8, "STRICT_PACK", pools=pools(TWO_NODES, frees))
    assert why.startswith("waiting for resources: STRICT_PACK puts all 8 bundles on one node")
    assert "needs 8 GPU on one node; largest free: 5 GPU (node nodeB0000000)" in why


def test_tp16_on_8_gpu_nodes_is_infeasible_with_what_to_change():
    why = explain([{"GPU": 16}], None, pools=pools(TWO_NODES, TWO_NODES))
    assert why.startswith("infeasible: needs 16 GPU on one node; largest node has: 8 GPU")
    assert "tensor_parallel_size" in why


def test_strict_spread_needs_as_many_nodes_as_bundles():
    three = [{"GPU": 8}] * 3
    assert "needs 3 distinct nodes; only 2 alive" in explain(three, "STRICT_SPREAD",
                                                             pools=pools(TWO_NODES, TWO_NODES))
    frees = {"nodeA" + "0" * 51: {"CPU": 64, "GPU": 8}, "nodeB" + "0" * 51: {"CPU": 64, "GPU": 0}}
    why = explain([{"GPU": 8}] * 2, "STRICT_SPREAD", pools=pools(TWO_NODES, frees))
    assert why.startswith("waiting for resources") and "1 node(s) have room now" in why


def test_a_request_that_fits_is_said_to_fit():
    assert explain(TP8, "STRICT_PACK", pools=pools(TWO_NODES, TWO_NODES)).startswith("fits")
    assert explain([{"GPU": 1}], None, pools=pools(TWO_NODES, TWO_NODES)).startswith("fits")
