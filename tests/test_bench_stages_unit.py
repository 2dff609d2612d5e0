"""The benchmark's engine-stage maths: vLLM's histograms from a scrape, and means between two."""
from __future__ import annotations

import sys
from pathlib import Path

# The benchmark runs as a script beside its own helper modules (bench/machine.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from serving_benchmark import engine_stage_totals, stage_means_ms  # noqa: E402

VLLM_SERVE_SCRAPE = """\
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 0.4
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 4.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 9.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 4.0
"""

RAY_SCRAPE = """\
# TYPE ray_vllm_time_to_first_token_seconds histogram
ray_vllm_time_to_first_token_seconds_sum{replica="a",model_name="m"} 1.5
ray_vllm_time_to_first_token_seconds_count{replica="a",model_name="m"} 3.0
ray_vllm_time_to_first_token_seconds_sum{replica="b",model_name="m"} 0.5
ray_vllm_time_to_first_token_seconds_count{replica="b",model_name="m"} 1.0
"""


def test_totals_from_vllm_serve_and_ray_names():
    assert engine_stage_totals(VLLM_SERVE_SCRAPE) == {"engine_ttft": (2.0, 4.0),
                                                      "engine_queue": (0.4, 4.0)}
    # Summed over replicas (label sets).
    assert engine_stage_totals(RAY_SCRAPE) == {"engine_ttft": (2.0, 4.0)}


def test_means_between_two_scrapes():
    before = {"engine_ttft": (2.0, 4.0), "engine_queue": (0.4, 4.0)}
    after = {"engine_ttft": (3.0, 6.0), "engine_queue": (0.4, 4.0), "engine_prefill": (0.2, 2.0)}
    # Queue saw no new request: no mean rather than 0/0; prefill is new since `before`.
    assert stage_means_ms(before, after) == {"engine_ttft_mean_ms": 500.0,
                                             "engine_prefill_mean_ms": 100.0}
