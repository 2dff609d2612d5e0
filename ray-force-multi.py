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

from common import cli
from common.deploy import script_main
from common.replica_plan import Topology
from replica.config import EngineConfig, ServeConfig

ENGINE_DEFAULTS = EngineConfig(tensor_parallel_size=8)


def add_topology_args(group) -> None:
    cli.add_flag(group, "--num-replicas", env="NUM_REPLICAS", type=int, default=2,
                 help="replicas, each on its own node; with --data-parallel-size: gangs of "
                      "that many ranks (default then 1)")


def topology(args, engine: EngineConfig, serve_config: ServeConfig) -> Topology:
    return Topology(replicas=args.num_replicas, one_per_node=True, pin_label=args.pin_label)


def main(argv: list[str] | None = None) -> int:
    return script_main(argv, description=__doc__, topology=topology,
                       add_topology_args=add_topology_args, engine_defaults=ENGINE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
