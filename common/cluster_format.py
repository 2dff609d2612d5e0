"""The text rendering of a cluster report (check_cluster.py) and of replica placement tables."""
from __future__ import annotations

from typing import Any, Iterable

from common.cluster import (UNKNOWN, ClusterReport, ReplicaInfo, _capacity, _fmt_num,
                            format_shape, short_id)


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _fmt_resources(res: dict) -> str:
    if not res:
        return "-"
    if res.get("placement_group_bundles"):
        bundles = res["placement_group_bundles"]
        return (f"{len(bundles)} bundles {res.get('placement_group_strategy', '')} "
                f"{format_shape(_capacity({k: v for k, v in res.items() if not k.startswith('placement_group_')}))}")
    return format_shape(res)


def bundles_per_node(replica: ReplicaInfo) -> str:
    """'node A: 8 GPU (stage 0), node B: 8 GPU (stage 1)': where a replica's placement group
    holds its GPUs, and which pipeline stage each node runs (vLLM's rank order:
    replica/parallel_layout.py); empty for a replica without GPU bundles."""
    from replica.parallel_layout import stages_per_node

    bundles = (replica.resources or {}).get("placement_group_bundles") or []
    if not bundles or len(replica.bundle_nodes) != len(bundles):
        return ""
    gpus: dict[str, float] = {}
    for bundle, node in zip(bundles, replica.bundle_nodes):
        if float(bundle.get("GPU", 0) or 0) > 0:
            key = node or "(unplaced)"
            gpus[key] = gpus.get(key, 0.0) + float(bundle["GPU"])
    if not gpus:
        return ""
    stages = (stages_per_node(bundles, replica.bundle_nodes, replica.node_id,
                              replica.tensor_parallel_size)
              if replica.tensor_parallel_size else {})
    parts = []
    for node, count in sorted(gpus.items(), key=lambda item: item[0] != replica.node_id):
        label = "(unplaced)" if node == "(unplaced)" else f"node {short_id(node)}"
        which = stages.get(node) or []
        stage = (f" (stage{'s' if len(which) > 1 else ''} {', '.join(map(str, which))})"
                 if which and node != "(unplaced)" else "")
        parts.append(f"{label}: {_fmt_num(count)} GPU{stage}")
    return ", ".join(parts)


def format_placement(replicas: list[ReplicaInfo]) -> str:
    if not replicas:
        return "(no replicas)"
    gangs = any(r.gang for r in replicas)

    def order(r: ReplicaInfo) -> tuple:
        # Ranks of one gang side by side, in rank order: a gang is what restarts as a whole.
        gang = (r.gang["id"], r.gang["rank"]) if r.gang else ("", 0)
        return (r.app, r.deployment, gang, r.node_id or "~", r.replica_id)

    rows = [(f"{r.app}/{r.deployment}", r.replica_id, r.state, short_id(r.node_id), r.node_ip,
             _fmt_resources(r.resources), bundles_per_node(r) or "-",
             *([gang_label(r.gang)] if gangs else []))
            for r in sorted(replicas, key=order)]
    return _table(["DEPLOYMENT", "REPLICA", "STATE", "NODE", "NODE IP", "RESOURCES",
                   "GPUS PER NODE", *(["GANG (RANK/SIZE)"] if gangs else [])], rows)


def gang_label(gang: dict | None) -> str:
    """A data-parallel rank's gang, as the placement table shows it: "<gang id> <rank>/<size>"."""
    return f"{gang['id']} {gang['rank']}/{gang['size']}" if gang else "-"


GCS_WORDS = {
    "redis": "state in Redis (fault tolerance on: the head can die and restart, the other nodes "
             "keep serving meanwhile)",
    "memory": "state in the head's memory (fault tolerance off: if the head dies, every node and "
              "application go with it; docs/reliability.md has the Redis recipe)",
    "rocksdb": "state on the head's disk (RocksDB: a head restarted on the same disk reloads it)",
}


def format_report(report: ClusterReport) -> str:
    out: list[str] = []
    alive = sum(1 for n in report.nodes if n.alive)
    out.append(f"NODES ({alive} alive, {len(report.nodes) - alive} dead)")
    out.append(_table(
        ["NODE", "IP", "STATE", "ROLE", "CPU FREE/TOTAL", "GPU FREE/TOTAL", "GPU MODEL", "GPU MEM"],
        [(short_id(n.node_id), n.ip, "alive" if n.alive else "DEAD", "head" if n.is_head else "worker",
          f"{_fmt_num(n.cpus_available)}/{_fmt_num(n.cpus_total)}",
          f"{_fmt_num(n.gpus_available)}/{_fmt_num(n.gpus_total)}",
          n.gpu_model if n.gpus_total else "-",
          (f"{_fmt_num(n.gpu_memory_gb)} GB" if n.gpu_memory_gb else UNKNOWN) if n.gpus_total else "-")
         for n in report.nodes]))

    gcs = GCS_WORDS.get(report.gcs_storage or "", f"state in {report.gcs_storage}" if
                        report.gcs_storage else "where it keeps its state is unknown")
    out.append(f"GCS: {gcs}")

    out.append("")
    out.append("SERVE APPLICATIONS" + (f" (HTTP ingress: {report.ingress})"
                                       if report.ingress else ""))
    if report.apps:
        rows = []
        for name, a in sorted(report.apps.items()):
            for dname, d in sorted(a["deployments"].items()) or [("-", {"status": "-", "replica_states": {}, "message": ""})]:
                states = ", ".join(f"{k} {v}" for k, v in sorted(d["replica_states"].items())) or "-"
                rows.append((name, a["status"], dname, d["status"], states,
                             d.get("message") or a.get("message") or ""))
        out.append(_table(["APP", "APP STATUS", "DEPLOYMENT", "STATUS", "REPLICAS", "MESSAGE"], rows))
    else:
        out.append("(none: Serve is not running or has no applications)")

    out.append("")
    out.append("REPLICAS")
    out.append(format_placement(report.replicas))

    out.append("")
    out.append("PLACEMENT GROUPS")
    if report.placement_groups:
        pg_rows = []
        for g in report.placement_groups:
            for i, (b, node) in enumerate(zip(g.bundles, g.bundle_nodes)):
                pg_rows.append((short_id(g.pg_id, 12) if i == 0 else "", g.name if i == 0 else "",
                                g.state if i == 0 else "", g.strategy if i == 0 else "", i,
                                format_shape(b), short_id(node) if node else "(unplaced)"))
        out.append(_table(["PG", "NAME", "STATE", "STRATEGY", "BUNDLE", "RESOURCES", "NODE"], pg_rows))
    else:
        out.append("(none)")

    out.append("")
    out.append("PENDING (what `ray status` lists as pending, and why it is not placed)")
    out.extend(pending_and_warning_lines(report))
    out.append("")
    out.append("HEALTHY" if report.healthy else
               "UNHEALTHY: something is pending, unhealthy or dead (see above)")
    return "\n".join(out)


def pending_and_warning_lines(report: ClusterReport) -> list[str]:
    """The pending demands with their reasons, then the warnings (check_cluster and --watch)."""
    out = [_table(["KIND", "SHAPE", "COUNT", "STRATEGY", "WHY"],
                  [(p.kind + (f" {short_id(p.pg_id)}" if p.pg_id else ""), format_shape(p.shape),
                    p.count, p.strategy or "-", p.reason) for p in report.pending])
           if report.pending else "(nothing pending)"]
    if report.warnings:
        out += ["", "WARNINGS", *(f"  ! {w}" for w in report.warnings)]
    return out
