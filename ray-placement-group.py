#!/usr/bin/env python3
"""Placement-group deployment: two backends pinned to two different nodes, behind a round-robin router.

A placement group with one bundle per backend and STRICT_SPREAD picks distinct nodes that can
each hold a backend. Serve refuses a scheduling_strategy in ray_actor_options, so a deployment
cannot be bound to a bundle of a driver-made group directly: each backend is pinned instead to
its bundle's node, once the group has been released, by something the node keeps when it
restarts (a label given with --pin-label, else its IP; common/placement.py). The router forwards
each request to a backend's own HTTP server, and skips a backend that is down.
"""
from __future__ import annotations

import sys

from common import cli
from common.deploy import configure, script_main
from common.deploy_options import deployment_options, router_options
from common.placement import pick_distinct_nodes, pin_to_node, pin_warning, stable_pins
from common.replica_plan import ReplicaPlan, Topology
from replica.config import EngineConfig, ServeConfig

ENGINE_DEFAULTS = EngineConfig(tensor_parallel_size=8)


def add_topology_args(group) -> None:
    cli.add_flag(group, "--num-backends", env="NUM_BACKENDS", type=cli.positive_int, default=2,
                 help="backend deployments, each pinned to its own node")
    cli.add_flag(group, "--router-replicas", env="ROUTER_REPLICAS", type=cli.positive_int,
                 default=1,
                 help="replicas of the router; each spreads its requests round-robin over every "
                      "backend (more carry more concurrent streams; the split stays even per "
                      "router, not request by request)")
    cli.add_flag(group, "--backend-port", env="BACKEND_PORT", type=cli.port_number, default=0,
                 help="port of each backend's own HTTP server, on its node's address, which "
                      "the router forwards requests to (0: any free port); it must be reachable "
                      "from every node")


def topology(args, engine: EngineConfig, serve_config: ServeConfig) -> Topology:
    return Topology(replicas=args.num_backends, one_per_node=True, span_nodes=False,
                    pin_label=args.pin_label)


def build(args, engine: EngineConfig, serve_config: ServeConfig, plan: ReplicaPlan):
    from replica.ingress import LLMBackend, RoundRobinRouter

    nodes = pick_distinct_nodes(plan.demand, args.num_backends, serve_config.timeout_s,
                                name=f"{serve_config.app_name}-node-picker")
    from common.cluster import list_nodes

    pins = stable_pins(nodes, list_nodes(), args.pin_label)
    warning = pin_warning(pins)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    backends = []
    for index, pin in enumerate(pins):
        print(f"backend {index}: node {pin.node_id}, pinned by {pin.describe()}")
        # Each backend is a deployment of one replica on its own node.
        options = pin_to_node(deployment_options(engine, serve_config, num_replicas=1), pin)
        backends.append(configure(LLMBackend, f"LLMBackend{index}", engine, serve_config,
                                  options, version_note=f"-port{args.backend_port}")
                        .bind(engine, serve_config, args.backend_port))
    # @serve.deployment makes the class a Deployment; mypy keeps a decorated class's own type
    router = RoundRobinRouter.options(  # type: ignore[attr-defined]
        **router_options(serve_config, args.num_backends, args.router_replicas))
    return router.bind(serve_config, *backends)


def main(argv: list[str] | None = None) -> int:
    return script_main(argv, description=__doc__, topology=topology, build=build,
                       add_topology_args=add_topology_args, engine_defaults=ENGINE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
