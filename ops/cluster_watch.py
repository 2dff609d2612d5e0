"""check_cluster.py --watch: a live view of nodes, replicas per node, pending demands and requests in flight."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from common import cluster
from common.cli import EXIT_OK
from common.cluster import ClusterReport, _fmt_num, short_id
from common.cluster_format import _table, pending_and_warning_lines

# Serve's own gauge of the requests a replica is processing (labels: application, deployment,
# replica); exported through each node's metrics agent like vLLM's.
SERVE_IN_FLIGHT = "ray_serve_replica_processing_queries"
_UNPLACED = "(unplaced)"


def in_flight_per_replica(samples) -> dict[str, float]:
    """Replica ID -> requests Serve says it is processing, for replicas that export the gauge."""
    values: dict[str, float] = {}
    for sample in samples:
        replica = sample.labels.get("replica")
        if sample.name == SERVE_IN_FLIGHT and replica:
            values[replica] = values.get(replica, 0.0) + sample.value
    return values


def watch_frame(report: ClusterReport, in_flight: dict[str, float] | None,
                engine: dict | None, header: str) -> str:
    """One screen: nodes (GPUs used/total, replicas held), replicas grouped by node with their
    state and requests in flight, pending demands with their reason, warnings. `in_flight` and
    `engine` (ops.metrics_scrape.per_replica) are None when the metrics were not readable."""
    status = "HEALTHY" if report.healthy else "UNHEALTHY"
    out = [f"{header}  {status}", ""]
    by_node: dict[str | None, list] = {}
    for replica in report.replicas:
        by_node.setdefault(replica.node_id, []).append(replica)

    alive = sum(1 for n in report.nodes if n.alive)
    out.append(f"NODES ({alive} alive, {len(report.nodes) - alive} dead)")
    out.append(_table(
        ["NODE", "IP", "STATE", "GPU USED/TOTAL", "CPU USED/TOTAL", "REPLICAS"],
        [(short_id(n.node_id), n.ip, ("alive" if n.alive else "DEAD") + (" head" if n.is_head else ""),
          f"{_fmt_num(n.gpus_total - n.gpus_available)}/{_fmt_num(n.gpus_total)}",
          f"{_fmt_num(n.cpus_total - n.cpus_available)}/{_fmt_num(n.cpus_total)}",
          len(by_node.get(n.node_id, [])))
         for n in report.nodes]))

    out.append("")
    out.append("REPLICAS BY NODE" + (f" (HTTP ingress: {report.ingress})" if report.ingress else ""))
    if report.replicas:
        rows = []
        ordered = sorted(by_node.items(), key=lambda item: (item[0] is None, item[0] or ""))
        for node_id, replicas in ordered:
            for i, r in enumerate(sorted(replicas, key=lambda r: (r.app, r.deployment, r.replica_id))):
                flight = "-" if in_flight is None or r.replica_id not in in_flight \
                    else _fmt_num(in_flight[r.replica_id])
                stats = (engine or {}).get(r.replica_id)
                rows.append(((short_id(node_id) if node_id else _UNPLACED) if i == 0 else "",
                             f"{r.app}/{r.deployment}", r.replica_id, r.state, flight,
                             "-" if stats is None else f"{stats.running:.0f}/{stats.waiting:.0f}"))
        out.append(_table(["NODE", "DEPLOYMENT", "REPLICA", "STATE", "IN FLIGHT",
                           "ENGINE RUN/WAIT"], rows))
    else:
        out.append("(no replicas)")

    out.append("")
    out.append("PENDING")
    out.extend(pending_and_warning_lines(report))
    return "\n".join(out)


def snapshot_frame(app: str | None, spread: set, header: str) -> str:
    """Reads the cluster once and renders it; a failed read is shown, not raised, so that the
    view keeps refreshing through a GCS hiccup."""
    from ops import metrics_scrape

    try:
        with cluster.state_snapshot():
            report = cluster.collect_report(app=app, spread_deployments=spread)
            in_flight: dict[str, float] | None
            engine: dict[str, metrics_scrape.ReplicaEngineStats] | None
            try:
                samples, _ = metrics_scrape.scrape_cluster(timeout=2.0)
                in_flight = in_flight_per_replica(samples)
                engine = metrics_scrape.per_replica(samples)
            except Exception:  # noqa: BLE001 - the metrics are extra; the state is the view
                in_flight = engine = None
    except Exception as exc:  # noqa: BLE001 - shown in the frame: the view keeps refreshing
        return f"{header}\n\ncould not read the cluster state: {type(exc).__name__}: {exc}"
    return watch_frame(report, in_flight, engine, header)


def watch(app: str | None, spread: set, interval: float, stream: TextIO | None = None,
          frame: Callable[[str | None, set, str], str] = snapshot_frame) -> int:
    """Refreshes the view every `interval` seconds until Ctrl-C: in place on a terminal, as
    plain frames one after another otherwise (logs, pipes). Ctrl-C exits 0."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(file=stream or sys.stdout, highlight=False)
    refresh = 0

    def next_frame() -> str:
        nonlocal refresh
        refresh += 1
        header = (f"check_cluster.py --watch {interval:g}s  refresh {refresh}  "
                  f"{time.strftime('%H:%M:%S')}  (Ctrl-C to stop)")
        return frame(app, spread, header)

    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    live.update(Text(next_frame(), no_wrap=True, overflow="crop"), refresh=True)
                    time.sleep(interval)
        while True:
            console.file.write(next_frame() + "\n\n")
            console.file.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
