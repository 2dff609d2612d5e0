"""Unit tests: each script's topology planned against a cluster's nodes, without Ray (common/replica_plan.py)."""
from __future__ import annotations

import argparse

import pytest

from common import builders, cli
from common.cluster import NodeInfo
from common.deploy_options import deployment_options, resolve_routing
from common.replica_plan import Topology, offline_plan, plan_replicas
from replica.config import EngineConfig, ServeConfig


def nodes(*gpus: float, free: tuple[float, ...] | None = None, cpus: float = 16.0
          ) -> list[NodeInfo]:
    free = free if free is not None else gpus
    return [NodeInfo(node_id=f"node{i}", ip=f"10.0.0.{i + 1}", alive=True, is_head=i == 0,
                     cpus_total=cpus, cpus_available=cpus, gpus_total=g, gpus_available=f)
            for i, (g, f) in enumerate(zip(gpus, free))]


def script_topology(script: str, argv: list[str]) -> tuple[Topology, EngineConfig, ServeConfig]:
    from common.deploy import parse_script_args

    module = builders.load_script(script)
    args, engine, serve_config, _ = parse_script_args(builders.script_parser_of(module), argv)
    return module.topology(args, engine, serve_config), engine, serve_config


def test_force_multi_two_tp8_replicas_fill_the_guides_two_nodes():
    topology, engine, serve_config = script_topology("ray-force-multi.py", [])
    plan = plan_replicas(engine, serve_config, topology, nodes(8, 8))
    assert (plan.replicas, plan.slots, plan.layout, plan.per_node) == (2, 2, None, None)
    assert plan.demand == {"CPU": 1.0, "GPU": 8.0}
    assert plan.lines()[0] == ("2 replica(s), each needing 1 CPU, 8 GPU on one node; the "
                               "cluster's nodes can hold 2")
    options = deployment_options(engine, serve_config, plan)
    assert options["num_replicas"] == 2 and "max_replicas_per_node" not in options
    assert options["placement_group_strategy"] == "STRICT_PACK"


def test_a_replica_larger_than_a_node_spans_nodes_one_stage_each():
    topology, engine, serve_config = script_topology(
        "ray-force-multi.py", ["--num-replicas", "1", "--pipeline-parallel-size", "2"])
    plan = plan_replicas(engine, serve_config, topology, nodes(8, 8))
    assert plan.layout is not None and plan.layout.replicas == [["node0", "node1"]]
    assert plan.demand == {"CPU": 1.0, "GPU": 8.0} and plan.stages == 2 and plan.slots == 1
    assert "2 pipeline stages of 8 GPUs" in plan.lines()[0]
    assert "pinned by node IP" in plan.lines()[1]
    options = deployment_options(engine, serve_config, plan)
    assert options["placement_group_strategy"] == "PACK"


def test_single_gpu_auto_fills_every_gpu_at_most_8_per_node():
    topology, engine, serve_config = script_topology("ray-single-gpu.py", [])
    plan = plan_replicas(engine, serve_config, topology, nodes(8, 8, 8))
    # --max-replicas 16 caps 24 GPUs; each node holds at most 8.
    assert (plan.replicas, plan.slots, plan.per_node) == (16, 24, 8)
    assert deployment_options(engine, serve_config, plan)["max_replicas_per_node"] == 8
    cpu_topology, cpu_engine, cpu_serve = script_topology(
        "ray-single-gpu.py", ["--device", "cpu", "--model", "/m"])
    assert plan_replicas(cpu_engine, cpu_serve, cpu_topology, nodes(0, 0)).replicas == 1


def test_more_replicas_than_the_nodes_hold_is_a_warning_not_a_refusal():
    topology, engine, serve_config = script_topology("ray-force-multi.py",
                                                     ["--num-replicas", "3"])
    plan = plan_replicas(engine, serve_config, topology, nodes(8, 8))
    assert plan.replicas == 3 and plan.slots == 2
    assert plan.warnings and "only 2 of 3 replica(s) fit" in plan.warnings[0]


def test_product_autoscales_to_its_maximum_one_per_node():
    topology, engine, serve_config = script_topology(
        "ray-product", ["--device", "cpu", "--model", "/m", "--tensor-parallel-size", "1"])
    plan = plan_replicas(engine, serve_config, topology, nodes(0, 0))
    options = deployment_options(engine, serve_config, plan)
    assert options["autoscaling_config"]["max_replicas"] == 2 and "num_replicas" not in options
    assert options["max_replicas_per_node"] == 1
    assert any(line.startswith("autoscaling 1..2 replicas") for line in plan.lines())


def test_placement_group_refuses_a_backend_larger_than_a_node():
    topology, engine, serve_config = script_topology(
        "ray-placement-group.py", ["--tensor-parallel-size", "16"])
    with pytest.raises(cli.ScriptError, match="use ray-force-multi.py") as refused:
        plan_replicas(engine, serve_config, topology, nodes(8, 8))
    assert refused.value.code == cli.EXIT_USAGE


def test_bad_counts_are_usage_errors_before_anything_is_read():
    topology, engine, serve_config = script_topology("ray-force-multi.py",
                                                     ["--num-replicas", "0"])
    with pytest.raises(cli.ScriptError, match=">= 1"):
        plan_replicas(engine, serve_config, topology, nodes(8, 8))
    with pytest.raises(cli.ScriptError, match=">= 1"):
        offline_plan(engine, serve_config, topology)


def test_offline_plan_keeps_the_count_as_given():
    topology, engine, serve_config = script_topology("ray-single-gpu.py",
                                                     ["--num-replicas", "4"])
    plan = offline_plan(engine, serve_config, topology)
    assert plan.deployment_topology() == {"num_replicas": 4, "max_replicas_per_node": 8}
    auto, engine, serve_config = script_topology("ray-single-gpu.py", [])
    with pytest.raises(cli.ScriptError, match="auto"):
        offline_plan(engine, serve_config, auto)


def test_prefix_routing_asks_the_route_deployment_with_the_body():
    from common.deploy import llm_app, parse_script_args
    from common.deploy_options import FORWARD_BODY_ENV, controller_env

    topology, engine, serve_config = script_topology(
        "ray-force-multi.py", ["--routing", "prefix", "--prefix-imbalance", "8"])
    plan = plan_replicas(engine, serve_config, topology, nodes(8, 8))
    router = deployment_options(engine, serve_config, plan)["request_router_config"]
    assert router["request_router_class"] == "replica.prefix_routing:PrefixAffinityRouter"
    assert router["request_router_kwargs"] == {"imbalance": 8}
    assert controller_env("haproxy", "prefix")[FORWARD_BODY_ENV] == "1"
    assert FORWARD_BODY_ENV not in controller_env("haproxy", "spread")
    app = llm_app(None, engine, serve_config, plan)
    assert app._ingress_request_router is not None
    module = builders.load_script("ray-force-multi.py")
    with pytest.raises(cli.ScriptError, match="--routing prefix chooses replicas for Serve's "
                                              "HAProxy") as refused:
        parse_script_args(builders.script_parser_of(module),
                          ["--routing", "prefix", "--ingress", "proxy"])
    assert refused.value.code == cli.EXIT_USAGE


def _auto_routing(script: str, argv: list[str], cluster: list[NodeInfo],
                  refuses: str | None = None) -> tuple[str, str]:
    from common.deploy import parse_script_args

    module = builders.load_script(script)
    args, engine, serve_config, _ = parse_script_args(builders.script_parser_of(module), argv)
    assert serve_config.routing == "auto"
    plan = plan_replicas(engine, serve_config, module.topology(args, engine, serve_config),
                         cluster)
    said = resolve_routing(args, engine, serve_config, plan, refuses)
    assert args.routing == serve_config.routing and said
    return serve_config.routing, said


def test_auto_routing_is_prefix_only_where_measured_ahead_and_says_why():
    two = ["--tensor-parallel-size", "8", "--num-replicas", "2"]
    routing, said = _auto_routing("ray-force-multi.py", two, nodes(8, 8))
    assert routing == "prefix" and said.startswith("--routing auto: prefix (GPU engines, up to 2")
    # ray-product's autoscaling: its upper bound counts.
    routing, _ = _auto_routing("ray-product", ["--tensor-parallel-size", "8", "--min-replicas",
                                               "1", "--max-replicas", "2"], nodes(8, 8))
    assert routing == "prefix"
    assert _auto_routing("ray-placement-group.py", ["--tensor-parallel-size", "8"],
                         nodes(8, 8))[0] == "prefix"
    cases = [
        ("ray-force-multi.py", ["--device", "cpu", "--model", "/m", "--tensor-parallel-size",
                                "1", "--num-replicas", "2"], nodes(0, 0), None, "CPU engines"),
        ("ray-force-multi.py", [*two, "--ingress", "proxy"], nodes(8, 8), None,
         "--ingress proxy"),
        ("ray-single-gpu.py", [], nodes(1), None, "one replica"),
        ("ray-force-multi.py", ["--data-parallel-size", "8", "--enable-expert-parallel",
                                "--num-replicas", "2"], nodes(8, 8), None, "data-parallel"),
        ("ray-force-multi.py", two, nodes(8, 8), "the running Serve was started without X",
         "without X"),
    ]
    for script, argv, cluster, refuses, why in cases:
        routing, said = _auto_routing(script, argv, cluster, refuses)
        assert routing == "spread" and why in said, (argv, said)
    # A routing given stays, unsaid.
    topology, engine, serve_config = script_topology("ray-force-multi.py",
                                                     [*two, "--routing", "session"])
    said = resolve_routing(argparse.Namespace(), engine, serve_config,
                           plan_replicas(engine, serve_config, topology, nodes(8, 8)))
    assert serve_config.routing == "session" and said is None


def test_replicas_on_a_share_of_one_gpu():
    topology, engine, serve_config = script_topology("ray-single-gpu.py", [
        "--gpus-per-replica", "0.5", "--gpu-memory-utilization", "0.45",
        "--replicas-per-node", "16", "--max-replicas", "32"])
    plan = plan_replicas(engine, serve_config, topology, nodes(8, 8))
    assert (plan.replicas, plan.slots, plan.demand["GPU"]) == (32, 32, 0.5)
    options = deployment_options(engine, serve_config, plan)
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    assert "0.5 GPU on one node, at most 16 per node" in plan.lines()[0]
    # vLLM's memory share is of the whole GPU: the default 0.92 cannot fit two replicas.
    for argv, words in ((["--gpus-per-replica", "0.5"], "at most 0.5 .e.g. 0.46"),
                        (["--gpus-per-replica", "1.5"], r"in \(0, 1\]"),
                        (["--gpus-per-replica", "0.5", "--device", "cpu", "--model", "/m"],
                         "--device cuda")):
        with pytest.raises(cli.ScriptError, match=words) as refused:
            script_topology("ray-single-gpu.py", argv)
        assert refused.value.code == cli.EXIT_USAGE


def test_the_haproxy_switch_for_route_deployments_stays_within_the_deploy(monkeypatch):
    """Set while a script deploys (Serve reads it on import), gone after: a Ray cluster a test
    starts later in the same process must not run HAProxy for it."""
    import os

    from common.deploy import _serve_builds_route_deployments

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    with _serve_builds_route_deployments(True):
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    with _serve_builds_route_deployments(False):
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")   # the operator's own word stays
    with _serve_builds_route_deployments(True):
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
