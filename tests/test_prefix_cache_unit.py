"""Unit tests of load_test.py's per-replica prefix-cache hit rate: counters from Ray's and vllm serve's metrics, the run's share, the report lines."""
from __future__ import annotations

from ops import prefix_cache
from ops.metrics_scrape import Sample, parse


def test_ray_metrics_count_per_serve_replica_and_vllm_serve_per_endpoint():
    ray = [Sample("ray_vllm_prefix_cache_queries_total", {"ReplicaId": "a", "engine": "0"}, 100),
           Sample("ray_vllm_prefix_cache_hits_total", {"ReplicaId": "a", "engine": "0"}, 60),
           Sample("ray_vllm_prefix_cache_queries_total", {"ReplicaId": "b"}, 50),
           Sample("ray_vllm_generation_tokens_total", {"ReplicaId": "b"}, 9)]
    assert prefix_cache.counters(ray, "http://n1/metrics") == {"a": (100, 60), "b": (50, 0)}
    serve = parse('vllm:prefix_cache_queries_total{engine="0",model_name="m"} 40.0\n'
                  'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 30.0\n'
                  'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 8.0\n')
    assert prefix_cache.counters(serve, "u") == {"u": (40.0, 30.0), "u engine 1": (8.0, 0.0)}


def test_the_run_is_the_difference_and_idle_replicas_are_left_out():
    hits = prefix_cache.of_run({"a": (100, 60), "b": (50, 0)},
                               {"a": (300, 210), "b": (50, 0), "c": (10, 5)})
    assert [(h.replica, h.queries, h.hits, h.rate) for h in hits] == [
        ("a", 200, 150, 0.75), ("c", 10, 5, 0.5)]
    lines = prefix_cache.format_rows(hits, ["x: down"])
    assert any(line.startswith("a:") and "75.0% of 200 tokens" in line for line in lines)
    assert any(line.startswith("All replicas:") and "73.8% of 210 tokens" in line
               for line in lines)
    assert lines[-1] == "  x: down"
    assert "no lookups counted" in prefix_cache.format_rows([], [])[1]


def test_the_counters_are_read_until_they_settle(monkeypatch):
    reads = iter([{"a": (100, 50)}, {"a": (180, 120)}, {"a": (200, 140)}, {"a": (200, 140)}])
    monkeypatch.setattr(prefix_cache, "read", lambda urls: (next(reads), []))
    hits, errors = prefix_cache.read_after(["u"], {"a": (100, 50)}, settle_s=5, interval_s=0)
    assert [(h.queries, h.hits) for h in hits] == [(100, 90)] and errors == []
    monkeypatch.setattr(prefix_cache, "read", lambda urls: ({"a": (100, 50)}, []))
    hits, errors = prefix_cache.read_after(["u"], {"a": (100, 50)}, settle_s=0.05,
                                           interval_s=0.01)
    assert hits == [] and "did not settle" in errors[0]
