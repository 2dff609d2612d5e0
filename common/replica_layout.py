"""Placing a replica larger than one node: one node per pipeline stage, each stage's tensor-parallel group kept on its node.

Why pins and not PACK alone: a replica's placement group can only be PACK to span nodes, and PACK
fills whatever is free (5 GPUs here, 11 there) when other work holds part of a node: vLLM would
then run a tensor-parallel group over the network, or refuse. So at deploy time the nodes for
each stage are chosen from the cluster's free GPUs (a node takes as many whole stages as it has
room for), and each stage's bundles are pinned to those nodes. Ray's PACK then places every
stage whole on one of its nodes; the replica checks its group once placed and refuses a split
(replica/parallel_layout.py) rather than run it.

The pin is what survives a node's restart (common/placement.py's NodePin): a label the operator
gave the nodes (--pin-label; a stage may then use any of the nodes chosen for it), else the
node's IP (the `node:<ip>` resource, where each stage has one node and the nodes' IPs differ),
else, as a last resort, its ID: a node that restarts joins with a new ID, so a replica pinned
by ID stays PENDING until the script is run again (the script warns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.placement import NODE_ID_LABEL, NODE_IP_RESOURCE_SHARE


@dataclass
class MultiNodeLayout:
    """Where the stages of a multi-node replica may go."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    # Per replica planned: the node of each stage (stage order).
    replicas: list[list[str]] = field(default_factory=list)
    # Node ID -> common.placement.NodePin of each planned node (none: pinned by node ID).
    pins: dict[str, Any] = field(default_factory=dict)

    def stage_nodes(self, stage: int) -> list[str]:
        """The nodes stage `stage` may use: the one planned for it in each replica."""
        return sorted({plan[stage] for plan in self.replicas})

    @property
    def pinned_by(self) -> str:
        """"label", "ip" or "node-id": what every stage's bundles are held by. A label may
        name several nodes per stage; an IP (a resource) only one; else the node ID."""
        nodes = {n for plan in self.replicas for n in plan}
        kinds = {getattr(self.pins.get(n), "kind", "node-id") for n in nodes}
        if kinds == {"label"}:
            return "label"
        one_node_per_stage = all(len(self.stage_nodes(s)) == 1
                                 for s in range(self.pipeline_parallel_size))
        return "ip" if kinds == {"ip"} and one_node_per_stage else "node-id"

    def bundle_label_selectors(self) -> list[dict[str, str]]:
        """One selector per GPU bundle, in bundle (stage) order; empty when pinned by IP."""
        by = self.pinned_by
        if by == "ip":
            return []
        selectors = []
        for stage in range(self.pipeline_parallel_size):
            nodes = self.stage_nodes(stage)
            if by == "label":
                key = self.pins[nodes[0]].key
                values = sorted({self.pins[n].value for n in nodes})
            else:
                key, values = NODE_ID_LABEL, nodes
            value = values[0] if len(values) == 1 else f"in({','.join(values)})"
            selectors += [{key: value}] * self.tensor_parallel_size
        return selectors

    def bundles(self, cpus_per_replica: float) -> list[dict[str, Any]]:
        """The replica's bundles (see bundles()); pinned by IP, each stage's also ask a sliver
        of their node's `node:<ip>` resource."""
        out = bundles(self.tensor_parallel_size, self.pipeline_parallel_size, cpus_per_replica)
        if self.pinned_by == "ip":
            for stage in range(self.pipeline_parallel_size):
                key = self.pins[self.stage_nodes(stage)[0]].key
                for index in range(stage * self.tensor_parallel_size,
                                   (stage + 1) * self.tensor_parallel_size):
                    out[index][key] = NODE_IP_RESOURCE_SHARE
        return out

    def pin_words(self) -> str:
        """How the stages are pinned, for the deploy's output."""
        return {"label": "by node label (kept across a node restart)",
                "ip": "by node IP (kept across a node restart)",
                "node-id": "by node ID (a restarted node gets a new one: run the script again "
                           "then, or pin by --pin-label)"}[self.pinned_by]

    def describe(self) -> str:
        """'node A: 8 GPU (stage 0), node B: 8 GPU (stage 1)' for each planned replica."""
        lines = []
        for index, plan in enumerate(self.replicas):
            per_node: dict[str, list[int]] = {}
            for stage, node in enumerate(plan):
                per_node.setdefault(node, []).append(stage)
            lines.append(f"replica {index}: " + ", ".join(
                f"node {node[:12]}: {len(stages) * self.tensor_parallel_size} GPU "
                f"(stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))})"
                for node, stages in per_node.items()))
        return "\n".join(lines)


def plan_stages(tensor_parallel_size: int, pipeline_parallel_size: int,
                nodes: dict[str, dict[str, float]], replicas: int,
                cpus_per_replica: float = 0.0) -> list[list[str]]:
    """For up to `replicas` replicas, the node of each pipeline stage, from the nodes' GPU and
    CPU amounts (free or total). A node takes as many whole stages as its GPUs allow; each
    replica uses the fewest nodes (those with the most room first) and its first stage's node
    also holds the replica actor's CPUs. Replicas that do not fit are left out."""
    left = {node: dict(res) for node, res in nodes.items()}
    plans: list[list[str]] = []
    for _ in range(replicas):
        trial = {node: dict(res) for node, res in left.items()}
        by_room = sorted(trial, key=lambda n: (-trial[n].get("GPU", 0.0), n))
        first = next((n for n in by_room
                      if trial[n].get("GPU", 0.0) + 1e-9 >= tensor_parallel_size
                      and trial[n].get("CPU", 0.0) + 1e-9 >= cpus_per_replica), None)
        if first is None:
            break
        trial[first]["CPU"] = trial[first].get("CPU", 0.0) - cpus_per_replica
        plan: list[str] = []
        for node in [first] + [n for n in by_room if n != first]:
            res = trial[node]
            while (len(plan) < pipeline_parallel_size
                   and res.get("GPU", 0.0) + 1e-9 >= tensor_parallel_size):
                res["GPU"] -= tensor_parallel_size
                plan.append(node)
        if len(plan) < pipeline_parallel_size:
            break
        plans.append(plan)
        left = trial
    return plans


def bundles(tensor_parallel_size: int, pipeline_parallel_size: int,
            cpus_per_replica: float) -> list[dict[str, Any]]:
    """One bundle per GPU in stage order; bundle 0 also holds the replica actor's CPUs."""
    count = tensor_parallel_size * pipeline_parallel_size
    return [{"CPU": cpus_per_replica, "GPU": 1}] + [{"GPU": 1} for _ in range(count - 1)]
