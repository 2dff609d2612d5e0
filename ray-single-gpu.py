#!/usr/bin/env python3
"""High-density deployment: one replica per GPU, each loading the whole model (no tensor parallelism).

For GPUs with 64 GB or more (A100-80G, H100): up to 16 replicas, at most 8 per node. Use
ray-force-multi.py when the model does not fit one GPU.
"""
from __future__ import annotations

import sys

from common import cli
from common.deploy import script_main
from common.replica_plan import Topology, check_gpu_share
from replica.config import EngineConfig, ServeConfig

# The guide's memory settings for 64 GB GPUs: most of the card for weights + KV cache, and a
# context that leaves KV room for many concurrent sequences.
ENGINE_DEFAULTS = EngineConfig(gpu_memory_utilization=0.92, max_model_len=8192)


def add_topology_args(group) -> None:
    cli.add_flag(group, "--num-replicas", env="NUM_REPLICAS", default="auto",
                 help="replicas to run; auto: one per GPU in the cluster (capped below)")
    cli.add_flag(group, "--max-replicas", env="MAX_REPLICAS", type=int, default=16,
                 help="upper bound on replicas")
    cli.add_flag(group, "--replicas-per-node", env="REPLICAS_PER_NODE", type=int, default=8,
                 help="at most this many replicas on one node (max_replicas_per_node)")
    cli.add_flag(group, "--gpus-per-replica", env="GPUS_PER_REPLICA", type=float, default=1.0,
                 help="the share of one GPU each replica takes: below 1, several replicas share "
                      "a GPU (0.5: two per GPU; a small model, e.g. an R1 distill), each with "
                      "--gpu-memory-utilization at most this share; raise --replicas-per-node "
                      "and --max-replicas to match. Replicas on one GPU start their engines one "
                      "at a time, unless --kv-cache-memory-bytes fixes their caches")


def topology(args, engine: EngineConfig, serve_config: ServeConfig) -> Topology:
    if engine.gpus_per_replica != 1:
        raise cli.ScriptError("ray-single-gpu.py runs one GPU per replica; for tensor "
                              "parallelism use ray-force-multi.py", cli.EXIT_USAGE)
    check_gpu_share(engine, args.gpus_per_replica)
    # CPU engines: no GPU count to fill, so `auto` is one replica.
    return Topology(replicas=args.num_replicas, max_replicas=args.max_replicas,
                    replicas_per_node=args.replicas_per_node,
                    auto_default=None if engine.device == "cuda" else 1,
                    gpu_share=args.gpus_per_replica)


def main(argv: list[str] | None = None) -> int:
    return script_main(argv, description=__doc__, topology=topology,
                       add_topology_args=add_topology_args, engine_defaults=ENGINE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
