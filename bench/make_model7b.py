"""Writes bench/model7b: a Qwen2-7B-shaped config and a small tokenizer, for vLLM's load_format=dummy."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "model7b"

# The published shape of Qwen2-7B (the size class of the DeepSeek-R1-Distill-Qwen-7B model):
# with load_format=dummy vLLM fills these weights randomly, so the GPU does the real compute of a
# 7B model while nothing is downloaded. Only the tokenizer is small.
QWEN2_7B_SHAPE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
}


def _cover_vocab(path: Path, vocab_size: int) -> None:
    """Extend the small trained BPE until it has a token for every id the model can emit.

    With load_format=dummy the model samples ids from its whole embedding (152,064 rows); ids the
    tokenizer lacks decode to nothing, and servers then skip or send empty stream chunks, which
    makes TTFT/ITL figures incomparable between servers. Each added token is two or three
    printable characters, reachable through added merges, so every id decodes to visible text."""
    data = json.loads(path.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    as_pairs = not merges or isinstance(merges[0], list)
    taken = set(vocab) | {t["content"] for t in data.get("added_tokens", [])}
    next_id = max(max(vocab.values()), *(t["id"] for t in data.get("added_tokens", []))) + 1
    chars = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
             if c in vocab]

    def add(left: str, right: str) -> bool:
        nonlocal next_id
        token = left + right
        if token in taken or next_id >= vocab_size:
            return False
        vocab[token] = next_id
        merges.append([left, right] if as_pairs else f"{left} {right}")
        taken.add(token)
        next_id += 1
        return True

    pairs = []
    for a in chars:
        for b in chars:
            if a + b in taken or add(a, b):
                pairs.append(a + b)
    for pair in pairs:
        for c in chars:
            add(pair, c)
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def write_model(target: Path, shape: dict | None = None) -> Path:
    """Write config.json (`shape`, default the 7B one), generation_config.json and the tokenizer
    files (covering the shape's vocabulary) into `target`."""
    from common.demo_model import _build_tokenizer

    shape = shape or QWEN2_7B_SHAPE
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size=512)
    tokenizer.model_max_length = shape["max_position_embeddings"]
    tokenizer.save_pretrained(target)
    _cover_vocab(target / "tokenizer.json", shape["vocab_size"])
    config = dict(shape, bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (target / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--path", default=str(DEFAULT_DIR), help="folder to write")
    args = parser.parse_args(argv)
    print(write_model(Path(args.path)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
