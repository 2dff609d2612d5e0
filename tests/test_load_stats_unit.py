"""Unit tests for loadgen.stats: percentiles, throughput, TPOT/ITL and the per-node balance figure."""
from __future__ import annotations

import math

import pytest

from loadgen import stats


def numpy_linear(values, q):
    """Reference: numpy.percentile's default method written out, independent of the code under test."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def test_percentile_empty_is_none():
    assert stats.percentile([], 50) is None
    assert stats.mean([]) is None


def test_percentile_single_value():
    for q in (0, 50, 90, 99, 100):
        assert stats.percentile([7.5], q) == 7.5


def test_percentile_known_values():
    values = [1, 2, 3, 4]
    assert stats.percentile(values, 50) == pytest.approx(2.5)
    assert stats.percentile(values, 90) == pytest.approx(3.7)
    assert stats.percentile(values, 99) == pytest.approx(3.97)
    assert stats.percentile(values, 0) == 1
    assert stats.percentile(values, 100) == 4


def test_percentile_unsorted_matches_numpy_style():
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 1.5, 0.05, 0.33]
    for q in (1, 10, 25, 50, 75, 90, 95, 99):
        assert stats.percentile(values, q) == pytest.approx(numpy_linear(values, q))


def test_percentile_matches_numpy_when_available():
    np = pytest.importorskip("numpy")
    values = [float(i * i % 17) for i in range(101)]
    for q in (50, 90, 99, 99.9):
        assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_out_of_range():
    with pytest.raises(ValueError):
        stats.percentile([1, 2], 101)


def test_describe():
    figures = stats.describe([3.0, 1.0, 2.0])
    assert figures.count == 3
    assert figures.mean == pytest.approx(2.0)
    assert figures.p50 == 2.0
    assert (figures.min, figures.max) == (1.0, 3.0)
    empty = stats.describe([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None


def test_throughput():
    assert stats.throughput(100, 4.0) == 25.0
    assert stats.throughput(100, 0.0) == 0.0
    assert stats.throughput(0, 2.0) == 0.0


def test_tpot():
    # 1.0 s total, first token at 0.1 s, 10 tokens: 9 intervals over 0.9 s.
    assert stats.tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert stats.tpot(1.0, 0.1, 1) is None
    assert stats.tpot(1.0, None, 10) is None


def test_inter_chunk_gaps():
    assert stats.inter_chunk_gaps([0.1, 0.15, 0.3]) == pytest.approx([0.05, 0.15])
    assert stats.inter_chunk_gaps([0.1]) == []
    assert stats.inter_chunk_gaps([]) == []


def test_node_counts_and_shares():
    counts = stats.node_counts(["a", "b", "a", "a"], expected_nodes=["c"])
    assert counts == {"c": 0, "a": 3, "b": 1}
    assert stats.shares(counts) == {"c": 0.0, "a": 0.75, "b": 0.25}
    assert stats.shares({}) == {}


def test_balance_even_split_is_perfect():
    assert stats.balance({"a": 50, "b": 50}) == 1.0
    assert stats.max_share_deviation({"a": 50, "b": 50}) == 0.0


def test_balance_one_sided_is_worst():
    assert stats.balance({"a": 100, "b": 0}) == 0.0
    # Only one node answered but two were expected: as bad as 100/0.
    assert stats.balance({"a": 100}, num_nodes=2) == 0.0
    assert stats.max_share_deviation({"a": 100}, num_nodes=2) == pytest.approx(0.5)


def test_balance_three_way():
    assert stats.balance({"a": 50, "b": 30, "c": 20}) == pytest.approx(0.4)
    assert stats.balance([34, 33, 33]) == pytest.approx(33 / 34)
    assert stats.max_share_deviation([50, 30, 20]) == pytest.approx(0.5 - 1 / 3)


def test_balance_nothing_to_compare():
    assert stats.balance({}) is None
    assert stats.balance({"a": 0, "b": 0}) is None
    assert stats.balance({"a": 10}) == 1.0
    assert not math.isnan(stats.balance({"a": 3, "b": 1}))
