"""Topology helpers: autoscaling settings, and pinning deployments to distinct nodes via a placement group."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from common import cli

# Ray gives every node this label; Serve accepts label selectors where it refuses a
# scheduling_strategy (so a deployment cannot be bound to a driver-made placement group).
NODE_ID_LABEL = "ray.io/node-id"
# Every node has one unit of the resource `node:<its IP>`; a pin asks for a sliver of it.
NODE_IP_RESOURCE_SHARE = 0.001
PIN_LABEL_EXAMPLE = "deepseek-serve/node"


@dataclass(frozen=True)
class NodePin:
    """What holds a deployment to one node: a label the operator gave the node (`ray start
    --labels`), its IP (the `node:<ip>` resource) or, failing both, its ID. A node that
    restarts keeps its labels and, on the same machine, its IP; it gets a new ID."""

    node_id: str
    kind: str       # "label" | "ip" | "node-id"
    key: str        # the label's key, "node:<ip>" or NODE_ID_LABEL
    value: str

    @property
    def survives_restart(self) -> bool:
        return self.kind != "node-id"

    def describe(self) -> str:
        return {"label": f"label {self.key}={self.value}", "ip": f"IP {self.value}",
                "node-id": f"node ID {self.value[:12]} (not kept across a restart)"}[self.kind]


def stable_pins(node_ids: Sequence[str], nodes: Sequence[Any],
                pin_label: str | None = None) -> list[NodePin]:
    """A pin per chosen node (`nodes`: common.cluster.NodeInfo of the cluster): by `pin_label` when
    given (each chosen node must carry a value of its own), else by IP where the chosen nodes'
    IPs differ, else (several raylets on one address) by node ID."""
    by_id = {n.node_id: n for n in nodes}
    missing = [i for i in node_ids if i not in by_id]
    if missing:
        raise cli.ScriptError(f"node(s) {', '.join(m[:12] for m in missing)} left the cluster "
                              "while being chosen; run the script again", cli.EXIT_UNHEALTHY)
    chosen = [by_id[i] for i in node_ids]
    if pin_label:
        values = [(n.labels or {}).get(pin_label) for n in chosen]
        if None in values or len(set(values)) < len(values):
            raise cli.ScriptError(
                f"--pin-label {pin_label}: every chosen node needs a value of its own for this "
                f"label (found {values}); start each node with `ray start "
                f"--labels='{{\"{pin_label}\": \"<name>\"}}'`", cli.EXIT_USAGE)
        return [NodePin(n.node_id, "label", pin_label, str(v)) for n, v in zip(chosen, values)]
    ips = [n.ip for n in chosen]
    if all(ips) and len(set(ips)) == len(ips):
        return [NodePin(n.node_id, "ip", f"node:{n.ip}", n.ip) for n in chosen]
    return [NodePin(n.node_id, "node-id", NODE_ID_LABEL, n.node_id) for n in chosen]


def pin_warning(pins: Sequence[NodePin]) -> str:
    """What an operator must know about pins that a node's restart would break ("" if none)."""
    if all(p.survives_restart for p in pins):
        return ""
    return (f"the chosen nodes share an IP, so deployments are pinned to node IDs: a node that "
            f"restarts comes back with a new ID and its deployment stays PENDING until this "
            f"script runs again. To pin to something a restart keeps, start each node with "
            f"`ray start --labels='{{\"{PIN_LABEL_EXAMPLE}\": \"<name>\"}}'` and pass "
            f"--pin-label {PIN_LABEL_EXAMPLE}")


def pin_to_node(options: dict[str, Any], pin: NodePin) -> dict[str, Any]:
    """Restrict a deployment's replicas (and, for tensor parallel, every bundle) to one node."""
    bundles = options.get("placement_group_bundles")
    if pin.kind == "ip":
        extra = {pin.key: NODE_IP_RESOURCE_SHARE}
        if bundles:
            options["placement_group_bundles"] = [{**b, **extra} for b in bundles]
        else:
            actor = dict(options.get("ray_actor_options", {}))
            actor["resources"] = {**actor.get("resources", {}), **extra}
            options["ray_actor_options"] = actor
        return options
    selector = {pin.key: pin.value}
    if bundles:
        options["placement_group_bundle_label_selector"] = [dict(selector) for _ in bundles]
    else:
        actor = dict(options.get("ray_actor_options", {}))
        actor["label_selector"] = selector
        options["ray_actor_options"] = actor
    return options


def pin_distinct_nodes(bundle: dict[str, float], count: int, timeout_s: float, name: str,
                       pin_label: str | None = None) -> list[NodePin]:
    """`count` distinct nodes with room for `bundle` each (pick_distinct_nodes), pinned by what
    survives a restart (stable_pins); says which node each pin holds, and warns where a pin
    would not survive one."""
    import sys

    from common.cluster import list_nodes

    pins = stable_pins(pick_distinct_nodes(bundle, count, timeout_s, name), list_nodes(),
                       pin_label)
    warning = pin_warning(pins)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    for index, pin in enumerate(pins):
        print(f"backend {index}: node {pin.node_id}, pinned by {pin.describe()}")
    return pins


def pick_distinct_nodes(bundle: dict[str, float], count: int, timeout_s: float,
                        name: str) -> list[str]:
    """Reserve `count` bundles on `count` different nodes at once (STRICT_SPREAD) and return their
    node IDs; the group is then removed so the deployments can take the same resources.

    Raises a ScriptError (EXIT_TIMEOUT) when Ray cannot place the group in time.
    """
    from ray.util.placement_group import (placement_group, placement_group_table,
                                          remove_placement_group)

    from common import cluster

    bundles = [dict(bundle) for _ in range(count)]
    group = placement_group(bundles, strategy="STRICT_SPREAD", name=name)
    started = time.monotonic()
    try:
        while True:
            ready, _ = _wait(group, 2.0)
            if ready:
                table = placement_group_table(group)
                nodes = table["bundles_to_node_id"]
                return [nodes[i] for i in range(count)]
            waited = time.monotonic() - started
            if int(waited) % 10 < 2:
                print(f"[{waited:5.0f}s] waiting for {count} distinct nodes with "
                      f"{cluster.format_shape(bundle)} free each (STRICT_SPREAD) ...",
                      flush=True)
            if waited > timeout_s:
                reason = cluster.explain(bundles, "STRICT_SPREAD")
                raise cli.ScriptError(f"no {count} distinct nodes with "
                                      f"{cluster.format_shape(bundle)} free each after "
                                      f"{timeout_s:.0f}s: {reason}", cli.EXIT_TIMEOUT)
    finally:
        remove_placement_group(group)


def _wait(group, seconds: float):
    import ray

    return ray.wait([group.ready()], timeout=seconds)


def autoscaling_config(min_replicas: int, max_replicas: int, target_ongoing_requests: float,
                       upscale_delay_s: float, downscale_delay_s: float,
                       initial_replicas: int | None = None) -> dict[str, Any]:
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise cli.ScriptError(f"need 0 <= --min-replicas ({min_replicas}) <= --max-replicas "
                              f"({max_replicas}) and --max-replicas >= 1", cli.EXIT_USAGE)
    config = {"min_replicas": min_replicas, "max_replicas": max_replicas,
              "target_ongoing_requests": target_ongoing_requests,
              "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s}
    if initial_replicas is not None:
        config["initial_replicas"] = initial_replicas
    return config
