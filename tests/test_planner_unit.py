"""Unit tests: the layout planner on made-up clusters and real model configs (no weights)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from common import planner
from common.planner import GIB, GpuNode, PlanningError, Settings

FIXTURES = Path(__file__).parent / "fixtures"
R1 = FIXTURES / "deepseek-r1"
QWEN7B = FIXTURES / "qwen2-7b"
LLAMA70B = FIXTURES / "llama-3.3-70b-instruct"


def cluster(nodes: int, gpus: int, gib: float) -> list[GpuNode]:
    return [GpuNode(gpus, gib * GIB, f"node{i}") for i in range(nodes)]


@pytest.fixture(scope="module")
def r1():
    return planner.read_checkpoint(R1)


def test_r1_config_is_the_model_cards_architecture(r1):
    config = json.loads((R1 / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_hidden_layers"] == 61
    assert config["hidden_size"] == 7168 and config["n_routed_experts"] == 256
    assert config["kv_lora_rank"] == 512 and config["qk_rope_head_dim"] == 64
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    # 671B without the MTP layer (vLLM skips it; the model card's total leaves it out).
    assert r1.params == pytest.approx(671e9, rel=0.01)
    assert r1.active_params == pytest.approx(37e9, rel=0.03)
    assert r1.quantization == "fp8" and r1.mla
    # fp8: about one byte per parameter, the 16-bit embedding and head on top.
    assert 660e9 < r1.weight_bytes < 690e9


def test_r1_kv_is_the_mla_latent_on_every_rank(r1):
    per_token = r1.kv_bytes_per_token_layer(tp=8, kv_dtype_bytes=2)
    assert per_token == (512 + 64) * 2
    assert r1.kv_bytes_per_token_layer(tp=1, kv_dtype_bytes=2) == per_token
    assert r1.kv_bytes_per_token_layer(tp=8, kv_dtype_bytes=1) == 576


def test_dense_param_counts():
    assert planner.read_checkpoint(QWEN7B).params == pytest.approx(7.6e9, rel=0.02)
    assert planner.read_checkpoint(LLAMA70B).params == pytest.approx(70.6e9, rel=0.02)


def test_gqa_kv_splits_by_tp_down_to_one_head():
    llama = planner.read_checkpoint(LLAMA70B)   # 8 KV heads x 128
    assert llama.kv_bytes_per_token_layer(1, 2) == 2 * 8 * 128 * 2
    assert llama.kv_bytes_per_token_layer(8, 2) == 2 * 1 * 128 * 2
    assert llama.kv_bytes_per_token_layer(16, 2) == 2 * 1 * 128 * 2


def test_r1_on_2x8x80_is_tp8_pp2_one_replica(r1):
    plan = planner.plan_layout(r1, cluster(2, 8, 80), Settings())
    assert (plan.tp, plan.pp, plan.replicas) == (8, 2, 1)
    assert plan.max_model_len == 163840 and plan.sequences >= planner.MIN_SEQUENCES
    assert plan.weights_per_gpu < 80 * GIB * 0.9 - plan.reserve_per_gpu
    assert "tensor-parallel-size 8 --pipeline-parallel-size 2 (auto)" in plan.reason
    assert "1 such replica" in plan.reason


def test_r1_on_2x8x64_full_context_needs_more_or_less(r1):
    with pytest.raises(PlanningError) as err:
        planner.plan_layout(r1, cluster(2, 8, 64), Settings())
    message = str(err.value)
    assert "--max-model-len" in message and "3 nodes" in message
    assert "--kv-cache-dtype fp8" in message
    # What the message suggests does fit.
    plan = planner.plan_layout(r1, cluster(2, 8, 64), Settings(max_model_len=65536))
    assert (plan.tp, plan.pp) == (8, 2)
    plan = planner.plan_layout(r1, cluster(3, 8, 64), Settings())
    assert (plan.tp, plan.pp) == (8, 3)


def test_r1_on_one_h200_node_is_tp8(r1):
    plan = planner.plan_layout(r1, cluster(1, 8, 141), Settings())
    assert (plan.tp, plan.pp, plan.replicas) == (8, 1, 1)


def test_r1_on_4x8x24_does_not_fit_and_says_how_many_nodes(r1):
    with pytest.raises(PlanningError, match=r"9 nodes of 8 x 24 GiB"):
        planner.plan_layout(r1, cluster(4, 8, 24), Settings())


def test_r1_single_gpu_on_80gb_is_refused_with_numbers_and_a_layout(r1):
    with pytest.raises(PlanningError) as err:
        planner.plan_layout(r1, cluster(2, 8, 80), Settings(0.92, 8192), tp=1, pp=1)
    message = str(err.value)
    assert "--tensor-parallel-size 1 --pipeline-parallel-size 1 cannot serve" in message
    assert "of weights per GPU" in message and "--gpu-memory-utilization 0.92" in message
    assert "A layout that fits: --tensor-parallel-size 8 --pipeline-parallel-size 2" in message


@pytest.mark.parametrize("nodes, gpus, gib, expected", [
    (2, 8, 80, (1, 1, 16)), (2, 8, 64, (1, 1, 16)), (1, 8, 141, (1, 1, 8)),
    (4, 8, 24, (1, 1, 32)),
])
def test_7b(nodes, gpus, gib, expected):
    plan = planner.plan_layout(planner.read_checkpoint(QWEN7B), cluster(nodes, gpus, gib),
                               Settings())
    assert (plan.tp, plan.pp, plan.replicas) == expected


@pytest.mark.parametrize("nodes, gpus, gib, expected", [
    (2, 8, 80, (4, 1, 4)), (2, 8, 64, (4, 1, 4)), (1, 8, 141, (2, 1, 4)),
    (4, 8, 24, (8, 2, 2)),
])
def test_70b(nodes, gpus, gib, expected):
    plan = planner.plan_layout(planner.read_checkpoint(LLAMA70B), cluster(nodes, gpus, gib),
                               Settings())
    assert (plan.tp, plan.pp, plan.replicas) == expected


def test_70b_shorter_context_fits_fewer_gpus():
    plan = planner.plan_layout(planner.read_checkpoint(LLAMA70B), cluster(2, 8, 80),
                               Settings(max_model_len=8192))
    assert (plan.tp, plan.pp, plan.replicas) == (2, 1, 8)


def test_given_tp_auto_pp(r1):
    plan = planner.plan_layout(r1, cluster(2, 8, 80), Settings(), tp=8, pp="auto")
    assert (plan.tp, plan.pp) == (8, 2)


def test_explicit_layout_that_fits_is_kept():
    plan = planner.plan_layout(planner.read_checkpoint(QWEN7B), cluster(2, 8, 80), Settings(),
                               tp=4, pp=1)
    assert (plan.tp, plan.pp, plan.chosen, plan.replicas) == (4, 1, "given", 4)


def test_tp_divides_heads_and_kv_heads():
    qwen = planner.read_checkpoint(QWEN7B)   # 28 heads, 4 KV heads
    assert [tp for tp in range(1, 9) if qwen.valid_tp(tp)] == [1, 2, 4]
    r1 = planner.read_checkpoint(R1)         # 128 heads; fp8 blocks of 2048 / tp
    assert r1.valid_tp(16) and not r1.valid_tp(32) and not r1.valid_tp(3)


def test_pp_stages_split_like_vllm():
    assert [len(r) for r in planner.pp_stage_layers(61, 2)] == [31, 30]
    assert [len(r) for r in planner.pp_stage_layers(80, 3)] == [27, 27, 26]
    assert [len(r) for r in planner.pp_stage_layers(61, 4)] == [15, 15, 16, 15]


def test_replicas_keep_stages_on_distinct_nodes():
    nodes = cluster(3, 8, 80)
    assert planner.replicas_on(nodes, 8, 2) == 1
    assert planner.replicas_on(nodes, 4, 2) == 3
    assert planner.replicas_on(nodes, 1, 1) == 24


def test_unknown_memory_and_no_gpu_are_planning_errors(r1):
    with pytest.raises(PlanningError, match="memory is unknown"):
        planner.plan_layout(r1, [GpuNode(8, None)], Settings())
    with pytest.raises(PlanningError, match="no GPU"):
        planner.plan_layout(r1, [GpuNode(0, 80 * GIB)], Settings())


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(planner.ModelConfigError, match="config.json not found"):
        planner.read_checkpoint(tmp_path)


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    header, offset = {}, 0
    sizes = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return offset


def test_measured_weights_come_from_safetensors_headers_without_mtp(tmp_path):
    (tmp_path / "config.json").write_text((R1 / "config.json").read_text())
    size = _write_safetensors(tmp_path / "model-1.safetensors", {
        "model.layers.0.mlp.down_proj.weight": ("F8_E4M3", [64, 64]),
        "model.layers.61.eh_proj.weight": ("BF16", [64, 64])})
    model = planner.read_checkpoint(tmp_path)
    assert model.weight_bytes == size - 64 * 64 * 2
    assert model.weights_source == "safetensors headers"


def test_measured_weights_from_the_index(tmp_path):
    (tmp_path / "config.json").write_text((QWEN7B / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 15_231_233_024}, "weight_map": {}}))
    model = planner.read_checkpoint(tmp_path)
    assert model.weight_bytes == 15_231_233_024 and model.weights_source == "safetensors index"
    plan = planner.plan_layout(model, cluster(1, 8, 80), Settings())
    assert plan.weights_per_gpu == pytest.approx(15_231_233_024, rel=1e-6)


def test_unquantized_model_too_big_suggests_fp8():
    llama = planner.read_checkpoint(LLAMA70B)
    with pytest.raises(PlanningError, match="fp8 checkpoint"):
        planner.plan_layout(llama, cluster(1, 2, 64), Settings(max_model_len=8192))


def test_explicit_tp_vllm_cannot_split_is_refused(r1):
    with pytest.raises(PlanningError, match="does not divide the model's 128 attention heads"):
        planner.plan_layout(r1, cluster(2, 8, 80), Settings(), tp=6, pp=2)
    with pytest.raises(PlanningError, match="fp8 quantization block"):
        planner.plan_layout(r1, cluster(8, 32, 80), Settings(), tp=32, pp=1)


def test_an_explicit_layout_is_doubted_when_only_kv_room_is_short_and_refused_when_weights_are():
    r1 = planner.read_checkpoint(R1)
    nodes_64 = [GpuNode(8, 64 * GIB), GpuNode(8, 64 * GIB)]
    with pytest.raises(planner.PlanDoubt) as doubt:
        planner.plan_layout(r1, nodes_64, Settings(), 8, 2)
    assert doubt.value.plan.weights_per_gpu < 64 * GIB * 0.9
    with pytest.raises(PlanningError) as refused:
        planner.plan_layout(r1, nodes_64, Settings(), 8, 1)
    assert not isinstance(refused.value, planner.PlanDoubt)


# vLLM 0.26's own figures on one H200 (143,771 MiB), bench/results/r1-shape-h200-memory-20261204.md:
# (model, --gpu-memory-utilization, max_model_len, max_num_batched_tokens, "Available KV cache
# memory" GiB).
H200_BYTES = 143771 * 2**20
# The first three calibrated the reserve; the rest were measured after, at settings the
# calibration never saw (R1 deployed by ray-single-gpu.py with its lowered default 0.90, with
# VLLM_USE_DEEP_GEMM=0 and then with DeepGEMM on, vLLM's default: 6,312,768 tokens of 9,216 B;
# the 7B shape at 0.80 with 4,096 tokens per step).
VLLM_KV_ON_H200 = [("r1-8-layers", 0.92, 8192, 8192, 56.98), ("r1-8-layers", 0.92, 8192, 4096, 59.88),
                   ("qwen2-7b", 0.90, 2048, 8192, 110.18),
                   ("r1-8-layers", 0.90, 8192, 8192, 54.22), ("r1-8-layers", 0.90, 8192, 8192, 54.18),
                   ("qwen2-7b", 0.80, 4096, 4096, 96.26)]


def r1_with_8_layers() -> planner.ModelFootprint:
    """The reduced-depth R1 shape the GPU runs measured (bench/make_model_r1.py)."""
    config = json.loads((R1 / "config.json").read_text())
    return planner.footprint_from_config({**config, "num_hidden_layers": 8}, "r1-8-layers")


@pytest.mark.parametrize("name,util,max_len,tokens,vllm_gib", VLLM_KV_ON_H200)
def test_kv_room_within_5_percent_of_vllms_own_figure(name, util, max_len, tokens, vllm_gib):
    model = r1_with_8_layers() if name.startswith("r1") else planner.read_checkpoint(QWEN7B)
    plan = planner.evaluate(model, 1, 1, H200_BYTES,
                            Settings(gpu_memory_utilization=util, max_model_len=max_len,
                                     max_num_batched_tokens=tokens))
    assert plan.kv_room_per_gpu / GIB == pytest.approx(vllm_gib, rel=0.05)


def test_reserve_grows_with_the_batch_and_shrinks_with_tp(r1):
    small = planner.runtime_reserve(r1, 8, 80 * GIB, Settings(max_num_batched_tokens=2048))
    large = planner.runtime_reserve(r1, 8, 80 * GIB, Settings(max_num_batched_tokens=8192))
    assert large > small > planner.RUNTIME_PROFILES["mla_moe"].fixed_bytes
    assert planner.runtime_reserve(r1, 1, 80 * GIB, Settings(max_num_batched_tokens=8192)) > large
    # Unset: vLLM's serve default for the GPU (8192 tokens on 80 GiB, 2048 on 48 GiB).
    assert planner.runtime_reserve(r1, 8, 80 * GIB, Settings()) == large
    assert planner.runtime_reserve(r1, 8, 48 * GIB, Settings()) == small
    # An explicit reserve is taken as it is.
    assert planner.runtime_reserve(r1, 8, 80 * GIB, Settings(reserve_bytes=GIB)) == GIB


def test_vllms_default_batch_by_gpu_memory():
    assert planner.serve_batch(48 * GIB) == 2048 and planner.serve_batch(48 * GIB, True) == 8192
    assert planner.serve_batch(80 * GIB) == 8192 and planner.serve_batch(141 * GIB) == 8192
    assert planner.serve_batch(80 * GIB, offline=True) == 16384
    assert planner.serve_batch(180 * GIB) == 16384


def test_headroom_warning_for_mla_where_little_is_left_outside_vllms_budget():
    model = r1_with_8_layers()
    tight = Settings(gpu_memory_utilization=0.92, max_model_len=8192)
    plan = planner.evaluate(model, 1, 1, H200_BYTES, tight)
    warning = planner.headroom_warning(model, plan, tight)
    assert "MLA prefill workspace" in warning and "--gpu-memory-utilization 0.90 or lower" in warning
    roomy = Settings(gpu_memory_utilization=0.90, max_model_len=8192)
    assert planner.headroom_warning(model, planner.evaluate(model, 1, 1, H200_BYTES, roomy),
                                    roomy) == ""
    dense = planner.read_checkpoint(QWEN7B)
    assert planner.headroom_warning(dense, planner.evaluate(dense, 1, 1, H200_BYTES, tight),
                                    tight) == ""


def test_plan_states_its_kv_tokens(r1):
    plan = planner.plan_layout(r1, cluster(2, 8, 80), Settings())
    assert plan.kv_tokens == int(plan.kv_room_per_gpu / plan.kv_bytes_per_token)
    assert plan.to_dict()["kv_cache_tokens"] == plan.kv_tokens


def test_kv_cache_report_sets_vllms_figure_beside_the_planners():
    from replica.server import kv_cache_report

    line, short = kv_cache_report(1000, None)
    assert line == "KV cache: 1000 tokens (vLLM's, after its memory profile)" and not short
    line, short = kv_cache_report(980, 1000)
    assert "the deploy's planner predicted 1000 (-2.0%)" in line and not short
    line, short = kv_cache_report(900, 1000)
    assert short and "(-10.0%)" in line and "over-estimated" in line


# Wide expert parallelism: R1's routed experts are 256 per MoE layer, 58 MoE layers of 61.
def test_r1_routed_experts_split_over_the_expert_parallel_ranks(r1):
    experts = sum(layer.experts for layer in r1.layers)
    rest = r1.weight_bytes - experts
    # Routed experts are nearly all of R1: 58 layers x 256 x 3 x 7168 x 2048 fp8 bytes (+ scales).
    assert experts / GIB == pytest.approx(58 * 256 * 3 * 7168 * 2048 * (1 + 4 / 128**2) / GIB,
                                          rel=1e-6)
    assert 15 * GIB < rest < 20 * GIB
    rank = planner.evaluate(r1, 1, 1, 141 * GIB, Settings(gpu_memory_utilization=0.9), dp=16,
                            expert_parallel=True)
    # Each of 16 ranks: everything but the routed experts in full, and 16 of the 256 experts.
    assert rank.weights_per_gpu == pytest.approx(rest + experts / 16, rel=1e-9)
    assert rank.gpus_per_replica == 16 and "--data-parallel-size 16 --enable-expert-parallel" in \
        rank.flags()
    # Without expert parallelism a data-parallel rank holds every expert.
    assert planner.evaluate(r1, 1, 1, 141 * GIB, Settings(), dp=16).weights_per_gpu == \
        pytest.approx(r1.weight_bytes, rel=1e-9)


def test_r1_wide_ep_against_tp_on_the_guides_clusters(r1):
    """2 x 8 x 141 GiB: 16 DP ranks each hold about 56 GiB of weights and cache their own
    requests, more than 12x the KV tokens of two TP 8 replicas, whose every GPU keeps a copy of
    each token's MLA cache. 2 x 8 x 80 GiB: a rank's 56 GiB leave no KV room, TP 8 x PP 2 fits."""
    big = planner.compare_wide_ep(r1, cluster(2, 8, 141), Settings(gpu_memory_utilization=0.9))
    assert big is not None and big.pick == "dp-ep"
    assert (big.tp_plan.tp, big.tp_plan.pp, big.tp_plan.replicas) == (8, 1, 2)
    assert big.ep_plan.fits and big.ep_plan.dp == 16 and big.ep_plan.kv_bytes_per_token == 576 * 2 * 61
    assert big.cluster_tokens(big.ep_plan) > 12 * big.cluster_tokens(big.tp_plan)
    assert any("RDMA" in line for line in big.lines())
    small = planner.compare_wide_ep(r1, cluster(2, 8, 80), Settings(gpu_memory_utilization=0.82))
    assert small is not None and small.pick == "tp-pp" and not small.ep_plan.fits
    assert (small.tp_plan.tp, small.tp_plan.pp) == (8, 2)
    assert planner.compare_wide_ep(planner.read_checkpoint(QWEN7B), cluster(2, 8, 80),
                                   Settings()) is None  # dense: nothing to compare
    # 2 x 8 x 80 GiB at a 32k context: one GPU per rank leaves no room for 4 sequences, two
    # do (tensor parallel 2 inside each of 8 ranks), and 8 ranks cache 2.5x the tokens of TP 8
    # x PP 2.
    mid = planner.compare_wide_ep(r1, cluster(2, 8, 80),
                                  Settings(gpu_memory_utilization=0.9, max_model_len=32768))
    assert mid is not None and mid.pick == "dp-ep"
    assert (mid.ep_plan.tp, mid.ep_plan.dp) == (2, 8) and mid.ep_plan.fits
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 1 --data-parallel-size 8" in \
        mid.ep_plan.flags()
    assert mid.cluster_tokens(mid.ep_plan) > 2.4 * mid.cluster_tokens(mid.tp_plan)


def test_r1_data_parallel_ranks_are_planned_per_rank_with_experts_split(r1):
    settings = Settings(gpu_memory_utilization=0.9)
    plan = planner.plan_layout(r1, cluster(2, 8, 141), settings, tp=1, pp=1, dp=16,
                               expert_parallel=True)
    assert (plan.tp, plan.pp, plan.dp, plan.expert_parallel, plan.chosen) == \
        (1, 1, 16, True, "given")
    assert plan.fits and plan.replicas == 1   # one gang of 16 ranks on 2 x 8 GPUs
    assert "--data-parallel-size 16 --enable-expert-parallel" in plan.reason
    assert round(plan.weights_per_gpu / GIB, 1) == 55.8   # compare_wide_ep's golden figure
    # Without expert parallelism every rank would hold all 671B parameters.
    with pytest.raises(PlanningError):
        planner.plan_layout(r1, cluster(2, 8, 141), settings, tp=1, pp=1, dp=16)


def test_eplbs_redundant_experts_add_their_share_to_every_rank(r1):
    """32 redundant experts over 16 ranks: each MoE layer holds 288 experts instead of 256, so
    every rank's routed experts grow by 1/8 (38.1 GiB -> 42.9 GiB) and its KV room shrinks."""
    plain = planner.evaluate(r1, 1, 1, 141 * GIB, Settings(gpu_memory_utilization=0.9), dp=16,
                             expert_parallel=True)
    eplb = planner.evaluate(r1, 1, 1, 141 * GIB, Settings(gpu_memory_utilization=0.9,
                                                          redundant_experts=32),
                            dp=16, expert_parallel=True)
    routed = sum(layer.experts for layer in r1.layers) / 16
    assert r1.routed_experts == 256
    assert eplb.weights_per_gpu - plain.weights_per_gpu == pytest.approx(routed * 32 / 256)
    assert round(eplb.weights_per_gpu / GIB, 1) == 60.6
    assert eplb.kv_room_per_gpu < plain.kv_room_per_gpu
    # Without expert parallelism there are no redundant experts to hold.
    assert planner.evaluate(r1, 8, 1, 141 * GIB, Settings(redundant_experts=32)).weights_per_gpu \
        == planner.evaluate(r1, 8, 1, 141 * GIB, Settings()).weights_per_gpu


def test_data_parallel_needs_a_moe_model_and_a_given_layout(r1):
    with pytest.raises(PlanningError, match="no MoE layers"):
        planner.plan_layout(planner.read_checkpoint(QWEN7B), cluster(2, 8, 80), Settings(),
                            tp=1, pp=1, dp=2)
    with pytest.raises(PlanningError, match="plans per rank"):
        planner.plan_layout(r1, cluster(2, 8, 141), Settings(), tp="auto", pp=1, dp=16)
