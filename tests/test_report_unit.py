"""Tests the HTML report's data shaping (loadgen/report.py) on made-up results, and that the page is self-contained."""
from __future__ import annotations

import re

import pytest

from loadgen.client import LoadConfig, LoadResult, RequestResult, format_report, summarize
from loadgen.report import (bucket_width, build_report_data, error_counts, histogram,
                            server_settings, timeline)
from loadgen.report_html import render_html

NODE_A = "a" * 56
NODE_B = "b" * 56


def ok(index, start, latency, node=NODE_A, tokens=4, ttft=None, itl=None):
    return RequestResult(index=index, start=start, latency=latency, ok=True, status=200,
                         node=node, output_tokens=tokens, prompt_tokens=3, usage_reported=True,
                         ttft=ttft, itl=itl)


def failed(index, start, latency, kind="http_503", status=503, message="overloaded"):
    return RequestResult(index=index, start=start, latency=latency, ok=False, status=status,
                         error=kind, message=message)


def server(replicas):
    return {"nodes": {"node": NODE_A, "model": "DeepSeek-R1", "replica_nodes": replicas,
                      "engine_layout": {"device": "cpu", "tensor_parallel_size": 1,
                                        "pipeline_parallel_size": 1, "max_model_len": 512}},
            "models": {"object": "list", "data": [{"id": "DeepSeek-R1", "root": "/models/r1",
                                                   "max_model_len": 512}]}}


def run(results, duration, stream=False, replicas=None, expected_nodes=None):
    config = LoadConfig(stream=stream, expected_nodes=expected_nodes)
    result = LoadResult(config=config, results=results, duration=duration, started_at=0.0,
                        replica_nodes=None if replicas is None else sorted(replicas),
                        server=None if replicas is None else server(replicas))
    return result, summarize(result)


def test_histogram_bins_cover_every_value():
    values = [float(v) for v in range(100)]
    shaped = histogram(values)
    assert len(shaped.counts) == 10 and len(shaped.edges) == 11
    assert sum(shaped.counts) == 100
    assert shaped.edges[0] == 0.0 and shaped.edges[-1] == 99.0
    assert shaped.counts == [10] * 10


def test_histogram_empty_and_single_value():
    assert histogram([]).counts == []
    one = histogram([5.0, 5.0, 5.0])
    assert one.counts == [3] and one.edges[0] < 5.0 < one.edges[1]


@pytest.mark.parametrize("span, width", [(0.5, 0.01), (5.0, 0.1), (60.0, 1.0), (600.0, 10.0),
                                         (0.0, 0.01)])
def test_bucket_width_is_readable_and_bounded(span, width):
    assert bucket_width(span) == width


def test_timeline_throughput_in_flight_and_errors():
    # Two requests in flight for the first second, then a stall (nothing ends in [1, 2)),
    # then a failure in the last second.
    results = [ok(0, 0.0, 0.5), ok(1, 0.0, 0.9), ok(2, 0.5, 0.4), failed(3, 2.0, 0.5)]
    line = timeline(results, duration=3.0, bucket_s=1.0)
    assert line.starts == [0.0, 1.0, 2.0]
    assert line.successes == [3, 0, 0]
    assert line.throughput == [3.0, 0.0, 0.0]
    assert line.output_tokens_per_s == [12.0, 0.0, 0.0]
    # Requests 0 and 2 touch at 0.5 s: an end and a start at the same time are not both in flight.
    assert line.in_flight_max == [2, 0, 1]
    assert line.errors == {"http_503": [0, 0, 1]}


def test_error_counts_by_kind_and_status():
    results = [ok(0, 0, 0.1), failed(1, 0, 0.1), failed(2, 0, 0.1),
               failed(3, 0, 0.1, kind="timeout", status=0, message="timed out"),
               failed(4, 0, 0.1, kind="http_500", status=500, message="boom")]
    counts = [(e.kind, e.status, e.count, e.sample) for e in error_counts(results)]
    assert counts == [("http_503", 503, 2, "overloaded"), ("http_500", 500, 1, "boom"),
                      ("timeout", 0, 1, "timed out")]


def test_idle_replica_node_is_a_flagged_zero_bar():
    results = [ok(i, i * 0.1, 0.2) for i in range(10)]
    result, summary = run(results, 1.2, replicas={NODE_A: 1, NODE_B: 1})
    data = build_report_data(result, summary)
    assert [(b.node, b.answers, b.replicas, b.idle) for b in data.nodes] == [
        (NODE_A, 10, 1, False), (NODE_B, 0, 1, True)]
    assert any(NODE_B in warning and "answered nothing" in warning for warning in data.warnings)
    # The node table is the Summary's own: the same nodes, counts and shares as the text report.
    assert [(b.node, b.answers, b.share) for b in data.nodes] == [
        (n.node, n.count, n.share) for n in summary.nodes]


def test_run_with_errors_and_streaming_uses_the_summary_statistics():
    results = ([ok(i, i * 0.1, 0.2 + i * 0.01, node=(NODE_A, NODE_B)[i % 2], tokens=5,
                   ttft=0.05, itl=[0.03, 0.04, 0.03, 0.05]) for i in range(20)]
               + [failed(20 + i, 1.0 + i * 0.1, 0.01) for i in range(5)])
    result, summary = run(results, 2.5, stream=True, replicas={NODE_A: 1, NODE_B: 1})
    data = build_report_data(result, summary)
    by_key = {d.key: d for d in data.distributions}
    assert set(by_key) == {"e2el", "ttft", "tpot", "itl"}
    assert by_key["e2el"].stats is summary.latency and by_key["itl"].stats is summary.itl
    assert sum(by_key["e2el"].histogram.counts) == 20
    assert sum(by_key["itl"].histogram.counts) == 80
    assert by_key["ttft"].histogram.counts == [20]
    assert [(e.kind, e.count) for e in data.errors] == [("http_503", 5)]
    assert sum(data.timeline.errors["http_503"]) == 5
    assert sum(data.timeline.successes) == 20
    assert not any(b.idle for b in data.nodes)
    assert "5 of 25 requests failed" in data.warnings


def test_not_streaming_has_only_end_to_end_latency():
    result, summary = run([ok(0, 0, 0.1)], 0.1)
    assert [d.key for d in build_report_data(result, summary).distributions] == ["e2el"]


def test_server_settings_from_http_answers():
    settings = server_settings(server({NODE_A: 2, NODE_B: 1}))
    assert settings["model"] == "DeepSeek-R1" and settings["model path"] == "/models/r1"
    assert settings["max model length"] == "512"
    assert settings["replicas"] == 3
    assert settings["replicas per node"] == {NODE_A: 2, NODE_B: 1}
    assert settings["engine layout (per replica)"]["tensor_parallel_size"] == 1
    assert server_settings(None) == {}
    assert server_settings({"nodes": None, "models": None}) == {}


def test_page_is_self_contained():
    results = [ok(i, i * 0.1, 0.2) for i in range(10)] + [failed(10, 0.5, 0.1)]
    result, summary = run(results, 1.2, replicas={NODE_A: 1, NODE_B: 1})
    page = render_html(build_report_data(result, summary), format_report(summary, result.config))
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)  # nothing to fetch
    assert 'id="per-node"' in page and 'id="timeline"' in page and 'id="errors-over-time"' in page
    assert NODE_B in page and "Load Test Result" in page
