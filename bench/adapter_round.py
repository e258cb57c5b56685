"""LoRA adapters vs full fine-tuning on the default model: one PPO-ptx round, checkpoint + publish, peak RSS.

    PYTHONPATH=. nice -n 5 .venv/bin/python bench/adapter_round.py [--rollouts 32] [--mini-batch 4]
        [--epochs 1] [--max-new-tokens 64] [--threads 1] [--device cuda --dtype bfloat16]

The defaults are the learner's own ``PPOConfig`` (what a round of the service does); ``--rollouts 4
--mini-batch 2 --epochs 1 --max-new-tokens 24`` is the small round of the first measurements.

Runs the same measurement twice, each in its own process (so peak RSS is the mode's own), with the same
settings and seed, and prints the ratios full / lora:

- ``lora``: what the learner does by default (``INSTRUCTLOOP_LEARNER_TRAINING=lora``): one frozen
  SmolLM2-135M base, the policy, value model and RM as LoRA adapters on it (``learner.adapters``), the
  reference = the base with adapters off; learning rate ``AdapterConfig.ppo_lr``;
- ``full``: four 135M models (policy, reference, RM, value = copy of the RM), every weight trained.

Each process: build the models, bias-normalise the RM on reference samples, one PPO-ptx round (ptx on the
shipped corpus), then a learner checkpoint of policy + value + optimizer state (``CheckpointStore.save``,
fsync'ed) and a registry publish of the policy (written, then ``set_current``, which re-hashes it). The
base's sha256 (what an adapter version records) is computed once per learner process; it is reported
apart (``base_sha256_s``) and not counted in publish.

``--device cuda --dtype bfloat16`` is the learner's mixed precision on a GPU (``INSTRUCTLOOP_LEARNER_DTYPE``):
frozen weights in bfloat16, trained weights float32, the round under ``torch.autocast``; peak GPU memory
(``torch.cuda.max_memory_allocated``) is reported beside peak RSS.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = [
    "Give me three tips for sleeping better.",
    "What is the capital of Italy?",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "How do I boil an egg?",
    "Suggest a name for a grey cat.",
    "Why is the sky blue?",
    "What should I pack for a weekend hike?",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructloop.model import prepare_default_model
    from instructloop.registry import Registry
    from learner.config import AdapterConfig, PPOConfig
    from learner.models import mixed_precision
    from learner.ppo import PPOPtxTrainer
    from learner.ptx import PtxSource
    from learner.reward import build_reward_model, normalize_reward
    from learner.rollout import generate_rollouts
    from learner.state import CheckpointStore, LearnerState

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = args.device, getattr(torch, args.dtype)
    autocast = mixed_precision(device, dtype)  # what the learner's loop runs under
    model_dir = args.model or str(prepare_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rss_start = _rss_mb()
    started = time.perf_counter()
    adapters = AdapterConfig(**json.loads(args.adapters))
    if mode == "lora":
        from learner.adapters import AdapterBase, PolicyAdapter, ReferenceModel, ScoreAdapter

        base = AdapterBase(model_dir, adapters, tokenizer, device, dtype)
        reference = ReferenceModel(base)
        reward_model = ScoreAdapter.fresh(base, "reward", tokenizer.pad_token_id, seed=0)
    else:  # trained weights float32, the frozen reference in dtype (as LearnerModels does)
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        reference = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            .to(device)
            .eval()
            .requires_grad_(False)
        )
        reward_model = build_reward_model(model_dir).to(device)
    config = PPOConfig(
        rollout_batch_size=args.rollouts,
        mini_batch_size=args.mini_batch,
        ppo_epochs=args.epochs,
        max_new_tokens=args.max_new_tokens,
        ptx_batch_size=2,
        ptx_seq_len=128,
        max_prompt_tokens=128,
        lr=adapters.ppo_lr if mode == "lora" else 3e-6,
        seed=0,
    )
    torch.manual_seed(0)
    with autocast:
        samples = generate_rollouts(
            reference,
            tokenizer,
            PROMPTS[: args.rollouts],
            128,
            args.max_new_tokens,
            do_sample=False,
            temperature=1.0,
        )
        normalize_reward(
            reward_model,
            tokenizer,
            PROMPTS[: args.rollouts],
            tokenizer.batch_decode(samples.responses, skip_special_tokens=True),
        )
    if mode == "lora":
        value_model = reward_model.copy_as("value")
        base.add("policy")
        policy = PolicyAdapter(base, "policy")
    else:
        value_model = copy.deepcopy(reward_model)
    ptx = PtxSource(tokenizer, None, seq_len=config.ptx_seq_len, batch_size=config.ptx_batch_size, seed=0)
    trainer = PPOPtxTrainer(policy, reference, value_model, reward_model, tokenizer, config, ptx)
    setup_s = time.perf_counter() - started

    with autocast:
        stats = trainer.round(PROMPTS)

    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-", dir=args.workdir) as tmp:
        store = CheckpointStore(Path(tmp) / "state")
        registry = Registry(Path(tmp) / "registry")
        base_sha256_s = 0.0
        if mode == "lora":
            t = time.perf_counter()
            _ = base.sha256
            base_sha256_s = time.perf_counter() - t
        t = time.perf_counter()
        part_tokenizer = (
            None if mode == "lora" else tokenizer
        )  # as the learner does (LearnerModels.part_tokenizer)
        store.save(
            LearnerState(),
            models={"policy": (policy, part_tokenizer), "value": (value_model, part_tokenizer)},
            optimizers={"ppo": trainer.state_dict()},
        )
        checkpoint_s = time.perf_counter() - t
        t = time.perf_counter()
        if mode == "lora":
            manifest = policy.write_version(registry, "v0001", served_base=True, tokenizer=tokenizer)
        else:
            manifest = registry.write_pretrained("v0001", policy, tokenizer)
        registry.set_current("v0001")
        publish_s = time.perf_counter() - t
        checkpoint_mb = sum(p.stat().st_size for p in (Path(tmp) / "state").rglob("*") if p.is_file()) / 2**20
        version_mb = sum(p.stat().st_size for p in registry.version_dir("v0001").iterdir()) / 2**20
    trained = sum(
        p.numel()
        for group in trainer.policy_optimizer.param_groups + trainer.value_optimizer.param_groups
        for p in group["params"]
    )
    return {
        "mode": mode,
        "setup_s": round(setup_s, 2),
        **{k: round(stats[k], 2) for k in ("rollout_s", "scoring_s", "update_s", "ptx_s", "round_s")},
        "response_tokens": int(stats["response_tokens"]),
        "checkpoint_s": round(checkpoint_s, 2),
        "publish_s": round(publish_s, 2),
        "checkpoint_publish_s": round(checkpoint_s + publish_s, 2),
        "base_sha256_s": round(base_sha256_s, 2),
        "checkpoint_mb": round(checkpoint_mb, 1),
        "version_mb": round(version_mb, 1),
        "version_kind": manifest.kind.value,
        "trained_params_policy_value": trained,
        "rss_after_imports_mb": round(rss_start),
        "peak_rss_mb": round(_rss_mb()),
        "device": device,
        "dtype": args.dtype,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)
        if torch.cuda.is_available()
        else None,
        "load_average": round(os.getloadavg()[0], 1),
    }


def _learner_defaults():
    from learner.config import PPOConfig

    return PPOConfig()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = _learner_defaults()
    parser.add_argument("--rollouts", type=int, default=defaults.rollout_batch_size)
    parser.add_argument("--mini-batch", type=int, default=defaults.mini_batch_size)
    parser.add_argument("--epochs", type=int, default=defaults.ppo_epochs)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where checkpoints and versions are written (tmp)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="frozen weights and autocast (trained weights stay float32)",
    )
    parser.add_argument("--model", default=None, help="a model folder (default: the prepared default model)")
    parser.add_argument(
        "--adapters", default="{}", help="AdapterConfig overrides (JSON), e.g. '{\"top_layers\": 10}'"
    )
    parser.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="lora,full", help="modes to run, in this order")
    args = parser.parse_args(argv)
    if args.mode:  # child process
        print(json.dumps(run_mode(args.mode, args)), flush=True)
        return {}
    results = {}
    for mode in args.modes.split(","):
        command = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--rollouts",
            str(args.rollouts),
            "--mini-batch",
            str(args.mini_batch),
            "--epochs",
            str(args.epochs),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--adapters",
            args.adapters,
        ]
        if args.model:
            command += ["--model", args.model]
        if args.workdir:
            command += ["--workdir", args.workdir]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    if {"lora", "full"} <= set(results):
        lora, full = results["lora"], results["full"]
        results["full_over_lora"] = {
            "round": round(full["round_s"] / lora["round_s"], 2),
            "update_plus_ptx": round(
                (full["update_s"] + full["ptx_s"]) / (lora["update_s"] + lora["ptx_s"]), 2
            ),
            "checkpoint_plus_publish": round(full["checkpoint_publish_s"] / lora["checkpoint_publish_s"], 1),
            "peak_rss_lora_share": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 2),
            **(
                {"peak_gpu_lora_share": round(lora["peak_gpu_mb"] / full["peak_gpu_mb"], 2)}
                if lora["peak_gpu_mb"]
                else {}
            ),
            "peak_rss_above_imports_lora_share": round(
                (lora["peak_rss_mb"] - lora["rss_after_imports_mb"])
                / (full["peak_rss_mb"] - full["rss_after_imports_mb"]),
                2,
            ),
        }
        print(json.dumps(results["full_over_lora"]), flush=True)
    return results


if __name__ == "__main__":
    main()
