"""Gracefully stops this project's Ray Serve applications (in-flight requests finish first), optionally Serve itself."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from common import cluster
from common.ray_connect import connect
from common.cli import (EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, ScriptError, add_address_flag,
                        add_flag, exits_with_codes, make_parser, parse)

EPILOG = """\
Each replica stops taking new requests and finishes the ones it has, for up to its deployment's
graceful_shutdown_timeout_s (Serve's default 20 s), before it exits; --timeout bounds the whole wait.
exit status: 0 stopped (or nothing was running); 5 still deleting after --timeout; 3 Ray not reachable.
"""

PROGRESS_EVERY_S = 2.0


class _AppendReplacingDefault(argparse._AppendAction):
    """--app repeatable; the first one given replaces the env-var default instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def build_parser():
    parser = make_parser(__doc__, EPILOG)
    add_address_flag(parser)
    add_flag(parser, "--app", env="APP_NAME", default=None, action=_AppendReplacingDefault,
             help="Serve application to stop; repeatable or comma-separated (default: every "
                  "application this project's scripts deployed; others are listed and left "
                  "running)")
    add_flag(parser, "--all", type=bool, default=False,
             help="stop every Serve application on the cluster, this project's or not")
    add_flag(parser, "--timeout", env="STOP_TIMEOUT_S", default=60.0, type=float,
             help="seconds to wait for the applications to drain and disappear")
    add_flag(parser, "--shutdown", type=bool, default=False,
             help="afterwards also shut Serve down entirely (controller and HTTP proxies)")
    return parser


def _names(raw) -> list[str]:
    items = [raw] if isinstance(raw, str) else list(raw or [])
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def _progress(apps: dict, waiting: list[str]) -> str:
    parts = []
    for name in waiting:
        a = apps.get(name)
        if a is None:
            parts.append(f"{name}: gone")
            continue
        states: dict = {}
        for d in a["deployments"].values():
            for k, v in d["replica_states"].items():
                states[k] = states.get(k, 0) + v
        reps = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no replicas"
        parts.append(f"{name}: {a['status']} ({reps})")
    return "; ".join(parts)


def _end_prefix_indexes(apps: Sequence[str]) -> None:
    """End the prefix index an application under --routing prefix kept (a detached actor:
    Serve does not know it)."""
    import ray

    from replica.prefix_routing import SERVE_NAMESPACE, index_actor_name

    for app in apps:
        try:
            actor = ray.get_actor(index_actor_name(app), namespace=SERVE_NAMESPACE)
        except ValueError:
            continue  # the application did not route by prefix
        ray.kill(actor)
        print(f"ended {app}'s prefix index")


@exits_with_codes
def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    connect(args.address)
    from ray import serve

    serve_running = cluster.serve_client() is not None
    apps = cluster.serve_apps() if serve_running else {}
    wanted = _names(args.app)
    if wanted:
        targets = [n for n in wanted if n in apps]
    else:
        targets = sorted(n for n, a in apps.items() if args.all or a["ours"])
        others = sorted(set(apps) - set(targets))
        if others:
            print(f"left running (not deployed by this project; --all stops them too): "
                  f"{', '.join(others)}")
    for name in wanted:
        if name not in apps:
            print(f"not running: application {name!r}")

    if not targets:
        if not serve_running:
            print("Nothing is running: Serve is not started on this cluster.")
        elif wanted:
            print(f"Nothing is running under {', '.join(map(repr, wanted))}"
                  f" (running: {', '.join(sorted(apps)) or 'none'}).")
        elif apps:
            print("Nothing to stop: no application of this project is running.")
        else:
            print("Nothing is running: Serve has no applications.")
        if args.shutdown and serve_running:
            serve.shutdown()
            print("Serve shut down.")
        return EXIT_OK

    counts = {n: sum(sum(d["replica_states"].values()) for d in apps[n]["deployments"].values())
              for n in targets}
    print(f"Stopping {', '.join(f'{n} ({counts[n]} replica(s))' for n in targets)}; "
          f"waiting up to {args.timeout:g} s for in-flight requests to finish...")
    start = time.monotonic()
    try:
        for name in targets:
            serve.delete(name, _blocking=False)
    except Exception as exc:  # noqa: BLE001 - any failure: one line with the reason for the operator
        raise ScriptError(f"could not ask Serve to delete {targets}: {type(exc).__name__}: "
                          f"{exc}", EXIT_FAILURE) from None

    waiting = list(targets)
    last_report = 0.0
    while True:
        current = cluster.serve_apps()
        waiting = [n for n in waiting if n in current]
        elapsed = time.monotonic() - start
        if not waiting:
            break
        if elapsed >= args.timeout:
            raise ScriptError(
                f"still stopping after {args.timeout:g} s: {_progress(current, waiting)}. "
                "Replicas may be draining long requests (graceful_shutdown_timeout_s); rerun to "
                "keep waiting, or check with check_cluster.py.", EXIT_TIMEOUT)
        if elapsed - last_report >= PROGRESS_EVERY_S:
            print(f"  {elapsed:5.1f} s  {_progress(current, waiting)}", flush=True)
            last_report = elapsed
        time.sleep(0.5)

    print(f"Stopped {', '.join(targets)} in {time.monotonic() - start:.1f} s.")
    _end_prefix_indexes(targets)
    if args.shutdown:
        serve.shutdown()
        print("Serve shut down (controller and proxies stopped).")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
