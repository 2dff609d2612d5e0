"""The one module that touches Ray's private interfaces, each checked against the installed Ray."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from replica import versions


class RayIncompatible(RuntimeError):
    """The installed Ray lacks an internal this project needs: one message names what is missing,
    the installed version and the tested ones."""


def ray_version() -> str:
    import ray

    return str(ray.__version__)


def _incompatible(what: str) -> RayIncompatible:
    return RayIncompatible(
        f"the installed Ray {ray_version()} lacks {what}, which this project needs; tested "
        f"pairs: {versions.tested_table()}. Install a tested Ray (requirements.txt).")


def _symbol(module: str, name: str) -> Any:
    """`module.name` of the installed Ray, or RayIncompatible naming it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _incompatible(f"{module}.{name}") from None


# Every private symbol used below, so check() can list all that are missing at once.
_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("ray._private.state", "actors"),
    ("ray._private.state", "available_resources_per_node"),
    ("ray._private.utils", "read_ray_address"),
    ("ray._private.worker", "_global_node"),
    ("ray._private.worker", "global_worker"),
    ("ray._private.services", "canonicalize_bootstrap_address_or_die"),
    ("ray._private.authentication.authentication_token_setup", "_enable_token_auth"),
    ("ray._raylet", "AuthenticationTokenLoader"),
    ("ray._raylet", "GcsClient"),
    ("ray.serve.context", "_get_global_client"),
    ("ray.experimental.internal_kv", "_internal_kv_get"),
    ("ray.experimental.internal_kv", "_internal_kv_put"),
    ("ray.experimental.internal_kv", "_internal_kv_del"),
    ("ray.experimental.internal_kv", "_internal_kv_list"),
    ("ray._common.usage.usage_constants", "EXTRA_USAGE_TAG_PREFIX"),
    ("ray._common.usage.usage_constants", "USAGE_STATS_NAMESPACE"),
    ("ray", "_config"),
)


def check() -> list[str]:
    """Problems with the installed Ray: each internal this project needs that is missing."""
    problems = []
    for module, name in _SYMBOLS:
        try:
            _symbol(module, name)
        except RayIncompatible as err:
            problems.append(str(err))
    options = inspect.signature(_symbol("ray.serve.deployment", "Deployment").options)
    if "_internal" not in options.parameters:
        problems.append(str(_incompatible("Deployment.options(_internal=...)")))
    if not hasattr(_symbol("ray.serve.deployment", "Application"),
                   "_with_ingress_request_router"):
        problems.append(str(_incompatible("Application._with_ingress_request_router")))
    if not hasattr(_symbol("ray.serve.handle", "DeploymentHandle"), "choose_replica"):
        problems.append(str(_incompatible("DeploymentHandle.choose_replica")))
    return problems


# ---- cluster state (GCS) ----------------------------------------------------------------------


def actor_table() -> dict:
    """Actor ID -> the GCS's record of every actor (state, class, node, pid, ...)."""
    return _symbol("ray._private.state", "actors")()


def available_resources_per_node() -> dict[str, dict]:
    return _symbol("ray._private.state", "available_resources_per_node")()


def head_node_ids() -> set[str]:
    """IDs of the nodes that were started as a head, dead ones too (Ray's own node list gives a
    dead node no resources, so not the head's marker): what tells a restarted head apart."""
    info = _symbol("ray._private.worker", "global_worker").gcs_client.get_all_node_info(timeout=30)
    return {node_id.hex() for node_id, node in info.items() if node.is_head_node}


def gcs_storage() -> str | None:
    """Where the connected cluster's GCS keeps its state, as the head's `ray start` recorded it
    in the GCS's own store: "redis" (GCS fault tolerance: the head can restart and the cluster
    with it), "memory" or "rocksdb"; None when nothing was recorded. Ray records it whether or
    not usage stats are on."""
    prefix = _symbol("ray._common.usage.usage_constants", "EXTRA_USAGE_TAG_PREFIX")
    namespace = _symbol("ray._common.usage.usage_constants", "USAGE_STATS_NAMESPACE")
    value = kv_get(f"{prefix}gcs_storage", namespace=namespace)
    return value.decode() if value else None


def metrics_export_interval_s() -> float:
    """How often this process's metrics reach its node's metrics agent: Ray's
    metrics_report_interval_ms, which Ray's exporter floors at one second. The agent drops a
    gauge series that was not exported again within two of these."""
    config = _symbol("ray", "_config")
    if not hasattr(config, "metrics_report_interval_ms"):
        raise _incompatible("ray._config.metrics_report_interval_ms")
    return max(int(config.metrics_report_interval_ms()), 1000) / 1000


def recorded_cluster_address() -> str | None:
    """The address `ray start` recorded last on this machine (/tmp/ray/ray_current_cluster)."""
    return _symbol("ray._private.utils", "read_ray_address")()


def session_dir() -> str | None:
    """The session directory of the cluster this driver is connected to (None: not connected)."""
    node = _symbol("ray._private.worker", "_global_node")
    return node.get_session_dir_path() if node is not None else None


def bootstrap_address(address: str) -> str:
    """'auto' or host:port as Ray resolves it (ConnectionError/ValueError when it cannot)."""
    return _symbol("ray._private.services", "canonicalize_bootstrap_address_or_die")(address)


# A namespace of the GCS's key-value store of our own (Ray's and Serve's keys live in others).
KV_NAMESPACE = "deepseek-serve"


def kv_put(key: str, value: bytes) -> None:
    _symbol("ray.experimental.internal_kv", "_internal_kv_put")(
        key.encode(), value, overwrite=True, namespace=KV_NAMESPACE)


def kv_get(key: str, namespace: str = KV_NAMESPACE) -> bytes | None:
    """A value of the GCS's key-value store (our namespace unless another is named)."""
    return _symbol("ray.experimental.internal_kv", "_internal_kv_get")(
        key.encode(), namespace=namespace)


def kv_items(prefix: str) -> dict[str, bytes]:
    """Key -> value of every key of our namespace that starts with prefix."""
    keys = _symbol("ray.experimental.internal_kv", "_internal_kv_list")(
        prefix.encode(), namespace=KV_NAMESPACE)
    values = {key.decode(): kv_get(key.decode()) for key in keys}
    return {key: value for key, value in values.items() if value is not None}


def kv_del(key: str) -> None:
    _symbol("ray.experimental.internal_kv", "_internal_kv_del")(key.encode(),
                                                                namespace=KV_NAMESPACE)


# ---- token auth -----------------------------------------------------------------------------


def token_available() -> bool:
    """True when Ray finds an auth token here, whether or not token auth is on in this process."""
    loader = _symbol("ray._raylet", "AuthenticationTokenLoader")
    return bool(loader.instance().has_token(ignore_auth_mode=True))


def enable_token_auth() -> None:
    """Token auth on in this process (what RAY_AUTH_MODE=token does at import)."""
    _symbol("ray._private.authentication.authentication_token_setup", "_enable_token_auth")()


def gcs_client(address: str) -> Any:
    """A GCS client, which raises ray.exceptions.AuthenticationError on refused credentials."""
    return _symbol("ray._raylet", "GcsClient")(address=address)


# ---- Serve ----------------------------------------------------------------------------------


def serve_client() -> Any:
    """The Serve controller's client, or None when no controller runs (never starts one)."""
    get_client: Callable[..., Any] = _symbol("ray.serve.context", "_get_global_client")
    return get_client(raise_if_no_controller_running=False)


def serve_details(client: Any) -> dict:
    """The controller's whole state (applications, deployments, replicas, proxies)."""
    return client.get_serve_details() or {}


def gang_context() -> Any:
    """This replica's gang (rank, world_size, gang_id: Serve's GangContext), None outside one."""
    from ray import serve

    context = serve.get_replica_context()
    if not hasattr(context, "gang_context"):
        raise _incompatible("ReplicaContext.gang_context (Serve's gang scheduling)")
    return context.gang_context


def with_version(deployment: Any, version: str) -> Any:
    """deployment.options(version=...): a replica whose version is unchanged is updated in place
    on redeploy instead of restarted. Serve's public API takes it only through this keyword
    (its declarative path sets it itself); without it every redeploy, even a --num-replicas
    change, restarts every replica, so a Ray that refuses it is an error, not a fallback."""
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError) as exc:
        raise _incompatible(f"Deployment.options(version=..., _internal=True) ({exc})") from None


# ---- --routing prefix: Serve's HAProxy asks a route deployment (common/deploy.py) --------------


def with_ingress_request_router(app: Any, router: Any) -> Any:
    """`app` with `router` (an application whose POST /internal/route names a replica of `app`
    for each request) as the router Serve's HAProxy consults, with the request's body, before
    sending each request straight to that replica. The hook is private to Ray (Ray Serve LLM
    attaches its own router with it)."""
    attach = getattr(app, "_with_ingress_request_router", None)
    if attach is None:
        raise _incompatible("Application._with_ingress_request_router")
    return attach(router)


async def choose_backend(handle: Any, payload: Any) -> tuple[str, int, str]:
    """(host, port, replica ID) of the replica of `handle`'s deployment that its request router
    chooses for `payload`, as HAProxy's consulted router must answer: the replica's own HTTP
    server and its full ID. Nothing is reserved on the replica: HAProxy sends the request."""
    if not getattr(handle, "is_initialized", True):
        handle._init()
    async with handle.choose_replica(payload, _reserve=False) as selection:
        replica = selection._replica
        endpoint = replica.backend_http_endpoint
        if endpoint is None:
            raise RuntimeError(f"replica {selection.replica_id} has no HTTP endpoint")
        return endpoint[0], endpoint[1], replica.replica_id.to_full_id_str()
