"""Writes bench/model-r1: DeepSeek-R1's own config.json at reduced depth and a tokenizer covering its 129,280 ids, for vLLM's load_format=dummy."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "model-r1"
R1_CONFIG = HERE.parent / "tests" / "fixtures" / "deepseek-r1" / "config.json"
# 8 layers keep R1's structure (3 dense layers, then MoE layers of 256 routed experts, fp8 128x128
# blocks, MLA) at about 59 GiB of weights: one GPU runs every kernel the full model runs.
DEFAULT_LAYERS = 8


def r1_shape(layers: int) -> dict:
    """R1's config with `layers` hidden layers and without remote code (vLLM has the model)."""
    config = json.loads(R1_CONFIG.read_text())
    config.pop("auto_map", None)
    config["num_hidden_layers"] = layers
    return config


def write_model(target: Path, layers: int = DEFAULT_LAYERS) -> Path:
    """config.json, generation_config.json and the tokenizer files (the demo's chat template,
    which opens <think> as R1's does) into `target`."""
    sys.path.insert(0, str(HERE))
    import make_model7b

    return make_model7b.write_model(target, r1_shape(layers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--path", default=str(DEFAULT_DIR), help="folder to write")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                        help="hidden layers (R1 has 61; its first 3 are dense)")
    args = parser.parse_args(argv)
    print(write_model(Path(args.path), args.layers))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
