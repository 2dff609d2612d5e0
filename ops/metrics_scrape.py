"""Reads Prometheus metrics from each Ray node's metrics endpoint and sums vLLM's per replica."""
from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Iterable

# vLLM metric names as Ray exports them (`vllm:` becomes `ray_vllm_`; counters end in _total).
RUNNING = "ray_vllm_num_requests_running"
WAITING = "ray_vllm_num_requests_waiting"
KV_CACHE_USAGE = "ray_vllm_kv_cache_usage_perc"       # 0..1
REQUEST_SUCCESS = "ray_vllm_request_success_total"
PROMPT_TOKENS = "ray_vllm_prompt_tokens_total"
GENERATION_TOKENS = "ray_vllm_generation_tokens_total"
PREEMPTIONS = "ray_vllm_num_preemptions_total"
# Prompt tokens looked up in the prefix cache, and those found there (a replica's hit rate:
# what routing a conversation back to its replica buys).
PREFIX_QUERIES = "ray_vllm_prefix_cache_queries_total"
PREFIX_HITS = "ray_vllm_prefix_cache_hits_total"
SERVE_REQUESTS = "ray_serve_deployment_request_counter_total"



@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def parse(text: str) -> list[Sample]:
    """Prometheus text exposition format -> samples, by prometheus_client's own parser; a
    malformed line is skipped rather than losing the whole scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples_of(chunk: str) -> list[Sample]:
        return [Sample(s.name, dict(s.labels), float(s.value))
                for family in text_string_to_metric_families(chunk) for s in family.samples]

    try:
        return samples_of(text)
    except ValueError:
        good: list[Sample] = []
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                try:
                    good += samples_of(line + "\n")
                except ValueError:
                    continue
        return good


def node_endpoints() -> list[tuple[str, str]]:
    """(node_id, URL of its /metrics) for every alive node of the connected Ray cluster: the
    port is what `ray start --metrics-export-port` set (random when not set)."""
    from common.cluster import ray_nodes

    endpoints = []
    for node in ray_nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            endpoints.append((node["NodeID"],
                              f"http://{node['NodeManagerAddress']}:{port}/metrics"))
    return endpoints


def scrape(urls: Iterable[str], timeout: float = 5.0) -> tuple[list[Sample], list[str]]:
    """Samples from every URL, and one error line per URL that did not answer."""
    samples: list[Sample] = []
    errors: list[str] = []
    # No proxy: these are cluster-internal addresses.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url in urls:
        try:
            with opener.open(url, timeout=timeout) as response:
                samples.extend(parse(response.read().decode("utf-8", "replace")))
        except Exception as exc:  # noqa: BLE001 - one silent node must not hide the others
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
    return samples, errors


def scrape_cluster(timeout: float = 5.0) -> tuple[list[Sample], list[str]]:
    """Every alive node's metrics, de-duplicated: simulated clusters can list one endpoint twice."""
    urls = sorted({url for _, url in node_endpoints()})
    return scrape(urls, timeout)


def total(samples: Iterable[Sample], name: str, **match: str) -> float:
    """Sum of `name` over the series whose labels include `match` (e.g. application="x")."""
    return sum(s.value for s in samples if s.name == name and
               all(s.labels.get(k) == v for k, v in match.items()))


@dataclass
class ReplicaEngineStats:
    replica: str
    application: str = ""
    deployment: str = ""
    node_id: str = ""
    model: str = ""
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    requests_finished: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else None


_FIELDS = {RUNNING: "running", WAITING: "waiting", KV_CACHE_USAGE: "kv_cache_usage",
           REQUEST_SUCCESS: "requests_finished", PROMPT_TOKENS: "prompt_tokens",
           GENERATION_TOKENS: "generation_tokens", PREFIX_QUERIES: "prefix_queries",
           PREFIX_HITS: "prefix_hits"}


def per_replica(samples: Iterable[Sample]) -> dict[str, ReplicaEngineStats]:
    """vLLM engine metrics summed per Serve replica (the `ReplicaId` label vLLM adds)."""
    stats: dict[str, ReplicaEngineStats] = {}
    for sample in samples:
        attr = _FIELDS.get(sample.name)
        replica = sample.labels.get("ReplicaId")
        if attr is None or not replica:
            continue
        entry = stats.setdefault(replica, ReplicaEngineStats(replica=replica))
        entry.application = entry.application or sample.labels.get("application", "")
        entry.deployment = entry.deployment or sample.labels.get("deployment", "")
        entry.node_id = entry.node_id or sample.labels.get("NodeId", "")
        entry.model = entry.model or sample.labels.get("model_name", "")
        setattr(entry, attr, getattr(entry, attr) + sample.value)
    return stats


def format_summary(stats: dict[str, ReplicaEngineStats], replicas: list | None = None,
                   errors: list[str] | None = None) -> str:
    """The ENGINE section of check_cluster.py: one line per live replica. `replicas`
    (common.cluster.ReplicaInfo) restricts it to replicas Serve still lists, since a node keeps
    exporting a stopped replica's last values for a while."""
    rows = []
    names = {}
    if replicas is not None:
        names = {r.replica_id: r for r in replicas}
    for replica_id, entry in sorted(stats.items()):
        info = names.get(replica_id)
        if replicas is not None and info is None:
            continue
        app = info.app if info else entry.application
        dep = info.deployment if info else entry.deployment
        rows.append([f"{app}/{dep}" if app or dep else "?", replica_id,
                     f"{entry.running:.0f}", f"{entry.waiting:.0f}",
                     f"{100 * entry.kv_cache_usage:.1f}%", f"{entry.requests_finished:.0f}",
                     f"{entry.generation_tokens:.0f}",
                     "-" if entry.prefix_hit_rate is None
                     else f"{100 * entry.prefix_hit_rate:.1f}%"])
    lines = ["ENGINE (vLLM metrics from each node's Ray metrics endpoint)"]
    if rows:
        headers = ["DEPLOYMENT", "REPLICA", "RUNNING", "WAITING", "KV CACHE", "FINISHED",
                   "GEN TOKENS", "PREFIX HITS"]
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        for row in [headers] + rows:
            lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    else:
        lines.append("no engine metrics (no replica yet, --engine-metrics false, or the nodes' "
                     "metrics agents are not exporting)")
    for error in errors or []:
        lines.append(f"  unreachable: {error}")
    return "\n".join(lines)


def summary_for_cluster(app: str | None = None, timeout: float = 5.0) -> str:
    """The ENGINE section for the connected cluster; "" when Serve runs no replica at all."""
    from common import cluster

    replicas = cluster.list_replicas(app)
    if not replicas:
        return ""
    samples, errors = scrape_cluster(timeout)
    return format_summary(per_replica(samples), replicas, errors)
