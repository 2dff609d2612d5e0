"""Unit tests: a Hugging Face ID planned like a local folder, through a stand-in Hub on loopback."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from _stand_in_hub import R1_SHARDS, R1_TOTAL_SIZE, r1_repository, stand_in_hub
from common import hub, layout, planner
from common.layout import NodeReport
from replica.config import EngineConfig

R1 = "deepseek-ai/DeepSeek-R1"


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub"


def test_hub_ids_and_paths():
    assert hub.is_hub_id(R1) and hub.is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not hub.is_hub_id("/models/DeepSeek-R1") and not hub.is_hub_id("models")
    assert not hub.is_hub_id("tests")


def test_the_default_model_is_read_from_the_hub_and_planned(hub_cache, monkeypatch):
    with stand_in_hub({R1: r1_repository()}) as (url, asked):
        monkeypatch.setenv("HF_ENDPOINT", url)
        checkpoint = hub.fetch_metadata(R1)
    assert any(path.endswith("/config.json") for path in asked)
    assert len(checkpoint.weight_files) == R1_SHARDS and checkpoint.total_bytes == R1_TOTAL_SIZE
    model = layout.local_footprint(EngineConfig(model=R1), checkpoint)
    assert model is not None and model.weight_bytes == pytest.approx(R1_TOTAL_SIZE, rel=0.02)
    assert model.weights_source == "safetensors index"
    eighty = [planner.GpuNode(8, 80 * planner.GIB, f"node{i}") for i in range(2)]
    with pytest.raises(planner.PlanningError, match="A layout that fits"):
        planner.plan_layout(model, eighty, planner.Settings(gpu_memory_utilization=0.92), 1, 1)


def test_an_unknown_repository_is_a_clear_error(hub_cache, monkeypatch):
    with stand_in_hub({}) as (url, _):
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(hub.HubError, match="cannot read nobody/nothing/config.json"):
            hub.fetch_metadata("nobody/nothing")


def test_each_node_says_whether_it_will_download_the_weights():
    checkpoint = hub.HubCheckpoint(R1, Path("."), tuple(f"f{i}" for i in range(4)), 400e9)
    reports = [NodeReport("a" * 40, "10.0.0.1", 8, hub_files_cached=4),
               NodeReport("b" * 40, "10.0.0.2", 8, hub_files_cached=1)]
    notes = layout.hub_download_notes(reports, checkpoint)
    assert "10.0.0.1" in notes[0] and "in its Hugging Face cache (4 weight files)" in notes[0]
    assert "10.0.0.2" in notes[1] and "will download 3 of 4 weight files" in notes[1]
    assert "~279.4 GiB" in notes[1]
