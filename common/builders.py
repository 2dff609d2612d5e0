"""Serve application builders (`import_path: common.builders:force_multi` ...) running the scripts' own build()."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from common import cli
from common.serve_config import PROJECT_ROOT, builder_argv, script_name


def load_script(script_file: str) -> ModuleType:
    """A deployment script as a module."""
    name = script_name(script_file)
    return load_file_module(PROJECT_ROOT / name)


def load_file_module(path: Path) -> ModuleType:
    """A top-level script of this project as a module, loaded once (their names have hyphens,
    one has no suffix)."""
    module_name = "_script_" + path.name.replace("-", "_").replace(".py", "")
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_loader(module_name, loader)
    if spec is None:  # never, with a file loader given; module_from_spec needs a spec
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def script_parser_of(module: ModuleType):
    from common.deploy import script_parser

    return script_parser(module.__doc__, getattr(module, "add_topology_args", None),
                         getattr(module, "ENGINE_DEFAULTS", None),
                         getattr(module, "SERVE_DEFAULTS", None))


def build_script_app(script_file: str, args: dict[str, Any] | None):
    """The application a script deploys for the flags in `args` (the config's `args:` keys are
    the flags' names with underscores), parsed and validated by the script's own parser."""
    from common.deploy import parse_script_args

    module = load_script(script_file)
    parser = script_parser_of(module)
    argv = builder_argv(parser, dict(args or {}))
    namespace, engine, serve_config, request = parse_script_args(parser, argv)
    if request.auto and engine.device == "cuda":
        raise cli.ScriptError("an application config needs explicit --tensor-parallel-size and "
                              "--pipeline-parallel-size (`auto` is planned by the scripts and "
                              "`python check_cluster.py --model PATH`)", cli.EXIT_USAGE)
    from common import cluster
    from common.deploy import StagedApp, plan_and_build

    app = plan_and_build(module.topology, getattr(module, "build", None), namespace, engine,
                         serve_config, cluster.list_nodes())
    # Serve applies a config in one step: a staged redeploy is the scripts' alone.
    return app.final if isinstance(app, StagedApp) else app


def single_gpu(args: dict[str, Any]):
    return build_script_app("ray-single-gpu.py", args)


def force_multi(args: dict[str, Any]):
    return build_script_app("ray-force-multi.py", args)


def product(args: dict[str, Any]):
    return build_script_app("ray-product", args)


def placement_group(args: dict[str, Any]):
    return build_script_app("ray-placement-group.py", args)
