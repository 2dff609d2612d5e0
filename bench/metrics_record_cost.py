"""What recording one engine metric point through Ray costs, and what a recorder thread takes off a busy event loop."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

EPILOG = """parts (in one Ray worker, as in a replica):
  per point  microseconds per call of: Ray's Histogram.observe with the 6 tags the replica's
             engine metrics carry, its Cython record with those tags and with one, and
             prometheus_client (vLLM's own registry); best of 3 rounds of --calls calls
  loop       a simulated replica event loop for --seconds: each step does busy x 6 ms of Python
             work, records --points-per-step histogram points (vLLM observes one per streamed
             token) inline or through replica.metrics_export.MetricRecorder, then idles the rest
             of 6 ms (waiting on the engine). Reports the mean step time, the most points ever
             waiting for the recorder thread, and how long it took to catch up afterwards

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/metrics_record_cost.py
"""
from replica.metrics_export import EXTRA_TAG_KEYS  # noqa: E402

# The tags of a replica's engine metric: vLLM's own, then the project's.
TAG_KEYS = ("model_name", "engine", "ReplicaId", *EXTRA_TAG_KEYS)
BOUNDARIES = [0.01 * i for i in range(1, 30)]


def best_us(call, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return round(best, 2)


def per_point(calls: int) -> dict[str, float]:
    import prometheus_client
    from ray.util import metrics

    tags = {key: "x" * 12 for key in TAG_KEYS}
    histogram = metrics.Histogram("bench_record_cost", boundaries=BOUNDARIES, tag_keys=TAG_KEYS)
    one_tag = metrics.Histogram("bench_record_cost_one_tag", boundaries=BOUNDARIES,
                                tag_keys=("a",))
    local = prometheus_client.Histogram("bench_record_cost", "d", labelnames=TAG_KEYS,
                                        buckets=BOUNDARIES).labels(**tags)
    return {"ray observe, 6 tags": best_us(lambda: histogram.observe(0.05, tags=tags), calls),
            "ray cython record, 6 tags": best_us(
                lambda: histogram._metric.record(0.05, tags=tags), calls),
            "ray cython record, 1 tag": best_us(
                lambda: one_tag._metric.record(0.05, tags={"a": "x"}), calls),
            "prometheus_client observe": best_us(lambda: local.observe(0.05), calls)}


def loop(mode: str, busy: float, points: int, seconds: float) -> dict:
    import asyncio

    from ray.util import metrics

    from replica.metrics_export import MetricRecorder

    tags = {key: "x" * 12 for key in TAG_KEYS}
    histogram = metrics.Histogram(f"bench_loop_{mode}", boundaries=BOUNDARIES, tag_keys=TAG_KEYS)
    recorder = MetricRecorder(max_pending=10**9, warn_pending=10**9)
    step_s = 0.006

    async def run() -> dict:
        steps = most_waiting = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            work_until = time.perf_counter() + step_s * busy
            while time.perf_counter() < work_until:
                pass
            for _ in range(points):
                if mode == "inline":
                    histogram.observe(0.05, tags=tags)
                else:
                    recorder.submit(histogram.observe, 0.05, tags)
            most_waiting = max(most_waiting, recorder.pending())
            await asyncio.sleep(step_s * (1 - busy))
            steps += 1
        elapsed = time.perf_counter() - started
        caught_up = time.perf_counter()
        while recorder.pending():
            await asyncio.sleep(0.001)
        return {"mode": mode, "busy": busy, "step_ms": round(elapsed / steps * 1e3, 3),
                "most_waiting": most_waiting,
                "catch_up_ms": round((time.perf_counter() - caught_up) * 1e3, 1)}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50_000,
                        help="calls per round of the per-point timings (default: %(default)s)")
    parser.add_argument("--points-per-step", type=int, default=64,
                        help="points recorded per simulated step (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds per simulated loop (default: %(default)s)")
    parser.add_argument("--busy", default="0.2,0.6,1.0",
                        help="busy fractions of a step to simulate (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    busy = [float(b) for b in args.busy.split(",")]

    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        costs = ray.get(ray.remote(per_point).remote(args.calls))
        loops = [ray.get(ray.remote(loop).remote(mode, b, args.points_per_step, args.seconds))
                 for b in busy for mode in ("inline", "thread")]
    finally:
        ray.shutdown()
    print("| per point | us |\n|---|---|")
    for name, value in costs.items():
        print(f"| {name} | {value} |")
    print("\n| recording | busy | step (ms) | most points waiting | catch-up (ms) |")
    print("|---|---|---|---|---|")
    for row in loops:
        print(f"| {row['mode']} | {row['busy']} | {row['step_ms']} | {row['most_waiting']} | "
              f"{row['catch_up_ms']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_point_us": costs, "loop": loops}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
