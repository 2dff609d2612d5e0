"""Unit tests: --engine-kwargs (ENGINE_KWARGS) parsing into EngineConfig, without importing vLLM."""
from __future__ import annotations

import pytest

from common import cli
from common.options import add_engine_args, engine_config_from_args, flag_of_engine_field


def parse(argv):
    parser = cli.make_parser("test")
    add_engine_args(parser)
    return engine_config_from_args(parser.parse_args(argv))


def test_engine_kwargs_flag_and_env_fallback(monkeypatch):
    assert parse([]).extra_engine_kwargs == {}
    engine = parse(["--engine-kwargs", '{"kv_cache_dtype": "fp8", "max_num_partial_prefills": 2}'])
    assert engine.extra_engine_kwargs == {"kv_cache_dtype": "fp8", "max_num_partial_prefills": 2}
    monkeypatch.setenv("DEEPSEEK_SERVE_ENGINE_KWARGS", '{"quantization": "fp8"}')
    assert parse([]).extra_engine_kwargs == {"quantization": "fp8"}
    # The engine's own kwargs stay ours; the extras travel apart (replica/vllm_app.serve_args).
    assert "quantization" not in parse([]).engine_kwargs()


def test_engine_kwargs_must_be_a_json_object(monkeypatch, capsys):
    for text in ("[1, 2]", "{not json"):
        with pytest.raises(SystemExit):
            parse(["--engine-kwargs", text])
        assert "--engine-kwargs" in capsys.readouterr().err
    monkeypatch.setenv("DEEPSEEK_SERVE_ENGINE_KWARGS", "fp8")
    with pytest.raises(cli.ScriptError) as refused:
        parse([])
    assert "ENGINE_KWARGS" in str(refused.value) and refused.value.code == cli.EXIT_USAGE


def test_flag_of_engine_field():
    assert flag_of_engine_field("max_num_seqs") == "--max-num-seqs"
    assert flag_of_engine_field("kv_cache_dtype") is None


def test_replicas_sharing_a_gpu_start_one_at_a_time(tmp_path, monkeypatch):
    """A second replica on the same shared GPU waits for the first's engine start; a fixed KV
    cache, a whole GPU or a CPU engine do not wait."""
    import threading

    from replica.config import EngineConfig
    from replica.engine import shared_gpu_start_turn

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    gpu = EngineConfig(model="m", device="cuda")
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def first():
        with shared_gpu_start_turn(gpu, 0.5, str(tmp_path)):
            order.append("first in")
            first_in.set()
            release.wait(10)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    for free in (EngineConfig(model="m", device="cuda", kv_cache_memory_bytes=1 << 30),
                 EngineConfig(model="m", device="cpu")):
        with shared_gpu_start_turn(free, 0.5, str(tmp_path)):
            order.append("free")
    with shared_gpu_start_turn(gpu, 1.0, str(tmp_path)):
        order.append("whole GPU")
    threading.Timer(0.2, release.set).start()
    with shared_gpu_start_turn(gpu, 0.5, str(tmp_path)):
        order.append("second in")
    thread.join(10)
    assert order == ["first in", "free", "free", "whole GPU", "first out", "second in"]
    assert (tmp_path / "deepseek-serve-gpu-3.start").exists()
