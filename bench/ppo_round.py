"""One PPO-ptx round on the default model (SmolLM2-135M-Instruct): where the time goes.

    PYTHONPATH=. python bench/ppo_round.py [--rollouts 8] [--mini-batch 4] [--max-new-tokens 48] [--rounds 1]
        [--ptx-coef 1] [--threads 2]

Full fine-tuning (``PPOConfig.lr``) of four copies of the prepared default model
(``instructloop.model.prepare_default_model``): the policy, the frozen reference, the reward model
(``build_reward_model``: a fresh scalar head on the 135M backbone, bias-normalised on reference samples —
scores are arbitrary, which does not change the cost) and the value model (a copy of the RM). The ptx data
is the learner's default corpus (``learner.ptx.default_corpus``: WordNet's glosses, else ``learner/data``).

Reports, per round, the time split rollout / scoring (reference logprobs, values, RM) / update (clipped
policy + value losses) / ptx, response tokens per second, and as the in-run baseline a plain
``model.generate`` of the same prompts with the same sampling settings (the floor of any RLHF round).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from instructloop.model import prepare_default_model  # noqa: E402
from learner.config import PPOConfig  # noqa: E402
from learner.ppo import PPOPtxTrainer  # noqa: E402
from learner.ptx import PtxSource  # noqa: E402
from learner.reward import build_reward_model, normalize_reward  # noqa: E402
from learner.rollout import generate_rollouts  # noqa: E402

PROMPTS = [
    "Give me three tips for sleeping better.",
    "What is the capital of Italy?",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "How do I boil an egg?",
    "Suggest a name for a grey cat.",
    "Why is the sky blue?",
    "Summarise the plot of Cinderella in two sentences.",
    "What should I pack for a weekend hike?",
    "Translate 'good morning' into French.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
    "Write a polite email declining a meeting.",
    "What is photosynthesis?",
    "Give me a fun fact about octopuses.",
    "How do I make a cup of tea?",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ptx-coef", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_started = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(policy)
    reward_model = build_reward_model(str(model_dir))
    config = PPOConfig(
        rollout_batch_size=args.rollouts,
        mini_batch_size=args.mini_batch,
        ppo_epochs=args.epochs,
        max_new_tokens=args.max_new_tokens,
        ptx_coef=args.ptx_coef,
        ptx_batch_size=2,
        ptx_seq_len=128,
        max_prompt_tokens=128,
        seed=0,
    )

    # baseline: a plain generate of the same prompts, same sampling (what any RLHF round must at least do)
    torch.manual_seed(0)
    started = time.perf_counter()
    baseline = generate_rollouts(
        policy,
        tokenizer,
        PROMPTS[: args.rollouts],
        config.max_prompt_tokens,
        config.max_new_tokens,
        do_sample=True,
        temperature=config.temperature,
    )
    generate_s = time.perf_counter() - started
    normalize_reward(
        reward_model,
        tokenizer,
        PROMPTS[: args.rollouts],
        tokenizer.batch_decode(baseline.responses, skip_special_tokens=True),
    )
    value_model = copy.deepcopy(reward_model)
    ptx = PtxSource(tokenizer, None, seq_len=config.ptx_seq_len, batch_size=config.ptx_batch_size, seed=0)
    trainer = PPOPtxTrainer(policy, reference, value_model, reward_model, tokenizer, config, ptx)
    load_s = time.perf_counter() - load_started - generate_s

    rounds = []
    for _ in range(args.rounds):
        stats = trainer.round(PROMPTS)
        phases = {k: stats[k] for k in ("rollout_s", "scoring_s", "update_s", "ptx_s")}
        rounds.append(
            {
                **{k: round(v, 2) for k, v in phases.items()},
                "round_s": round(stats["round_s"], 2),
                "share": {k: round(v / stats["round_s"], 3) for k, v in phases.items()},
                "response_tokens": int(stats["response_tokens"]),
                "tokens_per_s": round(stats["tokens_per_s"], 2),
                "rollout_tokens_per_s": round(stats["rollout_tokens_per_s"], 2),
                "round_over_plain_generate": round(stats["round_s"] / generate_s, 2),
                "kl": round(stats["kl"], 4),
                "ptx_nll": round(stats["ptx_nll"], 3),
                "clip_fraction": round(stats["clip_fraction"], 3),
                "entropy": round(stats["entropy"], 3),
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "threads": args.threads,
        "config": {
            "rollouts": args.rollouts,
            "mini_batch": args.mini_batch,
            "epochs": args.epochs,
            "max_new_tokens": args.max_new_tokens,
            "ptx_batch": "2x128 tokens",
            "ptx_coef": args.ptx_coef,
        },
        "setup_s": round(load_s, 2),
        "plain_generate_s": round(generate_s, 2),
        "plain_generate_tokens": int(baseline.response_mask.sum()),
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
