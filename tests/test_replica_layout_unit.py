"""Unit tests: a replica over several nodes (stage planning, bundle layout, vLLM's rank order, the GPUs-per-node column) and the network env its workers get."""
from __future__ import annotations

from common import replica_plan
from common.cluster import ReplicaInfo
from common.cluster_format import bundles_per_node, format_placement
from common.deploy_options import replica_resources
from common.replica_layout import NODE_ID_LABEL, MultiNodeLayout, plan_stages
from replica.config import EngineConfig, ServeConfig, network_env, replica_env
from replica.parallel_layout import TP_ENV, gpu_bundle_ranks, split_groups, stages_per_node

A, B, C = "a" * 56, "b" * 56, "c" * 56


def test_tp8_pp2_on_two_8_gpu_nodes_takes_one_node_per_stage():
    nodes = {A: {"GPU": 8, "CPU": 16}, B: {"GPU": 8, "CPU": 16}}
    assert plan_stages(8, 2, nodes, replicas=2, cpus_per_replica=1) == [[A, B]]


def test_busy_gpus_are_left_out_and_a_stage_is_never_split():
    # C has 5 free GPUs: PACK alone could put 5 + 3 of a stage there and on A.
    nodes = {A: {"GPU": 8, "CPU": 4}, B: {"GPU": 8, "CPU": 4}, C: {"GPU": 5, "CPU": 4}}
    assert plan_stages(8, 2, nodes, replicas=1, cpus_per_replica=1) == [[A, B]]
    assert plan_stages(8, 2, {A: {"GPU": 8, "CPU": 4}, C: {"GPU": 5, "CPU": 4}}, 1, 1) == []


def test_a_big_node_takes_several_stages_and_the_first_stage_needs_the_cpus():
    nodes = {A: {"GPU": 16, "CPU": 0}, B: {"GPU": 8, "CPU": 2}}
    # A has no CPU for the replica actor: stage 0 goes to B, then A takes the other two.
    assert plan_stages(8, 3, nodes, replicas=1, cpus_per_replica=1) == [[B, A, A]]
    assert plan_stages(4, 4, {A: {"GPU": 8, "CPU": 2}, B: {"GPU": 8, "CPU": 2}}, 1, 1) == \
        [[A, A, B, B]]


def test_layout_pins_each_stage_with_node_id_label_selectors():
    one = MultiNodeLayout(8, 2, [[A, B]])
    selectors = one.bundle_label_selectors()
    assert selectors == [{NODE_ID_LABEL: A}] * 8 + [{NODE_ID_LABEL: B}] * 8
    two = MultiNodeLayout(8, 2, [[A, B], [C, A]])
    assert two.bundle_label_selectors()[0] == {NODE_ID_LABEL: f"in({A},{C})"}
    assert "node aaaaaaaaaaaa: 8 GPU (stage 0), node bbbbbbbbbbbb: 8 GPU (stage 1)" in \
        one.describe()


def test_stages_pinned_by_ip_or_label_survive_a_restart_and_node_id_is_the_last_resort():
    from common.placement import NodePin

    ip = {A: NodePin(A, "ip", "node:10.0.0.1", "10.0.0.1"),
          B: NodePin(B, "ip", "node:10.0.0.2", "10.0.0.2"),
          C: NodePin(C, "ip", "node:10.0.0.3", "10.0.0.3")}
    one = MultiNodeLayout(8, 2, [[A, B]], ip)
    assert one.pinned_by == "ip" and one.bundle_label_selectors() == []
    bundles = one.bundles(1.0)
    assert [b.get("node:10.0.0.1") for b in bundles] == [0.001] * 8 + [None] * 8
    assert [b.get("node:10.0.0.2") for b in bundles] == [None] * 8 + [0.001] * 8
    assert bundles[0]["CPU"] == 1.0 and all(b["GPU"] == 1 for b in bundles)
    assert "kept across a node restart" in one.pin_words()
    # Two replicas: a stage may go to either of two nodes, which a resource cannot say.
    two = MultiNodeLayout(8, 2, [[A, B], [C, A]], ip)
    assert two.pinned_by == "node-id" and "run the script again" in two.pin_words()
    assert two.bundle_label_selectors()[0] == {NODE_ID_LABEL: f"in({A},{C})"}
    label = {n: NodePin(n, "label", "deepseek-serve/node", name)
             for n, name in ((A, "gpu-a"), (B, "gpu-b"), (C, "gpu-c"))}
    labelled = MultiNodeLayout(8, 2, [[A, B], [C, A]], label)
    assert labelled.pinned_by == "label"
    assert labelled.bundle_label_selectors()[0] == {"deepseek-serve/node": "in(gpu-a,gpu-c)"}
    assert labelled.bundle_label_selectors()[8] == {"deepseek-serve/node": "in(gpu-a,gpu-b)"}
    engine = EngineConfig(tensor_parallel_size=8, pipeline_parallel_size=2)
    options = replica_resources(engine, ServeConfig(), one)
    assert options["placement_group_bundles"] == bundles
    assert "placement_group_bundle_label_selector" not in options


def test_replica_resources_multi_node_is_pack_with_stage_selectors():
    engine = EngineConfig(tensor_parallel_size=8, pipeline_parallel_size=2)
    layout = MultiNodeLayout(8, 2, [[A, B]])
    options = replica_resources(engine, ServeConfig(), layout)
    assert options["placement_group_strategy"] == "PACK"
    bundles = options["placement_group_bundles"]
    assert len(bundles) == 16 and all(b["GPU"] == 1 for b in bundles) and bundles[0]["CPU"] == 1
    assert options["placement_group_bundle_label_selector"] == layout.bundle_label_selectors()
    assert options["ray_actor_options"]["runtime_env"]["env_vars"][TP_ENV] == "8"
    # A replica that fits one node keeps STRICT_PACK and no selectors.
    single = replica_resources(EngineConfig(tensor_parallel_size=8), ServeConfig())
    assert single["placement_group_strategy"] == "STRICT_PACK"
    assert "placement_group_bundle_label_selector" not in single


def test_vllm_rank_order_driver_node_first_then_node_id():
    bundles = [{"CPU": 1, "GPU": 1}] + [{"GPU": 1}] * 7
    nodes = [B, A, B, A, C, C, B, A]
    ranks = gpu_bundle_ranks(bundles, nodes, driver_node=B)
    assert [nodes[i] for i in ranks] == [B, B, B, A, A, A, C, C]
    assert ranks[:3] == [0, 2, 6]


def test_split_groups_flags_a_node_with_part_of_a_stage():
    bundles = [{"GPU": 1}] * 16
    assert split_groups(bundles, [A] * 8 + [B] * 8, 8) == []
    problems = split_groups(bundles, [A] * 5 + [B] * 11, 8)
    assert len(problems) == 2 and "holds 5 GPU bundle(s)" in problems[0]
    assert stages_per_node(bundles, [A] * 8 + [B] * 8, B, 8) == {B: [0], A: [1]}
    assert stages_per_node(bundles, [A] * 16, A, 4) == {A: [0, 1, 2, 3]}


def test_gpus_per_node_column_names_the_stage_of_each_node():
    bundles = [{"CPU": 1, "GPU": 1}] + [{"GPU": 1}] * 15
    replica = ReplicaInfo("app", "Dep", "r1", "RUNNING", A, "10.0.0.1", "x", 1,
                          {"placement_group_bundles": bundles, "GPU": 16.0},
                          bundle_nodes=[A] * 8 + [B] * 8, tensor_parallel_size=8)
    assert bundles_per_node(replica) == \
        "node aaaaaaaaaaaa: 8 GPU (stage 0), node bbbbbbbbbbbb: 8 GPU (stage 1)"
    replica.tensor_parallel_size = None  # deployed by an older script: GPUs only
    assert bundles_per_node(replica) == "node aaaaaaaaaaaa: 8 GPU, node bbbbbbbbbbbb: 8 GPU"
    assert bundles_per_node(ReplicaInfo("a", "D", "r", "RUNNING", A, None, None, None,
                                        {"GPU": 1.0})) == ""


def test_placement_table_lists_the_ranks_of_a_gang_together_in_rank_order():
    def rank(rid: str, node: str, gang: str, r: int) -> ReplicaInfo:
        return ReplicaInfo("wide", "LLM", rid, "RUNNING", node, None, None, None, {"GPU": 1.0},
                           gang={"id": gang, "rank": r, "size": 2})

    table = format_placement([rank("z1", B, "g2", 1), rank("a0", A, "g1", 0),
                              rank("b1", A, "g1", 1), rank("y0", B, "g2", 0)])
    lines = table.splitlines()
    assert "GANG (RANK/SIZE)" in lines[0]
    assert [line.split()[1] for line in lines[1:]] == ["a0", "b1", "y0", "z1"]
    assert lines[1].endswith("g1 0/2") and lines[4].endswith("g2 1/2")
    # without gangs the table has no gang column
    plain = ReplicaInfo("app", "LLM", "r", "RUNNING", A, None, None, None, {"GPU": 1.0})
    assert "GANG" not in format_placement([plain])


def test_slots_count_multi_node_replicas():
    nodes = [{"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}, {"CPU": 1}]
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 8}, None, nodes, stages=2) == 1
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 8}, None, nodes + nodes[:1],
                                      stages=2) == 2
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 4}, None, nodes, stages=4) == 1


def test_network_env_reaches_multi_gpu_replicas_only(monkeypatch):
    env = {"NCCL_SOCKET_IFNAME": "eth1", "GLOO_SOCKET_IFNAME": "eth1", "NCCL_IB_HCA": "mlx5",
           "TP_SOCKET_IFNAME": "eth1", "HOME": "/root", "VLLM_HOST_IP": "10.0.0.1"}
    assert network_env(env) == {k: v for k, v in env.items()
                                if k not in ("HOME", "VLLM_HOST_IP")}
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    multi = replica_env(EngineConfig(tensor_parallel_size=8, pipeline_parallel_size=2))
    assert multi["NCCL_SOCKET_IFNAME"] == "ib0" and multi["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "NCCL_SOCKET_IFNAME" not in replica_env(EngineConfig())
    # What the operator gives the replicas explicitly still wins.
    assert replica_env(EngineConfig(tensor_parallel_size=2),
                       {"NCCL_SOCKET_IFNAME": "eth9"})["NCCL_SOCKET_IFNAME"] == "eth9"
