"""Topology helpers: autoscaling settings, and pinning deployments to distinct nodes via a placement group."""
from __future__ import annotations

import time
from typing import Any

from common import cli

# Ray gives every node this label; Serve accepts label selectors where it refuses a
# scheduling_strategy (so a deployment cannot be bound to a driver-made placement group).
NODE_ID_LABEL = "ray.io/node-id"


def pin_to_node(options: dict[str, Any], node_id: str) -> dict[str, Any]:
    """Restrict a deployment's replicas (and, for tensor parallel, every bundle) to one node."""
    selector = {NODE_ID_LABEL: node_id}
    if "placement_group_bundles" in options:
        options["placement_group_bundle_label_selector"] = \
            [dict(selector) for _ in options["placement_group_bundles"]]
    else:
        actor = dict(options.get("ray_actor_options", {}))
        actor["label_selector"] = selector
        options["ray_actor_options"] = actor
    return options


def pick_distinct_nodes(bundle: dict[str, float], count: int, timeout_s: float,
                        name: str) -> list[str]:
    """Reserve `count` bundles on `count` different nodes at once (STRICT_SPREAD) and return their
    node IDs; the group is then removed so the deployments can take the same resources.

    Raises a ScriptError (EXIT_TIMEOUT) when Ray cannot place the group in time.
    """
    from ray.util.placement_group import (placement_group, placement_group_table,
                                          remove_placement_group)

    from ops import cluster

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
