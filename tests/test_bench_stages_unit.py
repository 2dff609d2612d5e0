"""The benchmark's pure parts: vLLM's histograms from a scrape, means between two, partial reports, kernel choices from a log."""
from __future__ import annotations

import sys
from pathlib import Path

# The benchmark runs as a script beside its own helper modules (bench/machine.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from serving_benchmark import engine_config_line, engine_stage_totals, kernel_lines, stage_means_ms, wave_ttft_p50_ms

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


def cut_short_report() -> dict:
    """A --partial-copy as a run interrupted after two of its target-runs leaves it."""
    from serving_benchmark import aggregate, ratios

    runs = [{"rep": 0, "row": "vllm-serve", "output_tok_s": 100.0, "requests": 4, "failures": 0},
            {"rep": 0, "row": "ray", "output_tok_s": 99.0, "requests": 4, "failures": 0}]
    table = aggregate(runs, ["vllm-serve", "ray", "ray-proxy"], False)
    params = {"num_requests": 4, "input_len": 8, "prompt_tokens_min": 8, "prompt_tokens_max": 8,
              "output_len": 4, "concurrency": 4, "request_rate": "inf", "stream_requests": 0,
              "stream_concurrency": 1, "model": "m", "load_format": "dummy", "engine": {},
              "repetitions": 3}
    return {"benchmark": "serving_benchmark", "date": "2026-12-02T00:00:00+00:00",
            "machine": {"cpu": "x", "cpus": 16, "python": "3.12", "versions": {"vllm": "0.26.0"},
                        "gpu": {"name": "H200"}},
            "parameters": params, "command": "python bench/serving_benchmark.py -r 3",
            "target_commands": {}, "table": table, "ratios": ratios(runs, table), "runs": runs,
            "partial": True}


def test_a_run_cut_short_becomes_the_usual_files_marked_partial(tmp_path):
    import json

    from serving_benchmark import main

    partial = tmp_path / "runs.json"
    partial.write_text(json.dumps(cut_short_report()))
    assert main(["--from-partial", str(partial), "--results-dir", str(tmp_path / "out"),
                 "--tag", "gpu"]) == 0
    md = next((tmp_path / "out").glob("serving_benchmark-gpu-partial-*.md")).read_text()
    assert "**Partial**" in md
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
            if line.startswith("| ")}
    assert rows["ray"].split(" | ")[1] == "1" and rows["ray-proxy"].split(" | ")[1] == "0"
    assert "ray/vllm-serve" in md
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert saved["partial"] is True and len(saved["runs"]) == 2


def test_every_partial_copy_is_a_whole_report(tmp_path, monkeypatch):
    import json

    import serving_benchmark as sb

    monkeypatch.setattr(sb, "machine_info", lambda: cut_short_report()["machine"])
    args = sb.apply_defaults(sb.build_parser().parse_args(
        ["--device", "cpu", "--targets", "vllm-serve,ray", "--partial-copy",
         str(tmp_path / "copy.json")]))
    args.argv = []
    bench = sb.Bench(args, tmp_path)
    bench.command_lines = {}
    bench.save_partial(cut_short_report()["runs"], [8, 9])
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy["partial"] is True and copy["machine"]["gpu"]["name"] == "H200"
    assert [e["runs"] for e in copy["table"] if not e["row"].endswith("stream")] == [1, 1]
    assert (tmp_path / "runs.json").read_text() == (tmp_path / "copy.json").read_text()


def test_partial_files_of_two_cut_runs_merge_into_one_table(tmp_path):
    import json

    from serving_benchmark import main

    first, second = cut_short_report(), cut_short_report()
    second["runs"] = [{**r, "output_tok_s": r["output_tok_s"] * 2} for r in second["runs"]]
    second["date"], second["command"] = "2026-12-02T01:00:00+00:00", "python b.py --tag second"
    paths = []
    for name, report in (("a.json", first), ("b.json", second)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(report))
    assert main(["--from-partial", *paths, "--results-dir", str(tmp_path / "out"),
                 "--tag", "gpu"]) == 0
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert [r["rep"] for r in saved["runs"]] == [0, 0, 1, 1]
    assert saved["parameters"]["repetitions"] == 2 and len(saved["merged_from"]) == 2
    ray = next(e for e in saved["table"] if e["row"] == "ray")
    assert ray["runs"] == 2 and ray["output_tok_s"]["max"] == 2 * ray["output_tok_s"]["min"]
    # Paired within each part: doubling both rows keeps each repetition's ratio.
    per_rep = saved["ratios"]["ray/vllm-serve"]["per_repetition"]
    assert len(per_rep) == 2 and abs(per_rep[0] - per_rep[1]) < 1e-9
    md = next((tmp_path / "out").glob("*.md")).read_text()
    assert "Part 2 of the merged runs" in md and "--tag second" in md


def test_partial_files_of_different_workloads_are_refused(tmp_path):
    import json

    import pytest

    from serving_benchmark import main

    other = cut_short_report()
    other["parameters"] = {**other["parameters"], "output_len": 99}
    for name, report in (("a.json", cut_short_report()), ("b.json", other)):
        (tmp_path / name).write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="different parameters"):
        main(["--from-partial", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
              "--results-dir", str(tmp_path / "out")])


def test_wave_ttft_splits_the_first_concurrency_requests_from_the_rest():
    requests = [{"index": i, "ok": True, "ttft": t} for i, t in
                enumerate([0.1, 0.3, 0.2, 0.5, 0.4])]
    requests.append({"index": 5, "ok": False, "ttft": None})  # a failure: not counted
    assert wave_ttft_p50_ms(requests, 2) == {"ttft_wave1_p50_ms": 200.0,
                                             "ttft_later_p50_ms": 400.0}
    assert wave_ttft_p50_ms(requests[:2], 2) == {"ttft_wave1_p50_ms": 200.0}
    assert wave_ttft_p50_ms([], 2) == {}


def test_kernel_choices_from_a_vllm_log():
    log = "\n".join([
        "(EngineCore_DP0 pid=412) INFO 12-04 18:02:11 [cuda.py:366] Using FLASH_ATTN_MLA "
        "attention backend out of potential backends: ['FLASH_ATTN_MLA', 'TRITON_MLA'].",
        "(ServeReplica:r1:Replica pid=90) (EngineCore_DP0 pid=412) INFO 12-04 18:02:11 "
        "[deep_gemm.py:137] DeepGEMM E8M0 enabled on current platform.",
        "INFO 12-04 18:02:12 [fp8.py:446] Using TRITON Fp8 MoE backend out of potential "
        "backends: ['DEEPGEMM', 'TRITON'].",
        "INFO 12-04 18:02:12 [fp8.py:856] Using MoEPrepareAndFinalizeNoDPEPModular",
        "INFO 12-04 18:02:12 [fp8.py:446] Using TRITON Fp8 MoE backend out of potential "
        "backends: ['DEEPGEMM', 'TRITON'].",
        "INFO 12-04 18:02:13 [__init__.py:759] Selected CutlassFP8ScaledMMLinearKernel for "
        "Fp8LinearMethod",
        "INFO 12-04 18:02:13 [gpu_model_runner.py:4000] Using 4 CUDA graph sizes",
        "Using a random seed (no log prefix: not vLLM's)",
        "WARNING 12-04 18:02:10 [vllm.py:1620] Async scheduling will be disabled because it is "
        "not supported with the `ray` distributed executor backend. ",
        "(EngineCore pid=5) INFO 12-04 18:02:09 [core.py:134] Initializing a V1 LLM engine "
        "(v0.26.0) with config: model='m', async_scheduling=True",
    ])
    assert engine_config_line(log) == ("Initializing a V1 LLM engine (v0.26.0) with config: "
                                       "model='m', async_scheduling=True")
    assert kernel_lines(log) == [
        "Using FLASH_ATTN_MLA attention backend",
        "DeepGEMM E8M0 enabled on current platform",
        "Using TRITON Fp8 MoE backend",
        "Using MoEPrepareAndFinalizeNoDPEPModular",
        "Selected CutlassFP8ScaledMMLinearKernel for Fp8LinearMethod",
        "Async scheduling will be disabled because it is not supported with the `ray` "
        "distributed executor backend"]


def test_vllm_serve_gets_the_reasoning_parser_the_replicas_pick():
    import argparse

    from serving_benchmark import MODEL7B, Bench

    bench = Bench.__new__(Bench)
    bench.args = argparse.Namespace(vllm_serve_args=[], model=str(MODEL7B))
    assert bench.reasoning_flags() == ["--reasoning-parser", "deepseek_r1"]  # opens <think>
    bench.args.vllm_serve_args = ["--reasoning-parser", "qwen3"]
    assert bench.reasoning_flags() == []   # the operator's own choice stays


def test_wide_ep_is_compared_with_tensor_parallel_over_the_same_gpus():
    from serving_benchmark import RAY_TARGETS, aggregate, ratios

    runs = [{"rep": 0, "row": "ray-tp", "output_tok_s": 100.0, "requests": 4, "failures": 0},
            {"rep": 0, "row": "ray-wide-ep", "output_tok_s": 150.0, "requests": 4,
             "failures": 0}]
    table = aggregate(runs, ["ray-tp", "ray-wide-ep"], False)
    assert ratios(runs, table)["ray-wide-ep/ray-tp"]["of_medians"] == 1.5
    script, flags = RAY_TARGETS["ray-wide-ep"]
    assert script == "ray-force-multi.py" and "--enable-expert-parallel" in flags
