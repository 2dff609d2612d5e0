"""Deploying an application: replica options per device, the scripts' shared main, readiness wait."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import cli, layout, preflight, replica_layout
from common.replica_layout import MultiNodeLayout
from replica import ray_compat
from replica.api import RETRY_AFTER_S
from replica.parallel_layout import TP_ENV
from common.options import (add_engine_args, add_serve_args, engine_config_from_args,
                            serve_config_from_args)
from replica.config import EngineConfig, ServeConfig, operator_env_wins, replica_env


def replica_resources(engine: EngineConfig, serve_config: ServeConfig,
                      layout: MultiNodeLayout | None = None) -> dict[str, Any]:
    """Ray resources of one replica, reserved exactly once.

    - cpu: the replica reserves CPUs only (the demo and the simulated-cluster tests).
    - cuda, one GPU per replica: the replica actor holds the GPU and vLLM runs in it.
    - cuda, tensor/pipeline parallel: the replica gets its own placement group, one bundle per
      GPU; the replica actor itself takes only CPU from bundle 0 and vLLM's Ray workers take the
      GPUs of the bundles (replica/engine.py points vLLM at the group). Ray Serve's own
      ray.serve.llm does the same. Asking `num_gpus=8` for the replica and letting vLLM reserve
      8 more for its workers books 16 GPUs per replica: the guide's "never reaches the second
      machine". A replica that fits one node is STRICT_PACK (all on one node); one that does
      not (`layout`, from multi_node_layout) is PACK over several nodes with each pipeline
      stage's bundles held on one node by label selectors (common/replica_layout.py).
    """
    cpus = serve_config.cpus_per_replica
    env = {"env_vars": replica_env(engine, serve_config.env_vars)}
    if engine.device == "cpu":
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": 0, "runtime_env": env}}
    if not engine.uses_ray_workers:
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": 1, "runtime_env": env}}
    env["env_vars"][TP_ENV] = str(engine.tensor_parallel_size)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0, "runtime_env": env},
        "placement_group_bundles": replica_layout.bundles(engine.tensor_parallel_size,
                                                          engine.pipeline_parallel_size, cpus),
        "placement_group_strategy": "STRICT_PACK",
    }
    if layout is not None:
        options["placement_group_strategy"] = "PACK"
        options["placement_group_bundle_label_selector"] = layout.bundle_label_selectors()
    return options


def multi_node_layout(engine: EngineConfig, serve_config: ServeConfig,
                      replicas: int) -> MultiNodeLayout | None:
    """None when a replica fits one node of the cluster (STRICT_PACK); else the nodes of each
    pipeline stage for up to `replicas` replicas, chosen from the GPUs free now (or, when none
    fit now, from the nodes' totals: the replica then waits for what others hold)."""
    if not engine.uses_ray_workers:
        return None
    from ops import cluster

    nodes = [n for n in cluster.list_nodes() if n.alive]
    largest = max((n.gpus_total for n in nodes), default=0.0)
    if engine.gpus_per_replica <= largest:
        return None
    tp, pp = engine.tensor_parallel_size, engine.pipeline_parallel_size
    if tp > largest:
        raise cli.ScriptError(
            f"--tensor-parallel-size {tp} is more GPUs than any node has (largest: "
            f"{largest:g}); a tensor-parallel group must sit on one node. Span nodes with "
            f"--pipeline-parallel-size (e.g. --tensor-parallel-size {int(largest)} "
            f"--pipeline-parallel-size {-(-engine.gpus_per_replica // max(int(largest), 1))})",
            cli.EXIT_USAGE)
    cpus = serve_config.cpus_per_replica
    for amounts in ({n.node_id: {"GPU": n.gpus_available, "CPU": n.cpus_available}
                     for n in nodes},
                    {n.node_id: {"GPU": n.gpus_total, "CPU": n.cpus_total} for n in nodes}):
        plans = replica_layout.plan_stages(tp, pp, amounts, replicas, cpus)
        if plans:
            return MultiNodeLayout(tp, pp, plans)
    raise cli.ScriptError(
        f"a replica of tensor parallel {tp} x pipeline parallel {pp} needs {pp} stage(s) of "
        f"{tp} GPUs, each stage on one node; the cluster's nodes cannot hold them (see "
        f"`python check_cluster.py`)", cli.EXIT_USAGE)


def one_replica_per_node(engine: EngineConfig) -> dict[str, Any]:
    """Topology options that put every replica on a distinct node.

    A tensor-parallel replica holds its own placement group of all the GPUs it uses, so on 8-GPU
    nodes two TP=8 replicas cannot share a node (and Serve refuses max_replicas_per_node together
    with placement_group_bundles). Any other replica gets max_replicas_per_node=1.
    """
    return {} if engine.uses_ray_workers else {"max_replicas_per_node": 1}


def replica_demand(engine: EngineConfig, serve_config: ServeConfig,
                   layout: MultiNodeLayout | None = None) -> dict[str, float]:
    """What one replica needs on a single node, for preflight checks; for a multi-node replica
    (`layout`), what its first pipeline stage needs on its node (each other stage: the GPUs)."""
    if engine.device == "cpu":
        return {"CPU": serve_config.cpus_per_replica}
    if layout is not None:
        return {"CPU": serve_config.cpus_per_replica, "GPU": float(engine.tensor_parallel_size)}
    return {"CPU": serve_config.cpus_per_replica, "GPU": float(engine.gpus_per_replica)}


def deployment_options(engine: EngineConfig, serve_config: ServeConfig,
                       layout: MultiNodeLayout | None = None, **topology: Any) -> dict[str, Any]:
    """All options of an LLM deployment: resources + request limits + health + topology."""
    options = replica_resources(engine, serve_config, layout)
    options.update(
        max_ongoing_requests=serve_config.max_ongoing_requests,
        max_queued_requests=serve_config.max_queued_requests,
        # Past max_ongoing + max_queued, Serve's proxy answers 503 at once instead of queueing
        # without bound; Retry-After tells clients (and load balancers) when to come back.
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    )
    if serve_config.max_surge_percent > 0:
        options["max_surge_percent"] = serve_config.max_surge_percent
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
            "max_ongoing_requests": max(1, math.ceil(
                backends * serve_config.max_ongoing_requests / replicas)),
            "max_queued_requests": serve_config.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S}}


# Fields of ServeConfig that Serve applies to running replicas without restarting them (deployment
# options and proxy/script settings); every other field reaches the replica's constructor.
_LIGHTWEIGHT_SERVE_FIELDS = ("app_name", "route_prefix", "host", "port", "max_ongoing_requests",
                             "max_queued_requests", "timeout_s", "max_surge_percent")


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
    import hashlib
    import json

    digest = hashlib.sha256()
    settings = {"engine": dataclasses.asdict(engine),
                "serve": {k: v for k, v in dataclasses.asdict(serve_config).items()
                          if k not in _LIGHTWEIGHT_SERVE_FIELDS}}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    root = replica_package_dir()
    for source in sorted(root.rglob("*.py")):
        digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def replica_package_dir() -> Path:
    import replica

    return Path(replica.__file__).resolve().parent


def configure(deployment: Any, name: str, engine: EngineConfig, serve_config: ServeConfig,
              options: dict[str, Any], version_note: str = "") -> Any:
    """An LLM deployment with its options and the version that keeps in-place updates working;
    `options` from deployment_options(), possibly pinned (common/placement.py); `version_note`:
    any other constructor argument whose change must restart the replicas."""
    return ray_compat.with_version(deployment.options(name=name, **options),
                        deployment_version(engine, serve_config) + version_note)


def llm_app(engine: EngineConfig, serve_config: ServeConfig, name: str = "LLMDeployment",
            layout: MultiNodeLayout | None = None, **topology: Any):
    """The Serve application of one LLM deployment answering HTTP itself."""
    from replica.ingress import LLMDeployment

    options = deployment_options(engine, serve_config, layout, **topology)
    return configure(LLMDeployment, name, engine, serve_config, options).bind(engine,
                                                                             serve_config)


# ---- the scripts' shared main --------------------------------------------------------------------

VLLM_EPILOG = ("Any other `vllm serve` flag is passed to every replica's engine and OpenAI "
               "server, e.g. --quantization fp8 --kv-cache-dtype fp8 --enable-expert-parallel "
               "--enable-prefix-caching --speculative-config JSON, or --enable-auto-tool-choice "
               "--tool-call-parser hermes; --help-vllm lists them, in vLLM's own groups. The "
               "flags above win where both name the same setting. Every flag is checked with "
               "vLLM's own parser before anything is deployed.")


def check_vllm_args(engine: EngineConfig, vllm_args: list[str]) -> list[str]:
    """Problems with the flags this script does not know and with --engine-kwargs, as vLLM's
    own `vllm serve` parser and AsyncEngineArgs fields see them, before anything is deployed
    (vLLM is imported only then: it takes seconds)."""
    from replica.vllm_app import serve_args

    problems = check_engine_kwargs(engine)
    if problems:
        return problems
    try:
        args = serve_args(engine.engine_kwargs(), vllm_args, exit_on_error=False,
                          extra=engine.extra_engine_kwargs)
    except Exception as exc:  # noqa: BLE001 - argparse and vLLM both raise their own types
        return [f"{' '.join(vllm_args)}: {exc}"]
    if int(getattr(args, "data_parallel_size", 1) or 1) > 1:
        problems.append(
            f"--data-parallel-size {args.data_parallel_size}: vLLM's data parallelism inside "
            "one Serve replica is not supported here; Serve replicas are the data parallelism: "
            "use --num-replicas (or --min/--max-replicas), each replica one engine")
    return problems


def check_engine_kwargs(engine: EngineConfig) -> list[str]:
    """--engine-kwargs keys that are no AsyncEngineArgs field of the installed vLLM (with the
    close matches), or that a flag of ours sets (the flag must be used: one place per
    setting, so --help and the deployed replica cannot disagree)."""
    import difflib

    extra = engine.extra_engine_kwargs
    if not extra:
        return []
    from common.options import flag_of_engine_field
    from replica import vllm_compat
    from replica.vllm_compat import vllm_version

    fields = vllm_compat.engine_arg_fields()
    ours = set(engine.engine_kwargs())
    problems = []
    for key in extra:
        flag = flag_of_engine_field(key)
        if flag or key in ours:
            problems.append(f"--engine-kwargs {key!r}: set by "
                            f"{flag or 'this script itself'}; use "
                            f"{'the flag' if flag else 'the script flags'} instead")
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"--engine-kwargs {key!r}: vLLM {vllm_version()} has no engine "
                            f"argument of that name{hint}")
    return problems


BuildFn = Callable[[argparse.Namespace, EngineConfig, ServeConfig], Any]


class VllmHelpAction(argparse.Action):
    """--help-vllm: like --help, for vLLM's own serve options (imported only then: seconds)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from replica.vllm_app import serve_help

        print(serve_help())
        parser.exit()


def script_parser(description: str | None,
                  add_topology_args: Callable[[argparse._ArgumentGroup], None] | None = None,
                  engine_defaults: EngineConfig | None = None,
                  serve_defaults: ServeConfig | None = None) -> argparse.ArgumentParser:
    """A deployment script's flags (also what its application builder parses: common/builders.py)."""
    from common.serve_config import add_config_flags

    parser = cli.make_parser(description, VLLM_EPILOG)
    cli.add_address_flag(parser)
    cli.add_flag(parser, "--proxy-location", env="PROXY_LOCATION", default="EveryNode",
                 choices=["EveryNode", "HeadOnly", "Disabled"],
                 help="where Serve runs HTTP proxies (EveryNode: any node's IP answers)")
    cli.add_flag(parser, "--ingress", env="INGRESS", default=DEFAULT_INGRESS,
                 choices=list(INGRESSES),
                 help="what answers on --port: haproxy = Serve's HAProxy in front of replicas "
                      "that serve HTTP themselves (direct ingress: no Python proxy hop; replicas "
                      "listen on ports 30000-31000, which must be open between nodes); proxy = "
                      "Serve's Python proxy actors. Applies when this script starts Serve")
    parser.add_argument("--help-vllm", action=VllmHelpAction,
                        help="show vLLM's own `vllm serve` options (any of them may be added "
                             "to this script's flags) and exit")
    if add_topology_args:
        add_topology_args(parser.add_argument_group("topology"))
    add_engine_args(parser, engine_defaults)
    add_serve_args(parser, serve_defaults)
    layout.add_layout_flags(parser)
    add_config_flags(parser)
    return parser


def parse_script_args(parser: argparse.ArgumentParser, argv: list[str] | None
                      ) -> tuple[argparse.Namespace, EngineConfig, ServeConfig,
                                 layout.LayoutRequest]:
    """Flags -> configs, checked; unknown flags are vLLM's (checked by vLLM's own parser)."""
    args, vllm_args = parser.parse_known_args(argv)
    engine = engine_config_from_args(args)
    serve_config = serve_config_from_args(args)
    requested_layout = layout.set_aside_auto(engine)
    requested_layout.min_sequences = args.min_sequences
    requested_layout.check = not args.no_layout_check
    problems = engine.validate()
    if vllm_args or engine.extra_engine_kwargs:
        problems += check_vllm_args(engine, vllm_args)
        engine.vllm_args = list(vllm_args)
    if problems:
        raise cli.ScriptError("\nerror: ".join(problems), cli.EXIT_USAGE)
    return args, engine, serve_config, requested_layout


@cli.exits_with_codes
def script_main(argv: list[str] | None, *, description: str, build: BuildFn,
                add_topology_args: Callable[[argparse._ArgumentGroup], None] | None = None,
                engine_defaults: EngineConfig | None = None,
                serve_defaults: ServeConfig | None = None) -> int:
    """Parse flags, connect to Ray, build the app, deploy it (or, with --print-config, print its
    Serve config); a ScriptError anywhere on the way becomes its message and exit code."""
    parser = script_parser(description, add_topology_args, engine_defaults, serve_defaults)
    args, engine, serve_config, requested_layout = parse_script_args(parser, argv)
    if args.print_config:
        from common.serve_config import print_config

        if engine.device == "cuda":
            # 'auto' goes back in for print_config's resolve_autos, which makes it a number again
            engine.tensor_parallel_size = requested_layout.tp  # type: ignore[assignment]
            engine.pipeline_parallel_size = requested_layout.pp  # type: ignore[assignment]
        script_file = sys.modules[build.__module__].__file__
        if script_file is None:
            raise RuntimeError(f"{build.__module__} has no source file to name in the config")
        return print_config(script_file, parser, args, engine, serve_config, requested_layout,
                            argv)

    from common.ray_connect import connect

    connect(args.address, runtime_env=replica_code_runtime_env())
    if engine.device == "cuda" and preflight.cluster_total("GPU") == 0:
        raise cli.ScriptError("the Ray cluster has no GPU (`ray status` lists none). For the CPU "
                              "demo run `make demo`, or add --device cpu --model "
                              ".cache/demo-model")
    check_upstreams(args.allow_untested_versions, engine)
    layout.resolve_layout(requested_layout, engine, serve_config, args.gpu_memory_gib, argv,
                          args.allow_untested_versions)
    app = build(args, engine, serve_config)
    return deploy(app, serve_config, proxy_location=args.proxy_location, ingress=args.ingress,
                  engine=engine)


def check_upstreams(allow_untested: bool, engine: EngineConfig | None = None) -> None:
    """Before anything is reserved: this machine's Ray and vLLM are a tested pair (or the
    operator allowed otherwise), and have every internal the project relies on for `engine`'s
    settings (engine metrics, batch limits)."""
    from replica import vllm_compat

    layout.check_tested_versions([("this machine", layout.installed_versions())], allow_untested)
    engine = engine or EngineConfig()
    problems = ray_compat.check() + vllm_compat.check(engine.engine_metrics, engine.batch_limits,
                                                      engine.device)
    if problems:
        raise cli.ScriptError("\nerror: ".join(problems), cli.EXIT_UNHEALTHY)


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
    },
}
DEFAULT_INGRESS = "haproxy"


def controller_env(ingress: str) -> dict[str, str]:
    """Env vars for Serve's controller, and through it its proxies and replicas; the same names
    set in this process's environment win."""
    return operator_env_wins({**SERVE_CONTROLLER_ENV, **INGRESSES[ingress]})


def start_serve(host: str, port: int, proxy_location: str, ingress: str = DEFAULT_INGRESS) -> None:
    """serve.start with the project's controller settings; a Serve that is already running keeps
    its own (they apply only when the controller is created), so say what that means."""
    from ray import serve

    from ops import cluster

    with cluster.state_snapshot():
        running = cluster.serve_ingress() if cluster.serve_client() is not None else None
        spreads = cluster.serve_spreads_load() if running == "proxy" else None
    if running is not None and running != ingress:
        print(f"note: Serve is already running with --ingress {running}; --ingress {ingress} "
              "applies only when Serve starts. `python stop_service.py --shutdown` and deploy "
              "again to change it.", file=sys.stderr)
    if spreads is False:
        print("note: Serve was already running, started without "
              "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0: a replica on the proxy's node may "
              "get every request. `python stop_service.py --shutdown` and deploy again to "
              "apply it (README: 故障排除).", file=sys.stderr)
    serve.start(proxy_location=proxy_location,
                http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": controller_env(ingress)}})


def deploy(app: Any, serve_config: ServeConfig, proxy_location: str = "EveryNode",
           ingress: str = DEFAULT_INGRESS, engine: EngineConfig | None = None) -> int:
    """Start Serve if needed, deploy the app without blocking, wait until it runs or fails."""
    from ray import serve
    from ray.serve.api import RunTarget

    start_serve(serve_config.host, serve_config.port, proxy_location, ingress)
    print(f"deploying application {serve_config.app_name!r} "
          f"(route {serve_config.route_prefix}) ...", flush=True)
    serve.run_many([RunTarget(target=app, name=serve_config.app_name,
                              route_prefix=serve_config.route_prefix)],
                   wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)
    wait_ready(serve_config.app_name, serve_config.timeout_s, engine=engine)
    print_ready(serve_config)
    return cli.EXIT_OK


def _replica_summary(app_status) -> str:
    parts = []
    for name, dep in app_status.deployments.items():
        states = ", ".join(f"{n} {s}" for s, n in sorted(dep.replica_states.items())) or "none"
        parts.append(f"{name}: {states}")
    return "; ".join(parts)


def wait_ready(app_name: str, timeout_s: float, poll_s: float = 2.0,
               engine: EngineConfig | None = None) -> None:
    """Poll Serve until the app is RUNNING, printing each change; raise a ScriptError saying why
    when it fails (EXIT_FAILURE: Serve's message and each dead replica's own root cause, with
    the remedy for `engine`'s settings) or the wait runs out (EXIT_TIMEOUT)."""
    from ops.startup_failures import explain_failed_start

    from ray import serve

    started = time.monotonic()
    last_line = ""
    while True:
        elapsed = time.monotonic() - started
        status = serve.status().applications.get(app_name)
        if status is not None:
            state = str(status.status.value if hasattr(status.status, "value") else status.status)
            line = f"[{elapsed:5.0f}s] {app_name}: {state} ({_replica_summary(status)})"
            if line != last_line:
                print(line, flush=True)
                last_line = line
            if state == "RUNNING":
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                details = "".join(f"\n  {name}: {serve_message_summary(dep.message)}"
                                  for name, dep in status.deployments.items() if dep.message)
                causes = explain_failed_start(app_name, engine)
                raise cli.ScriptError(f"application {app_name!r} is {state}{details}{causes}",
                                      cli.EXIT_FAILURE)
        if elapsed > timeout_s:
            break
        time.sleep(poll_s)
    raise cli.ScriptError(f"application {app_name!r} not ready after {timeout_s:.0f}s; a "
                          "replica still loading weights needs a longer wait: --timeout SECONDS "
                          f"(DEPLOY_TIMEOUT){_pending_lines()}\n"
                          "the application stays deployed and Serve keeps trying; inspect with "
                          "`python check_cluster.py`, remove with `python stop_service.py`",
                          cli.EXIT_TIMEOUT)


def serve_message_summary(message: str) -> str:
    """Serve's deployment message without the replica's traceback it may carry (the root cause
    is printed apart): its first line and the traceback's last."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} [...] {lines[-1].strip()}"


def _pending_lines() -> str:
    from ops import cluster

    pending = cluster.pending_demands()
    if not pending:
        return ""
    return "\nthe cluster cannot place these demands (as `ray status` lists them):" + "".join(
        f"\n  {d.count} x {cluster.format_shape(d.shape)} ({d.kind}): {d.reason}"
        for d in pending)


def print_ready(serve_config: ServeConfig) -> None:
    from ops import cluster
    from ops.cluster_format import format_placement

    replicas = cluster.list_replicas(serve_config.app_name)
    print(f"\napplication {serve_config.app_name!r} is RUNNING with {len(replicas)} replica(s):")
    print(format_placement(replicas))
    host = "localhost" if serve_config.host in ("0.0.0.0", "::", "127.0.0.1") \
        else serve_config.host
    url = f"http://{host}:{serve_config.port}{serve_config.route_prefix.rstrip('/')}/"
    auth = " -H 'Authorization: Bearer $API_KEY'" if serve_config.api_key else ""
    print(f"\nURL: {url}")
    print(f"try:  curl -X POST {url} -H 'Content-Type: application/json'{auth} "
          "-d '{\"prompt\": \"请简要介绍人工智能的发展历史\", \"max_tokens\": 64}'")
    print("load: python load_test.py -c 20 -n 100")
    print(f"stop: python stop_service.py --app {serve_config.app_name}")
