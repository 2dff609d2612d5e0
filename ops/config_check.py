"""check_cluster.py --plan CONFIG: the scripts' pre-deploy checks for a Serve config file, before `serve deploy`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from common import cli
from common.serve_config import BUILDERS, BUILDERS_MODULE, validate_document
from replica.config import AUTO_ROUTING

_SCRIPT_OF = {function: script for script, function in BUILDERS.items()}


def read_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise cli.ScriptError(f"cannot read {path}: {exc.strerror}", cli.EXIT_USAGE) from None
    except yaml.YAMLError as exc:
        raise cli.ScriptError(f"{path} is not YAML: {exc}", cli.EXIT_USAGE) from None
    if not isinstance(document, dict):
        raise cli.ScriptError(f"{path} holds no Serve config", cli.EXIT_USAGE)
    if document.get("kind") == "RayService":
        document = yaml.safe_load(document.get("spec", {}).get("serveConfigV2", "")) or {}
    validate_document(document)
    return document


def script_of(app: dict[str, Any]) -> str | None:
    module, _, function = str(app.get("import_path", "")).partition(":")
    return _SCRIPT_OF.get(function) if module == BUILDERS_MODULE else None


def planned_replicas(app: dict[str, Any]) -> int:
    """The most engine replicas the application's deployments may run (autoscaling: its
    maximum; the placement-group router holds no engine)."""
    from common.serve_config import engine_replicas

    return engine_replicas(app.get("deployments") or []) or 1


def local_dir_of(uri: str | None) -> str | None:
    if uri and uri.startswith("local://"):
        return uri[len("local://"):]
    return None


def check_app(app: dict[str, Any], memory_gib: float | None) -> list[str]:
    """What the script would check before deploying this application; a ScriptError for what
    refuses it outright (bad args, a layout that cannot fit), problems as lines otherwise."""
    from common import cluster, layout, replica_plan
    from common.builders import load_script, script_parser_of
    from common.deploy import parse_script_args
    from common.serve_config import builder_argv

    name = app.get("name", "default")
    script = script_of(app)
    if script is None:
        return [f"{name}: import_path {app.get('import_path')!r} is no builder of this project "
                f"({', '.join(f'{BUILDERS_MODULE}:{f}' for f in BUILDERS.values())}); "
                "not checked"]
    module = load_script(script)
    parser = script_parser_of(module)
    try:
        argv = builder_argv(parser, dict(app.get("args") or {}))
        _, engine, serve_config, request = parse_script_args(parser, argv)
    except cli.ScriptError as err:
        raise cli.ScriptError(f"{name}: {err}", err.code) from None
    problems = []
    working_dir = local_dir_of((app.get("runtime_env") or {}).get("working_dir"))
    if working_dir and not (Path(working_dir) / "common" / "builders.py").is_file():
        problems.append(f"{name}: runtime_env working_dir local://{working_dir} holds no "
                        "checkout of this project here; it must exist on every node")
    print(f"{name}: {script} with {engine.device}, tensor parallel "
          f"{engine.tensor_parallel_size} x pipeline {engine.pipeline_parallel_size}",
          flush=True)
    layout.resolve_layout(request, engine, serve_config, memory_gib, ["--timeout", "0"])
    per_node = None
    for entry in app.get("deployments") or []:
        per_node = entry.get("max_replicas_per_node") or per_node
    wanted = planned_replicas(app)
    topology = replica_plan.Topology(replicas=wanted, replicas_per_node=per_node,
                                     span_nodes=script != "ray-placement-group.py")
    plan = replica_plan.plan_replicas(engine, serve_config, topology,
                                      cluster.list_nodes())
    print("\n".join(plan.lines()), flush=True)
    if plan.slots < wanted:
        problems.append(f"{name}: {wanted} replica(s) planned, the cluster's nodes hold "
                        f"{plan.slots}")
    return problems


def controller_routing(document: dict[str, Any]) -> str:
    """The routing whose HAProxy settings the applications need (one set per Serve): session's
    header hash if one asks for it, else prefix's (the body handed to a route deployment, which
    spread does not mind) wherever one may route by prefix (auto resolves when it is built)."""
    routings = {str((app.get("args") or {}).get("routing", AUTO_ROUTING))
                for app in document.get("applications") or []}
    if "session" in routings:
        return "session"
    return "prefix" if routings & {"prefix", AUTO_ROUTING} else "spread"


def plan_config(path: str, memory_gib: float | None = None) -> int:
    """Check every application of a Serve config against the connected cluster."""
    from common.deploy_options import controller_env

    document = read_config(path)
    problems: list[str] = []
    for app in document.get("applications") or []:
        problems += check_app(app, memory_gib)
    env = controller_env("haproxy", controller_routing(document))
    print("note: `serve deploy` starts Serve with the environment of `ray start`: set "
          + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
          + " there on every node (README: 从配置文件部署)", file=sys.stderr)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if problems:
        return cli.EXIT_UNHEALTHY
    print(f"{path}: ready for `serve deploy`")
    return cli.EXIT_OK
