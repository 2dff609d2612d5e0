"""Generates the embedded demo model: a tiny random-weight Qwen2 with its own tokenizer, no download."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Bumped whenever the generated files change, so stale caches are rebuilt.
DEMO_MODEL_VERSION = "5"
DEFAULT_DEMO_DIR = Path(__file__).resolve().parent.parent / ".cache" / "demo-model"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
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
    target = Path(path or os.environ.get("DEMO_MODEL_DIR") or DEFAULT_DEMO_DIR)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--path", default=os.environ.get("DEMO_MODEL_DIR", str(DEFAULT_DEMO_DIR)),
                        help="where to write the model [env: DEMO_MODEL_DIR]")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    print(ensure_demo_model(args.path, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
