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


def write_model(target: Path) -> Path:
    """Write config.json, generation_config.json and the tokenizer files into `target`."""
    from common.demo_model import _build_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size=512)
    tokenizer.model_max_length = QWEN2_7B_SHAPE["max_position_embeddings"]
    tokenizer.save_pretrained(target)
    config = dict(QWEN2_7B_SHAPE, bos_token_id=tokenizer.eos_token_id,
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
