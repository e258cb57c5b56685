"""How fast the learner's own RM + PPO-ptx move a content preference on the default model, without HTTP.

    PYTHONPATH=. nice -n 5 .venv/bin/python bench/preference_offline.py [--preference with:you]
        [--rankings 32] [--rounds 6] [--ppo '{"lr": 3e-6}'] [--reward '{"epochs": 3}'] [--threads 1]

A tuning tool for ``bench/learning_curve.py`` (the proof, over HTTP), which costs 30+ minutes per setting:
this runs the same algorithms in one process. The reference policy answers the labeler's training prompts
(chat-rendered, K=4, 48 tokens, T 0.7, as the scripted labeler asks serve), the preference ranks them; the
learner's RM trains on the rankings (``train_reward_model``, its defaults plus ``--reward``), is normalised on
the reference's answers (``normalize_reward``: mean 0, std 1) and is checked on
held-out prompts (does its score separate answers that satisfy the preference? does it follow length?);
then ``--rounds`` PPO-ptx rounds (``PPOPtxTrainer``, lora mode, the learner's defaults plus ``--ppo``) each
followed by the policy's share of held-out answers that satisfy the preference and the win-rate it implies
against the base. Prints one JSON line per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def emit(**row) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preference", default="with:you")
    parser.add_argument("--rankings", type=int, default=32, help="Rankings (K=4) the RM trains on.")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ppo", default="{}", help="PPOConfig overrides (JSON).")
    parser.add_argument("--reward", default="{}", help="RewardConfig overrides (JSON).")
    parser.add_argument("--adapters", default="{}", help="AdapterConfig overrides (JSON).")
    parser.add_argument("--eval-n", type=int, default=4, help="Samples per held-out prompt.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--zero-value-head",
        action="store_true",
        help="The value model keeps the RM's adapter but starts from a zero head (values 0 until it learns).",
    )
    parser.add_argument(
        "--dump", type=Path, default=None, help="JSONL file: the held-out answers after each step."
    )
    parser.add_argument(
        "--rm-cache",
        type=Path,
        default=None,
        help="Folder keeping the trained RM: written the first time, loaded after (same traffic).",
    )
    parser.add_argument(
        "--traffic",
        type=Path,
        default=None,
        help="JSON file keeping the generated traffic: written the first time, read after.",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from instructloop.events import ComparisonEvent
    from instructloop.prompt import render_chat
    from labeler.preferences import (
        DEFAULT_HELDOUT_PROMPTS,
        DEFAULT_PROMPTS,
        load_preference,
        rank_texts,
        read_prompts,
    )
    from learner.config import PPOConfig, RewardConfig
    from learner.models import LearnerModels
    from learner.ppo import PPOPtxTrainer
    from learner.ptx import PtxSource
    from learner.reward import normalize_reward, reward_scores, train_reward_model
    from learner.rollout import generate_rollouts
    from learner.settings import Settings
    from learner.state import CheckpointStore

    preference = load_preference(args.preference)
    state_dir = Path(tempfile.mkdtemp(prefix="pref-offline-"))
    settings = Settings(
        redis_url="redis://unused",
        state_dir=state_dir,
        registry_dir=state_dir / "registry",
        adapters=json.loads(args.adapters),
    )
    models = LearnerModels(settings, CheckpointStore(state_dir), lambda: None)
    tokenizer = models.tokenizer
    chat = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in read_prompts(DEFAULT_PROMPTS)]
    heldout = [
        render_chat(tokenizer, [{"role": "user", "content": p}])
        for p in read_prompts(DEFAULT_HELDOUT_PROMPTS)
    ]

    def answers(policy, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        torch.manual_seed(seed)
        batch = [p for p in prompts for _ in range(n)]
        out: list[str] = []
        for start in range(0, len(batch), 16):
            rollouts = generate_rollouts(policy, tokenizer, batch[start : start + 16], 256, 48, True, 0.7)
            out += [
                tokenizer.decode(ids[mask], skip_special_tokens=True)
                for ids, mask in zip(rollouts.responses, rollouts.response_mask, strict=True)
            ]
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def share(groups: list[list[str]], step: str = "") -> tuple[float, float]:
        texts = [t for g in groups for t in g]
        if args.dump is not None:
            with args.dump.open("a") as dump:
                dump.write(json.dumps({"step": step, "answers": texts}) + "\n")
        return sum(preference(t) > 0 for t in texts) / len(texts), sum(len(t) for t in texts) / len(texts)

    started = time.perf_counter()
    reference = models.reference
    base_share, base_len = share(answers(reference, heldout, args.eval_n, seed=1), "base")
    emit(step="base", share=base_share, length=base_len, s=time.perf_counter() - started)

    # traffic: K=4 answers per training prompt per labeling round, ranked; all-tied rankings are not posted
    if args.traffic is not None and args.traffic.exists():
        traffic = json.loads(args.traffic.read_text())
    else:
        traffic = {"train": [], "heldout": answers(reference, heldout, 8, seed=7)}
        round_index = 0
        while len(traffic["train"]) < args.rankings:
            round_index += 1
            for prompt, texts in zip(chat, answers(reference, chat, 4, seed=1000 + round_index), strict=True):
                if len(rank_texts(texts, preference)) > 1:
                    traffic["train"].append([prompt, texts])
        if args.traffic is not None:
            args.traffic.write_text(json.dumps(traffic))
    comparisons = [
        ComparisonEvent(prompt=p, responses=t, ranking=rank_texts(t, preference), labeler_id="x")
        for p, t in traffic["train"][: args.rankings]
    ]
    held_texts = traffic["heldout"]
    held = [
        ComparisonEvent(prompt=p, responses=t, ranking=rank_texts(t, preference), labeler_id="x")
        for p, t in zip(heldout, held_texts, strict=True)
        if len(rank_texts(t, preference)) > 1
    ]
    emit(
        step="traffic", rankings=len(comparisons), heldout_rankings=len(held), s=time.perf_counter() - started
    )

    t0 = time.perf_counter()
    config = RewardConfig(**{**models.mode_defaults("reward"), **json.loads(args.reward)})
    if args.rm_cache is not None and args.rm_cache.exists():
        from learner.adapters import ScoreAdapter

        rm = models._reward = ScoreAdapter.load(models.adapter_base, "reward", args.rm_cache)
        stats = {"train_accuracy": float("nan"), "heldout_accuracy": float("nan")}
    else:
        rm = models.new_reward_model()
        stats = train_reward_model(rm, tokenizer, comparisons, config, held or None)
        if args.rm_cache is not None:
            rm.save_pretrained(args.rm_cache)
    # the learner's normalisation: the reference's samples (the training traffic) score mean 0, std 1
    gain, bias = normalize_reward(
        rm,
        tokenizer,
        [p for p, ts in traffic["train"] for _ in ts][:64],
        [t for _, ts in traffic["train"] for t in ts][:64],
    )
    flat_p = [p for p, ts in zip(heldout, held_texts, strict=True) for _ in ts]
    flat_t = [t for ts in held_texts for t in ts]
    scores = reward_scores(rm, tokenizer, flat_p, flat_t)
    sat = torch.tensor([preference(t) > 0 for t in flat_t])
    lengths = torch.tensor([float(len(t)) for t in flat_t])
    length_corr = torch.corrcoef(torch.stack([scores, lengths]))[0, 1].item()
    emit(
        step="rm",
        train_accuracy=stats["train_accuracy"],
        heldout_accuracy=stats.get("heldout_accuracy"),
        gap=(scores[sat].mean() - scores[~sat].mean()).item() if sat.any() and (~sat).any() else None,
        length_corr=length_corr,
        gain=gain,
        bias=bias,
        s=time.perf_counter() - t0,
    )
    for name, value in stats.items():
        if name.endswith("accuracy") or name == "loss":
            print(f"  rm {name}: {value:.3f}", flush=True)
    rm.eval().requires_grad_(False)

    policy, value, _ = models.policy_and_value()
    if args.zero_value_head:
        with torch.no_grad():
            value.score.weight.zero_()
    ppo = PPOConfig(
        **{
            "kl_coef": settings.kl_coef,
            "ptx_coef": settings.ptx_coef,
            **models.mode_defaults("ppo"),
            **json.loads(args.ppo),
        }
    )
    ptx = (
        PtxSource(tokenizer, None, seq_len=ppo.ptx_seq_len, batch_size=ppo.ptx_batch_size)
        if ppo.reads_ptx_corpus
        else None
    )
    trainer = PPOPtxTrainer(policy, reference, value, rm, tokenizer, ppo, ptx)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        result = trainer.round(chat, [48] * len(chat))
        round_s = time.perf_counter() - t0
        s, length = share(answers(policy, heldout, args.eval_n, seed=1), f"ppo{r + 1}")
        emit(
            step=f"ppo{r + 1}",
            share=s,
            win_rate=0.5 + 0.5 * (s - base_share),
            length_ratio=length / base_len,
            rm_score=result["rm_score_mean"],
            kl=result["kl"],
            approx_kl=result["approx_kl"],
            clip=result["clip_fraction"],
            ptx_ratio=result.get("ptx_heldout_nll_ratio"),
            round_s=round_s,
            s=time.perf_counter() - started,
        )


if __name__ == "__main__":
    main()
