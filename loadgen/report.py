"""The HTML report's data, shaped from a load test's results: histograms, time series, per-node bars, errors."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from loadgen import stats
from loadgen.client import LoadResult, RequestResult, Summary, replica_nodes_of
from loadgen.stats import Stats

# Bucket widths a time axis may use (seconds): readable ticks, about TIMELINE_BUCKETS of them.
_NICE_BUCKETS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)
TIMELINE_BUCKETS = 60
MAX_HISTOGRAM_BINS = 40


@dataclass(slots=True)
class Histogram:
    """Equal-width bins: counts[i] values fall in [edges[i], edges[i+1]) (the last bin is closed)."""

    edges: list[float]
    counts: list[int]


@dataclass(slots=True)
class Distribution:
    """One latency metric: its histogram (milliseconds) and the run's statistics (seconds,
    the Summary's own, so the report marks the same p50/p90/p99 as the text summary)."""

    key: str                          # "e2el", "ttft", "tpot", "itl"
    title: str
    histogram: Histogram
    stats: Stats


@dataclass(slots=True)
class Timeline:
    """The run over time in buckets of `bucket_s` seconds, counted by when requests ended."""

    bucket_s: float
    starts: list[float]               # each bucket's start, seconds since the run started
    successes: list[int]
    throughput: list[float]           # successful requests / s
    output_tokens_per_s: list[float]
    in_flight_max: list[int]          # most requests in flight at any moment of the bucket
    errors: dict[str, list[int]]      # error kind -> failures per bucket


@dataclass(slots=True)
class NodeBar:
    node: str
    answers: int
    share: float
    replicas: int | None              # replicas the service says the node holds; None: unknown
    idle: bool                        # answered nothing (while holding replicas, or expected to)


@dataclass(slots=True)
class ErrorCount:
    kind: str
    status: int                       # HTTP status; 0 when no response arrived
    count: int
    sample: str


@dataclass(slots=True)
class Marker:
    """A moment of the run to mark on the time axes (a chaos run's faults)."""

    at_s: float                       # seconds since the run started
    label: str


@dataclass(slots=True)
class ReportData:
    title: str
    settings: dict[str, Any]          # the run's own settings
    server: dict[str, Any]            # what the service says about itself over HTTP
    distributions: list[Distribution]
    timeline: Timeline
    nodes: list[NodeBar]
    errors: list[ErrorCount]
    warnings: list[str] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)


def histogram(values: Sequence[float], max_bins: int = MAX_HISTOGRAM_BINS) -> Histogram:
    """Equal-width histogram over [min, max] with about sqrt(n) bins (at most `max_bins`)."""
    if not values:
        return Histogram(edges=[], counts=[])
    low, high = min(values), max(values)
    bins = max(1, min(max_bins, math.ceil(math.sqrt(len(values)))))
    if high <= low:  # one distinct value: one bin around it, wide enough to be seen
        pad = abs(low) * 0.01 or 0.5
        return Histogram(edges=[low - pad, high + pad], counts=[len(values)])
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    return Histogram(edges=[low + i * width for i in range(bins)] + [high], counts=counts)


def bucket_width(span_s: float, buckets: int = TIMELINE_BUCKETS) -> float:
    """The smallest readable bucket width that cuts `span_s` into at most about `buckets`."""
    wanted = span_s / buckets if span_s > 0 else 0.0
    return next((width for width in _NICE_BUCKETS_S if width >= wanted), _NICE_BUCKETS_S[-1])


def _end(result: RequestResult) -> float:
    return result.start + result.latency


def timeline(results: Sequence[RequestResult], duration: float,
             bucket_s: float | None = None) -> Timeline:
    """Throughput, requests in flight and failures per time bucket (ramp-up, stalls and restarts
    show as dips, plateaus and bursts of errors)."""
    span = max([duration] + [_end(r) for r in results])
    width = bucket_s if bucket_s is not None else bucket_width(span)
    count = max(1, math.ceil(span / width - 1e-9))

    def bucket_of(seconds: float) -> int:
        return min(count - 1, max(0, int(seconds / width)))

    successes = [0] * count
    tokens = [0] * count
    errors: dict[str, list[int]] = {}
    for r in results:
        index = bucket_of(_end(r))
        if r.ok:
            successes[index] += 1
            tokens[index] += r.output_tokens
        else:
            errors.setdefault(r.error or "unknown_error", [0] * count)[index] += 1

    # Sweep of starts (+1) and ends (-1); at equal times ends come first, so back-to-back
    # requests of a closed loop do not count twice.
    events = sorted([(r.start, 1) for r in results] + [(_end(r), -1) for r in results])
    in_flight_max = [0] * count
    level = 0
    position = 0
    for index in range(count):
        bucket_end = (index + 1) * width
        peak = level
        while position < len(events) and (events[position][0] < bucket_end or index == count - 1):
            level += events[position][1]
            peak = max(peak, level)
            position += 1
        in_flight_max[index] = peak
    return Timeline(
        bucket_s=width, starts=[index * width for index in range(count)],
        successes=successes, throughput=[value / width for value in successes],
        output_tokens_per_s=[value / width for value in tokens], in_flight_max=in_flight_max,
        errors=dict(sorted(errors.items())))


def _ms(values: Iterable[float]) -> list[float]:
    return [value * 1000.0 for value in values]


def distributions(result: LoadResult, summary: Summary) -> list[Distribution]:
    """End-to-end latency always; TTFT, TPOT and ITL when the run streamed. The values are the
    ones summarize() described, the statistics are the Summary's."""
    successes = [r for r in result.results if r.ok]
    shaped = [Distribution("e2el", "End-to-end latency",
                           histogram(_ms(r.latency for r in successes)), summary.latency)]
    # summarize() describes the three together, for a streamed run
    ttft, tpot, itl = summary.ttft, summary.tpot, summary.itl
    if result.config.stream and ttft is not None and tpot is not None and itl is not None:
        tpots = [stats.tpot(r.latency, r.ttft, r.output_tokens) for r in successes]
        shaped += [
            Distribution("ttft", "Time to first token",
                         histogram(_ms(r.ttft for r in successes if r.ttft is not None)), ttft),
            Distribution("tpot", "Time per output token (excl. 1st)",
                         histogram(_ms(value for value in tpots if value is not None)), tpot),
            Distribution("itl", "Inter-token latency",
                         histogram(_ms(gap for r in successes if r.itl for gap in r.itl)), itl),
        ]
    return shaped


def node_bars(summary: Summary, replicas: dict[str, int] | None) -> list[NodeBar]:
    """One bar per node: every node that answered, and every node holding replicas (the service's
    GET /nodes) even when it answered nothing; those are flagged idle."""
    bars = [NodeBar(node=entry.node, answers=entry.count, share=entry.share,
                    replicas=None if replicas is None else replicas.get(entry.node, 0),
                    idle=entry.count == 0)
            for entry in summary.nodes]
    return bars


def error_counts(results: Iterable[RequestResult]) -> list[ErrorCount]:
    """Failures by kind and HTTP status, most frequent first, with one message of each."""
    grouped: dict[tuple[str, int], ErrorCount] = {}
    for r in results:
        if r.ok:
            continue
        key = (r.error or "unknown_error", r.status)
        entry = grouped.setdefault(key, ErrorCount(kind=key[0], status=key[1], count=0,
                                                   sample=r.message))
        entry.count += 1
    return sorted(grouped.values(), key=lambda e: (-e.count, e.kind, e.status))


def server_settings(server: dict[str, Any] | None) -> dict[str, Any]:
    """The service's model, replicas per node and engine layout, as it reports them over HTTP
    (GET /v1/models and GET /nodes); what it does not report is left out."""
    nodes = (server or {}).get("nodes") or {}
    models = [m for m in ((server or {}).get("models") or {}).get("data") or []
              if isinstance(m, dict)]
    settings: dict[str, Any] = {}
    if models:
        settings["model"] = ", ".join(str(m.get("id")) for m in models)
        roots = {str(m.get("root")) for m in models if m.get("root")}
        if roots:
            settings["model path"] = ", ".join(sorted(roots))
        lengths = {m["max_model_len"] for m in models if m.get("max_model_len")}
        if lengths:
            settings["max model length"] = ", ".join(str(value) for value in sorted(lengths))
    elif nodes.get("model"):
        settings["model"] = nodes["model"]
    replicas = replica_nodes_of(server)
    if replicas is not None:
        settings["replicas"] = sum(replicas.values())
        settings["replicas per node"] = replicas
    layout = nodes.get("engine_layout")
    if isinstance(layout, dict):
        settings["engine layout (per replica)"] = layout
    return settings


def run_settings(result: LoadResult) -> dict[str, Any]:
    settings = result.config.public_dict()
    settings.pop("progress", None)
    settings["started_at"] = time.strftime("%Y-%m-%d %H:%M:%S %z",
                                           time.localtime(result.started_at))
    settings["event_loop"] = result.event_loop
    return settings


def build_report_data(result: LoadResult, summary: Summary, markers: Sequence[Marker] = (),
                      title: str | None = None) -> ReportData:
    """Everything the HTML report shows, from the run's results and its Summary."""
    replicas = replica_nodes_of(result.server)
    nodes = node_bars(summary, replicas)
    warnings = []
    idle = [bar.node for bar in nodes if bar.idle]
    if idle:
        warnings.append(f"nodes holding replicas answered nothing: {', '.join(idle)}")
    answering = sum(1 for bar in nodes if not bar.idle)
    if summary.expected_nodes and answering < summary.expected_nodes:
        warnings.append(f"only {answering} of {summary.expected_nodes} expected nodes answered")
    if summary.failures:
        warnings.append(f"{summary.failures} of {summary.answered} requests failed")
    if summary.aborted:
        warnings.append(f"stopped early: {summary.aborted}")
    return ReportData(
        title=title or f"Load test of {result.config.target_url()}",
        settings=run_settings(result),
        server=server_settings(result.server),
        distributions=distributions(result, summary),
        timeline=timeline(result.results, result.duration),
        nodes=nodes,
        errors=error_counts(result.results),
        warnings=warnings, markers=list(markers))
