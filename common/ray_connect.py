"""Connects a script to a Ray cluster: the address probed first, token auth matched to the cluster, one-line errors."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from typing import Any

from replica import ray_compat
from common.cli import EXIT_RAY_AUTH, EXIT_RAY_UNREACHABLE, ScriptError, project_env

# Drivers of this project share one namespace so that named/detached actors one script
# creates can be found by the next one.
NAMESPACE = project_env("RAY_NAMESPACE", "deepseek-serve") or "deepseek-serve"

# A refused or filtered GCS port must fail fast: ray.init itself retries for ~20 s or more.
CONNECT_TIMEOUT_S = float(project_env("RAY_CONNECT_TIMEOUT_S", "5") or "5")


def _unreachable(tried: str, detail: Any) -> ScriptError:
    detail = " ".join(str(detail).split()).rstrip(".")  # Ray's messages span lines; keep ours to one
    return ScriptError(f"cannot reach a Ray cluster at {tried!r}: {detail}. Start one with "
                       f"`ray start --head` on the head node, or point --address / RAY_ADDRESS "
                       f"at the head's GCS address (host:6379).", EXIT_RAY_UNREACHABLE)


def split_host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


AUTH_HELP = ("The head made its token with `ray get-auth-token --generate` (~/.ray/auth_token "
             "there). Give this machine the same token: copy that file to ~/.ray/auth_token "
             "(chmod 600), or set RAY_AUTH_TOKEN_PATH to a copy, or RAY_AUTH_TOKEN to its value. "
             "README: 集群与令牌认证 (cluster and token authentication).")


def _auth_refused(tried: str, detail: Any) -> ScriptError:
    detail = " ".join(str(detail).split())[:300]
    return ScriptError(f"the Ray cluster at {tried!r} requires token authentication and refused "
                       f"this process: {detail}. {AUTH_HELP}", EXIT_RAY_AUTH)


@contextlib.contextmanager
def _stderr_silenced():
    """Ray's C++ GCS client logs its own warning on an auth refusal; ours says it better."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def token_available() -> bool:
    """True when this process can find a Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), whether or not token auth is switched on in it."""
    return ray_compat.token_available()


def _match_cluster_auth(target: str, tried: str) -> str:
    """Switch this process to token auth when the cluster requires it and a token is here.

    Ray turns token auth on by itself only for `ray.init(address="auto")`; with an explicit
    host:port (or RAY_ADDRESS) the driver must be told with RAY_AUTH_MODE=token. Asking the GCS
    answers the question for every address form, so operators need neither variable. Returns how
    the token was found, for the log line ("" when the cluster does not use auth)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        if not _gcs_refuses(target):
            return ""
        if mode == "disabled":
            raise _auth_refused(tried, "RAY_AUTH_MODE=disabled is set here; unset it")
        if not token_available():
            raise _auth_refused(tried, "no token found on this machine")
        ray_compat.enable_token_auth()
    if _gcs_refuses(target):
        raise _auth_refused(tried, f"the token from {token_source()} was refused (not the "
                                   "head's token)")
    return f"token auth ({token_source()})"


def _gcs_refuses(target: str) -> bool:
    """True when the GCS at `target` refuses this process's credentials (or lack of them)."""
    from ray.exceptions import AuthenticationError

    try:
        with _stderr_silenced():
            ray_compat.gcs_client(target)
    except AuthenticationError:
        return True
    except Exception:  # noqa: BLE001 - anything else is ray.init's to report
        return False
    return False


def token_source() -> str:
    """Where this process's Ray token comes from, in Ray's own lookup order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def connect(address: str = "auto", *, namespace: str = NAMESPACE,
            timeout_s: float = CONNECT_TIMEOUT_S, runtime_env: dict | None = None) -> None:
    """Connects this process to the cluster (with token auth when the cluster uses it), or raises
    a ScriptError with EXIT_RAY_UNREACHABLE / EXIT_RAY_AUTH and one line. `runtime_env` is the job's: Serve
    copies it into every deployment this process deploys."""
    import ray
    if ray.is_initialized():
        return
    tried = address or "auto"
    target = address or "auto"
    if not target.startswith("ray://"):
        try:
            target = ray_compat.bootstrap_address(target)
        except (ConnectionError, ValueError) as exc:
            raise _unreachable(tried, exc) from exc
    probe = split_host_port(target[len("ray://"):] if target.startswith("ray://") else target)
    if probe is None:
        raise _unreachable(tried, "not a host:port address")
    # Preflight: a closed port answers at once here, whereas ray.init would retry for long.
    try:
        socket.create_connection(probe, timeout=timeout_s).close()
    except OSError as exc:
        raise _unreachable(tried, f"nothing answers at {probe[0]}:{probe[1]} "
                                  f"({exc.strerror or exc})") from exc
    auth = "" if target.startswith("ray://") else _match_cluster_auth(target, tried)
    # Something listens but may not be a GCS: keep ray.init's own retry loop short too.
    saved = os.environ.get("RAY_gcs_server_port_wait_time_s")
    os.environ["RAY_gcs_server_port_wait_time_s"] = str(max(1, int(timeout_s)))
    try:
        ray.init(address=target, namespace=namespace, logging_level=logging.WARNING,
                 log_to_driver=False, runtime_env=runtime_env)
    except Exception as exc:  # any failure here means "not reachable" to the operator (re-raised)
        raise _unreachable(tried, f"{type(exc).__name__}: {exc}") from exc
    finally:
        if saved is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        else:
            os.environ["RAY_gcs_server_port_wait_time_s"] = saved
    print(f"connected to Ray at {target}" + (f" with {auth}" if auth else ""), file=sys.stderr,
          flush=True)
