"""Deploying an application: replica options per device, the scripts' shared main, readiness wait."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from common import cli, layout, replica_plan
from common.replica_plan import ReplicaPlan, Topology
from common.deploy_options import (DEFAULT_INGRESS, FORWARD_BODY_ENV, HAPROXY_BALANCE,
                                   HAPROXY_BALANCE_ENV, INGRESSES, auto_routing,
                                   controller_env, deployment_options, deployment_version,
                                   replica_code_runtime_env, resolve_routing, route_options)
from replica import ray_compat
from common.options import (add_engine_args, add_serve_args, engine_config_from_args,
                            serve_config_from_args)
from replica.config import AUTO_ROUTING, EngineConfig, ServeConfig


def configure(deployment: Any, name: str, engine: EngineConfig, serve_config: ServeConfig,
              options: dict[str, Any], version_note: str = "", version: str | None = None
              ) -> Any:
    """An LLM deployment with its options and the version that keeps in-place updates working;
    `options` from deployment_options(), possibly pinned (common/placement.py); `version_note`:
    any other constructor argument whose change must restart the replicas; `version`: the one
    to keep instead (a backend not yet reached by a staged redeploy)."""
    return ray_compat.with_version(deployment.options(name=name, **options),
                                   version or deployment_version(engine, serve_config)
                                   + version_note)


@dataclass
class StagedApp:
    """One application deployed in steps under one name, each step once the last runs: a
    redeploy that moves one backend at a time while the others serve. Each stage is (what it
    changes, the application); the last is the application as the flags describe it."""

    stages: list[tuple[str, Any]]

    @property
    def final(self) -> Any:
        return self.stages[-1][1]


def llm_app(args: argparse.Namespace, engine: EngineConfig, serve_config: ServeConfig,
            plan: ReplicaPlan):
    """The Serve application of one LLM deployment answering HTTP itself (a script's build()
    unless it declares its own)."""
    from replica.ingress import LLMDeployment

    options = deployment_options(engine, serve_config, plan)
    app = configure(LLMDeployment, "LLMDeployment", engine, serve_config, options).bind(
        engine, serve_config)
    if serve_config.routing != "prefix":
        return app
    from replica.prefix_routing import PrefixRoute

    # @serve.deployment makes the class a Deployment; mypy keeps a decorated class's own type
    route = PrefixRoute.options(**route_options(serve_config)).bind(  # type: ignore[attr-defined]
        app)
    return ray_compat.with_ingress_request_router(app, route)


TopologyFn = Callable[[argparse.Namespace, EngineConfig, ServeConfig], Topology]
BuildFn = Callable[[argparse.Namespace, EngineConfig, ServeConfig, ReplicaPlan], Any]


def plan_and_build(topology: TopologyFn, build: BuildFn | None, args: argparse.Namespace,
                   engine: EngineConfig, serve_config: ServeConfig, nodes: list[Any],
                   serve_refuses_prefix: str | None = None) -> Any:
    """The script's topology planned against `nodes` (read once), said, --routing auto
    resolved for it, then built into the application: the one pass from flags to what is
    deployed."""
    plan = replica_plan.plan_replicas(engine, serve_config, topology(args, engine, serve_config),
                                      nodes)
    print("\n".join(plan.lines()), flush=True)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    routing_note = resolve_routing(args, engine, serve_config, plan, serve_refuses_prefix)
    if routing_note:
        print(routing_note, flush=True)
    return (build or llm_app)(args, engine, serve_config, plan)


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
    # vLLM's own data-parallel flags (or their short forms, -dp ...) would reach every rank
    # unchanged: the size is ours, the rest is each rank's own.
    rank_fields = ("data_parallel_rank", "data_parallel_address", "data_parallel_rpc_port",
                   "data_parallel_start_rank", "data_parallel_size_local")
    given = [f"--{name.replace('_', '-')}" for name in rank_fields
             if getattr(args, name, None) is not None]
    given += [flag for flag, name in (("--data-parallel-hybrid-lb", "data_parallel_hybrid_lb"),
                                      ("--data-parallel-external-lb",
                                       "data_parallel_external_lb"), ("--headless", "headless"))
              if getattr(args, name, False)]
    if given:
        problems.append(
            f"{', '.join(given)}: each data-parallel rank's number, address and port come from "
            "its Serve gang (replica/data_parallel.py); give --data-parallel-size (ranks per "
            "gang) and --num-replicas (gangs) only")
    if int(getattr(args, "data_parallel_size", 1) or 1) != engine.data_parallel_size:
        problems.append(f"--data-parallel-size is this script's flag: give it as "
                        f"--data-parallel-size {args.data_parallel_size}")
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
    if engine.data_parallel_size > 1:
        data_parallel_defaults(engine, args, argv)
    requested_layout = layout.set_aside_auto(engine)
    requested_layout.min_sequences = args.min_sequences
    requested_layout.check = not args.no_layout_check
    problems = engine.validate()
    if serve_config.routing == "prefix" and getattr(args, "ingress", None) == "proxy":
        problems.append("--routing prefix chooses replicas for Serve's HAProxy (--ingress "
                        "haproxy); Serve's Python proxy routes by load and x-session-id only")
    if vllm_args or engine.extra_engine_kwargs:
        problems += check_vllm_args(engine, vllm_args)
        engine.vllm_args = list(vllm_args)
    if problems:
        raise cli.ScriptError("\nerror: ".join(problems), cli.EXIT_USAGE)
    return args, engine, serve_config, requested_layout


def data_parallel_defaults(engine: EngineConfig, args: argparse.Namespace,
                           argv: list[str] | None) -> None:
    """With --data-parallel-size each rank is one GPU and --num-replicas (gangs) is 1 unless the
    operator said otherwise: a script's own defaults (ray-force-multi.py: 2 replicas of tensor
    parallel 8) are not a rank's nor a gang count."""
    for flag, env, name in (("--tensor-parallel-size", "TENSOR_PARALLEL_SIZE",
                             "tensor_parallel_size"),
                            ("--pipeline-parallel-size", "PIPELINE_PARALLEL_SIZE",
                             "pipeline_parallel_size")):
        if getattr(engine, name) != 1 and not layout.flag_given(argv, flag, env):
            setattr(engine, name, 1)
            setattr(args, name, 1)
    if getattr(args, "num_replicas", 1) != 1 and \
            not layout.flag_given(argv, "--num-replicas", "NUM_REPLICAS"):
        args.num_replicas = 1


@cli.exits_with_codes
def script_main(argv: list[str] | None, *, description: str, topology: TopologyFn,
                build: BuildFn | None = None,
                add_topology_args: Callable[[argparse._ArgumentGroup], None] | None = None,
                engine_defaults: EngineConfig | None = None,
                serve_defaults: ServeConfig | None = None) -> int:
    """Flags -> configs (pure) -> connect, read the cluster once, fit the model -> plan the
    replicas (pure) -> build the app -> deploy it and wait (or, with --print-config, print its
    Serve config); a ScriptError anywhere on the way becomes its message and exit code."""
    parser = script_parser(description, add_topology_args, engine_defaults, serve_defaults)
    args, engine, serve_config, requested_layout = parse_script_args(parser, argv)
    if args.print_config:
        from common.serve_config import print_config

        if engine.device == "cuda":
            # 'auto' goes back in for print_config's resolve_autos, which makes it a number again
            engine.tensor_parallel_size = requested_layout.tp  # type: ignore[assignment]
            engine.pipeline_parallel_size = requested_layout.pp  # type: ignore[assignment]
        script_file = sys.modules[topology.__module__].__file__
        if script_file is None:
            raise RuntimeError(f"{topology.__module__} has no source file to name in the config")
        return print_config(script_file, parser, args, engine, serve_config, topology,
                            requested_layout, argv)

    from common import cluster
    from common.ray_connect import connect

    # Before the plan: could --routing auto pick prefix for any replica count here?
    may_route_by_prefix = serve_config.routing == "prefix" or (
        serve_config.routing == AUTO_ROUTING
        and auto_routing(engine, args.ingress, replicas=2)[0] == "prefix")
    with _serve_builds_route_deployments(may_route_by_prefix):
        connect(args.address, runtime_env=replica_code_runtime_env())
        nodes = cluster.list_nodes()
        if engine.device == "cuda" and not any(n.alive and n.gpus_total for n in nodes):
            raise cli.ScriptError("the Ray cluster has no GPU (`ray status` lists none). For the "
                                  "CPU demo run `make demo`, or add --device cpu --model "
                                  ".cache/demo-model")
        check_upstreams(args.allow_untested_versions, engine)
        layout.resolve_layout(requested_layout, engine, serve_config, args.gpu_memory_gib, argv,
                              args.allow_untested_versions)
        serve_now = running_serve()   # read once: the plan's routing and Serve's start
        app = plan_and_build(topology, build, args, engine, serve_config, nodes,
                             serve_refuses_prefix(serve_now))
        return deploy(app, serve_config, proxy_location=args.proxy_location,
                      ingress=args.ingress, engine=engine, serve_now=serve_now)


@contextlib.contextmanager
def _serve_builds_route_deployments(on: bool):
    """Serve builds an app with a route deployment (--routing prefix) only where its own
    process runs with HAProxy on, read when ray.serve is first imported (inside this block).
    Set for the block only: a Ray cluster a caller starts later in this process (tests run the
    scripts' main()) must not inherit it."""
    if not on or "RAY_SERVE_ENABLE_HA_PROXY" in os.environ:
        yield
        return
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    try:
        yield
    finally:
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)


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


RESTART_SERVE = "`python stop_service.py --shutdown` and deploy again"


@dataclass
class RunningServe:
    """What the Serve already running on the cluster was started with (ingress None: none runs);
    these settings apply only when Serve starts."""

    ingress: str | None = None
    spreads: bool | None = None          # Serve's proxy: node-local routing off
    balance: str | None = None           # HAProxy's balance algorithm
    forward_body: str | None = None      # HAProxy hands the route deployment the body ("1")


def running_serve() -> RunningServe:
    """The running Serve's settings, read from its proxy actors."""
    from common import cluster

    with cluster.state_snapshot():
        running = cluster.serve_ingress() if cluster.serve_client() is not None else None
        serve_now = RunningServe(running, cluster.serve_spreads_load() if running == "proxy"
                                 else None)
        if running == "haproxy":
            serve_now.balance = cluster.haproxy_setting(HAPROXY_BALANCE_ENV,
                                                        HAPROXY_BALANCE["spread"])
            serve_now.forward_body = cluster.haproxy_setting(FORWARD_BODY_ENV, "0")
    return serve_now


def serve_refuses_prefix(serve_now: RunningServe) -> str | None:
    """Why the running Serve cannot route by prefix (None: it can, or none runs)."""
    if serve_now.ingress == "proxy" or serve_now.forward_body not in (None, "1"):
        started = ("with --ingress proxy" if serve_now.ingress == "proxy"
                   else f"without {FORWARD_BODY_ENV}=1")
        return ("routing by prefix needs Serve's HAProxy to hand each request's body to the "
                f"route deployment, and the running Serve was started {started}: "
                f"{RESTART_SERVE}")
    return None


def start_serve(host: str, port: int, proxy_location: str, ingress: str = DEFAULT_INGRESS,
                routing: str = "spread", serve_now: RunningServe | None = None) -> None:
    """serve.start with the project's controller settings; a Serve that is already running
    (`serve_now`, read here if not given) keeps its own (they apply only when the controller is
    created), so say what that means, and refuse --routing prefix where it cannot do it."""
    from ray import serve

    serve_now = serve_now or running_serve()
    refused = serve_refuses_prefix(serve_now) if routing == "prefix" else None
    if refused:
        raise cli.ScriptError(f"--routing prefix: {refused}", cli.EXIT_USAGE)
    running, balance = serve_now.ingress, serve_now.balance
    if running is not None and running != ingress:
        print(f"note: Serve is already running with --ingress {running}; --ingress {ingress} "
              f"applies only when Serve starts. {RESTART_SERVE} to change it.", file=sys.stderr)
    if serve_now.spreads is False:
        print("note: Serve was already running, started without "
              "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0: a replica on the proxy's node may "
              f"get every request. {RESTART_SERVE} to apply it (README: 故障排除).", file=sys.stderr)
    wanted = controller_env(ingress, routing).get(HAPROXY_BALANCE_ENV)
    if balance is not None and wanted is not None and balance != wanted:
        print(f"note: Serve's HAProxy is already running with `balance {balance}`; --routing "
              f"{routing} (`balance {wanted}`) applies only when Serve starts. {RESTART_SERVE} to "
              "change it.", file=sys.stderr)
    serve.start(proxy_location=proxy_location,
                http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": controller_env(ingress,
                                                                               routing)}})


def deploy(app: Any, serve_config: ServeConfig, proxy_location: str = "EveryNode",
           ingress: str = DEFAULT_INGRESS, engine: EngineConfig | None = None,
           serve_now: RunningServe | None = None) -> int:
    """Start Serve if needed, deploy the app without blocking, wait until it runs or fails."""
    from ray import serve
    from ray.serve.api import RunTarget

    start_serve(serve_config.host, serve_config.port, proxy_location, ingress,
                serve_config.routing, serve_now)
    stages = app.stages if isinstance(app, StagedApp) else [("", app)]
    for number, (change, stage) in enumerate(stages, 1):
        step = f" step {number}/{len(stages)}: {change}" if len(stages) > 1 else ""
        print(f"deploying application {serve_config.app_name!r} "
              f"(route {serve_config.route_prefix}){step} ...", flush=True)
        serve.run_many([RunTarget(target=stage, name=serve_config.app_name,
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
    from common.startup_failures import explain_failed_start

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
    from common import cluster

    pending = cluster.pending_demands()
    if not pending:
        return ""
    return "\nthe cluster cannot place these demands (as `ray status` lists them):" + "".join(
        f"\n  {d.count} x {cluster.format_shape(d.shape)} ({d.kind}): {d.reason}"
        for d in pending)


def print_ready(serve_config: ServeConfig) -> None:
    from common import cluster
    from common.cluster_format import format_placement

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
