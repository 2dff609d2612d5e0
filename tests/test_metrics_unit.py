"""Unit tests for common.metrics: percentiles, throughput, TPOT/ITL and the per-node balance figure."""
from __future__ import annotations

import math

import pytest

from common import metrics


def numpy_linear(values, q):
    """Reference: numpy.percentile's default method written out, independent of the code under test."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def test_percentile_empty_is_none():
    assert metrics.percentile([], 50) is None
    assert metrics.mean([]) is None


def test_percentile_single_value():
    for q in (0, 50, 90, 99, 100):
        assert metrics.percentile([7.5], q) == 7.5


def test_percentile_known_values():
    values = [1, 2, 3, 4]
    assert metrics.percentile(values, 50) == pytest.approx(2.5)
    assert metrics.percentile(values, 90) == pytest.approx(3.7)
    assert metrics.percentile(values, 99) == pytest.approx(3.97)
    assert metrics.percentile(values, 0) == 1
    assert metrics.percentile(values, 100) == 4


def test_percentile_unsorted_matches_numpy_style():
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 1.5, 0.05, 0.33]
    for q in (1, 10, 25, 50, 75, 90, 95, 99):
        assert metrics.percentile(values, q) == pytest.approx(numpy_linear(values, q))


def test_percentile_matches_numpy_when_available():
    np = pytest.importorskip("numpy")
    values = [float(i * i % 17) for i in range(101)]
    for q in (50, 90, 99, 99.9):
        assert metrics.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_out_of_range():
    with pytest.raises(ValueError):
        metrics.percentile([1, 2], 101)


def test_describe():
    stats = metrics.describe([3.0, 1.0, 2.0])
    assert stats.count == 3
    assert stats.mean == pytest.approx(2.0)
    assert stats.p50 == 2.0
    assert (stats.min, stats.max) == (1.0, 3.0)
    empty = metrics.describe([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None


def test_throughput():
    assert metrics.throughput(100, 4.0) == 25.0
    assert metrics.throughput(100, 0.0) == 0.0
    assert metrics.throughput(0, 2.0) == 0.0


def test_tpot():
    # 1.0 s total, first token at 0.1 s, 10 tokens: 9 intervals over 0.9 s.
    assert metrics.tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert metrics.tpot(1.0, 0.1, 1) is None
    assert metrics.tpot(1.0, None, 10) is None


def test_inter_chunk_gaps():
    assert metrics.inter_chunk_gaps([0.1, 0.15, 0.3]) == pytest.approx([0.05, 0.15])
    assert metrics.inter_chunk_gaps([0.1]) == []
    assert metrics.inter_chunk_gaps([]) == []


def test_node_counts_and_shares():
    counts = metrics.node_counts(["a", "b", "a", "a"], expected_nodes=["c"])
    assert counts == {"c": 0, "a": 3, "b": 1}
    assert metrics.shares(counts) == {"c": 0.0, "a": 0.75, "b": 0.25}
    assert metrics.shares({}) == {}


def test_balance_even_split_is_perfect():
    assert metrics.balance({"a": 50, "b": 50}) == 1.0
    assert metrics.max_share_deviation({"a": 50, "b": 50}) == 0.0


def test_balance_one_sided_is_worst():
    assert metrics.balance({"a": 100, "b": 0}) == 0.0
    # Only one node answered but two were expected: as bad as 100/0.
    assert metrics.balance({"a": 100}, num_nodes=2) == 0.0
    assert metrics.max_share_deviation({"a": 100}, num_nodes=2) == pytest.approx(0.5)


def test_balance_three_way():
    assert metrics.balance({"a": 50, "b": 30, "c": 20}) == pytest.approx(0.4)
    assert metrics.balance([34, 33, 33]) == pytest.approx(33 / 34)
    assert metrics.max_share_deviation([50, 30, 20]) == pytest.approx(0.5 - 1 / 3)


def test_balance_nothing_to_compare():
    assert metrics.balance({}) is None
    assert metrics.balance({"a": 0, "b": 0}) is None
    assert metrics.balance({"a": 10}) == 1.0
    assert not math.isnan(metrics.balance({"a": 3, "b": 1}))
