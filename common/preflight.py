"""Checks before deploying: how many replicas the cluster can hold (model fit: common/layout.py)."""
from __future__ import annotations

import math
import sys

from common import cli


def alive_node_resources() -> list[dict[str, float]]:
    from common.cluster import ray_nodes

    return [dict(n["Resources"]) for n in ray_nodes() if n.get("Alive")]


def cluster_total(resource: str) -> float:
    return sum(r.get(resource, 0.0) for r in alive_node_resources())


def slots_on_node(node: dict[str, float], demand: dict[str, float]) -> int:
    """How many replicas with `demand` fit on one node's total resources."""
    counts = []
    for name, amount in demand.items():
        if amount > 0:
            counts.append(math.floor(node.get(name, 0.0) / amount + 1e-9))
    return min(counts) if counts else 0


def replica_slots(demand: dict[str, float], replicas_per_node: int | None = None,
                  nodes: list[dict[str, float]] | None = None, stages: int = 1) -> int:
    """Replicas the whole cluster can hold, each node capped at `replicas_per_node`. With
    `stages` > 1 a replica is that many pipeline stages of `demand` (its GPUs on one node
    each, a node taking as many whole stages as it has room for; the CPUs on the first)."""
    nodes = nodes if nodes is not None else alive_node_resources()
    if stages > 1:
        from common.replica_layout import plan_stages

        tp = max(int(demand.get("GPU", 0)), 1)
        amounts = {str(i): node for i, node in enumerate(nodes)}
        most = int(sum(node.get("GPU", 0.0) for node in nodes) // (tp * stages))
        return len(plan_stages(tp, stages, amounts, most, demand.get("CPU", 0.0)))
    total = 0
    for node in nodes:
        fit = slots_on_node(node, demand)
        total += min(fit, replicas_per_node) if replicas_per_node else fit
    return total


def resolve_replicas(requested: str | int, slots: int, max_replicas: int,
                     auto_default: int | None = None) -> int:
    """The replica count for --num-replicas (a number or 'auto'), or a usage ScriptError."""
    if str(requested).strip().lower() == "auto":
        count = auto_default if auto_default is not None else min(slots, max_replicas)
        if count < 1:
            raise cli.ScriptError("no node can hold even one replica; see "
                                  "`python check_cluster.py`", cli.EXIT_USAGE)
        return count
    try:
        count = int(requested)
    except ValueError:
        raise cli.ScriptError(f"--num-replicas must be a number or 'auto', got {requested!r}",
                              cli.EXIT_USAGE) from None
    if count < 1:
        raise cli.ScriptError("--num-replicas must be >= 1", cli.EXIT_USAGE)
    if count > max_replicas:
        raise cli.ScriptError(f"--num-replicas {count} is above --max-replicas {max_replicas}",
                              cli.EXIT_USAGE)
    return count


def report_capacity(replicas: int, demand: dict[str, float], slots: int, timeout_s: float,
                    stages: int = 1) -> None:
    """Say up front how many replicas the cluster can hold, and warn when some cannot fit."""
    from common.cluster import format_shape

    if stages > 1:
        needs = (f"{stages} pipeline stages of {demand.get('GPU', 0):g} GPUs, each stage on one "
                 f"node (e.g. {stages} nodes with {demand.get('GPU', 0):g} free GPUs each)")
    else:
        needs = f"{format_shape(demand)} on one node"
    print(f"{replicas} replica(s), each needing {needs}; the cluster's nodes can hold {slots}")
    if slots < replicas:
        print(f"warning: only {slots} of {replicas} replica(s) fit the cluster's nodes; the rest "
              f"will stay pending, and the wait ends with an error after --timeout "
              f"{timeout_s:.0f}s", file=sys.stderr)
