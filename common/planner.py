"""Parallel layout planning: a checkpoint's memory footprint against a cluster's GPUs, for `auto` and for refusing layouts that cannot fit.

The rule
--------
Every GPU of a replica holds its share of the weights, a runtime reserve and the KV cache.
vLLM gives itself `gpu_memory_utilization x GPU memory` per GPU, so a layout (tp, pp) fits when,
on every pipeline stage,

    usable   = memory_per_gpu x gpu_memory_utilization - runtime reserve (below)
    kv_room  = usable - weights on one GPU of the stage
    kv_room >= MIN_SEQUENCES x max_model_len x KV bytes per token on one GPU of the stage

- Weights per GPU: the layers of the stage (vLLM's split: layers // pp per stage, the remainder
  going to the stages before the last), the embedding on the first stage and the LM head on the
  last, each split by tp except what vLLM replicates on every tensor-parallel rank (norms,
  DeepSeek's q_a/kv_a projections and MoE router, and the K/V projections once tp exceeds the
  KV heads).
- KV bytes per token per GPU, for the stage's layers: MLA (DeepSeek) caches the compressed latent
  (kv_lora_rank + qk_rope_head_dim) in full on every tensor-parallel rank; GQA caches
  2 x head_dim x (kv_heads / tp, at least 1) per layer. Elements are the KV cache dtype's bytes
  (`auto`: the model's activation dtype; fp8: 1).
- max_model_len defaults to the model's max_position_embeddings.
- MIN_SEQUENCES = 2 full-length sequences at once (vLLM itself needs room for one): a replica
  that holds only one full-length request at a time stalls every other request behind it.

`auto` picks the first layout that fits in this order: fewest pipeline stages first (each stage
is a node of its own: pipeline parallelism crosses nodes, where the link is slow and only the
activations between stages travel), then the smallest tensor-parallel size within the node
(fast NVLink all-reduces). Pipeline stages therefore never share a node: within a node a larger
tp is always preferred. tp must divide the attention heads (and the KV heads, or be a multiple of
them), and with fp8 block quantization every sharded dimension must stay a multiple of the block.
The replicas the cluster holds count each node's free tp-GPU slots, stages on distinct nodes.

The runtime reserve is what vLLM's memory profile counts besides weights and KV cache, per GPU:

    reserve = profile.fixed + profile.factor x activation bytes per token x max_num_batched_tokens

- activation bytes per token: the widest per-token activation of a layer, in the model's dtype:
  a dense MLP's hidden + 3 x intermediate / tp (gate/up output and the activation), a MoE
  layer's top_k x (hidden + 3 x moe_intermediate / tp) (the fused-MoE kernel's workspaces).
- max_num_batched_tokens: the flag, else what vLLM picks for `vllm serve` on that GPU (8192 on
  70-160 GiB GPUs other than the A100, 16384 above, 2048 below; batch_limits "offline": the
  LLM class's).
- profile (RUNTIME_PROFILES): `fixed` holds non-torch memory, the sampler's pass and CUDA-graph
  memory as vLLM estimates it; `factor` how many such widths are live at the activation peak;
  `outside_budget` what vLLM allocates beyond gpu_memory_utilization (graph capture beyond its
  estimate, MLA's prefill workspace after capture), which the GPU must have free on top.
  Calibrated against vLLM 0.26's own figures on an H200 (bench/results/
  r1-shape-h200-memory-20261204.md): a DeepSeek-V3-architecture model (MLA + MoE, fp8) and a
  Qwen2-7B-shaped one (dense, bf16). It is an estimate: the replica reports the KV cache vLLM
  allocated beside the planner's figure (GET /nodes, check_cluster.py), so every deploy checks it.

Weights come from the checkpoint when it has them (the safetensors index's metadata.total_size,
or the safetensors headers), else they are estimated from config.json: llama/qwen2/mistral-style
dense models and DeepSeek V2/V3 (MoE + MLA). An fp8 `quantization_config` stores each linear
weight in 1 byte plus one float32 scale per 128 x 128 block. DeepSeek's multi-token-prediction
layer (num_nextn_predict_layers) is not counted: vLLM skips it unless speculative decoding asks
for it, and the model card's 671B total leaves it out too. Weights measured from the files count
at their size on disk (a float32 checkpoint that vLLM runs in 16 bits is counted twice too big).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

GIB = 2**30
MIN_SEQUENCES = 2
# Layouts beyond this many nodes are not worth suggesting.
_MAX_SUGGESTED_NODES = 64

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp16": 2,
                "bf16": 2, "fp32": 4}
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
                            "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                            "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}


class PlanningError(Exception):
    """A layout that cannot fit, or a checkpoint this module cannot read; the message says why
    with the numbers, and what would fit."""


class ModelConfigError(PlanningError):
    """config.json is missing, unreadable, or of an architecture this module cannot size."""


# --------------------------------------------------------------------------- model footprint


@dataclass(frozen=True)
class LayerBytes:
    """One decoder layer's weights in bytes, by how vLLM splits them over tensor-parallel ranks."""

    sharded: float      # divided by tp
    replicated: float   # held in full by every rank
    kv_proj: float = 0  # GQA K/V projections: divided by min(tp, kv_heads)
    experts: float = 0  # a MoE layer's routed experts: divided by tp, or by the expert-parallel ranks

    @property
    def total(self) -> float:
        return self.sharded + self.replicated + self.kv_proj + self.experts

    def per_gpu(self, tp: int, kv_heads: int | None, expert_ranks: int | None = None,
                expert_copies: float = 1.0) -> float:
        """On one GPU of `tp` tensor-parallel ranks; with expert parallelism, each of
        `expert_ranks` ranks (data-parallel x tensor-parallel) holds whole routed experts,
        `expert_copies` times as many as the model has (EPLB's redundant experts)."""
        kv_split = min(tp, kv_heads) if kv_heads else tp
        return (self.sharded / tp + self.replicated + self.kv_proj / kv_split
                + self.experts * expert_copies / (expert_ranks or tp))


@dataclass(frozen=True)
class ModelFootprint:
    """What a checkpoint needs in GPU memory, independent of the layout."""

    name: str
    model_type: str
    params: int                  # parameters vLLM loads (no MTP layer)
    active_params: int           # of which one token uses (MoE: the routed top-k experts)
    weight_bytes: float          # all of them once, in GPU memory
    weights_source: str          # where weight_bytes comes from
    quantization: str | None
    dtype_bytes: int             # activations (and KV cache with kv_cache_dtype auto)
    layers: tuple[LayerBytes, ...]
    embed_bytes: float
    head_bytes: float            # 0 when tied to the embedding
    num_attention_heads: int
    num_kv_heads: int | None     # None for MLA
    kv_elems_per_token_layer: int  # per GPU for MLA; for all KV heads for GQA
    max_position_embeddings: int
    tp_multiples: tuple[int, ...] = ()  # sharded dims that must stay multiples of `tp_block`
    tp_block: int = 1
    mla: bool = False
    hidden_size: int = 0
    intermediate_size: int = 0       # the dense MLP's (0: no dense layer)
    moe_intermediate_size: int = 0   # one expert's (0: no MoE layer)
    experts_per_token: int = 0
    routed_experts: int = 0          # per MoE layer (what EPLB's redundant experts add to)

    @property
    def moe(self) -> bool:
        return self.moe_intermediate_size > 0 and self.experts_per_token > 0

    def activation_bytes_per_token(self, tp: int) -> float:
        """The widest per-token activation of a layer on one of `tp` ranks (see the module
        docstring)."""
        dense = self.hidden_size + 3 * self.intermediate_size / tp if self.intermediate_size else 0
        moe = (self.experts_per_token * (self.hidden_size + 3 * self.moe_intermediate_size / tp)
               if self.moe else 0)
        return max(dense, moe) * self.dtype_bytes

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tp_problem(self, tp: int) -> str | None:
        """Why vLLM cannot split this model over `tp` ranks; None when it can."""
        if tp < 1 or self.num_attention_heads % tp:
            return f"it does not divide the model's {self.num_attention_heads} attention heads"
        if self.num_kv_heads and self.num_kv_heads % tp and tp % self.num_kv_heads:
            return (f"it neither divides the model's {self.num_kv_heads} KV heads nor is a "
                    "multiple of them")
        for dim in self.tp_multiples:
            if dim % tp or (dim // tp) % self.tp_block:
                return (f"a {dim}-wide layer split {tp} ways is not a multiple of the fp8 "
                        f"quantization block ({self.tp_block})")
        return None

    def valid_tp(self, tp: int) -> bool:
        return self.tp_problem(tp) is None

    def kv_bytes_per_token_layer(self, tp: int, kv_dtype_bytes: int) -> float:
        if self.mla:
            return self.kv_elems_per_token_layer * kv_dtype_bytes
        heads_per_rank = max(1, self.num_kv_heads // tp) if self.num_kv_heads else 1
        per_head = self.kv_elems_per_token_layer / (self.num_kv_heads or 1)
        return per_head * heads_per_rank * kv_dtype_bytes

    def describe(self) -> str:
        quant = self.quantization or f"{self.dtype_bytes * 8}-bit"
        return (f"{self.name} ({self.model_type}, {quant}, {self.params / 1e9:.1f}B parameters, "
                f"{gib(self.weight_bytes)} of weights)")


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def _dtype_bytes(config: dict, dtype: str = "auto") -> int:
    if dtype and dtype != "auto":
        return _DTYPE_BYTES.get(dtype.lower(), 2)
    # vLLM's `auto` keeps 16-bit checkpoints as they are and runs float32 ones in 16 bits.
    return 2


def kv_dtype_bytes(kv_cache_dtype: str | None, dtype_bytes: int) -> int:
    if not kv_cache_dtype or kv_cache_dtype == "auto":
        return dtype_bytes
    if kv_cache_dtype.startswith("fp8") or kv_cache_dtype in ("int8", "nvfp4"):
        return 1
    return _DTYPE_BYTES.get(kv_cache_dtype, dtype_bytes)


@dataclass
class _Quant:
    method: str | None
    linear_bytes: float       # bytes per linear weight element
    block: tuple[int, int] | None = None
    scale_bytes: int = 4

    def linear(self, out_features: int, in_features: int) -> float:
        weight = out_features * in_features * self.linear_bytes
        if self.block:
            bo, bi = self.block
            weight += math.ceil(out_features / bo) * math.ceil(in_features / bi) * self.scale_bytes
        return weight


def _quantization(config: dict, dtype_bytes: int) -> _Quant:
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if not method:
        return _Quant(None, dtype_bytes)
    if method in ("fp8", "fbgemm_fp8"):
        block = qc.get("weight_block_size")
        return _Quant("fp8", 1, tuple(block) if block else None)
    bits = qc.get("bits") or qc.get("w_bit")
    if bits:
        return _Quant(f"{method} {bits}-bit", bits / 8)
    # An unknown scheme is counted at the activation dtype: never smaller than it really is.
    return _Quant(str(method), dtype_bytes)


def _need(config: dict, *keys: str) -> list[int]:
    missing = [k for k in keys if config.get(k) in (None, "")]
    if missing:
        raise ModelConfigError(f"config.json lacks {', '.join(missing)}: cannot size the model")
    return [int(config[k]) for k in keys]


def _dense_layers(config: dict, quant: _Quant, dtype_bytes: int
                  ) -> tuple[list[LayerBytes], list[int], int, int, int]:
    """Llama/Qwen2/Mistral-style decoder layers: (layers, params per layer, kv heads, kv elems
    per token per layer, attention heads)."""
    hidden, layers, heads, inter = _need(config, "hidden_size", "num_hidden_layers",
                                         "num_attention_heads", "intermediate_size")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    bias = bool(config.get("attention_bias")) or config.get("model_type") in ("qwen2",)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    sharded = quant.linear(q_out, hidden) + quant.linear(hidden, q_out) + \
        quant.linear(2 * inter, hidden) + quant.linear(hidden, inter)
    kv_proj = quant.linear(2 * kv_out, hidden)
    norms = 2 * hidden * dtype_bytes
    params = q_out * hidden + 2 * kv_out * hidden + hidden * q_out + 3 * hidden * inter + 2 * hidden
    if bias:
        sharded += q_out * dtype_bytes
        kv_proj += 2 * kv_out * dtype_bytes
        params += q_out + 2 * kv_out
    layer = LayerBytes(sharded=sharded, replicated=norms, kv_proj=kv_proj)
    return [layer] * layers, [params] * layers, kv_heads, 2 * kv_out, heads


def _deepseek_layers(config: dict, quant: _Quant, dtype_bytes: int
                     ) -> tuple[list[LayerBytes], list[int], list[int], int]:
    """DeepSeek V2/V3 decoder layers (MLA attention; dense MLP in the first
    first_k_dense_replace layers, MoE after): (layers, params per layer, active params per layer,
    kv elems per token)."""
    hidden, layers, heads, inter, kv_lora, rope, nope, v_dim = _need(
        config, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    q_lora = config.get("q_lora_rank")
    qk_head = nope + rope
    attn_sharded = quant.linear(heads * (nope + v_dim), kv_lora) + quant.linear(hidden, heads * v_dim)
    attn_replicated = quant.linear(kv_lora + rope, hidden) + (kv_lora + 2 * hidden) * dtype_bytes
    attn_params = (kv_lora + rope) * hidden + kv_lora * heads * (nope + v_dim) + \
        heads * v_dim * hidden + kv_lora + 2 * hidden
    if q_lora:
        attn_replicated += quant.linear(q_lora, hidden) + q_lora * dtype_bytes
        attn_sharded += quant.linear(heads * qk_head, q_lora)
        attn_params += q_lora * hidden + q_lora + heads * qk_head * q_lora
    else:
        attn_sharded += quant.linear(heads * qk_head, hidden)
        attn_params += heads * qk_head * hidden

    experts = int(config.get("n_routed_experts") or 0)
    moe_inter = int(config.get("moe_intermediate_size") or 0)
    shared = int(config.get("n_shared_experts") or 0)
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    dense_mlp = quant.linear(2 * inter, hidden) + quant.linear(hidden, inter)
    expert_mlp = quant.linear(2 * moe_inter, hidden) + quant.linear(hidden, moe_inter)
    # The router stays in the activation dtype; V3's correction bias is float32.
    router = experts * hidden * dtype_bytes + \
        (experts * 4 if config.get("topk_method") == "noaux_tc" else 0)
    router_params = experts * hidden + (experts if config.get("topk_method") == "noaux_tc" else 0)

    top_k = int(config.get("num_experts_per_tok") or 0)
    out, params, active = [], [], []
    for index in range(layers):
        moe = experts > 0 and index >= first_dense and index % freq == 0
        if moe:
            # Shared experts are a dense MLP to vLLM: split by tensor parallelism only.
            out.append(LayerBytes(sharded=attn_sharded + shared * expert_mlp,
                                  replicated=attn_replicated + router,
                                  experts=experts * expert_mlp))
            params.append(attn_params + (experts + shared) * 3 * hidden * moe_inter + router_params)
            active.append(attn_params + (top_k + shared) * 3 * hidden * moe_inter + router_params)
        else:
            out.append(LayerBytes(sharded=attn_sharded + dense_mlp, replicated=attn_replicated))
            params.append(attn_params + 3 * hidden * inter)
            active.append(params[-1])
    return out, params, active, kv_lora + rope


def footprint_from_config(config: dict, name: str = "model", dtype: str = "auto"
                          ) -> ModelFootprint:
    """The footprint estimated from config.json alone."""
    model_type = str(config.get("model_type") or "unknown")
    dtype_bytes = _dtype_bytes(config, dtype)
    quant = _quantization(config, dtype_bytes)
    hidden, vocab = _need(config, "hidden_size", "vocab_size")
    tied = bool(config.get("tie_word_embeddings"))
    embed = vocab * hidden * dtype_bytes
    head = 0 if tied else vocab * hidden * dtype_bytes
    final_norm = hidden * dtype_bytes
    multiples: tuple[int, ...] = ()
    if model_type in ("deepseek_v2", "deepseek_v3"):
        layers, layer_params, layer_active, kv_elems = _deepseek_layers(config, quant,
                                                                         dtype_bytes)
        kv_heads, heads, mla = None, int(config["num_attention_heads"]), True
        if quant.block:
            multiples = tuple(d for d in (config.get("intermediate_size"),
                                          config.get("moe_intermediate_size")) if d)
    elif config.get("num_local_experts") or config.get("n_routed_experts") or \
            config.get("num_experts"):
        raise ModelConfigError(f"cannot estimate the weights of a {model_type} MoE model from "
                               "config.json; a checkpoint folder with its *.safetensors files "
                               "(or model.safetensors.index.json) can be sized")
    else:
        layers, layer_params, kv_heads, kv_elems, heads = _dense_layers(config, quant, dtype_bytes)
        layer_active = layer_params
        mla = False
        if quant.block:
            multiples = (int(config["intermediate_size"]),)
    edge_params = vocab * hidden * (1 if tied else 2) + hidden
    params = sum(layer_params) + edge_params
    weight_bytes = sum(l.total for l in layers) + embed + head + \
        final_norm
    max_pos = int(config.get("max_position_embeddings") or 0) or 4096
    return ModelFootprint(
        name=name, model_type=model_type, params=params,
        active_params=sum(layer_active) + edge_params, weight_bytes=weight_bytes,
        weights_source="estimated from config.json", quantization=quant.method,
        dtype_bytes=dtype_bytes, layers=tuple(layers), embed_bytes=embed + final_norm,
        head_bytes=head, num_attention_heads=heads, num_kv_heads=kv_heads,
        kv_elems_per_token_layer=kv_elems, max_position_embeddings=max_pos,
        tp_multiples=multiples, tp_block=quant.block[0] if quant.block else 1, mla=mla,
        hidden_size=hidden, intermediate_size=int(config.get("intermediate_size") or 0),
        moe_intermediate_size=int(config.get("moe_intermediate_size") or 0) if mla else 0,
        experts_per_token=int(config.get("num_experts_per_tok") or 0) if mla else 0,
        routed_experts=int(config.get("n_routed_experts") or 0) if mla else 0)


def _mtp_prefix(config: dict) -> str | None:
    if config.get("model_type") in ("deepseek_v3",) and int(config.get("num_nextn_predict_layers") or 0):
        return f"model.layers.{int(config['num_hidden_layers'])}."
    return None


def _safetensors_header_bytes(files: Iterable[Path], skip_prefix: str | None) -> int:
    """Bytes of the tensors in safetensors files, read from their headers only."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for tensor, meta in header.items():
            if tensor == "__metadata__" or (skip_prefix and tensor.startswith(skip_prefix)):
                continue
            start, end = meta["data_offsets"]
            total += end - start
    return total


def _measured_weight_bytes(folder: Path, config: dict, estimate: ModelFootprint
                           ) -> tuple[float, str] | None:
    """The checkpoint's own weight bytes (MTP layer left out), and where they come from."""
    skip = _mtp_prefix(config)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        try:
            return float(_safetensors_header_bytes(files, skip)), "safetensors headers"
        except (OSError, ValueError, KeyError, struct.error):
            pass
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = float(json.loads(index.read_text())["metadata"]["total_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if skip:
            # The index has no per-tensor sizes: take off one estimated layer for the MTP module.
            total -= max(l.sharded + l.replicated + l.experts for l in estimate.layers)
        return total, "safetensors index"
    return None


def _scaled_to(estimate: ModelFootprint, measured: float, source: str) -> ModelFootprint:
    """The estimate's split over layers and ranks, scaled so the layers add up to `measured`."""
    layer_total = sum(l.total for l in estimate.layers)
    edges = estimate.embed_bytes + estimate.head_bytes
    factor = max(measured - edges, 0.0) / layer_total if layer_total else 1.0
    layers = tuple(LayerBytes(l.sharded * factor, l.replicated * factor, l.kv_proj * factor,
                              l.experts * factor) for l in estimate.layers)
    return replace(estimate, layers=layers, weight_bytes=measured, weights_source=source)


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{path} not found: --model must be a local checkpoint folder "
                               "to plan its layout") from None
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path} is not readable JSON: {exc}") from None


def read_checkpoint(folder: str | Path, dtype: str = "auto") -> ModelFootprint:
    """The footprint of a local checkpoint folder: config.json, plus its weight files' sizes
    when it has them."""
    folder = Path(folder)
    config = read_config(folder)
    estimate = footprint_from_config(config, name=folder.name or str(folder), dtype=dtype)
    measured = _measured_weight_bytes(folder, config, estimate)
    if measured is None:
        return estimate
    return _scaled_to(estimate, *measured)


# --------------------------------------------------------------------------- cluster and plan


@dataclass(frozen=True)
class GpuNode:
    gpus: int
    memory_bytes: float | None   # per GPU; None when unknown
    name: str = ""


@dataclass(frozen=True)
class Settings:
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None      # None: the model's max_position_embeddings
    kv_cache_dtype: str | None = None     # None / "auto": the activation dtype
    min_sequences: int = MIN_SEQUENCES
    max_num_batched_tokens: int | None = None  # None: vLLM's default for the GPU (serve_batch)
    offline_batch: bool = False           # batch_limits "offline": the LLM class's default
    reserve_bytes: float | None = None    # None: modelled (runtime_reserve); a number: that
    redundant_experts: int = 0            # EPLB's num_redundant_experts (expert parallel only)


@dataclass(frozen=True)
class RuntimeProfile:
    """What vLLM keeps per GPU besides weights and KV cache, for one family of models."""

    name: str
    fixed_bytes: float        # non-torch memory, the sampler, vLLM's CUDA-graph estimate
    factor: float             # activation widths live at the peak, per batched token
    outside_budget_bytes: float  # allocated beyond gpu_memory_utilization after the profile


# Calibrated on vLLM 0.26 / H200 (bench/results/r1-shape-h200-memory-20261204.md). MLA + MoE: the
# 8-layer R1 shape left 13.19 GiB at 8192 batched tokens and 10.29 GiB at 4096 besides weights
# and KV cache (2.90 GiB per 4096 tokens over a 106,496-element MoE width: factor 3.57; the rest,
# 7.43 GiB, incl. vLLM's 4.23 GiB graph estimate, fixed); graph capture took 4.22 GiB more than
# estimated and MLA's prefill workspace 4 GiB after it, with up to 4.2 GiB more seen between runs
# (12.5 GiB in all at worst), plus 1.5 GiB of margin.
# Dense: the 7B shape left 1.89 GiB at 8192 tokens (0.92 GiB of one activation width, 0.97 GiB
# fixed); graph capture took 0.89 GiB.
RUNTIME_PROFILES = {
    "mla_moe": RuntimeProfile("MLA + MoE (DeepSeek V2/V3)", fixed_bytes=7.43 * GIB, factor=3.57,
                              outside_budget_bytes=14 * GIB),
    "dense": RuntimeProfile("dense", fixed_bytes=0.97 * GIB, factor=1.0,
                            outside_budget_bytes=1.0 * GIB),
}


def runtime_profile(model: ModelFootprint) -> RuntimeProfile:
    return RUNTIME_PROFILES["mla_moe" if model.mla or model.moe else "dense"]


def serve_batch(memory_bytes: float, offline: bool = False) -> int:
    """max_num_batched_tokens vLLM picks where none is given (EngineArgs.get_batch_defaults):
    `vllm serve`'s, or the LLM class's for batch_limits "offline". The A100 (80 GiB, smaller
    defaults) cannot be told apart by memory: it is counted at the larger figure."""
    if memory_bytes >= 160 * GIB:
        return 16384
    if memory_bytes >= 70 * GIB:
        return 16384 if offline else 8192
    return 8192 if offline else 2048


def runtime_reserve(model: ModelFootprint, tp: int, memory_bytes: float,
                    settings: Settings) -> float:
    """Bytes per GPU vLLM's profile counts besides weights and KV cache (module docstring)."""
    if settings.reserve_bytes is not None:
        return settings.reserve_bytes
    profile = runtime_profile(model)
    tokens = settings.max_num_batched_tokens or serve_batch(memory_bytes, settings.offline_batch)
    return profile.fixed_bytes + profile.factor * model.activation_bytes_per_token(tp) * tokens


@dataclass
class Plan:
    tp: int
    pp: int
    memory_per_gpu: float
    usable_per_gpu: float            # memory x utilization - reserve
    reserve_per_gpu: float           # the runtime reserve (runtime_reserve)
    weights_per_gpu: float           # on the fullest GPU
    kv_room_per_gpu: float           # on the GPU with the least room per token
    kv_bytes_per_token: float        # per GPU, on that GPU's stage
    max_model_len: int
    sequences: int                   # sequences of max_model_len the KV cache holds at once
    replicas: int                    # replicas of this layout the cluster holds
    fits: bool
    chosen: str = "auto"             # auto | given
    reason: str = ""
    extra: dict = field(default_factory=dict)
    dp: int = 1                      # data-parallel ranks of one replica (a gang of engines)
    expert_parallel: bool = False    # routed experts split over the dp x tp ranks

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache of one replica holds (vLLM's "GPU KV cache size")."""
        if self.kv_bytes_per_token <= 0:
            return 0
        return max(0, int(self.kv_room_per_gpu / self.kv_bytes_per_token))

    def flags(self) -> str:
        wide = (f" --data-parallel-size {self.dp}" if self.dp > 1 else "") + \
            (" --enable-expert-parallel" if self.expert_parallel else "")
        return f"--tensor-parallel-size {self.tp} --pipeline-parallel-size {self.pp}{wide}"

    def to_dict(self) -> dict[str, Any]:
        return {"tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp,
                "chosen": self.chosen, "fits": self.fits,
                "memory_per_gpu_gib": round(self.memory_per_gpu / GIB, 2),
                "usable_per_gpu_gib": round(self.usable_per_gpu / GIB, 2),
                "reserve_per_gpu_gib": round(self.reserve_per_gpu / GIB, 2),
                "weights_per_gpu_gib": round(self.weights_per_gpu / GIB, 2),
                "kv_room_per_gpu_gib": round(self.kv_room_per_gpu / GIB, 2),
                "kv_bytes_per_token_per_gpu": round(self.kv_bytes_per_token),
                "max_model_len": self.max_model_len, "sequences": self.sequences,
                "kv_cache_tokens": self.kv_tokens,
                "data_parallel_size": self.dp, "enable_expert_parallel": self.expert_parallel,
                "replicas": self.replicas, "reason": self.reason, **self.extra}


def pp_stage_layers(num_layers: int, pp: int) -> list[range]:
    """vLLM's split of layers over pipeline stages (get_pp_indices): num_layers // pp each, the
    remainder one each to the stages just before the last."""
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def evaluate(model: ModelFootprint, tp: int, pp: int, memory_bytes: float,
             settings: Settings, dp: int = 1, expert_parallel: bool = False) -> Plan:
    """The numbers of one layout on GPUs of `memory_bytes` (replicas left at 0). With dp > 1
    every data-parallel rank is an engine of its own holding the whole model but, with
    expert parallelism, only its share of the routed experts; KV room and sequences are per
    rank (each rank caches only its own requests)."""
    expert_ranks = tp * dp if expert_parallel else None
    # EPLB's redundant experts: every MoE layer holds (routed + redundant) experts over the ranks.
    copies = ((model.routed_experts + settings.redundant_experts) / model.routed_experts
              if expert_parallel and model.routed_experts else 1.0)
    max_len = settings.max_model_len or model.max_position_embeddings
    kv_bytes = kv_dtype_bytes(settings.kv_cache_dtype, model.dtype_bytes)
    reserve = runtime_reserve(model, tp, memory_bytes, settings)
    usable = memory_bytes * settings.gpu_memory_utilization - reserve
    kv_layer = model.kv_bytes_per_token_layer(tp, kv_bytes)
    worst_weights, worst = 0.0, None
    for index, stage in enumerate(pp_stage_layers(model.num_layers, pp)):
        weights = sum(model.layers[i].per_gpu(tp, model.num_kv_heads, expert_ranks, copies)
                      for i in stage)
        if index == 0:
            weights += model.embed_bytes / tp
        if index == pp - 1:
            # A tied head is the embedding itself on one stage, a copy on the last of several.
            weights += (model.head_bytes or (model.embed_bytes if pp > 1 else 0)) / tp
        per_token = kv_layer * len(stage)
        room = usable - weights
        sequences = room / (per_token * max_len) if per_token else math.inf
        worst_weights = max(worst_weights, weights)
        if worst is None or sequences < worst[0]:
            worst = (sequences, room, per_token)
    sequences, room, per_token = worst
    whole = max(0, math.floor(sequences + 1e-9)) if sequences != math.inf else 0
    return Plan(tp=tp, pp=pp, memory_per_gpu=memory_bytes, usable_per_gpu=usable,
                reserve_per_gpu=reserve,
                weights_per_gpu=worst_weights, kv_room_per_gpu=room, kv_bytes_per_token=per_token,
                max_model_len=max_len, sequences=whole,
                replicas=0, fits=sequences >= settings.min_sequences, dp=dp,
                expert_parallel=expert_parallel)


def replicas_on(nodes: Sequence[GpuNode], tp: int, pp: int) -> int:
    """Replicas of tp x pp GPUs the nodes hold, each stage on a node of its own."""
    slots = [n.gpus // tp for n in nodes if n.gpus // tp > 0]
    best = 0
    for k in range(1, sum(slots) // pp + 1):
        if sum(min(s, k) for s in slots) >= k * pp:
            best = k
    return best


def candidate_layouts(model: ModelFootprint, gpus_per_node: int, nodes: int
                      ) -> list[tuple[int, int]]:
    """(tp, pp) in the order `auto` tries them: fewest stages, then smallest tp."""
    tps = [tp for tp in range(1, gpus_per_node + 1) if model.valid_tp(tp)]
    return [(tp, pp) for pp in range(1, min(nodes, model.num_layers) + 1) for tp in tps]


def _memory(nodes: Sequence[GpuNode]) -> float:
    known = [n.memory_bytes for n in nodes if n.memory_bytes]
    if not known:
        raise PlanningError("the GPUs' memory is unknown")
    return min(known)


def _gpu_nodes(nodes: Sequence[GpuNode]) -> list[GpuNode]:
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    if not gpu_nodes:
        raise PlanningError("the cluster has no GPU node")
    return gpu_nodes


def _cluster_words(nodes: Sequence[GpuNode], memory: float) -> str:
    counts = sorted({n.gpus for n in nodes})
    per_node = "/".join(str(c) for c in counts)
    return f"{len(nodes)} node(s) x {per_node} GPU(s) of {memory / GIB:.0f} GiB"


def _numbers(plan: Plan, settings: Settings) -> str:
    need = settings.min_sequences * plan.max_model_len * plan.kv_bytes_per_token
    return (f"{gib(plan.weights_per_gpu)} of weights per GPU + {gib(plan.reserve_per_gpu)} "
            f"runtime reserve in {gib(plan.usable_per_gpu + plan.reserve_per_gpu)} usable "
            f"({plan.memory_per_gpu / GIB:.0f} GiB x --gpu-memory-utilization "
            f"{settings.gpu_memory_utilization:g}) leaves {gib(plan.kv_room_per_gpu)} for the KV "
            f"cache; {settings.min_sequences} sequences of --max-model-len {plan.max_model_len} "
            f"need {gib(need)} ({plan.kv_bytes_per_token / 1024:.1f} KiB per token per GPU)")


def _suggestions(model: ModelFootprint, nodes: Sequence[GpuNode], memory: float,
                 settings: Settings) -> list[str]:
    """What would fit when nothing on this cluster does: a shorter context, fp8 KV cache or
    weights, more nodes."""
    gpn = max(n.gpus for n in nodes)
    layouts = candidate_layouts(model, gpn, len(nodes))
    out = []
    plans = [evaluate(model, tp, pp, memory, settings) for tp, pp in layouts]
    with_room = [p for p in plans if p.kv_room_per_gpu > 0]
    if with_room:
        best = max(with_room, key=lambda p: p.kv_room_per_gpu / p.kv_bytes_per_token)
        tokens = int(best.kv_room_per_gpu / best.kv_bytes_per_token / settings.min_sequences)
        tokens = tokens // 1024 * 1024
        if tokens >= 1024:
            # The smallest layout that reaches that context.
            for plan in plans:
                if plan.kv_room_per_gpu / plan.kv_bytes_per_token / settings.min_sequences >= tokens:
                    best = plan
                    break
            out.append(f"--max-model-len {tokens} or less with {best.flags()}")
    if kv_dtype_bytes(settings.kv_cache_dtype, model.dtype_bytes) > 1:
        fp8_kv = replace(settings, kv_cache_dtype="fp8")
        fit = next((p for p in (evaluate(model, tp, pp, memory, fp8_kv) for tp, pp in layouts)
                    if p.fits), None)
        if fit:
            out.append(f"--kv-cache-dtype fp8 with {fit.flags()}")
    if model.quantization is None and model.dtype_bytes > 1:
        half = _fp8_weights(model)
        fit = next((p for p in (evaluate(half, tp, pp, memory, settings) for tp, pp in layouts)
                    if p.fits), None)
        if fit:
            out.append(f"an fp8 checkpoint (or --quantization fp8) with {fit.flags()}")
    for count in range(len(nodes) + 1, _MAX_SUGGESTED_NODES + 1):
        more = candidate_layouts(model, gpn, count)
        fit = next((p for p in (evaluate(model, tp, pp, memory, settings) for tp, pp in more)
                    if p.fits), None)
        if fit:
            out.append(f"{count} nodes of {gpn} x {memory / GIB:.0f} GiB GPUs with {fit.flags()}")
            break
    return out


def _fp8_weights(model: ModelFootprint) -> ModelFootprint:
    layers = tuple(LayerBytes(l.sharded / model.dtype_bytes, l.replicated,
                              l.kv_proj / model.dtype_bytes, l.experts / model.dtype_bytes)
                   for l in model.layers)
    return replace(model, layers=layers, quantization="fp8")


def highest_utilization(model: ModelFootprint, memory_bytes: float) -> float:
    """The largest --gpu-memory-utilization (in hundredths) that leaves what vLLM allocates
    beyond it for this kind of model (RuntimeProfile.outside_budget_bytes)."""
    outside = runtime_profile(model).outside_budget_bytes
    return math.floor((1 - outside / memory_bytes) * 100) / 100


def headroom_warning(model: ModelFootprint, plan: Plan, settings: Settings) -> str:
    """A warning when the memory left beyond --gpu-memory-utilization is short of what vLLM
    allocates there for this kind of model (RuntimeProfile.outside_budget_bytes); "" if not."""
    profile = runtime_profile(model)
    headroom = plan.memory_per_gpu * (1 - settings.gpu_memory_utilization)
    if settings.reserve_bytes is not None or headroom >= profile.outside_budget_bytes:
        return ""
    highest = highest_utilization(model, plan.memory_per_gpu)
    return (f"--gpu-memory-utilization {settings.gpu_memory_utilization:g} leaves "
            f"{gib(headroom)} of each {plan.memory_per_gpu / GIB:.0f} GiB GPU outside vLLM's "
            f"budget, where vLLM allocates up to about {gib(profile.outside_budget_bytes)} for a "
            f"{profile.name} model after its memory profile (CUDA graphs beyond its estimate"
            f"{', the MLA prefill workspace' if model.mla else ''}): its start may fail out of "
            f"memory; --gpu-memory-utilization {highest:.2f} or lower leaves that room")


class PlanDoubt(PlanningError):
    """An explicit layout without the KV room the planner wants, whose weights still fit in the
    memory vLLM may use: vLLM decides (the deploy warns with the numbers)."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def plan_layout(model: ModelFootprint, nodes: Sequence[GpuNode], settings: Settings,
                tp: int | str = "auto", pp: int | str = "auto", dp: int = 1,
                expert_parallel: bool = False) -> Plan:
    """The layout for tp/pp (each an int or "auto"): the first candidate that fits, or the given
    one when it fits; a PlanningError with the numbers and what would fit otherwise. With dp > 1
    (data-parallel ranks, given tp and pp) the given layout per rank."""
    nodes = _gpu_nodes(nodes)
    memory = _memory(nodes)
    gpn = max(n.gpus for n in nodes)
    given_tp, given_pp = tp != "auto", pp != "auto"
    if given_tp and model.tp_problem(int(tp)):
        raise PlanningError(f"--tensor-parallel-size {tp} cannot split {model.name}: "
                            f"{model.tp_problem(int(tp))}")
    if dp > 1 and not (given_tp and given_pp):
        raise PlanningError("--data-parallel-size plans per rank: give --tensor-parallel-size "
                            "and --pipeline-parallel-size as numbers (1 and 1 for wide EP)")
    if dp > 1 and not model.moe:
        raise PlanningError(f"--data-parallel-size {dp}: {model.name} has no MoE layers, and "
                            "vLLM runs data-parallel groups of separate engines for MoE models "
                            "only; for a dense model use --num-replicas (independent replicas)")
    if given_tp and given_pp:
        plan = evaluate(model, int(tp), int(pp), memory, settings, dp=dp,
                        expert_parallel=expert_parallel)
        plan.chosen = "given"
        plan.replicas = (replicas_on(nodes, plan.tp, plan.pp) if dp == 1
                         else sum(n.gpus // (plan.tp * plan.pp) for n in nodes) // dp)
        if plan.fits:
            plan.reason = _reason(model, plan, settings, nodes, memory)
            return plan
        message = _refusal(model, plan, nodes, memory, settings)
        # Weights alone over what vLLM may use: its start certainly fails. Anything else (KV
        # room, the runtime reserve) is the planner's estimate against vLLM's own measurement.
        if plan.weights_per_gpu <= memory * settings.gpu_memory_utilization:
            raise PlanDoubt(message, plan)
        raise PlanningError(message)
    layouts = [(t, p) for t, p in candidate_layouts(model, gpn, len(nodes))
               if (not given_tp or t == int(tp)) and (not given_pp or p == int(pp))]
    if given_tp and not layouts:
        # A tp beyond one node's GPUs: still say what memory it would leave.
        layouts = [(int(tp), p) for p in range(1, len(nodes) + 1)]
    if given_pp and not layouts:
        layouts = [(t, int(pp)) for t in range(1, gpn + 1) if model.valid_tp(t)]
    plans = [evaluate(model, t, p, memory, settings) for t, p in layouts]
    for plan in plans:
        if plan.fits:
            plan.replicas = replicas_on(nodes, plan.tp, plan.pp)
            plan.reason = _reason(model, plan, settings, nodes, memory)
            return plan
    largest = max(plans, key=lambda p: (p.sequences, p.kv_room_per_gpu),
                  default=evaluate(model, 1, 1, memory, settings))
    largest.replicas = replicas_on(nodes, largest.tp, largest.pp)
    raise PlanningError(_refusal(model, largest, nodes, memory, settings, auto=True))


def _reason(model: ModelFootprint, plan: Plan, settings: Settings, nodes: Sequence[GpuNode],
            memory: float) -> str:
    why = "the smallest layout that holds" if plan.chosen == "auto" else "holds"
    return (f"{plan.flags()} ({plan.chosen}): {why} {model.describe()} at "
            f"{gib(plan.weights_per_gpu)} per GPU with KV room for {plan.sequences} sequences of "
            f"{plan.max_model_len} tokens ({gib(plan.kv_room_per_gpu)} per GPU, "
            f"{plan.kv_bytes_per_token / 1024:.1f} KiB per token) on "
            f"{_cluster_words(nodes, memory)} at --gpu-memory-utilization "
            f"{settings.gpu_memory_utilization:g}; the cluster holds {plan.replicas} such "
            f"replica(s)")


def _refusal(model: ModelFootprint, plan: Plan, nodes: Sequence[GpuNode], memory: float,
             settings: Settings, auto: bool = False) -> str:
    if auto:
        head = (f"no layout on {_cluster_words(nodes, memory)} holds {model.describe()} with KV "
                f"room for {settings.min_sequences} sequences; the roomiest, {plan.flags()}: ")
    else:
        head = (f"{plan.flags()} cannot serve {model.describe()} on {memory / GIB:.0f} GiB "
                f"GPUs: ")
    text = head + _numbers(plan, settings) + "."
    if not auto:
        try:
            fit = plan_layout(model, nodes, settings)
            text += (f" A layout that fits: {fit.flags()} ({fit.gpus_per_replica} GPUs per "
                     f"replica, {fit.replicas} replica(s) on this cluster; or "
                     "--tensor-parallel-size auto --pipeline-parallel-size auto).")
            return text
        except PlanningError:
            pass
    options = _suggestions(model, nodes, memory, settings)
    if options:
        text += " Would fit: " + "; or ".join(options) + "."
    return text


# --------------------------------------------------------------------------- wide expert parallelism


@dataclass
class WideEpComparison:
    """The `auto` tensor x pipeline layout (its replicas over the cluster) against one gang of
    data-parallel ranks with expert parallelism over every GPU (each rank on the fewest GPUs
    that hold it: tensor parallel 1, else 2, 4, ...)."""

    gpus: int
    tp_plan: Plan | None          # None: no TP x PP layout holds the model
    ep_plan: Plan                 # one gang over every GPU; fits False when a rank cannot hold it
    multi_node: bool

    @staticmethod
    def cluster_tokens(plan: Plan | None) -> int:
        """KV-cache tokens over the cluster: a TP x PP replica caches each token once (on every
        one of its GPUs), a DP rank caches only its own requests' tokens."""
        if plan is None or not plan.fits:
            return 0
        return plan.kv_tokens * (plan.dp if plan.dp > 1 else max(plan.replicas, 0))

    @property
    def pick(self) -> str:
        """The rule: DP x EP when its ranks fit and its KV cache holds more tokens over the
        cluster than the TP x PP replicas together; TP x PP otherwise; "" when neither fits."""
        tp_tokens, ep_tokens = self.cluster_tokens(self.tp_plan), self.cluster_tokens(self.ep_plan)
        if not tp_tokens and not ep_tokens:
            return ""
        return "dp-ep" if ep_tokens > tp_tokens else "tp-pp"

    def lines(self) -> list[str]:
        out = []
        for label, plan in (("TP x PP", self.tp_plan), ("DP x EP", self.ep_plan)):
            if plan is None:
                out.append(f"  {label}: no layout holds the model")
                continue
            count = (f"{plan.dp} ranks of {plan.tp} GPU" if plan.dp > 1
                     else f"{plan.replicas} replica(s) of {plan.gpus_per_replica} GPU(s)")
            fit = "" if plan.fits else ", does not fit"
            unit = "per rank" if plan.dp > 1 else "per replica"
            out.append(f"  {label}: {plan.flags()} ({count}){fit}: weights "
                       f"{gib(plan.weights_per_gpu)} per GPU, KV room {gib(plan.kv_room_per_gpu)} "
                       f"per GPU, {max(plan.kv_tokens, 0):,} KV tokens {unit}, "
                       f"{self.cluster_tokens(plan):,} on the cluster")
        pick = {"dp-ep": "DP x EP: its ranks cache more tokens together",
                "tp-pp": "TP x PP: DP x EP does not fit, or holds no more tokens",
                "": "neither fits"}[self.pick]
        out.append(f"  pick: {pick} (rule: DP x EP when every rank fits and the cluster's KV "
                   "cache holds more tokens that way; an MLA layer's cache is not split by "
                   "tensor parallelism, so a TP x PP replica keeps a copy on each GPU)")
        if self.multi_node:
            out.append("  DP x EP over several nodes exchanges tokens between all ranks at every "
                       "MoE layer (all-to-all): it needs RDMA (InfiniBand or RoCE) between every "
                       "pair of NICs; over TCP it is far slower (not measured here)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "pick": self.pick,
                "tp_pp": self.tp_plan.to_dict() if self.tp_plan else None,
                "dp_ep": self.ep_plan.to_dict(),
                "tp_pp_cluster_kv_tokens": self.cluster_tokens(self.tp_plan),
                "dp_ep_cluster_kv_tokens": self.cluster_tokens(self.ep_plan)}


def compare_wide_ep(model: ModelFootprint, nodes: Sequence[GpuNode], settings: Settings
                    ) -> WideEpComparison | None:
    """TP x PP against DP x EP over the same GPUs, for a MoE model (None otherwise)."""
    if not model.moe:
        return None
    nodes = _gpu_nodes(nodes)
    memory = _memory(nodes)
    gpus = sum(n.gpus for n in nodes)
    try:
        tp_plan: Plan | None = plan_layout(model, nodes, settings)
    except PlanningError:
        tp_plan = None
    # One gang over every GPU; each rank on the fewest GPUs of one node that hold it (tensor
    # parallel inside a rank splits its attention and dense layers; MLA's KV cache stays whole).
    per_node = min(n.gpus for n in nodes)
    ranks = [tp for tp in range(1, per_node + 1)
             if per_node % tp == 0 and gpus % tp == 0 and model.valid_tp(tp)]
    plans = [evaluate(model, tp, 1, memory, settings, dp=gpus // tp, expert_parallel=True)
             for tp in ranks]
    ep_plan = next((plan for plan in plans if plan.fits), plans[0])
    ep_plan.replicas = 1 if ep_plan.fits else 0
    return WideEpComparison(gpus, tp_plan, ep_plan, multi_node=len(nodes) > 1)
