"""R1 operators' vLLM engine options pass the pre-deploy check (vLLM's own parser and AsyncEngineArgs fields); mistakes are refused with a clear message. Imports vLLM (seconds), starts no engine or Ray."""
from __future__ import annotations

import json

import pytest

from common.deploy import check_vllm_args
from common.demo_model import ensure_demo_model
from replica.config import EngineConfig
from replica.vllm_app import serve_args

R1_ENGINE = EngineConfig(tensor_parallel_size=8, pipeline_parallel_size=2)
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}


def test_r1_operators_flags_pass_as_vllm_serve_flags():
    flags = ["--quantization", "fp8", "--kv-cache-dtype", "fp8", "--enable-expert-parallel",
             "--enable-prefix-caching", "--speculative-config", json.dumps(SPECULATIVE)]
    assert check_vllm_args(R1_ENGINE, flags) == []
    args = serve_args(R1_ENGINE.engine_kwargs(), flags)
    assert args.quantization == "fp8" and args.kv_cache_dtype == "fp8"
    assert args.enable_expert_parallel is True and args.enable_prefix_caching is True
    assert args.speculative_config["num_speculative_tokens"] == 3


def test_the_same_options_pass_as_engine_kwargs_and_reach_the_engine_args():
    from vllm import AsyncEngineArgs

    extra = {"quantization": "fp8", "kv_cache_dtype": "fp8",
             "enable_prefix_caching": True, "speculative_config": SPECULATIVE}
    # A local checkpoint: AsyncEngineArgs of vLLM 0.26 looks a Hugging Face ID up on the Hub.
    engine = EngineConfig(model=str(ensure_demo_model(quiet=True)), tensor_parallel_size=8,
                          pipeline_parallel_size=2, enable_expert_parallel=True,
                          extra_engine_kwargs=extra)
    assert check_vllm_args(engine, []) == []
    engine_args = AsyncEngineArgs.from_cli_args(
        serve_args(engine.engine_kwargs(), [], extra=engine.extra_engine_kwargs))
    assert engine_args.quantization == "fp8" and engine_args.enable_expert_parallel is True
    assert engine_args.speculative_config == SPECULATIVE
    assert engine_args.tensor_parallel_size == 8 and engine_args.pipeline_parallel_size == 2


def test_unknown_engine_kwarg_names_close_matches():
    engine = EngineConfig(extra_engine_kwargs={"enable_expert_paralel": True})
    [problem] = check_vllm_args(engine, [])
    assert "'enable_expert_paralel'" in problem and "did you mean enable_expert_parallel" in problem


def test_engine_kwarg_that_a_flag_sets_is_refused_naming_the_flag():
    engine = EngineConfig(extra_engine_kwargs={"max_num_seqs": 8, "enable_log_requests": True})
    problems = check_vllm_args(engine, [])
    assert any("set by --max-num-seqs" in p for p in problems)
    assert any("'enable_log_requests'" in p and "this script itself" in p for p in problems)


def test_data_parallel_given_to_vllm_is_refused_pointing_to_the_scripts_flags():
    # The size is the script's flag (a gang of that many replicas); a rank's own settings come
    # from its gang.
    [problem] = check_vllm_args(R1_ENGINE, ["-dp", "2"])
    assert "give it as --data-parallel-size 2" in problem
    [problem] = check_vllm_args(EngineConfig(extra_engine_kwargs={"data_parallel_size": 2}), [])
    assert "set by --data-parallel-size" in problem
    [problem] = check_vllm_args(EngineConfig(data_parallel_size=2),
                                ["--data-parallel-rank", "0", "--data-parallel-rpc-port", "5"])
    assert "--data-parallel-rank, --data-parallel-rpc-port" in problem
    assert "--num-replicas (gangs)" in problem


def test_help_vllm_prints_vllms_own_option_groups(capsys):
    from common.deploy import script_main

    def topology(*_):
        raise AssertionError("--help-vllm must not deploy")

    with pytest.raises(SystemExit) as exited:  # like --help
        script_main(["--help-vllm"], description="test", topology=topology)
    assert exited.value.code in (0, None)
    text = capsys.readouterr().out
    assert "--kv-cache-dtype" in text and "--speculative-config" in text
    assert "ParallelConfig" in text or "parallel" in text.lower()


def test_script_help_points_to_help_vllm(capsys):
    from common.deploy import script_main

    with pytest.raises(SystemExit):
        script_main(["--help"], description="test", topology=lambda *_: None)
    text = capsys.readouterr().out
    assert "--help-vllm" in text and "--engine-kwargs" in text and "DEEPSEEK_SERVE_ENGINE_KWARGS]" in text


def test_wide_ep_options_pass_through_and_a_wrong_one_is_refused_before_deploying():
    engine = EngineConfig(data_parallel_size=16, enable_expert_parallel=True)
    assert check_vllm_args(engine, [
        "--enable-eplb", "--eplb-config", json.dumps({"num_redundant_experts": 32}),
        "--all2all-backend", "deepep_low_latency", "--enable-dbo"]) == []
    [problem] = check_vllm_args(engine, ["--all2all-backend", "nonsense"])
    assert "invalid choice: 'nonsense'" in problem
