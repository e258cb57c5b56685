"""Reward-model update time: our K-wise trainer vs TRL's pairwise ``RewardTrainer`` on the same rankings.

    PYTHONPATH=. python bench/rm_kwise_vs_trl.py [--rankings 24] [--heldout 24] [--ks 4 9] [--threads 1]

For each K, the same synthetic rankings (K responses of random words carrying 0..K-1 times the word
" wonderful", ranked by that count: a full order, as labelers rank in the paper) train two identical fresh
reward models for one epoch:

- ours (``learner.reward.train_reward_model``): each ranking is one batch element, one forward per
  response: N·K sequences per epoch;
- TRL 1.16 ``RewardTrainer``: every (chosen, rejected) pair the rankings imply is one example: N·C(K,2)
  pairs, 2 sequences each, N·K·(K-1) sequences per epoch.

Both forward the same number of sequences per step (2 rankings = 2K sequences vs K pairs = 2K sequences),
the same lr and the same model. The ideal speed-up is K-1; the target is ≥ 0.8·(K-1).
Held-out pair accuracy is measured with the same scoring function for both.

Model: a small random-init Llama (hidden 256, 4 layers, 8 heads, the real 49k-token SmolLM2 tokenizer,
~16M parameters), so the whole benchmark runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from instructloop.events import ComparisonEvent  # noqa: E402
from instructloop.model import load_default_tokenizer  # noqa: E402
from learner.config import RewardConfig  # noqa: E402
from learner.reward import build_reward_model, pairwise_accuracy, train_reward_model  # noqa: E402

WORDS = [
    "river",
    "stone",
    "cloud",
    "paper",
    "green",
    "quiet",
    "north",
    "table",
    "light",
    "music",
    "apple",
    "winter",
]
TARGET = " wonderful"
PROMPTS = ["Describe your day.", "Say something.", "Write a short line.", "Tell me a thing.", "Any news?"]


def synthetic_ranking(rng: random.Random, k: int) -> ComparisonEvent:
    counts = rng.sample(range(k), k)  # a full order: 0..K-1 " wonderful"s, one response each (no tie)
    responses = []
    for count in counts:
        words = [" " + rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
        for _ in range(count):
            words.insert(rng.randint(0, len(words)), TARGET)
        responses.append("".join(words).strip())
    ranking = [[i for i in range(k) if counts[i] == c] for c in sorted(set(counts), reverse=True)]
    return ComparisonEvent(
        prompt=rng.choice(PROMPTS), responses=responses, ranking=ranking, labeler_id="bench"
    )


def build_small_model(path: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_trl(model_dir: Path, tokenizer, train: list[ComparisonEvent], k: int, lr: float, workdir: Path):
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    rows = []
    for comparison in train:
        query = comparison.prompt  # the model input itself (the prompt contract)
        for w, lo in comparison.pairs():
            rows.append(
                {"chosen": query + comparison.responses[w], "rejected": query + comparison.responses[lo]}
            )
    model = build_reward_model(str(model_dir))
    args = TRLRewardConfig(
        output_dir=str(workdir / f"trl-k{k}"),
        per_device_train_batch_size=k,
        num_train_epochs=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        use_cpu=True,
        max_length=128,
        seed=0,
        dataloader_drop_last=False,
    )
    init_started = time.perf_counter()
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    init_s = time.perf_counter() - init_started
    started = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - started
    model.eval()
    return model, {
        "pairs": len(rows),
        "sequences": 2 * len(rows),
        "steps": result.global_step,
        "train_s": train_s,
        "init_s": init_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rankings", type=int, default=24, help="training rankings per K")
    parser.add_argument("--heldout", type=int, default=24, help="held-out rankings per K")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 9])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_default_tokenizer()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = build_small_model(workdir / "small", tokenizer)
        # warm-up (untimed): the first forward/backward of a process pays one-off allocation costs, which
        # would otherwise be charged to whichever trainer runs first
        warm = build_reward_model(str(model_dir))
        train_reward_model(
            warm,
            tokenizer,
            [synthetic_ranking(random.Random(-1), 4) for _ in range(4)],
            RewardConfig(lr=args.lr, rankings_per_batch=2, max_length=128),
        )
        del warm
        for k in args.ks:
            rng = random.Random(k)
            train = [synthetic_ranking(rng, k) for _ in range(args.rankings)]
            heldout = [synthetic_ranking(rng, k) for _ in range(args.heldout)]

            ours_model = build_reward_model(str(model_dir))
            config = RewardConfig(lr=args.lr, epochs=1, rankings_per_batch=2, max_length=128, seed=0)
            started = time.perf_counter()
            ours = train_reward_model(ours_model, tokenizer, train, config)
            ours_s = time.perf_counter() - started
            ours_accuracy = pairwise_accuracy(ours_model, tokenizer, heldout, 32, 128)

            trl_model, trl = run_trl(model_dir, tokenizer, train, k, args.lr, workdir)
            trl_accuracy = pairwise_accuracy(trl_model, tokenizer, heldout, 32, 128)

            speedup = trl["train_s"] / ours_s
            results[f"K={k}"] = {
                "pairs": trl["pairs"],
                "ours_sequences": int(ours["sequences"]),
                "trl_sequences": trl["sequences"],
                "ours_steps": int(ours["steps"]),
                "trl_steps": trl["steps"],
                "ours_s": round(ours_s, 2),
                "trl_train_s": round(trl["train_s"], 2),
                "trl_init_s": round(trl["init_s"], 2),
                "speedup": round(speedup, 2),
                "ideal": k - 1,
                "speedup_over_ideal": round(speedup / (k - 1), 2),
                "ours_heldout_accuracy": round(ours_accuracy, 3),
                "trl_heldout_accuracy": round(trl_accuracy, 3),
            }
            print(json.dumps({f"K={k}": results[f"K={k}"]}), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
