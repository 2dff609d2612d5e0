#!/usr/bin/env python3
"""Fixed multi-replica deployment: 2 replicas x tensor parallel 8, each on its own node.

Each replica reserves its GPUs once, as its own placement group (one GPU per bundle, STRICT_PACK,
so all on one node), and vLLM's tensor-parallel workers run in that group. On the reference
cluster (2 nodes x 8 GPUs) the two replicas therefore land on the two nodes. A replica larger
than one node (e.g. --num-replicas 1 --tensor-parallel-size 8 --pipeline-parallel-size 2) spans
nodes, one pipeline stage per node.
"""
from __future__ import annotations

import sys

from common import cli, preflight
from replica.config import EngineConfig, ServeConfig
from common.deploy import llm_app, multi_node_layout, script_main
from common.deploy_options import one_replica_per_node, replica_demand

ENGINE_DEFAULTS = EngineConfig(tensor_parallel_size=8)


def add_topology_args(group) -> None:
    cli.add_flag(group, "--num-replicas", env="NUM_REPLICAS", type=int, default=2,
                 help="replicas, each on its own node")


def build(args, engine: EngineConfig, serve_config: ServeConfig):
    if args.num_replicas < 1:
        raise cli.ScriptError("--num-replicas must be >= 1", cli.EXIT_USAGE)
    spread = one_replica_per_node(engine)
    layout = multi_node_layout(engine, serve_config, args.num_replicas, args.pin_label)
    demand = replica_demand(engine, serve_config, layout)
    stages = engine.pipeline_parallel_size if layout else 1
    slots = preflight.replica_slots(demand, spread.get("max_replicas_per_node"), stages=stages)
    preflight.report_capacity(args.num_replicas, demand, slots, serve_config.timeout_s, stages)
    if layout:
        print("each replica spans nodes, one pipeline stage per node, pinned "
              f"{layout.pin_words()}:\n" + layout.describe())
    return llm_app(engine, serve_config, layout=layout, num_replicas=args.num_replicas,
                   **spread)


def main(argv: list[str] | None = None) -> int:
    return script_main(argv, description=__doc__, build=build,
                       add_topology_args=add_topology_args, engine_defaults=ENGINE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
