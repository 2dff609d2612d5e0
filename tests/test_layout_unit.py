"""Unit tests: `auto` parallel sizes in the flags, the per-node checks' verdicts, the layout
resolution before deploying (Ray's per-node probe replaced by made-up nodes)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from common import cli, layout, planner
from common.layout import LayoutRequest, NodeReport
from common.options import add_engine_args, engine_config_from_args
from replica.config import EngineConfig, ServeConfig

FIXTURES = Path(__file__).parent / "fixtures"
R1 = str(FIXTURES / "deepseek-r1")
QWEN7B = str(FIXTURES / "qwen2-7b")
VERSIONS = {"ray": "2.60.0", "vllm": "0.26.0", "torch": "2.9.0+cu128", "cuda": "12.8"}


def engine_from(argv, monkeypatch=None, env=None):
    for key, value in (env or {}).items():
        monkeypatch.setenv(cli.env_name(key), value)
    parser = cli.make_parser("test")
    add_engine_args(parser)
    return engine_config_from_args(parser.parse_args(argv))


def test_parallel_flags_take_numbers_or_auto(monkeypatch):
    engine = engine_from(["--tensor-parallel-size", "auto", "--pipeline-parallel-size", "2"])
    assert engine.tensor_parallel_size == "auto" and engine.pipeline_parallel_size == 2
    engine = engine_from([], monkeypatch, {"PIPELINE_PARALLEL_SIZE": "AUTO"})
    assert engine.pipeline_parallel_size == "auto"
    with pytest.raises(SystemExit):
        engine_from(["--tensor-parallel-size", "eight"])


def test_auto_is_set_aside_so_the_engine_config_validates():
    engine = EngineConfig(tensor_parallel_size="auto", pipeline_parallel_size="auto")
    request = layout.set_aside_auto(engine)
    assert request.auto and (engine.tensor_parallel_size, engine.pipeline_parallel_size) == (1, 1)
    assert engine.validate() == []


def node(i, memory_gib=80.0, model_found=True, **versions):
    return NodeReport(f"{i:02d}" * 20, f"10.0.0.{i}", 8,
                      memory_gib * planner.GIB if memory_gib else None, model_found,
                      {**VERSIONS, **versions})


def test_node_problems_name_the_node_and_the_versions():
    assert layout.node_problems([node(1), node(2)], "/models/r1") == []
    problems = layout.node_problems([node(1), node(2, model_found=False, vllm="0.25.1")],
                                    "/models/r1")
    assert len(problems) == 2
    assert "/models/r1" in problems[0] and "10.0.0.2" in problems[0]
    assert "vllm versions differ" in problems[1]
    assert "0.26.0 on 10.0.0.1" in problems[1] and "0.25.1 on 10.0.0.2" in problems[1]


def test_kv_cache_dtype_from_passed_through_flags():
    assert layout.kv_cache_dtype(["--kv-cache-dtype", "fp8"]) == "fp8"
    assert layout.kv_cache_dtype(["--kv-cache-dtype=fp8_e5m2"]) == "fp8_e5m2"
    assert layout.kv_cache_dtype(["--enable-prefix-caching"]) is None


def test_planner_settings_take_the_kv_cache_dtype_from_engine_kwargs_too():
    from replica.config import EngineConfig

    engine = EngineConfig(extra_engine_kwargs={"kv_cache_dtype": "fp8"})
    assert layout.settings_for(engine).kv_cache_dtype == "fp8"
    engine = EngineConfig(vllm_args=["--kv-cache-dtype", "fp8_e5m2"])
    assert layout.settings_for(engine).kv_cache_dtype == "fp8_e5m2"


def test_planner_settings_take_eplbs_redundant_experts_in_every_form_vllm_takes():
    def redundant(**kwargs) -> int:
        return layout.settings_for(EngineConfig(**kwargs)).redundant_experts

    assert redundant(vllm_args=["--eplb-config", '{"num_redundant_experts": 32}']) == 32
    assert redundant(vllm_args=['--eplb-config={"num_redundant_experts": 16}']) == 16
    assert redundant(vllm_args=["--eplb-config.num_redundant_experts", "8"]) == 8
    assert redundant(extra_engine_kwargs={"eplb_config": {"num_redundant_experts": 4}}) == 4
    assert redundant(vllm_args=["--enable-eplb"]) == 0


@pytest.fixture
def two_nodes(monkeypatch):
    reports = [node(1), node(2)]
    monkeypatch.setattr(layout, "probe_gpu_nodes", lambda model_path, checkpoint=None: reports)
    return reports


def resolve(engine, argv=(), memory_gib=None, serve_config=None):
    serve_config = serve_config or ServeConfig()
    request = layout.set_aside_auto(engine)
    layout.resolve_layout(request, engine, serve_config, memory_gib, list(argv))
    return serve_config


def test_auto_resolves_r1_to_tp8_pp2_and_prints_why(two_nodes, capsys):
    engine = EngineConfig(model=R1, tensor_parallel_size="auto", pipeline_parallel_size="auto")
    serve_config = resolve(engine)
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size) == (8, 2)
    out = capsys.readouterr().out
    assert "\nlayout: --tensor-parallel-size 8 --pipeline-parallel-size 2 (auto)" in out
    # ~330 GiB per node read from disk: more than the 900 s default.
    assert serve_config.timeout_s > 900 and "deploy timeout" in out


def test_explicit_timeout_is_kept(two_nodes):
    engine = EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=2)
    serve_config = resolve(engine, argv=["--timeout", "600"],
                           serve_config=ServeConfig(timeout_s=600))
    assert serve_config.timeout_s == 600


def test_single_gpu_r1_on_80gb_is_refused_before_deploying(two_nodes):
    engine = EngineConfig(model=R1, gpu_memory_utilization=0.92, max_model_len=8192)
    with pytest.raises(cli.ScriptError) as err:
        resolve(engine)
    assert err.value.code == cli.EXIT_USAGE
    assert "--tensor-parallel-size 1 --pipeline-parallel-size 1 cannot serve" in str(err.value)


def resolve_checked(engine, min_sequences=planner.MIN_SEQUENCES, check=True, memory_gib=None,
                    argv=()):
    request = layout.set_aside_auto(engine)
    request.min_sequences, request.check = min_sequences, check
    layout.resolve_layout(request, engine, ServeConfig(), memory_gib, list(argv))


def test_an_explicit_layout_short_of_kv_room_deploys_after_a_warning(two_nodes, capsys):
    """R1 on 2 x 8 x 64 GB at TP8 x PP2: the weights fit, 2 full-length sequences do not."""
    engine = EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=2)
    resolve_checked(engine, memory_gib=64)
    err = capsys.readouterr().err
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size) == (8, 2)
    assert "warning: --tensor-parallel-size 8 --pipeline-parallel-size 2 cannot serve" in err
    assert "Deploying the layout as given" in err and "(now 2)" in err
    # With room for fewer full-length sequences asked, the planner has no doubt about the KV
    # cache (what vLLM allocates beyond --gpu-memory-utilization is a warning of its own).
    given = ["--gpu-memory-utilization", "0.9"]
    engine = EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=2)
    resolve_checked(engine, min_sequences=1, memory_gib=64, argv=given)
    err = capsys.readouterr().err
    assert "cannot serve" not in err and "outside vLLM's budget" in err


def test_default_utilization_leaves_what_mla_allocates_beyond_it(two_nodes, capsys):
    """R1 on 80 GB GPUs: the default 0.9 leaves 8 GiB, short of what vLLM allocates beyond its
    budget for an MLA + MoE model; the default is lowered and said so, a given value is kept
    with a warning."""
    engine = EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=2)
    resolve_checked(engine)
    out, err = capsys.readouterr()
    assert engine.gpu_memory_utilization == 0.82
    assert "gpu-memory-utilization: 0.82 instead of the default 0.9" in out
    assert "warning" not in err
    engine = EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=2)
    resolve_checked(engine, argv=["--gpu-memory-utilization=0.9"])
    out, err = capsys.readouterr()
    assert engine.gpu_memory_utilization == 0.9 and "instead of the default" not in out
    assert "outside vLLM's budget" in err and "--gpu-memory-utilization 0.82 or lower" in err
    # A dense model needs little beyond the budget: the default stays.
    engine = EngineConfig(model=QWEN7B, tensor_parallel_size=1, pipeline_parallel_size=1)
    resolve_checked(engine)
    assert engine.gpu_memory_utilization == 0.9 and "instead" not in capsys.readouterr().out


def test_weights_over_the_gpu_are_refused_unless_the_check_is_skipped(two_nodes, capsys):
    engine = EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=1)
    with pytest.raises(cli.ScriptError, match="--no-layout-check deploys anyway"):
        resolve_checked(engine)
    resolve_checked(engine, check=False)
    assert "layout not checked (--no-layout-check)" in capsys.readouterr().err
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size) == (8, 1)
    with pytest.raises(cli.ScriptError, match="--no-layout-check skips the planner"):
        resolve_checked(EngineConfig(model=R1, tensor_parallel_size="auto"), check=False)


def test_memory_flag_overrides_the_probe(two_nodes):
    engine = EngineConfig(model=QWEN7B, tensor_parallel_size="auto")
    resolve(engine, memory_gib=16)
    assert engine.tensor_parallel_size == 2


def test_unknown_memory_skips_explicit_and_refuses_auto(monkeypatch, capsys):
    monkeypatch.setattr(layout, "probe_gpu_nodes", lambda p, c=None: [node(1, memory_gib=None)])
    engine = EngineConfig(model=R1, tensor_parallel_size=8)
    resolve(engine)
    assert "GPU memory" in capsys.readouterr().err
    with pytest.raises(cli.ScriptError, match="--gpu-memory-gib"):
        resolve(EngineConfig(model=R1, tensor_parallel_size="auto"))


def test_an_unreadable_hub_id_skips_explicit_and_refuses_auto(two_nodes, capsys, monkeypatch,
                                                              tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    resolve(EngineConfig(model="deepseek-ai/DeepSeek-R1", tensor_parallel_size=8))
    assert ("layout not checked: cannot read deepseek-ai/DeepSeek-R1/config.json from the "
            "Hugging Face Hub: offline (HF_HUB_OFFLINE) and not in the cache"
            ) in capsys.readouterr().err
    with pytest.raises(cli.ScriptError, match="auto: cannot read deepseek-ai/DeepSeek-R1"):
        resolve(EngineConfig(model="deepseek-ai/DeepSeek-R1", tensor_parallel_size="auto"))


def test_version_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(layout, "probe_gpu_nodes",
                        lambda p, c=None: [node(1), node(2, torch="2.8.0+cu126", cuda="12.6")])
    with pytest.raises(cli.ScriptError) as err:
        resolve(EngineConfig(model=R1, tensor_parallel_size=8, pipeline_parallel_size=2))
    assert err.value.code == cli.EXIT_UNHEALTHY
    assert "torch versions differ" in str(err.value) and "cuda versions differ" in str(err.value)


def test_cpu_device_resolves_auto_to_one_silently(capsys):
    engine = EngineConfig(device="cpu", tensor_parallel_size="auto")
    resolve(engine)
    assert engine.tensor_parallel_size == 1 and capsys.readouterr() == ("", "")


def test_probe_runs_here():
    answer = layout._probe_this_node(R1)
    assert answer["model_found"] is True and answer["versions"]["ray"]
    assert layout._probe_this_node("/nonexistent")["model_found"] is False


def test_derived_timeout_never_below_the_default():
    plan = planner.Plan(1, 1, 80 * planner.GIB, 68 * planner.GIB, 4 * planner.GIB,
                        1 * planner.GIB, 60, 1, 1024, 10, 1, True)
    assert layout.derived_timeout_s(plan, 8) == 900
    assert LayoutRequest(1, "auto").auto


def test_probe_reads_gpu_memory_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 143771\necho 143771\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert layout._probe_this_node(None)["gpu_memory_bytes"] == 143771 * 2**20
