"""Command-line plumbing shared by every script: flags with env-var fallbacks, exit codes."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable, Sequence

# Exit codes shared by all scripts, so operators' automation can tell failures apart.
EXIT_OK = 0
EXIT_FAILURE = 1          # the thing asked for failed (deploy failed, requests failed, ...)
EXIT_USAGE = 2            # bad flags (argparse's own code), incl. a layout the GPUs cannot hold
EXIT_RAY_UNREACHABLE = 3  # no Ray cluster at --address
EXIT_UNHEALTHY = 4        # the cluster answered but something is pending/unhealthy/dead,
                          # or its GPU nodes lack the model folder / differ in versions
EXIT_TIMEOUT = 5          # a wait ran out (e.g. replicas still PENDING)
EXIT_RAY_AUTH = 6         # the cluster refused this process's Ray auth token (or it has none)


class ScriptError(Exception):
    """A failure a script reports as one `error: ...` line on stderr and its exit code. Library
    code raises it; only the scripts' main functions (wrapped by exits_with_codes) turn it into
    the message and the status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def exits_with_codes(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps a script's main(): a ScriptError becomes its message and its exit code."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except ScriptError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return err.code

    return wrapper


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


def make_parser(description: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    # No abbreviations: a `vllm serve` flag passed through must never match a prefix of ours.
    return argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False,
                                   formatter_class=HelpFormatter)


def str_to_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def int_in_range(low: int, high: int | None, name: str) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (no upper bound for None), named in argparse's
    error message ("invalid <name> value")."""
    def convert(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be in {low}..{'' if high is None else high}")
        return value
    convert.__name__ = name
    return convert


positive_int = int_in_range(1, None, "positive integer")
non_negative_int = int_in_range(0, None, "non-negative integer")
port_number = int_in_range(0, 65535, "port number (0-65535)")


# Every flag's environment fallback carries the project's prefix: generic names (API_KEY, DEVICE,
# MODEL_PATH, ...) are set by other tools, and a stray one must not turn on auth with someone
# else's key or put a CPU engine on a GPU cluster. Ray's own variables keep Ray's names.
ENV_PREFIX = "DEEPSEEK_SERVE_"
RAY_ENV_NAMES = frozenset({"RAY_ADDRESS"})


def env_name(name: str) -> str:
    """The environment variable a flag reads: NAME -> DEEPSEEK_SERVE_NAME, Ray's own as Ray names them."""
    return name if name in RAY_ENV_NAMES or name.startswith(ENV_PREFIX) else ENV_PREFIX + name


def project_env(name: str, default: str | None = None) -> str | None:
    """A project setting read from the environment by its prefixed name (env_name)."""
    return os.environ.get(env_name(name), default)


_warned_unprefixed: set[str] = set()


def warn_unprefixed(name: str, flag: str) -> None:
    """Says once on stderr that a generic variable this project no longer reads is set."""
    old = name.removeprefix(ENV_PREFIX)
    if old != name and os.environ.get(old) not in (None, "") and old not in _warned_unprefixed:
        _warned_unprefixed.add(old)
        print(f"warning: environment variable {old} is ignored (other tools use that name); "
              f"set {name} for {flag}", file=sys.stderr, flush=True)


def env_default(env: str | None, default: Any, convert: Callable[[str], Any] | None) -> Any:
    """The flag's default: the env var's value (converted) when set, else `default`."""
    if env and os.environ.get(env) not in (None, ""):
        raw = os.environ[env]
        if convert is None:
            return raw
        try:
            return convert(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ScriptError(f"environment variable {env}={raw!r} is invalid: {exc}",
                              EXIT_USAGE) from None
    return default


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str,
             env: str | None = None, default: Any = None, type: Callable[[str], Any] | None = None,
             help: str = "", **kwargs: Any) -> argparse.Action:
    """argparse.add_argument with an env-var fallback, named in --help as [env: NAME]."""
    if type is bool:
        type = str_to_bool
        kwargs.setdefault("nargs", "?")
        kwargs.setdefault("const", True)
    if env:
        env = env_name(env)
        warn_unprefixed(env, names[-1] if names else "")
        help = f"{help} [env: {env}]" if help else f"[env: {env}]"
    value = env_default(env, default, type)
    if type is not None:  # argparse's own default is None; its stubs do not accept None
        kwargs["type"] = type
    action = parser.add_argument(*names, default=value, help=help, **kwargs)
    # What the docs' flag table shows (common/flag_docs.py): the declared default, not the
    # value an env var of the shell that built the parser gave it.
    action.env_var = env  # type: ignore[attr-defined]
    action.declared_default = default  # type: ignore[attr-defined]
    return action


def add_address_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--address", env="RAY_ADDRESS", default="auto",
             help="Ray cluster to connect to ('auto' finds the local cluster started by `ray start`)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(list(argv) if argv is not None else None)
