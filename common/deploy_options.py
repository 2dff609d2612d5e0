"""Deployment options (pure): each replica's resources, request limits and version, the router's, the code shipped to replicas and Serve's controller env."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from common import replica_layout
from common.replica_layout import MultiNodeLayout
from common.replica_plan import ReplicaPlan
from replica.api import RETRY_AFTER_S
from replica.config import (AUTO_ROUTING, SESSION_HEADER, EngineConfig, ServeConfig,
                            operator_env_wins, replica_env)
from replica.parallel_layout import TP_ENV


def replica_resources(engine: EngineConfig, serve_config: ServeConfig,
                      layout: MultiNodeLayout | None = None,
                      gpu_share: float = 1.0) -> dict[str, Any]:
    """Ray resources of one replica, reserved exactly once.

    - cpu: the replica reserves CPUs only (the demo and the simulated-cluster tests).
    - cuda, one GPU per replica: the replica actor holds the GPU and vLLM runs in it.
    - cuda, tensor/pipeline parallel: the replica gets its own placement group, one bundle per
      GPU; the replica actor itself takes only CPU from bundle 0 and vLLM's Ray workers take the
      GPUs of the bundles (replica/engine.py points vLLM at the group). Ray Serve's own
      ray.serve.llm does the same. Asking `num_gpus=8` for the replica and letting vLLM reserve
      8 more for its workers books 16 GPUs per replica: the guide's "never reaches the second
      machine". A replica that fits one node is STRICT_PACK (all on one node); one that does
      not (`layout`, from common/replica_plan.py) is PACK over several nodes with each pipeline
      stage's bundles pinned to its node by a label, an IP or a node ID (common/replica_layout.py).
    """
    cpus = serve_config.cpus_per_replica
    env = {"env_vars": replica_env(engine, serve_config.env_vars)}
    if engine.device == "cpu":
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": 0, "runtime_env": env}}
    if not engine.uses_ray_workers:
        # gpu_share below 1: Ray puts several such replicas on one GPU (same CUDA device).
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpu_share,
                                      "runtime_env": env}}
    env["env_vars"][TP_ENV] = str(engine.tensor_parallel_size)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0, "runtime_env": env},
        "placement_group_bundles": replica_layout.bundles(engine.tensor_parallel_size,
                                                          engine.pipeline_parallel_size, cpus),
        "placement_group_strategy": "STRICT_PACK",
    }
    if engine.data_parallel_size > 1:
        # A rank's bundles go into its gang's group (Serve's gang scheduling, which refuses a
        # strategy of the replica's own); the rank keeps its workers on one node itself
        # (replica/data_parallel.rank_bundles).
        del options["placement_group_strategy"]
    elif layout is not None:
        options["placement_group_strategy"] = "PACK"
        options["placement_group_bundles"] = layout.bundles(cpus)
        selectors = layout.bundle_label_selectors()
        if selectors:
            options["placement_group_bundle_label_selector"] = selectors
    return options


def request_limits(serve_config: ServeConfig) -> dict[str, Any]:
    """The deployment options that bound the requests a replica holds and queues (Serve applies
    them without restarting replicas: a Serve config file carries them too)."""
    limits: dict[str, Any] = {"max_ongoing_requests": serve_config.max_ongoing_requests,
                              "max_queued_requests": serve_config.max_queued_requests}
    if serve_config.max_surge_percent > 0:
        limits["max_surge_percent"] = serve_config.max_surge_percent
    return limits


def deployment_options(engine: EngineConfig, serve_config: ServeConfig,
                       plan: ReplicaPlan | None = None, **topology: Any) -> dict[str, Any]:
    """All options of an LLM deployment: resources + request limits + the replicas of `plan`
    (common/replica_plan.py) + any other `topology` option."""
    options = replica_resources(engine, serve_config, plan.layout if plan else None,
                                plan.gpu_share if plan else 1.0)
    options.update(request_limits(serve_config))
    # Past max_ongoing + max_queued, Serve's proxy answers 503 at once instead of queueing
    # without bound; Retry-After tells clients (and load balancers) when to come back.
    options["backpressure_config"] = {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
    if plan is not None:
        options.update(plan.deployment_topology())
        if serve_config.routing == "prefix":
            from replica.prefix_routing import request_router_config

            options["request_router_config"] = request_router_config(
                serve_config.prefix_imbalance)
    options.update(topology)
    return options


def router_options(serve_config: ServeConfig, backends: int, replicas: int) -> dict[str, Any]:
    """The router's replicas and request limits: together they admit what the backends would
    each admit through Serve (--max-ongoing-requests, then --max-queued-requests), and answer
    503 past that (requests reach the backends' own servers, which Serve does not count).
    Like an engine replica, a router runs its code on Serve's own event loop (a second loop
    would hand every request and streamed chunk between threads) and answers errors in JSON."""
    env = replica_env(None, serve_config.env_vars)
    return {"num_replicas": replicas,
            "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}},
            # It takes no GPU, so a restart starts each new router before its old one stops.
            "max_surge_percent": 100,
            "max_ongoing_requests": max(1, math.ceil(
                backends * serve_config.max_ongoing_requests / replicas)),
            "max_queued_requests": serve_config.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S}}


def route_options(serve_config: ServeConfig) -> dict[str, Any]:
    """The route deployment's (--routing prefix; Serve runs its replicas on every proxy node,
    whatever their count says): no CPU reserved (it answers in about a millisecond); requests
    in flight unbounded in practice (HAProxy gives up on it after a few seconds: a 503)."""
    env = replica_env(None, serve_config.env_vars)
    return {"max_ongoing_requests": 4096,
            "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}}}


# Fields of ServeConfig that Serve applies to running replicas without restarting them (deployment
# options and proxy/script settings); every other field reaches the replica's constructor.
_LIGHTWEIGHT_SERVE_FIELDS = ("app_name", "route_prefix", "host", "port", "max_ongoing_requests",
                             "max_queued_requests", "timeout_s", "max_surge_percent", "routing",
                             "prefix_imbalance")


def deployment_version(engine: EngineConfig, serve_config: ServeConfig) -> str:
    """A version that changes exactly when running replicas must restart: the engine settings,
    the replica's own API settings and the code replicas run (the `replica` package; scripts,
    operator tools and the load generator do not count).

    Serve restarts every replica on each `serve.run` of an app built in Python (it gives such a
    deployment a random version). With a stable version, re-running a script with only
    lightweight changes (replicas, max_ongoing_requests, max_queued_requests, autoscaling) updates
    the running replicas in place, and anything else is a rolling restart (Serve compares
    ray_actor_options and placement separately: resources and env vars restart too)."""
    import dataclasses

    return _code_and_settings_version({"engine": dataclasses.asdict(engine),
                                       "serve": _restarting_serve_fields(serve_config)})


def router_version(serve_config: ServeConfig, backends: int) -> str:
    """The placement-group router's version, on the same terms as deployment_version: it
    changes with the router's own settings and code, not with a backend's engine, so that a
    redeploy moving the backends one at a time leaves the router running."""
    return _code_and_settings_version({"backends": backends,
                                       "serve": _restarting_serve_fields(serve_config)})


def _restarting_serve_fields(serve_config: ServeConfig) -> dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(serve_config).items()
            if k not in _LIGHTWEIGHT_SERVE_FIELDS}


def _code_and_settings_version(settings: dict[str, Any]) -> str:
    import hashlib
    import json

    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    root = replica_package_dir()
    for source in sorted(root.rglob("*.py")):
        digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def replica_package_dir() -> Path:
    import replica

    return Path(replica.__file__).resolve().parent


def replica_code_runtime_env() -> dict[str, Any]:
    """The job runtime_env that carries the `replica` package to every replica.

    Replicas unpickle classes of the `replica` package; without this they import it only where the
    driver's checkout happens to sit at the same path on their node (a restart after the checkout
    moved, or any replica on a node without a shared filesystem, fails with ModuleNotFoundError).
    Ray uploads the package to the cluster once, content-addressed, and Serve copies the job's
    runtime_env into each deployment: only what replicas run travels, so an edit elsewhere in
    the checkout (README, tests, scripts, common/) leaves the URI, and the running replicas,
    unchanged."""
    return {"py_modules": [str(replica_package_dir())], "excludes": ["__pycache__", "*.pyc"]}


# Serve's HTTP proxy sends a request to a replica on its own node whenever that one accepts it,
# which with vLLM's large max_ongoing_requests is always: a replica beside the proxy gets every
# request and the other nodes none. Serve's controller passes its environment to the proxies and
# replicas it starts, so these apply wherever the scripts start Serve, with no `ray start` setting.
SERVE_CONTROLLER_ENV = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
INGRESSES = {
    "proxy": {},
    # HAProxy on every proxy node in front of ingress replicas that serve HTTP themselves (direct
    # ingress), with Serve's throughput settings: user code on the replica's own event loop, which
    # is also the engine's, and gRPC between deployments (the router's hop).
    "haproxy": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # ...but the access log line of each request is written when it ends, not 1000 at a time
        # (operators look requests up by ID in the replica logs).
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
        # The router hands a whole request body to a backend in one gRPC message.
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(256 * 2**20),
        # A stopping replica stays reachable this long so that every node's HAProxy drops it
        # (the controller tells them within a second; HAProxy retries refused connections).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
        # HAProxy retries a request on another replica when the connection failed, and also
        # when the replica closed it without a byte of answer: a replica process that died or
        # ended itself (its engine died) under a request that had only just reached it.
        # Generating again has no side effect; a replica that answered anything is never retried.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    },
}
DEFAULT_INGRESS = "haproxy"


# HAProxy's balance algorithm per --routing: least connections, or a hash of the session header
# (HAProxy sends a request without one round robin). Under prefix, the application's route
# deployment chooses each POST's replica; the balance takes the rest.
HAPROXY_BALANCE = {"spread": "leastconn", "session": f"hdr({SESSION_HEADER})",
                   "prefix": "leastconn"}
HAPROXY_BALANCE_ENV = "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"
# HAProxy hands the consulted route deployment the request's body (Serve: headers only).
FORWARD_BODY_ENV = "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"


def auto_routing(engine: EngineConfig, ingress: str, replicas: int,
                 serve_refuses_prefix: str | None = None) -> tuple[str, str]:
    """--routing auto: prefix where the side-by-side run measured it ahead of spread (GPU
    engines, several replicas, HAProxy asking the route deployment: bench/README.md (f)), spread
    everywhere else; with the reason, which the deploy prints. `replicas`: the most the
    deployment runs (autoscaling's upper bound); `serve_refuses_prefix`: why an already running
    Serve cannot route by prefix, if it cannot."""
    if engine.device != "cuda":
        return "spread", ("CPU engines: asking the route deployment waits for cores the engines "
                          "hold, which cost more first-token time than the cache hits saved")
    if ingress != "haproxy":
        return "spread", "--ingress proxy routes by load (and x-session-id) only"
    if replicas < 2:
        return "spread", "one replica: nothing to choose between"
    if engine.data_parallel_size > 1:
        return "spread", "data-parallel ranks: prefix routing among them is not measured"
    if serve_refuses_prefix:
        return "spread", serve_refuses_prefix
    return "prefix", (f"GPU engines, up to {replicas} replicas: each request goes to the replica "
                      "that served the longest start of it, within --prefix-imbalance")


def resolve_routing(args: argparse.Namespace, engine: EngineConfig, serve_config: ServeConfig,
                    plan: ReplicaPlan, serve_refuses_prefix: str | None = None) -> str | None:
    """--routing auto made the routing auto_routing() picks for this plan (in the configs and
    the flags both); the line that says which and why, for the deploy to print."""
    if serve_config.routing != AUTO_ROUTING:
        return None
    serve_config.routing, why = auto_routing(
        engine, getattr(args, "ingress", DEFAULT_INGRESS), plan.replicas * plan.gang_size,
        serve_refuses_prefix)
    args.routing = serve_config.routing
    return f"--routing auto: {serve_config.routing} ({why})"


def controller_env(ingress: str, routing: str = "spread") -> dict[str, str]:
    """Env vars for Serve's controller, and through it its proxies and replicas; the same names
    set in this process's environment win."""
    routing_env = {HAPROXY_BALANCE_ENV: HAPROXY_BALANCE[routing]} if ingress == "haproxy" else {}
    if ingress == "haproxy" and routing == "prefix":
        routing_env[FORWARD_BODY_ENV] = "1"
    return operator_env_wins({**SERVE_CONTROLLER_ENV, **INGRESSES[ingress], **routing_env})
