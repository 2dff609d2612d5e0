#!/usr/bin/env python3
"""Placement-group deployment: two backends pinned to two different nodes, behind a round-robin router.

A placement group with one bundle per backend and STRICT_SPREAD picks distinct nodes that can
each hold a backend. Serve refuses a scheduling_strategy in ray_actor_options, so a deployment
cannot be bound to a bundle of a driver-made group directly: each backend is pinned instead to
its bundle's node, once the group has been released, by something the node keeps when it
restarts (a label given with --pin-label, else its IP; common/placement.py). The router forwards
each request to a backend's own HTTP server, and skips a backend that is down. Run again on a
running application, it keeps the backends' nodes and moves the backends whose settings changed
one at a time (common/backend_stages.py).
"""
from __future__ import annotations

import sys

from common import cli
from common.backend_stages import backend_record, kept_pins, running_backends, stage_versions
from common.deploy import StagedApp, configure, script_main
from common.deploy_options import (deployment_options, deployment_version, router_options,
                                   router_version)
from common.placement import pin_distinct_nodes, pin_to_node
from common.replica_plan import ReplicaPlan, Topology
from replica.config import EngineConfig, ServeConfig
from replica.ray_compat import with_version

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
    if engine.data_parallel_size > 1:
        raise cli.ScriptError("--data-parallel-size: each backend here is one replica pinned to "
                              "its node; data-parallel gangs are ray-force-multi.py's and "
                              "ray-product's", cli.EXIT_USAGE)
    return Topology(replicas=args.num_backends, one_per_node=True, span_nodes=False,
                    pin_label=args.pin_label)


def build(args, engine: EngineConfig, serve_config: ServeConfig, plan: ReplicaPlan):
    from replica.ingress import LLMBackend, RoundRobinRouter

    from common.cluster import list_nodes

    # A running application keeps its backends' nodes (they hold the GPUs a fresh pick would
    # wait for); else each backend gets a node of its own.
    running = running_backends(serve_config.app_name, args.num_backends)
    kept = kept_pins(running, list_nodes(), args.pin_label)
    pins = kept or pin_distinct_nodes(plan.demand, args.num_backends, serve_config.timeout_s,
                                      f"{serve_config.app_name}-node-picker", args.pin_label)
    if kept:
        print("the application runs: its backends stay on their nodes ("
              + ", ".join(pin.describe() for pin in kept) + ")")
    version = deployment_version(engine, serve_config) + f"-port{args.backend_port}"

    def app(versions: list[str]):
        backends = []
        for index, (pin, backend_version) in enumerate(zip(pins, versions)):
            # Each backend is a deployment of one replica on its own node, recording its
            # version and pin in Serve's state for the next run.
            options = pin_to_node(deployment_options(engine, serve_config, num_replicas=1), pin)
            options["user_config"] = backend_record(backend_version, pin)
            backends.append(configure(LLMBackend, f"LLMBackend{index}", engine, serve_config,
                                      options, version=backend_version)
                            .bind(engine, serve_config, args.backend_port))
        # @serve.deployment makes the class a Deployment; mypy keeps a decorated class's own type
        router = with_version(RoundRobinRouter.options(  # type: ignore[attr-defined]
            **router_options(serve_config, args.num_backends, args.router_replicas)),
            router_version(serve_config, args.num_backends))
        return router.bind(serve_config, *backends)

    stages = stage_versions([r.version for r in running if r], version) if kept else []
    if len(stages) < 2:
        return app([version] * len(pins))
    # A backend holds its node's GPUs, so Serve stops it before its replacement starts: moving
    # the backends one at a time keeps the others serving (the router skips the one down).
    print(f"redeploying the {len(stages)} changed backends one at a time")
    return StagedApp([(f"backend {index} on the new version", app(versions))
                      for index, versions in stages])


def main(argv: list[str] | None = None) -> int:
    return script_main(argv, description=__doc__, topology=topology, build=build,
                       add_topology_args=add_topology_args, engine_defaults=ENGINE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
