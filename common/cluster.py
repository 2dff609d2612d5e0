"""One snapshot of a Ray cluster and its Serve apps, and why what is pending does not fit."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any


from common.cli import ScriptError
from replica import data_parallel, ray_compat
from replica.config import PROJECT_MARKER_ENV

UNKNOWN = "unknown"
_HEAD_MARKER = "node:__internal_head__"
REPLICA_CLASS_PREFIX = "ServeReplica:"
_REPLICA_NAME_PREFIX = "SERVE_REPLICA::"
# Resources that describe a node rather than capacity a request competes for.
_IGNORED_RESOURCE_PREFIXES = ("node:", "accelerator_type:", "bundle_group_")
_GPU_MEMORY_LABELS = ("gpu-memory-gb", "gpu_memory_gb", "ray.io/gpu-memory-gb", "nvidia.com/gpu.memory")
_GPU_MODEL_LABELS = ("ray.io/accelerator-type", "accelerator-type", "nvidia.com/gpu.product")


# --------------------------------------------------------------------------- data


@dataclass
class NodeInfo:
    node_id: str
    ip: str
    alive: bool
    is_head: bool
    cpus_total: float
    cpus_available: float
    gpus_total: float
    gpus_available: float
    gpu_model: str = UNKNOWN
    gpu_memory_gb: float | None = None
    labels: dict = field(default_factory=dict)


@dataclass
class ReplicaInfo:
    app: str
    deployment: str
    replica_id: str
    # Serve's replica state (RUNNING, STARTING, ...), except PENDING_CREATION when the
    # replica's actor is still waiting for resources: Serve only says STARTING then.
    state: str
    node_id: str | None
    node_ip: str | None
    actor_id: str | None
    pid: int | None
    resources: dict = field(default_factory=dict)
    # The node of each bundle of the replica's own placement group (none without one), and the
    # tensor-parallel size that makes consecutive ranks a pipeline stage.
    bundle_nodes: list = field(default_factory=list)
    tensor_parallel_size: int | None = None
    # With --data-parallel-size: the replica's gang ({id, rank, size}), as its rank recorded it.
    gang: dict | None = None


@dataclass
class PlacementGroupInfo:
    pg_id: str
    name: str
    state: str
    strategy: str
    bundles: list = field(default_factory=list)
    bundle_nodes: list = field(default_factory=list)


@dataclass
class PendingDemand:
    shape: dict
    count: int
    kind: str  # "actor/task" or "placement_group"
    strategy: str | None
    reason: str
    pg_id: str | None = None
    bundles: list = field(default_factory=list)


@dataclass
class ClusterReport:
    nodes: list
    apps: dict
    replicas: list
    placement_groups: list
    pending: list
    warnings: list
    healthy: bool
    ingress: str | None = None   # what answers HTTP: haproxy | proxy (see common.deploy)
    # Where the GCS keeps the cluster's state: redis (fault tolerant), memory, rocksdb; None: unknown.
    gcs_storage: str | None = None


# --------------------------------------------------------------------------- helpers


def _num(x: Any) -> float:
    try:
        return float(x or 0)
    except (TypeError, ValueError):
        return 0.0


def _fmt_num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x == int(x) else f"{x:g}"


def _fmt_amount(resource: str, value: float) -> str:
    if resource in ("memory", "object_store_memory"):
        return f"{value / 2**30:.1f} GiB {resource}"
    return f"{_fmt_num(value)} {resource}"


def format_shape(shape: dict) -> str:
    if not shape:
        return "{}"
    return "{" + ", ".join(f"{k}: {_fmt_num(v) if k not in ('memory', 'object_store_memory') else f'{v / 2**30:.1f}GiB'}"
                           for k, v in sorted(shape.items())) + "}"


def _capacity(shape: dict) -> dict:
    return {k: _num(v) for k, v in (shape or {}).items()
            if _num(v) > 0 and not k.startswith(_IGNORED_RESOURCE_PREFIXES)}


def short_id(node_id: str | None, n: int = 12) -> str:
    return (node_id or "-")[:n]


def _enum_str(value: Any) -> str:
    return str(getattr(value, "value", value))


# ---- Ray's state, read once per snapshot ------------------------------------------------------
# Every private or state-API call of this module goes through these readers. Inside
# `state_snapshot()` each is read once and reused, so a report's "free" and "total" come from
# the same moment (and one check_cluster.py run asks the GCS once per kind of state).

_SNAPSHOT: dict[str, Any] | None = None


@contextlib.contextmanager
def state_snapshot():
    global _SNAPSHOT
    outer = _SNAPSHOT
    _SNAPSHOT = {} if outer is None else outer
    try:
        yield
    finally:
        _SNAPSHOT = outer


def _read(kind: str, fetch):
    if _SNAPSHOT is None:
        return fetch()
    if kind not in _SNAPSHOT:
        _SNAPSHOT[kind] = fetch()
    return _SNAPSHOT[kind]


def ray_nodes() -> list[dict]:
    import ray
    return _read("nodes", ray.nodes)


def _cluster_status():
    from ray.autoscaler.v2.sdk import get_cluster_status
    return _read("cluster_status", lambda: get_cluster_status(_gcs_address()))


def _read_or(kind: str, fetch, default):
    """_read(kind, fetch), or `default` when the read fails (what it reads is optional)."""
    def guarded():
        try:
            return fetch()
        except Exception:  # noqa: BLE001 - the caller says what `default` means
            return default

    return _read(kind, guarded)


def gcs_storage() -> str | None:
    """Where the GCS keeps the cluster's state (see ray_compat.gcs_storage); None: unknown."""
    return _read_or("gcs_storage", ray_compat.gcs_storage, None)


def _raw_actors() -> dict:
    return _read("actors", ray_compat.actor_table)


def _placement_group_table() -> dict:
    import ray
    return _read("placement_groups", ray.util.placement_group_table)


def _gcs_address() -> str:
    import ray
    return ray.get_runtime_context().gcs_address


def serve_client():
    """The Serve controller's client, or None when Serve is not running (never starts it)."""
    return ray_compat.serve_client()


def serve_ingress() -> str | None:
    """'haproxy' or 'proxy': what answers HTTP for the running Serve (see common.deploy), from
    the proxy actors it started; None when none is alive."""
    alive = {a["class_name"] for a in _actor_table().values() if a["state"] == "ALIVE"}
    if "HAProxyManager" in alive:
        return "haproxy"
    return "proxy" if "ProxyActor" in alive else None


def proxy_environments(class_name: str) -> list[dict[str, str]]:
    """The environments of Serve's alive proxy actors of `class_name` ("ProxyActor",
    "HAProxyManager") on this machine: the settings Serve's controller gave them when it
    started (see common.deploy_options); actors on other machines are not readable here."""
    import psutil

    environments = []
    for actor in _actor_table().values():
        if actor["class_name"] != class_name or actor["state"] != "ALIVE":
            continue
        try:
            environments.append(psutil.Process(int(actor["pid"])).environ())
        except (psutil.Error, TypeError, ValueError):
            continue  # on another machine, or gone
    return environments


def haproxy_setting(env_name: str, default: str) -> str | None:
    """A setting Serve's HAProxy runs with (`env_name` in its manager's environment, Serve's
    `default` when unset); None when no HAProxy manager is readable here."""
    environments = proxy_environments("HAProxyManager")
    return environments[0].get(env_name, default) if environments else None


def serve_spreads_load() -> bool | None:
    """Whether Serve's HTTP proxies run with node-local routing off (see common.deploy); None
    when no proxy is readable here."""
    environments = proxy_environments("ProxyActor")
    if not environments:
        return None
    return all(env.get("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "1").lower()
               not in ("1", "true") for env in environments)


# --------------------------------------------------------------------------- nodes


def _available_per_node() -> dict[str, dict]:
    try:
        status = _cluster_status()
        out = {n.node_id: n.available_resources()
               for n in list(status.active_nodes) + list(status.idle_nodes) if n.node_id}
        if out:
            return out
    except Exception:  # noqa: BLE001 - the GCS's own table below holds the same figures
        pass
    return _read("available", ray_compat.available_resources_per_node)


def list_nodes() -> list[NodeInfo]:
    available = _available_per_node()
    # Where this is unreadable, an alive head still shows by its resources.
    heads = _read_or("head_node_ids", ray_compat.head_node_ids, set())
    nodes = []
    for raw in ray_nodes():
        total = raw.get("Resources") or {}
        alive = bool(raw.get("Alive"))
        free = available.get(raw["NodeID"], {}) if alive else {}
        labels = dict(raw.get("Labels") or {})
        gpu_model = next((k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:")), None)
        gpu_model = gpu_model or next((labels[k] for k in _GPU_MODEL_LABELS if labels.get(k)), UNKNOWN)
        gpu_mem = None
        for key in _GPU_MEMORY_LABELS:
            if labels.get(key):
                try:
                    gpu_mem = float(str(labels[key]).lower().rstrip("gib").rstrip("g"))
                except ValueError:
                    pass
                break
        nodes.append(NodeInfo(
            node_id=raw["NodeID"], ip=raw.get("NodeManagerAddress", ""), alive=alive,
            is_head=_HEAD_MARKER in total or raw["NodeID"] in heads,
            cpus_total=_num(total.get("CPU")),
            cpus_available=_num(free.get("CPU")), gpus_total=_num(total.get("GPU")),
            gpus_available=_num(free.get("GPU")), gpu_model=gpu_model, gpu_memory_gb=gpu_mem,
            labels=labels))
    # Head first, then alive before dead, so the table reads top-down like the cluster.
    nodes.sort(key=lambda n: (not n.is_head, not n.alive, n.ip, n.node_id))
    return nodes


# --------------------------------------------------------------------------- serve


def _serve_details() -> dict:
    """The Serve controller's state ({} when no Serve runs); a controller that does not answer
    is an error (ServeUnreadable), never taken for "nothing is running"."""
    def fetch() -> dict:
        client = serve_client()
        if client is None:
            return {}
        try:
            return ray_compat.serve_details(client)
        except Exception as exc:  # any failure: the operator must see it (re-raised)
            raise ServeUnreadable(f"could not read Serve's state from its controller: "
                                  f"{type(exc).__name__}: {exc}") from exc

    return _read("serve_details", fetch)


class ServeUnreadable(ScriptError):
    """Serve's controller runs but its state could not be read."""


def deployment_user_configs(app: str) -> dict[str, Any]:
    """Deployment name -> the user_config Serve keeps for it, of one running application ({}
    when it does not run)."""
    deployments = ((_serve_details().get("applications") or {}).get(app) or {}).get(
        "deployments") or {}
    return {name: (dep.get("deployment_config") or {}).get("user_config")
            for name, dep in deployments.items()}


def serve_apps() -> dict:
    """App name -> {status, message, route_prefix, deployments: {name -> status, message, replica_states, target}}."""
    details = _serve_details()
    apps: dict = {}
    for name, app in (details.get("applications") or {}).items():
        deployments = {}
        for dname, dep in (app.get("deployments") or {}).items():
            states: dict = {}
            for rep in dep.get("replicas") or []:
                key = _enum_str(rep.get("state", UNKNOWN))
                states[key] = states.get(key, 0) + 1
            deployments[dname] = {
                "status": _enum_str(dep.get("status", UNKNOWN)),
                "message": dep.get("message") or "",
                "replica_states": states,
                "target_replicas": dep.get("target_num_replicas"),
            }
        apps[name] = {"status": _enum_str(app.get("status", UNKNOWN)), "message": app.get("message") or "",
                      "route_prefix": app.get("route_prefix"), "deployments": deployments,
                      "ours": any(deployed_by_project(dep)
                                  for dep in (app.get("deployments") or {}).values())}
    return apps


def deployed_by_project(deployment: dict) -> bool:
    """Whether a deployment of Serve's details was deployed by this project's scripts (its
    replicas carry PROJECT_MARKER_ENV, replica/config.py)."""
    options = (deployment.get("deployment_config") or {}).get("ray_actor_options") or {}
    env = ((options.get("runtime_env") or {}).get("env_vars") or {})
    return all(env.get(k) == v for k, v in PROJECT_MARKER_ENV.items())


def _replica_resources(dep: dict) -> dict:
    config = dep.get("deployment_config") or {}
    bundles = config.get("placement_group_bundles") or dep.get("placement_group_bundles")
    if bundles:
        total: dict = {}
        for bundle in bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + _num(v)
        return {**_capacity(total), "placement_group_bundles": bundles,
                "placement_group_strategy": config.get("placement_group_strategy") or "PACK"}
    required = dep.get("required_resources")
    if required is None:
        opts = config.get("ray_actor_options") or {}
        required = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0),
                    **(opts.get("resources") or {})}
    return _capacity(required)


def _replica_tensor_parallel_size(dep: dict) -> int | None:
    """The tensor-parallel size common/deploy_options.py puts in a multi-GPU replica's env vars."""
    from replica.parallel_layout import TP_ENV

    options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
    value = ((options.get("runtime_env") or {}).get("env_vars") or {}).get(TP_ENV)
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _actor_table() -> dict[str, dict]:
    """Actor id -> {state, node_id, ip, pid, class_name, name}, from the state API or the GCS."""
    return {aid: {"state": a.get("State"), "node_id": (a.get("Address") or {}).get("NodeID"),
                  "ip": (a.get("Address") or {}).get("IPAddress"), "pid": a.get("Pid"),
                  "class_name": a.get("ActorClassName", ""), "name": a.get("Name", "")}
            for aid, a in _raw_actors().items()}


_NIL_NODE = "0" * 56


def _replica_group_bundles() -> dict[str, dict]:
    """Bundles of each replica's own placement group, by name: Serve names a replica's group
    after its actor, and its details do not list the bundles (a TP=8 replica would otherwise show
    only the CPU its actor takes, not the 8 GPUs its group holds)."""
    table = _placement_group_table()
    return {g.get("name"): {"placement_group_bundles": [dict(b) for b in
                                                          (g.get("bundles") or {}).values()],
                            "deployment_config": {"placement_group_strategy": g.get("strategy")},
                            "bundle_nodes": [(g.get("bundles_to_node_id") or {}).get(k) or None
                                             for k in (g.get("bundles") or {})]}
            for g in table.values()
            if str(g.get("name", "")).startswith(_REPLICA_NAME_PREFIX) and g.get("state") != "REMOVED"}


def list_replicas(app: str | None = None) -> list[ReplicaInfo]:
    actors = _actor_table()
    replicas: list[ReplicaInfo] = []
    details = _serve_details()
    group_bundles = _replica_group_bundles() if details else {}
    gangs = _read("gangs", data_parallel.members) if details else {}
    for app_name, app_details in (details.get("applications") or {}).items():
        if app is not None and app_name != app:
            continue
        for dname, dep in (app_details.get("deployments") or {}).items():
            resources = _replica_resources(dep)
            tp = _replica_tensor_parallel_size(dep)
            for rep in dep.get("replicas") or []:
                actor = actors.get(rep.get("actor_id") or "") or next(
                    (a for a in actors.values() if a["name"] and a["name"] == rep.get("actor_name")
                     and a["state"] != "DEAD"), None)
                state = _enum_str(rep.get("state", UNKNOWN))
                node_id = rep.get("node_id") or (actor or {}).get("node_id")
                if actor and actor["state"] in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
                    # The GCS records the node a pending actor's lease was sent to, not where it runs.
                    state, node_id = actor["state"], None
                replicas.append(ReplicaInfo(
                    app=app_name, deployment=dname, replica_id=rep.get("replica_id", ""), state=state,
                    node_id=None if node_id in (None, "", _NIL_NODE) else node_id,
                    node_ip=rep.get("node_ip") or ((actor or {}).get("ip") or None if node_id else None),
                    actor_id=rep.get("actor_id") or None, pid=rep.get("pid") or (actor or {}).get("pid") or None,
                    resources=_replica_resources(group)
                    if (group := group_bundles.get(rep.get("actor_name"))) else resources,
                    bundle_nodes=list((group or {}).get("bundle_nodes") or []),
                    tensor_parallel_size=tp, gang=gangs.get(rep.get("replica_id", ""))))
    if details:
        return replicas
    # No controller answer: replica actors still tell where they are.
    for actor_id, a in actors.items():
        if not a["class_name"].startswith(REPLICA_CLASS_PREFIX) or a["state"] == "DEAD":
            continue
        if a["name"].startswith(_REPLICA_NAME_PREFIX) and a["name"].count("#") >= 2:
            app_name, dname, rid = a["name"][len(_REPLICA_NAME_PREFIX):].split("#", 2)
        else:
            _, app_name, dname = (a["class_name"].split(":", 2) + ["", ""])[:3]
            rid = actor_id[:8]
        if app is not None and app_name != app:
            continue
        node_id = None if a["node_id"] in (None, "", _NIL_NODE) or a["state"] != "ALIVE" else a["node_id"]
        replicas.append(ReplicaInfo(app=app_name, deployment=dname, replica_id=rid, state=a["state"],
                                    node_id=node_id, node_ip=a["ip"] if node_id else None,
                                    actor_id=actor_id, pid=a["pid"] or None, resources={}))
    return replicas


# --------------------------------------------------------------------------- placement groups


def list_placement_groups() -> list[PlacementGroupInfo]:
    table = _placement_group_table()
    groups = []
    for pg_id, pg in table.items():
        bundle_map = pg.get("bundles") or {}
        node_map = pg.get("bundles_to_node_id") or {}
        keys = sorted(bundle_map, key=lambda k: int(k))
        groups.append(PlacementGroupInfo(
            pg_id=pg_id, name=pg.get("name") or "", state=pg.get("state", UNKNOWN),
            strategy=pg.get("strategy", UNKNOWN), bundles=[dict(bundle_map[k]) for k in keys],
            bundle_nodes=[node_map.get(k) or None for k in keys]))
    return groups


# --------------------------------------------------------------------------- pending demands


def _fits(shape: dict, resources: dict) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in shape.items())


def _sub(resources: dict, shape: dict) -> dict:
    out = dict(resources)
    for k, v in shape.items():
        out[k] = out.get(k, 0.0) - v
    return out


def _node_pools(nodes: list[NodeInfo], free: bool) -> list[tuple[str, dict]]:
    available = _available_per_node() if free else {}
    pools = []
    by_id = {n.node_id: n for n in nodes if n.alive}
    for raw in ray_nodes():
        if raw["NodeID"] not in by_id:
            continue
        res = available.get(raw["NodeID"], {}) if free else (raw.get("Resources") or {})
        pools.append((raw["NodeID"], _capacity(res)))
    return pools


def _shortfall(shape: dict, pools: list[tuple[str, dict]], what: str) -> str:
    """'needs 16 GPU on one node; largest <what>: 8 GPU (node abc)' for the resources that don't fit."""
    parts = []
    for k, v in sorted(shape.items()):
        best_node, best = max(((nid, res.get(k, 0.0)) for nid, res in pools), key=lambda t: t[1],
                              default=(None, 0.0))
        if best + 1e-9 < v:
            where = f" (node {short_id(best_node)})" if best_node and best > 0 else ""
            label = "largest free" if what == "free" else "largest node has"
            parts.append(f"needs {_fmt_amount(k, v)} on one node; {label}: "
                         f"{_fmt_amount(k, best)}{where}")
    if not parts:
        parts.append(f"needs {format_shape(shape)} on one node; every resource fits on some node "
                     f"but no single node has all of them {'free' if what == 'free' else 'in total'}")
    return "; ".join(parts)


def _place(bundles: list[dict], pools: list[tuple[str, dict]], strategy: str | None) -> bool:
    """Whether the bundles can be placed on these pools under the strategy (greedy, first fit)."""
    if not bundles:
        return True
    strategy = (strategy or "PACK").upper()
    if strategy == "STRICT_PACK":
        total: dict = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        return any(_fits(total, res) for _, res in pools)
    left = [dict(res) for _, res in pools]
    used: set[int] = set()
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        for i, res in enumerate(left):
            if strategy == "STRICT_SPREAD" and i in used:
                continue
            if _fits(b, res):
                left[i] = _sub(res, b)
                used.add(i)
                break
        else:
            return False
    return True


def _pools(nodes: list[NodeInfo]) -> tuple[list, list]:
    return _node_pools(nodes, free=False), _node_pools(nodes, free=True)


def explain(bundles: list[dict], strategy: str | None, nodes: list[NodeInfo] | None = None,
            pools: tuple[list, list] | None = None) -> str:
    """Why a request of these bundles (one for an actor/task) is not placed. A pure function of
    `pools` ((node, total resources) and (node, free resources) lists) when they are given; else
    they are read from the cluster."""
    if pools is None:
        pools = _pools(nodes if nodes is not None else list_nodes())
    bundles = [_capacity(b) for b in bundles]
    totals, frees = pools
    alive = len(totals)
    if strategy is None or len(bundles) == 1 and (strategy or "").upper() != "STRICT_SPREAD":
        shape = bundles[0] if len(bundles) == 1 else {}
        if len(bundles) > 1:
            for b in bundles:
                for k, v in b.items():
                    shape[k] = shape.get(k, 0.0) + v
        if not any(_fits(shape, res) for _, res in totals):
            return (f"infeasible: {_shortfall(shape, totals, 'total')}. No node can ever "
                    f"fit it: lower the request (e.g. tensor_parallel_size) or add bigger nodes")
        if not any(_fits(shape, res) for _, res in frees):
            return (f"waiting for resources: {_shortfall(shape, frees, 'free')}. Other actors or "
                    f"placement groups hold the rest")
        return "fits on a node now; should be scheduled shortly (if it stays pending, check label selectors)"
    s = strategy.upper()
    if s == "STRICT_PACK":
        packed: dict = {}
        for b in bundles:
            for k, v in b.items():
                packed[k] = packed.get(k, 0.0) + v
        if not _place(bundles, totals, s):
            return (f"infeasible: STRICT_PACK puts all {len(bundles)} bundles on one node; "
                    f"{_shortfall(packed, totals, 'total')}")
        if not _place(bundles, frees, s):
            return (f"waiting for resources: STRICT_PACK puts all {len(bundles)} bundles on one node; "
                    f"{_shortfall(packed, frees, 'free')}")
    elif s == "STRICT_SPREAD":
        if len(bundles) > alive:
            return f"infeasible: STRICT_SPREAD needs {len(bundles)} distinct nodes; only {alive} alive"
        if not _place(bundles, totals, s):
            return (f"infeasible: STRICT_SPREAD needs {len(bundles)} distinct nodes that each hold one "
                    f"bundle of {format_shape(max(bundles, key=lambda b: sum(b.values())))}")
        if not _place(bundles, frees, s):
            fit = sum(1 for _, res in frees if any(_fits(b, res) for b in bundles))
            return (f"waiting for resources: STRICT_SPREAD needs {len(bundles)} distinct nodes with a "
                    f"bundle's resources free; {fit} node(s) have room now")
    else:
        if not _place(bundles, totals, s):
            return f"infeasible: the {len(bundles)} bundles ({s}) do not fit the cluster even when it is empty"
        if not _place(bundles, frees, s):
            return f"waiting for resources: the {len(bundles)} bundles ({s}) do not fit in what is free now"
    return "fits now; should be scheduled shortly"


def pending_demands(nodes: list[NodeInfo] | None = None) -> list[PendingDemand]:
    nodes = nodes if nodes is not None else list_nodes()
    pools = _pools(nodes)
    demands: list[PendingDemand] = []
    try:
        summary = _cluster_status().resource_demands
    except Exception:  # noqa: BLE001 - the autoscaler's view is optional: the placement group
        # table below still explains every pending group
        summary = None
    if summary is not None:
        for demand in summary.ray_task_actor_demand:
            for by_count in demand.bundles_by_count:
                bundle = dict(by_count.bundle)
                # Actors waiting inside a placement group: the group's own demand explains them.
                if any(k.startswith("bundle_group_") for k in bundle):
                    continue
                demands.append(PendingDemand(shape=bundle, count=by_count.count, kind="actor/task",
                                             strategy=None, reason=explain([bundle], None, nodes, pools)))
        for demand in summary.placement_group_demand:
            bundles = [dict(b.bundle) for b in demand.bundles_by_count for _ in range(b.count)]
            total: dict = {}
            for b in bundles:
                for k, v in b.items():
                    total[k] = total.get(k, 0.0) + v
            demands.append(PendingDemand(shape=total, count=1, kind="placement_group",
                                         strategy=demand.strategy, pg_id=demand.pg_id, bundles=bundles,
                                         reason=explain(bundles, demand.strategy or "PACK", nodes, pools)))
        return demands
    for pg in list_placement_groups():
        if pg.state not in ("PENDING", "RESCHEDULING"):
            continue
        total = {}
        for b in pg.bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        demands.append(PendingDemand(shape=total, count=1, kind="placement_group", strategy=pg.strategy,
                                     pg_id=pg.pg_id, bundles=pg.bundles,
                                     reason=explain(pg.bundles, pg.strategy, nodes, pools)))
    return demands


# --------------------------------------------------------------------------- report


def _matches_spread(app: str, deployment: str, spread: set) -> bool:
    return deployment in spread or f"{app}/{deployment}" in spread or f"{app}:{deployment}" in spread


def dead_node_warnings(nodes: list[NodeInfo], gcs: str | None) -> list[tuple[str, bool]]:
    """(warning, whether it makes the cluster unhealthy) per dead node. An old head beside an
    alive one is the head having restarted with the cluster kept (GCS fault tolerance): said,
    not a problem. Any other dead node is (a node that restarts joins with a new ID)."""
    head = next((n for n in nodes if n.alive and n.is_head), None)
    out = []
    for n in nodes:
        if n.alive:
            continue
        if n.is_head and head is not None:
            out.append((f"the head restarted: node {short_id(n.node_id)} ({n.ip}) is the old "
                        f"head, DEAD; the head is now {short_id(head.node_id)} ({head.ip}), "
                        "with the cluster's state reloaded from "
                        f"{'Redis' if gcs == 'redis' else 'the GCS store'}", False))
        else:
            out.append((f"node {short_id(n.node_id)} ({n.ip}) is DEAD (a node that restarts "
                        "joins with a new ID: see NODES)", True))
    return out


def collect_report(app: str | None = None, spread_deployments: set | None = None) -> ClusterReport:
    """The cluster's state and what is wrong with it, from one snapshot of Ray's state."""
    with state_snapshot():
        return _collect_report(app, spread_deployments)


def _collect_report(app: str | None, spread_deployments: set | None) -> ClusterReport:
    spread = set(spread_deployments or ())
    nodes = list_nodes()
    apps = serve_apps()
    if app is not None:
        apps = {k: v for k, v in apps.items() if k == app}
    replicas = list_replicas(app)
    groups = list_placement_groups()
    if app is not None:
        # Hide other apps' replica groups; keep groups made outside Serve (e.g. by a deploy script).
        groups = [g for g in groups if not g.name.startswith(_REPLICA_NAME_PREFIX)
                  or g.name.startswith(f"{_REPLICA_NAME_PREFIX}{app}#")]
    pending = pending_demands(nodes)
    pools = _pools(nodes)

    alive = [n for n in nodes if n.alive]
    gcs = gcs_storage()
    dead_nodes = dead_node_warnings(nodes, gcs)
    problems = any(problem for _, problem in dead_nodes)
    warnings = [text for text, _ in dead_nodes]
    for name, a in apps.items():
        if a["status"] != "RUNNING":
            problems = True
            msg = f": {a['message']}" if a["message"] else ""
            warnings.append(f"application {name} is {a['status']}{msg}")
        for dname, d in a["deployments"].items():
            if d["status"] not in ("HEALTHY",) and a["status"] == "RUNNING":
                problems = True
                warnings.append(f"deployment {name}/{dname} is {d['status']}"
                                + (f": {d['message']}" if d["message"] else ""))

    by_dep: dict[tuple[str, str], list[ReplicaInfo]] = {}
    for r in replicas:
        by_dep.setdefault((r.app, r.deployment), []).append(r)
    for (app_name, dname), reps in sorted(by_dep.items()):
        running = [r for r in reps if r.state == "RUNNING"]
        meant = len(reps) > 1 or _matches_spread(app_name, dname, spread)
        on = {r.node_id for r in running}
        if meant and len(reps) > 1 and running and len(on) == 1 and len(alive) > 1:
            node = next(iter(on))
            ip = next((n.ip for n in nodes if n.node_id == node), "?")
            warnings.append(f"deployment {app_name}/{dname}: all {len(running)} RUNNING replica(s) of "
                            f"{len(reps)} are on one node ({short_id(node)}, {ip}) although "
                            f"{len(alive)} nodes are alive: it is not spread across machines")
        for r in reps:
            if r.state == "RUNNING":
                continue
            problems = True
            why = ""
            if r.state in ("PENDING_CREATION", "STARTING") and r.node_id is None and r.resources:
                if r.resources.get("placement_group_bundles"):
                    why = ": " + explain(r.resources["placement_group_bundles"],
                                         r.resources.get("placement_group_strategy"), nodes, pools)
                else:
                    why = ": " + explain([_capacity(r.resources)], None, nodes, pools)
            warnings.append(f"replica {r.app}/{r.deployment}#{r.replica_id} is {r.state}{why}")

    for g in groups:
        if g.state in ("PENDING", "RESCHEDULING"):
            problems = True
    if pending:
        problems = True
        idle = [n for n in alive if n.gpus_available > 0]
        if idle:
            spare = ", ".join(f"{short_id(n.node_id)}: {_fmt_num(n.gpus_available)}" for n in idle)
            warnings.append(f"{_fmt_num(sum(n.gpus_available for n in idle))} GPU(s) idle ({spare}) "
                            f"while {len(pending)} demand(s) are pending: the pending shapes do not "
                            f"fit in the free GPUs of any single node (see PENDING)")

    return ClusterReport(nodes=nodes, apps=apps, replicas=replicas, placement_groups=groups,
                         pending=pending, warnings=warnings, healthy=not problems,
                         ingress=serve_ingress() if apps else None, gcs_storage=gcs)


def report_to_dict(report: ClusterReport) -> dict:
    return dataclasses.asdict(report)
