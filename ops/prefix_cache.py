"""The run's prefix-cache hit rate per replica, from vLLM's counters read before and after it."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterable

from ops.metrics_scrape import PREFIX_HITS, PREFIX_QUERIES, Sample, scrape

# The same counters under `vllm serve`'s own names (Ray exports them with the ray_vllm_ prefix).
SERVE_QUERIES = PREFIX_QUERIES.replace("ray_vllm_", "vllm:")
SERVE_HITS = PREFIX_HITS.replace("ray_vllm_", "vllm:")
_KIND = {PREFIX_QUERIES: 0, SERVE_QUERIES: 0, PREFIX_HITS: 1, SERVE_HITS: 1}

Counters = dict[str, tuple[float, float]]   # replica -> (tokens looked up, tokens found)


@dataclass(frozen=True)
class ReplicaHits:
    """One replica's prefix-cache lookups during the run, in prompt tokens."""

    replica: str
    queries: float
    hits: float

    @property
    def rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": self.rate}


def counters(samples: Iterable[Sample], source: str) -> Counters:
    """Per replica: Serve's (the ReplicaId label Ray's metrics carry), else the endpoint's own
    (`vllm serve`: one engine, or one per data-parallel rank)."""
    out: dict[str, list[float]] = {}
    for sample in samples:
        kind = _KIND.get(sample.name)
        if kind is None:
            continue
        replica = sample.labels.get("ReplicaId") or source
        engine = sample.labels.get("engine")
        if not sample.labels.get("ReplicaId") and engine not in (None, "0"):
            replica = f"{source} engine {engine}"
        out.setdefault(replica, [0.0, 0.0])[kind] += sample.value
    return {replica: (queries, hits) for replica, (queries, hits) in out.items()}


def read(urls: Iterable[str], timeout: float = 5.0) -> tuple[Counters, list[str]]:
    """The counters behind every URL (a Ray node's metrics endpoint, or `vllm serve`'s
    /metrics), and one error line per URL that did not answer."""
    found: Counters = {}
    errors: list[str] = []
    for url in urls:
        samples, failed = scrape([url], timeout)
        errors += failed
        found.update(counters(samples, url))
    return found, errors


def of_run(before: Counters, after: Counters) -> list[ReplicaHits]:
    """What each replica looked up during the run (replicas that looked up nothing left out)."""
    out = []
    for replica, (queries, hits) in sorted(after.items()):
        old_queries, old_hits = before.get(replica, (0.0, 0.0))
        if queries - old_queries > 0:
            out.append(ReplicaHits(replica, queries - old_queries, hits - old_hits))
    return out


def read_after(urls: list[str], before: Counters, settle_s: float = 30.0,
               interval_s: float = 2.0) -> tuple[list[ReplicaHits], list[str]]:
    """The run's hits once the counters have settled: Ray's metrics agents export every few
    seconds, so read until the lookups moved and two reads agree (or `settle_s` passed)."""
    deadline = time.monotonic() + settle_s
    last, errors = read(urls)
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now, errors = read(urls)
        moved = sum(q for q, _ in now.values()) > sum(q for q, _ in before.values())
        if moved and now == last:
            break
        last = now
    else:
        errors.append(f"the counters did not settle in {settle_s:.0f} s: the figures may be "
                      "short of the run's last requests")
    return of_run(before, last), errors


def format_rows(hits: list[ReplicaHits], errors: list[str], width: int = 40) -> list[str]:
    """Lines for the end-of-run table: each replica's hit rate, and the whole service's."""
    lines = [f"{' Prefix cache (this run, vLLM counters) ':-^56}"]
    for entry in hits:
        rate = "-" if entry.rate is None else f"{100 * entry.rate:.1f}%"
        lines.append(f"{entry.replica[-(width - 2):] + ':':<{width}}{rate} of "
                     f"{entry.queries:.0f} tokens")
    queries = sum(h.queries for h in hits)
    if hits:
        lines.append(f"{'All replicas:':<{width}}"
                     f"{100 * sum(h.hits for h in hits) / queries:.1f}% of {queries:.0f} tokens")
    else:
        lines.append("no lookups counted (engine metrics off, or the wrong endpoint)")
    lines += [f"  {error}" for error in errors]
    return lines
