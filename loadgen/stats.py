"""Pure metric maths for load tests: percentiles, throughputs, TTFT/TPOT/ITL and per-node balance."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Matches numpy.percentile's default ("linear") method: rank = q/100 * (n-1), interpolated
    between the two neighbouring sorted values. Returns None for empty input, so callers
    can show "n/a" instead of a misleading 0.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def mean(values: Sequence[float]) -> float | None:
    return (math.fsum(values) / len(values)) if values else None


@dataclass(slots=True)
class Stats:
    """Summary of one sample (seconds, unless the field says otherwise); None when empty."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    min: float | None
    max: float | None


def describe(values: Sequence[float]) -> Stats:
    """count, mean, p50/p90/p99, min and max of `values` (all None except count when empty)."""
    if not values:
        return Stats(0, None, None, None, None, None, None)
    ordered = sorted(values)
    return Stats(
        count=len(ordered),
        mean=mean(ordered),
        p50=percentile(ordered, 50.0),
        p90=percentile(ordered, 90.0),
        p99=percentile(ordered, 99.0),
        min=float(ordered[0]),
        max=float(ordered[-1]),
    )


def throughput(count: float, duration_s: float) -> float:
    """Items per second; 0.0 when the duration is not positive (nothing measurable happened)."""
    if duration_s <= 0:
        return 0.0
    return count / duration_s


def tpot(latency_s: float, ttft_s: float | None, output_tokens: int) -> float | None:
    """Time per output token after the first: (latency - ttft) / (output_tokens - 1).

    Same definition as `vllm bench serve`. Undefined (None) without a TTFT or with fewer than
    two output tokens, because then there is no "after the first token" interval.
    """
    if ttft_s is None or output_tokens < 2:
        return None
    return (latency_s - ttft_s) / (output_tokens - 1)


def inter_chunk_gaps(chunk_times: Sequence[float]) -> list[float]:
    """Inter-token latencies: gaps between consecutive content-chunk arrival times.

    The first chunk's arrival is the TTFT, so it contributes no gap; one chunk gives no gaps.
    """
    return [later - earlier for earlier, later in zip(chunk_times, chunk_times[1:])]


def node_counts(nodes: Iterable[str], expected_nodes: Iterable[str] = ()) -> dict[str, int]:
    """How many answers each node gave; nodes in `expected_nodes` that answered nothing count 0."""
    counts: dict[str, int] = {node: 0 for node in expected_nodes}
    for node in nodes:
        counts[node] = counts.get(node, 0) + 1
    return counts


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Each node's fraction of all answers (0.0 for every node when there are none)."""
    total = sum(counts.values())
    return {node: (count / total if total else 0.0) for node, count in counts.items()}


def balance(counts: Mapping[str, int] | Sequence[int], num_nodes: int | None = None) -> float | None:
    """Load balance across nodes: min share / max share, in [0, 1].

    1.0 means every node answered the same number of requests; 0.0 means at least one node
    answered none while another answered some (the "second machine never used" case).
    With 3 nodes at 50/30/20 it is 20/50 = 0.4: the busiest node took 2.5x the idlest one.

    `num_nodes` is how many nodes were expected to serve: nodes beyond those in `counts`
    count as zero, so 100 answers from 1 of 2 expected nodes gives 0.0 rather than a
    misleading 1.0. Returns None when there is nothing to compare (no answers at all).
    """
    values = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    if num_nodes is not None and num_nodes > len(values):
        values += [0] * (num_nodes - len(values))
    if not values or max(values) <= 0:
        return None
    return min(values) / max(values)


def max_share_deviation(counts: Mapping[str, int] | Sequence[int],
                        num_nodes: int | None = None) -> float | None:
    """Largest absolute gap between a node's share and the even share 1/N (0 = perfectly even)."""
    values = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    if num_nodes is not None and num_nodes > len(values):
        values += [0] * (num_nodes - len(values))
    total = sum(values)
    if not values or total <= 0:
        return None
    even = 1.0 / len(values)
    return max(abs(value / total - even) for value in values)
