"""Unit tests: labelled vLLM Ray metric wrappers, Prometheus text parsing, per-replica summary."""
from __future__ import annotations

import pytest

from ops import metrics_scrape
from common.cluster import ReplicaInfo
from replica import vllm_compat
from replica import ray_compat
from replica.metrics_export import EXTRA_TAG_KEYS, GaugeRefresher, labelled_stat_logger

TEXT = """\
# HELP ray_vllm_num_requests_running Number of requests in model execution batches.
# TYPE ray_vllm_num_requests_running gauge
ray_vllm_num_requests_running{ReplicaId="r1",application="a",deployment="LLMDeployment",engine="0",model_name="DeepSeek-R1",NodeId="n1"} 3.0
ray_vllm_num_requests_running{ReplicaId="r2",application="a",deployment="LLMDeployment",engine="0",model_name="DeepSeek-R1",NodeId="n2"} 1.0
ray_vllm_kv_cache_usage_perc{ReplicaId="r1",application="a",deployment="LLMDeployment",engine="0",model_name="DeepSeek-R1",NodeId="n1"} 0.25
ray_vllm_request_success_total{ReplicaId="r1",application="a",finished_reason="length",model_name="x"} 7
ray_vllm_request_success_total{ReplicaId="r1",application="a",finished_reason="stop",model_name="x"} 3
ray_vllm_generation_tokens_total{ReplicaId="r2",application="a",model_name="x"} 128
ray_vllm_prefix_cache_queries_total{ReplicaId="r1",application="a",model_name="x"} 400
ray_vllm_prefix_cache_hits_total{ReplicaId="r1",application="a",model_name="x"} 300
ray_serve_deployment_request_counter_total{application="a",deployment="LLMDeployment",replica="r1",route="/"} 10.0
weird_label{path="a\\"b"} 1
not a sample line
"""


def test_parse_reads_names_labels_values_and_skips_junk():
    samples = metrics_scrape.parse(TEXT)
    assert len(samples) == 10
    assert samples[0].name == metrics_scrape.RUNNING
    assert samples[0].labels["ReplicaId"] == "r1" and samples[0].value == 3.0
    assert samples[-1].labels == {"path": 'a"b'}


def test_parse_keeps_non_ascii_label_values():
    text = 'ray_vllm_num_requests_running{model_name="模型-R1",ReplicaId="r1"} 2.0\n'
    (sample,) = metrics_scrape.parse(text)
    assert sample.labels == {"model_name": "模型-R1", "ReplicaId": "r1"} and sample.value == 2.0


def test_totals_and_per_replica_sums():
    samples = metrics_scrape.parse(TEXT)
    assert metrics_scrape.total(samples, metrics_scrape.REQUEST_SUCCESS, application="a") == 10
    assert metrics_scrape.total(samples, metrics_scrape.REQUEST_SUCCESS, application="b") == 0
    stats = metrics_scrape.per_replica(samples)
    assert set(stats) == {"r1", "r2"}
    assert stats["r1"].running == 3 and stats["r1"].kv_cache_usage == 0.25
    assert stats["r1"].requests_finished == 10 and stats["r1"].node_id == "n1"
    assert stats["r2"].generation_tokens == 128 and stats["r2"].deployment == "LLMDeployment"
    assert stats["r1"].prefix_hit_rate == 0.75 and stats["r2"].prefix_hit_rate is None


def test_summary_lists_only_replicas_serve_still_has():
    stats = metrics_scrape.per_replica(metrics_scrape.parse(TEXT))
    live = [ReplicaInfo(app="a", deployment="LLMDeployment", replica_id="r1", state="RUNNING",
                        node_id="n1", node_ip="127.0.0.1", actor_id=None, pid=None)]
    text = metrics_scrape.format_summary(stats, live, ["http://x:1/metrics: timeout"])
    assert "r1" in text and "r2" not in text and "25.0%" in text and "unreachable" in text
    assert "PREFIX HITS" in text and "75.0%" in text
    assert "no engine metrics" in metrics_scrape.format_summary({}, live)


def test_labelled_logger_declares_and_fills_the_extra_labels():
    # Through the seam, not importorskip: a vLLM without vLLM's Ray logger fails here.
    base = vllm_compat.ray_stat_logger()
    logger_cls = labelled_stat_logger(base)
    assert issubclass(logger_cls, base) and logger_cls is not base
    counter = logger_cls._counter_cls("ops_unit_counter", "doc", labelnames=["model_name", "engine"])
    assert counter.metric._tag_keys[-len(EXTRA_TAG_KEYS):] == EXTRA_TAG_KEYS
    # Positional labels (how vLLM calls them) and keyword labels both give every declared key.
    for labelled in (counter.labels("m", "0"), counter.labels(model_name="m", engine="0")):
        assert set(labelled._tags) == set(counter.metric._tag_keys)
        assert labelled._tags["model_name"] == "m" and labelled._tags["engine"] == "0"
    with pytest.raises(ValueError):
        counter.labels("only-one")
    gauge = logger_cls._gauge_cls("ops_unit_gauge", "doc")
    assert set(gauge._tags) == set(gauge.metric._tag_keys)


def test_unknown_wrapper_shape_keeps_vllms_logger():
    class Other:  # a vLLM whose logger has no wrapper class attributes
        pass

    assert labelled_stat_logger(Other) is Other


class FakeMetric:
    """A Ray metric stand-in that remembers what was recorded, and on which thread."""

    def __init__(self):
        self.points: list[tuple[str, float, dict, str]] = []

    def _note(self, kind, value, tags):
        import threading
        self.points.append((kind, value, dict(tags), threading.current_thread().name))

    def observe(self, value, tags=None):
        self._note("observe", value, tags)

    def inc(self, value=1.0, tags=None):
        self._note("inc", value, tags)

    def set(self, value, tags=None):
        if value is None:
            raise TypeError("no value")
        self._note("set", value, tags)


def test_labelled_wrappers_record_with_the_extra_labels():
    logger_cls = labelled_stat_logger(vllm_compat.ray_stat_logger())
    histogram = logger_cls._histogram_cls("ops_unit_hist", "doc", labelnames=["model_name"],
                                          buckets=[0.1, 1.0]).labels("m")
    counter = logger_cls._counter_cls("ops_unit_counter2", "doc",
                                      labelnames=["model_name"]).labels("m")
    gauge = logger_cls._gauge_cls("ops_unit_gauge2", "doc")
    for wrapper in (histogram, counter, gauge):
        wrapper.metric = FakeMetric()
    histogram.observe(0.5)
    counter.inc(0)    # vLLM's wrapper skips zero increments; so does ours
    counter.inc(3)
    gauge.set(7)
    assert histogram.metric.points[0][:2] == ("observe", 0.5)
    assert histogram.metric.points[0][2]["model_name"] == "m"
    assert set(histogram.metric.points[0][2]) >= set(EXTRA_TAG_KEYS)
    assert counter.metric.points == [("inc", 3, counter._tags, counter.metric.points[0][3])]
    assert gauge.metric.points[0][:2] == ("set", 7)


def test_gauges_are_set_again_at_their_last_value_while_the_engine_idles():
    refresher = GaugeRefresher(period_s=3600)
    logger_cls = vllm_compat.labelled_stat_logger(vllm_compat.ray_stat_logger(),
                                                  {"application": "a"}, refresher.set)
    gauge = logger_cls._gauge_cls("ops_unit_gauge3", "doc", labelnames=["engine"])
    running, other = gauge.labels("0"), gauge.labels("1")
    fake = FakeMetric()
    running.metric = other.metric = fake
    running.set(3)
    running.set(1)       # the series' last value is what is refreshed
    other.set(5)
    running.set_to_current_time()
    stamp = fake.points[-1][1]
    fake.points.clear()
    refresher.refresh()
    assert sorted((p[1], p[2]["engine"], p[2]["application"]) for p in fake.points) == \
        sorted([(stamp, "0", "a"), (5, "1", "a")])
    assert refresher._thread is not None and refresher._thread.daemon


def test_a_gauge_that_failed_to_record_is_not_refreshed():
    refresher = GaugeRefresher(period_s=3600)
    fake = FakeMetric()
    with pytest.raises(TypeError):
        refresher.set(fake, {"k": "v"}, None)
    refresher.refresh()
    assert fake.points == []


@pytest.mark.parametrize("configured_ms, seconds", [(200, 1.0), (1000, 1.0), (15000, 15.0)])
def test_metrics_export_interval_is_rays_floored_at_a_second(monkeypatch, configured_ms, seconds):
    import ray

    class Config:
        @staticmethod
        def metrics_report_interval_ms():
            return configured_ms

    monkeypatch.setattr(ray, "_config", Config())
    assert ray_compat.metrics_export_interval_s() == seconds
    monkeypatch.setattr(ray, "_config", object())
    with pytest.raises(ray_compat.RayIncompatible, match="metrics_report_interval_ms"):
        ray_compat.metrics_export_interval_s()
