"""Held-out evaluation of a policy, the numbers the promotion gate compares (candidate vs incumbent).

Responses are seeded samples at the loop's temperature (``EvalConfig``; greedy with ``do_sample=False``).
Every policy is evaluated on the same prompts, in the same order, with the same config and so the same seeds
batch by batch: their scores pair by (prompt, seed), and the gate compares them pair by pair.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.config import EvalConfig
from learner.ppo import response_kl, rollout_scores
from learner.rollout import Rollouts, generate_rollouts


@dataclass
class PolicySamples:
    """A policy's held-out responses and everything about them the RM does not decide. Deterministic for
    a given policy, reference, prompts and config (greedy, or sampled from ``config.seed``), so the gate
    can keep the incumbent's and only re-score them when the RM changes."""

    rollouts: list[Rollouts]
    kl: torch.Tensor
    """(N,) Σ_t KL(π || π_ref) along each response."""
    eos: torch.Tensor
    """(N,) 1.0 where the response ended with EOS."""
    lengths: torch.Tensor
    """(N,) response tokens, EOS included."""
    duration_s: float
    eos_token_id: int
    """Appended to a response cut at its length cap when the RM scores it (``rollout.scoring_inputs``)."""


@torch.no_grad()
def sample_policy(
    policy,
    reference,
    tokenizer,
    prompts: list[str],
    config: EvalConfig,
    max_tokens: Sequence[int | None] | None = None,
) -> PolicySamples:
    """Generate ``policy``'s responses to ``prompts`` (model inputs, used verbatim) and their exact KL to
    ``reference``; each response is cut at its prompt's traffic ``max_tokens`` where given (capped by
    ``config.max_new_tokens``), as serve cut it."""
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    started = time.perf_counter()
    temperature = config.temperature if config.do_sample else 1.0
    limits = [
        min(m, config.max_new_tokens) if m else config.max_new_tokens
        for m in (max_tokens if max_tokens is not None else [None] * len(prompts))
    ]
    all_rollouts, kls, eos, lengths = [], [], [], []
    for start in range(0, len(prompts), config.batch_size):
        rows = slice(start, start + config.batch_size)
        if config.do_sample:  # per batch: the same (prompt, seed) pairs for every policy evaluated
            torch.manual_seed(config.seed + start // config.batch_size)
        rollouts = generate_rollouts(
            policy,
            tokenizer,
            prompts[rows],
            config.max_prompt_tokens,
            limits[rows],
            config.do_sample,
            temperature,
        )
        all_rollouts.append(rollouts)
        kls.append(response_kl(policy, reference, rollouts, temperature, config.batch_size).sum(1))  # (b,)
        eos.append(rollouts.has_eos.float())
        lengths.append(rollouts.response_mask.sum(1).float())
    return PolicySamples(
        all_rollouts,
        torch.cat(kls),
        torch.cat(eos),
        torch.cat(lengths),
        time.perf_counter() - started,
        tokenizer.eos_token_id,
    )


@torch.no_grad()
def score_samples(samples: PolicySamples, reward_model, config: EvalConfig) -> dict:
    """The gate's numbers for ``samples`` under ``reward_model`` (see ``evaluate_policy``)."""
    started = time.perf_counter()
    score = torch.cat(
        [
            rollout_scores(reward_model, rollouts, config.batch_size, samples.eos_token_id)
            for rollouts in samples.rollouts
        ]
    )
    return {
        "reward_mean": score.mean().item(),
        "reward_std": score.std().item() if score.numel() > 1 else 0.0,
        "kl": samples.kl.mean().item(),
        "eos_rate": samples.eos.mean().item(),
        "length_mean": samples.lengths.mean().item(),
        "n": float(score.numel()),
        "scores": score.tolist(),
        "duration_s": samples.duration_s + time.perf_counter() - started,
    }


def evaluate_policy(
    policy,
    reference,
    reward_model,
    tokenizer,
    prompts: list[str],
    config: EvalConfig,
    max_tokens: Sequence[int | None] | None = None,
) -> dict:
    """Score ``policy`` on ``prompts`` (responses cut at their traffic ``max_tokens``, see ``sample_policy``).

    Returns a dict of floats (and one list): ``reward_mean`` / ``reward_std`` (RM score at the last real
    token; no EOS penalty, see ``eos_rate``), ``kl`` (mean over prompts of
    Σ_t KL(π(·|x, y_<t) || π_ref(·|x, y_<t)), the exact next-token KL summed along the evaluated response:
    ≥ 0 and without sampling noise, unlike the k1 estimate PPO uses as its reward penalty; logits divided by
    the temperature when sampling), ``eos_rate`` (share of responses that ended with EOS), ``length_mean``
    (response tokens, EOS included), ``n``, ``scores`` (each prompt's RM score, a list in prompt order: the
    gate's paired standard error) and ``duration_s``. With ``policy is reference`` (or equal weights) ``kl``
    is exactly 0.
    """
    return score_samples(
        sample_policy(policy, reference, tokenizer, prompts, config, max_tokens), reward_model, config
    )


@torch.no_grad()
def reference_samples(reference, tokenizer, queries: list, config: EvalConfig) -> list[str]:
    """Responses of the reference policy to ``queries`` (``TrafficPrompt``s; EOS and padding stripped), greedy
    or seeded samples at ``config.temperature`` (``config.do_sample``), each cut at its traffic's
    ``max_tokens`` as serve would cut it (the RM normalisation samples)."""
    if config.do_sample:
        torch.manual_seed(config.seed)
    limits = [
        min(q.max_tokens, config.max_new_tokens) if q.max_tokens else config.max_new_tokens for q in queries
    ]
    responses: list[str] = []
    for start in range(0, len(queries), config.batch_size):
        rows = slice(start, start + config.batch_size)
        rollouts = generate_rollouts(
            reference,
            tokenizer,
            [q.text for q in queries[rows]],
            config.max_prompt_tokens,
            limits[rows],
            config.do_sample,
            config.temperature if config.do_sample else 1.0,
        )
        for ids, mask in zip(rollouts.responses, rollouts.response_mask, strict=True):
            responses.append(tokenizer.decode(ids[mask], skip_special_tokens=True))
    return responses
