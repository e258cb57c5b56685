"""A model folder with a model's config and tokenizer but seeded random weights.

    python bench/random_weights_model.py SRC_MODEL_FOLDER DST [--seed 0]

For timing where the real weights cannot travel (the GPU machine is reached with at most 64 MiB; the
default model's GGUF is 94 MB): same architecture, shapes and compute. Random weights rarely emit EOS, so
generation runs to its token limit; never use such a folder to judge what a model learns.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", type=Path, help="a model folder (its config.json and tokenizer files are copied)"
    )
    parser.add_argument("target", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source), dtype=torch.float32)
    model.save_pretrained(args.target)
    for item in args.source.iterdir():
        if (
            item.is_file()
            and item.name not in {"config.json", "model.safetensors"}
            and item.suffix != ".gguf"
            and not item.name.startswith(".")
        ):
            shutil.copy(item, args.target / item.name)
    print(
        f"{args.target}: {sum(p.numel() for p in model.parameters()):,} parameters, random (seed {args.seed})"
    )


if __name__ == "__main__":
    main()
