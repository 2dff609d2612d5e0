"""Declarative deployment: the Serve config file (and a KubeRay RayService around it) for a script's flags."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from common import cli
from replica.config import EngineConfig, ServeConfig
from replica.server import ROUTER_DEPLOYMENT

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILDERS_MODULE = "common.builders"
# Script file -> builder function in common/builders.py (Serve imports `module:function`).
BUILDERS = {
    "ray-single-gpu.py": "single_gpu",
    "ray-force-multi.py": "force_multi",
    "ray-product": "product",
    "ray-placement-group.py": "placement_group",
}

# Flags that say how to reach or start Serve, or what to print: no part of the application.
_NOT_APP_ARGS = {"help", "address", "proxy_location", "ingress", "print_config", "kuberay",
                 "working_dir", "gpu_memory_gib", "timeout_s", "image", "image_workdir",
                 "gpus_per_node", "auth_secret", "pod_cpus", "pod_memory_gib",
                 "redis_address", "redis_secret",
                 "allow_untested_versions", "min_sequences", "no_layout_check"}
# A worker pod's default size (--pod-cpus, --pod-memory-gib): a GPU pod gets CPUs for vLLM's
# per-GPU workers, tokenization and Serve, and host memory for the weights read through it.
POD_CPUS_PER_GPU = 4.0
POD_GIB_PER_GPU = 32.0
POD_SPARE_CPUS = 2.0
POD_GIB_PER_CPU_REPLICA = 8.0
# Set at the config file's top level (http_options) or on the application (name, route_prefix).
_CONFIG_LEVEL_ARGS = {"host", "port", "app_name", "route_prefix"}
# Deployment options Serve updates on running replicas without restarting them: they go into the
# config's `deployments:` section and stay out of `args`, whose every change is a new code version
# (Serve restarts the replicas).
LIGHTWEIGHT_ARGS = {"max_ongoing_requests", "max_queued_requests", "max_surge_percent",
                    "num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                    "upscale_delay", "downscale_delay"}
# Topology flags that are also lightweight only in some scripts (the others pass them as args).
_ARGS_IN = {"ray-single-gpu.py": {"max_replicas"}}
VLLM_ARGS_KEY = "vllm_args"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("declarative deployment (serve deploy / KubeRay)")
    cli.add_flag(group, "--print-config", type=bool, default=False,
                 help="print the Serve config YAML for these flags (for `serve deploy`) and exit; "
                      "deploys nothing and needs no cluster (an `auto` value is resolved on a "
                      "reachable cluster, else named as the flag to give)")
    cli.add_flag(group, "--kuberay", type=bool, default=False,
                 help="with --print-config: print a KubeRay RayService manifest around it")
    cli.add_flag(group, "--working-dir", env="WORKING_DIR", default=None,
                 help="runtime_env working_dir of the config: where the cluster finds this "
                      "project (a zip URI, or local:///PATH of a checkout present at that path "
                      "on every node); default: local:// of this checkout, or of --image-workdir "
                      "with --kuberay")
    cli.add_flag(group, "--image", env="KUBERAY_IMAGE", default="deepseek-ray-serve:latest",
                 help="with --kuberay: container image with Ray, vLLM and this project at "
                      "--image-workdir (e.g. built FROM rayproject/ray:2.60.0-py311-gpu)")
    cli.add_flag(group, "--image-workdir", env="KUBERAY_IMAGE_WORKDIR", default="/app",
                 help="with --kuberay: where this project sits in the image")
    cli.add_flag(group, "--gpus-per-node", env="KUBERAY_GPUS_PER_NODE", type=int, default=8,
                 help="with --kuberay: GPUs of one worker pod (one Kubernetes node)")
    cli.add_flag(group, "--auth-secret", env="KUBERAY_AUTH_SECRET", default="ray-auth-token",
                 help="with --kuberay: Kubernetes secret whose key `token` holds the Ray auth token")
    cli.add_flag(group, "--redis-address", env="KUBERAY_REDIS_ADDRESS", default=None,
                 help="with --kuberay: host:port of a (highly available) Redis that keeps the "
                      "GCS's state, so that the head pod can die and come back while worker "
                      "pods keep serving (KubeRay's gcsFaultToleranceOptions); default: none")
    cli.add_flag(group, "--redis-secret", env="KUBERAY_REDIS_SECRET", default="redis-password",
                 help="with --redis-address: Kubernetes secret whose key `password` holds "
                      "Redis's password")
    cli.add_flag(group, "--pod-cpus", env="KUBERAY_POD_CPUS", type=float, default=None,
                 help=f"with --kuberay: CPUs of one worker pod; default: {POD_CPUS_PER_GPU:g} per "
                      f"GPU (a GPU pod), or the replicas' CPUs + {POD_SPARE_CPUS:g} (a CPU pod)")
    cli.add_flag(group, "--pod-memory-gib", env="KUBERAY_POD_MEMORY_GIB", type=float,
                 default=None,
                 help=f"with --kuberay: memory of one worker pod in GiB; default: "
                      f"{POD_GIB_PER_GPU:g} per GPU (weights pass through host memory while "
                      f"loading), or {POD_GIB_PER_CPU_REPLICA:g} per replica (a CPU pod)")


def script_name(script_file: str) -> str:
    name = Path(script_file).name
    if name not in BUILDERS:
        raise cli.ScriptError(f"{name} has no application builder (known: "
                              f"{', '.join(BUILDERS)})", cli.EXIT_USAGE)
    return name


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def builder_args(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 engine: EngineConfig) -> dict[str, Any]:
    """The builder's `args`: every application flag with its value (explicit, so the file alone
    says what runs), but not the lightweight options nor what the config sets elsewhere."""
    keep = _ARGS_IN.get(script, set())
    values: dict[str, Any] = {}
    for dest in _flag_actions(parser):
        if dest in _NOT_APP_ARGS or dest in _CONFIG_LEVEL_ARGS:
            continue
        if dest in LIGHTWEIGHT_ARGS and dest not in keep:
            continue
        value = getattr(args, dest, None)
        if value is not None:
            values[dest] = value
    if "model" in values:
        values["model"] = engine.model
    if engine.vllm_args:
        values[VLLM_ARGS_KEY] = list(engine.vllm_args)
    return values


def builder_argv(parser: argparse.ArgumentParser, args: dict[str, Any]) -> list[str]:
    """The command line the script would get for a builder's `args` (so that the builder parses
    and validates them with the script's own parser and messages)."""
    actions = _flag_actions(parser)
    argv: list[str] = []
    for key, value in args.items():
        if key == VLLM_ARGS_KEY:
            continue
        action = actions.get(key) or actions.get(key.replace("-", "_"))
        if action is None or key in _NOT_APP_ARGS:
            known = sorted(d for d in actions if d not in _NOT_APP_ARGS)
            raise cli.ScriptError(f"unknown builder argument {key!r}; known: {', '.join(known)}",
                                  cli.EXIT_USAGE)
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        argv += [action.option_strings[0], text]
    vllm_args = args.get(VLLM_ARGS_KEY) or []
    if isinstance(vllm_args, str):
        vllm_args = vllm_args.split()
    return argv + [str(a) for a in vllm_args]


def _autos(script: str, args: argparse.Namespace, engine: EngineConfig) -> list[str]:
    """The `auto` options a config cannot hold (they are resolved against the cluster), as the
    explicit flags to give instead."""
    missing = []
    if engine.device == "cuda":
        for flag, value in (("--tensor-parallel-size", engine.tensor_parallel_size),
                            ("--pipeline-parallel-size", engine.pipeline_parallel_size)):
            if str(value).lower() == "auto":
                missing.append(f"{flag} N")
        if str(getattr(args, "num_replicas", "")).lower() == "auto":
            missing.append("--num-replicas N")
    return missing


def _check_no_auto(script: str, args: argparse.Namespace, engine: EngineConfig,
                   why: str = "") -> None:
    missing = _autos(script, args, engine)
    if missing:
        raise cli.ScriptError(
            "--print-config writes explicit values and `auto` is resolved against the cluster"
            f"{why}: give {', '.join(missing)} (`python check_cluster.py --model PATH` plans "
            "them)", cli.EXIT_USAGE)


def resolve_autos(args: argparse.Namespace, engine: EngineConfig, serve_config: ServeConfig,
                  request: Any, argv: Sequence[str] | None, topology: Any, script: str) -> None:
    """`auto` options resolved as the script would, when a cluster is reachable (its notes go to
    stderr: stdout is the config); otherwise a ScriptError naming the explicit flags."""
    import contextlib
    import sys

    from common import cluster, layout
    from common.deploy_options import replica_code_runtime_env
    from common.ray_connect import connect
    from common.replica_plan import plan_replicas

    if not _autos(script, args, engine):
        return
    try:
        connect(args.address, runtime_env=replica_code_runtime_env())
    except cli.ScriptError as err:
        if err.code != cli.EXIT_RAY_UNREACHABLE:
            raise
        _check_no_auto(script, args, engine, f" and no cluster is reachable ({err})")
    with contextlib.redirect_stdout(sys.stderr):
        engine.tensor_parallel_size = 1 if request.tp == "auto" else request.tp
        engine.pipeline_parallel_size = 1 if request.pp == "auto" else request.pp
        layout.resolve_layout(request, engine, serve_config, args.gpu_memory_gib, argv)
        args.tensor_parallel_size = engine.tensor_parallel_size
        args.pipeline_parallel_size = engine.pipeline_parallel_size
        if str(getattr(args, "num_replicas", "")).lower() == "auto":
            plan = plan_replicas(engine, serve_config, topology(args, engine, serve_config),
                                 cluster.list_nodes())
            args.num_replicas = plan.replicas
            print(f"--num-replicas auto: {args.num_replicas}")


def deployment_entries(script: str, args: argparse.Namespace, engine: EngineConfig,
                       serve_config: ServeConfig, topology: Any) -> list[dict[str, Any]]:
    """The config's `deployments:` section: per deployment the options Serve applies from the
    file. The LLM deployment of the three one-deployment topologies carries its resources and
    replicas (the script's topology, as given: no cluster is read); placement-group backends
    carry only lightweight options (their node pin is chosen when the application is built,
    and a ray_actor_options here would replace it)."""
    from common.deploy_options import replica_resources, request_limits, router_options
    from common.replica_plan import offline_plan

    plan = offline_plan(engine, serve_config, topology(args, engine, serve_config))
    lightweight = request_limits(serve_config)
    if script == "ray-placement-group.py":
        router = router_options(serve_config, args.num_backends, args.router_replicas)
        return [*({"name": f"LLMBackend{i}", "num_replicas": 1, **lightweight}
                  for i in range(args.num_backends)),
                {"name": ROUTER_DEPLOYMENT, **{k: router[k] for k in (
                    "num_replicas", "max_ongoing_requests", "max_queued_requests",
                    "ray_actor_options")}}]
    return [{"name": "LLMDeployment", **lightweight, **plan.deployment_topology(),
             **replica_resources(engine, serve_config, gpu_share=plan.gpu_share)}]


def serve_config_document(script_file: str, parser: argparse.ArgumentParser,
                          args: argparse.Namespace, engine: EngineConfig,
                          serve_config: ServeConfig, topology: Any,
                          working_dir: str | None = None) -> dict[str, Any]:
    """The Serve config (`serve deploy` / `serveConfigV2`) for a script's parsed flags and its
    topology() (common/replica_plan.py)."""
    import sys

    from common.deploy_options import resolve_routing
    from common.replica_plan import offline_plan

    script = script_name(script_file)
    _check_no_auto(script, args, engine)
    # The file says which routing runs (the note goes to stderr: stdout is the config).
    routing_note = resolve_routing(
        args, engine, serve_config,
        offline_plan(engine, serve_config, topology(args, engine, serve_config)))
    if routing_note:
        print(routing_note, file=sys.stderr)
    deployments = deployment_entries(script, args, engine, serve_config, topology)
    app = {
        "name": serve_config.app_name,
        "route_prefix": serve_config.route_prefix,
        "import_path": f"{BUILDERS_MODULE}:{BUILDERS[script]}",
        "args": builder_args(script, parser, args, engine),
        "runtime_env": {"working_dir": working_dir or f"local://{PROJECT_ROOT}"},
        "deployments": deployments,
    }
    return {
        "proxy_location": args.proxy_location,
        "http_options": {"host": serve_config.host, "port": serve_config.port},
        "applications": [app],
    }


def validate_document(document: dict[str, Any]) -> None:
    """Serve's own schema check of a config (what `serve deploy` runs)."""
    from ray.serve.schema import ServeDeploySchema

    import copy

    try:
        # A copy: Serve's validators replace parts of what they check (gang_scheduling_config).
        ServeDeploySchema.model_validate(copy.deepcopy(document))
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, shown as is
        raise cli.ScriptError(f"the generated Serve config is invalid: {exc}",
                              cli.EXIT_FAILURE) from None


def to_yaml(document: dict[str, Any]) -> str:
    """Block YAML without anchors (repeated bundles written out), multi-line strings as `|`."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(document, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                     width=100, allow_unicode=True)


# ---- KubeRay ------------------------------------------------------------------------------------

def _env_list(env: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": str(v)} for k, v in env.items()]


def _ray_container(name: str, image: str, env: list[dict[str, Any]], resources: dict[str, Any],
                   ports: Sequence[tuple[str, int]] = ()) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "env": env,
                                 "resources": {"limits": resources, "requests": resources}}
    if ports:
        container["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    return container


def worker_groups(engine: EngineConfig, deployments: list[dict[str, Any]],
                  gpus_per_node: int) -> tuple[int, int]:
    """(worker pods, GPUs per pod) for the topology: enough nodes for the most engine replicas
    the application can run (the placement-group router holds no engine and no GPU), each pod
    one whole node of `gpus_per_node` GPUs (CPU: one pod per replica, no GPU)."""
    replicas = engine_replicas(deployments)
    if engine.device == "cpu":
        return max(replicas, 1), 0
    per_replica = engine.gpus_per_replica
    if per_replica > gpus_per_node:
        raise cli.ScriptError(f"a replica needs {per_replica} GPUs on one node, a pod has "
                              f"--gpus-per-node {gpus_per_node}", cli.EXIT_USAGE)
    per_node = gpus_per_node // per_replica
    cap = min((e["max_replicas_per_node"] for e in deployments
               if e.get("max_replicas_per_node")), default=None)
    if cap:
        per_node = min(per_node, cap)
    pods = -(-replicas // per_node)
    return pods, gpus_per_node


def worker_pod_resources(engine: EngineConfig, serve_config: ServeConfig, pods: int,
                         gpus: int, replicas: int, cpus: float | None, memory_gib: float | None
                         ) -> dict[str, Any]:
    """A worker pod's Kubernetes resources: the flags where given, else derived (POD_*)."""
    if gpus:
        cpus = cpus if cpus is not None else POD_CPUS_PER_GPU * gpus
        memory_gib = memory_gib if memory_gib is not None else POD_GIB_PER_GPU * gpus
        return {"cpu": f"{cpus:g}", "memory": f"{memory_gib:g}Gi", "nvidia.com/gpu": gpus}
    per_pod = -(-replicas // max(pods, 1))
    cpus = cpus if cpus is not None else per_pod * serve_config.cpus_per_replica + POD_SPARE_CPUS
    memory_gib = memory_gib if memory_gib is not None else POD_GIB_PER_CPU_REPLICA * per_pod
    return {"cpu": f"{cpus:g}", "memory": f"{memory_gib:g}Gi"}


def engine_replicas(deployments: list[dict[str, Any]]) -> int:
    """The most engine replicas the application runs (autoscaling: its maximum)."""
    total = 0
    for entry in deployments:
        if entry.get("name") == ROUTER_DEPLOYMENT:
            continue
        autoscaling = entry.get("autoscaling_config")
        total += autoscaling["max_replicas"] if autoscaling else entry.get("num_replicas", 1)
    return total


def rayservice_manifest(document: dict[str, Any], engine: EngineConfig, controller_env: dict[str, str],
                        image: str, gpus_per_node: int, auth_secret: str,
                        name: str = "deepseek", serve_config: ServeConfig | None = None,
                        pod_cpus: float | None = None, pod_memory_gib: float | None = None,
                        redis_address: str | None = None, redis_secret: str = "redis-password"
                        ) -> dict[str, Any]:
    """A KubeRay RayService: `serveConfigV2` is the config file itself, the head (no GPUs: it
    schedules nothing) and one worker group sized from the topology; every Ray container gets
    Serve's controller settings and token auth from a Kubernetes secret. With `redis_address`,
    the GCS keeps its state in that Redis (KubeRay's gcsFaultToleranceOptions): a head pod that
    dies comes back with the cluster's state while the worker pods' replicas keep serving."""
    deployments = [d for app in document["applications"] for d in app.get("deployments", [])]
    pods, gpus = worker_groups(engine, deployments, gpus_per_node)
    token = {"name": "RAY_AUTH_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": auth_secret, "key": "token"}}}
    env = _env_list({"RAY_AUTH_MODE": "token", **controller_env}) + [token]
    port = document["http_options"]["port"]
    head_resources = {"cpu": "8", "memory": "32Gi"}
    worker_resources = worker_pod_resources(engine, serve_config or ServeConfig(), pods, gpus,
                                            engine_replicas(deployments), pod_cpus,
                                            pod_memory_gib)
    head = {
        # num-gpus 0 on the head: replicas go to the GPU workers.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0",
                           "metrics-export-port": "8080"},
        "template": {"spec": {"containers": [_ray_container(
            "ray-head", image, env, head_resources,
            [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", port)])]}},
    }
    worker = {
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": pods, "minReplicas": pods, "maxReplicas": pods,
        "rayStartParams": {"metrics-export-port": "8080"},
        "template": {"spec": {"containers": [_ray_container("ray-worker", image, env,
                                                            worker_resources)]}},
    }
    cluster: dict[str, Any] = {
        "rayVersion": _ray_version(),
        "headGroupSpec": head,
        "workerGroupSpecs": [worker],
    }
    if redis_address:
        cluster["gcsFaultToleranceOptions"] = {
            "redisAddress": redis_address,
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": redis_secret,
                                                             "key": "password"}}}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {"serveConfigV2": to_yaml(document), "rayClusterConfig": cluster},
    }


def _ray_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # the manifest still works without it
        return "2.60.0"


def print_config(script_file: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 engine: EngineConfig, serve_config: ServeConfig, topology: Any,
                 request: Any = None, argv: Sequence[str] | None = None) -> int:
    """--print-config: the config (or, with --kuberay, the RayService) on stdout; `topology` is
    the script's, `request` the layout as given (common/layout.py), resolved here when it says
    `auto`."""
    from common.deploy_options import controller_env

    if request is not None:
        resolve_autos(args, engine, serve_config, request, argv, topology,
                      script_name(script_file))

    working_dir = args.working_dir
    if working_dir is None and args.kuberay:
        working_dir = f"local://{args.image_workdir}"
    document = serve_config_document(script_file, parser, args, engine, serve_config, topology,
                                     working_dir)
    validate_document(document)
    if args.kuberay:
        manifest = rayservice_manifest(document, engine,
                                       controller_env(args.ingress, serve_config.routing),
                                       args.image, args.gpus_per_node, args.auth_secret,
                                       name=serve_config.app_name, serve_config=serve_config,
                                       pod_cpus=args.pod_cpus, pod_memory_gib=args.pod_memory_gib,
                                       redis_address=args.redis_address,
                                       redis_secret=args.redis_secret)
        print(to_yaml(manifest), end="")
    else:
        print(to_yaml(document), end="")
    return cli.EXIT_OK
