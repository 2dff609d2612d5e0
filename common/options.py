"""The scripts' flags for the replica's EngineConfig and ServeConfig, made from the fields' own declarations (replica/config.py: option)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable

from common.cli import add_flag
from common.layout import parallel_size
from replica.config import EngineConfig, ServeConfig, apply_cpu_defaults, option_fields

def json_object(text: str) -> dict[str, Any]:
    """A JSON object from the command line (argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


# The parsers a field's `parse` names (replica/config.py cannot import them), else its type's.
PARSERS: dict[str, Callable[[str], Any]] = {
    "parallel": parallel_size, "json": json_object,
    "str": str, "int": int, "float": float, "bool": bool}


def flag_of(option_field: dataclasses.Field) -> str:
    return option_field.metadata["flag"] or "--" + option_field.name.replace("_", "-")


def env_of(option_field: dataclasses.Field) -> str:
    return option_field.metadata["env"] or option_field.name.upper()


def parser_of(option_field: dataclasses.Field) -> Callable[[str], Any]:
    # Annotations are strings here (from __future__ import annotations): "int | None" -> int.
    name = option_field.metadata["parse"] or str(option_field.type).split("|")[0].strip()
    return PARSERS[name]


def flag_of_engine_field(name: str) -> str | None:
    """The flag of an EngineConfig field, or None."""
    return next((flag_of(f) for f in option_fields(EngineConfig) if f.name == name), None)


def add_option_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                     defaults: Any, only: list[str] | None = None) -> None:
    """The flags of `cls`'s option fields (or of those named in `only`), defaulting to
    `defaults`' values (an instance, or a dict of field name -> default)."""
    for option_field in option_fields(cls):
        if only is not None and option_field.name not in only:
            continue
        default = (defaults[option_field.name] if isinstance(defaults, dict)
                   else getattr(defaults, option_field.name))
        type_ = parser_of(option_field)
        extra: dict[str, Any] = {}
        if option_field.metadata["choices"]:
            extra["choices"] = list(option_field.metadata["choices"])
        if type_ is json_object:
            extra["metavar"] = "JSON"
        add_flag(parser, flag_of(option_field), dest=option_field.name, env=env_of(option_field),
                 default=default, type=type_, help=option_field.metadata["help"], **extra)


def add_engine_args(parser: argparse.ArgumentParser, defaults: EngineConfig | None = None) -> None:
    add_option_flags(parser.add_argument_group("engine (vLLM)"), EngineConfig,
                     defaults or EngineConfig())


def add_serve_args(parser: argparse.ArgumentParser, defaults: ServeConfig | None = None) -> None:
    add_option_flags(parser.add_argument_group("serving (Ray Serve)"), ServeConfig,
                     defaults or ServeConfig())


def _from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    config = _from_args(EngineConfig, args)
    # Replicas do not run in the driver's directory: a relative model folder must travel as an
    # absolute path (a Hugging Face ID, which is no local path, stays as given).
    if os.path.exists(config.model):
        config.model = os.path.abspath(config.model)
    if config.device == "cpu":
        apply_cpu_defaults(config)
    return config


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    return _from_args(ServeConfig, args)


