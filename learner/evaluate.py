"""Held-out evaluation of a policy, the numbers the promotion gate compares (candidate vs incumbent).

Responses are greedy (``EvalConfig.do_sample=False``, deterministic) or seeded samples; both candidate and
incumbent are evaluated on the same prompts with the same config, so their numbers are comparable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from learner.config import EvalConfig
from learner.ppo import generate_rollouts, response_kl, rollout_scores


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, tokenizer, prompts: list[str], config: EvalConfig,
                    max_tokens: Sequence[int | None] | None = None) -> dict:
    """Score ``policy`` on ``prompts`` (model inputs, used verbatim), each response cut at its prompt's
    traffic ``max_tokens`` where given (capped by ``config.max_new_tokens``), as serve cuts it.

    Returns a dict of floats: ``reward_mean`` / ``reward_std`` (RM score at the last real token; no EOS
    penalty, see ``eos_rate``), ``kl`` (mean over prompts of Σ_t KL(π(·|x, y_<t) || π_ref(·|x, y_<t)), the exact
    next-token KL summed along the evaluated response: ≥ 0 and without sampling noise, unlike the k1
    estimate PPO uses as its reward penalty; logits divided by the temperature when sampling), ``eos_rate`` (share of
    responses that ended with EOS), ``length_mean`` (response tokens, EOS included), ``n`` and
    ``duration_s``. With ``policy is reference`` (or equal weights) ``kl`` is exactly 0.
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    started = time.perf_counter()
    temperature = config.temperature if config.do_sample else 1.0
    if config.do_sample:
        torch.manual_seed(config.seed)
    limits = [min(m, config.max_new_tokens) if m else config.max_new_tokens
              for m in (max_tokens if max_tokens is not None else [None] * len(prompts))]
    scores, kls, eos, lengths = [], [], [], []
    for start in range(0, len(prompts), config.batch_size):
        rows = slice(start, start + config.batch_size)
        rollouts = generate_rollouts(policy, tokenizer, prompts[rows], config.max_prompt_tokens, limits[rows],
                                     config.do_sample, temperature)
        mask = rollouts.response_mask  # (b, Tr)
        kls.append(response_kl(policy, reference, rollouts, temperature, config.batch_size).sum(1))  # (b,)
        scores.append(rollout_scores(reward_model, rollouts, config.batch_size, tokenizer.eos_token_id))
        eos.append(rollouts.has_eos.float())
        lengths.append(mask.sum(1).float())
    score = torch.cat(scores)
    return {
        "reward_mean": score.mean().item(),
        "reward_std": score.std().item() if score.numel() > 1 else 0.0,
        "kl": torch.cat(kls).mean().item(),
        "eos_rate": torch.cat(eos).mean().item(),
        "length_mean": torch.cat(lengths).mean().item(),
        "n": float(score.numel()),
        "duration_s": time.perf_counter() - started,
    }
