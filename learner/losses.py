"""Pure loss, mask and advantage functions of the learning loop (no trainer state, no models).

Every function takes tensors and returns tensors; shapes are in the docstrings with these letters:

- ``B``: sequences in a batch (rollouts, or flattened responses for the reward model)
- ``T``: response tokens (PPO), or sequence tokens (RM, ptx)
- ``N``: responses scored by the reward model (all K responses of all rankings, flattened)
- ``P``: (winner, loser) pairs implied by the rankings of a batch
- ``R``: rankings in a batch
- ``V``: vocabulary size

Paper equations are named after Ouyang et al. 2022 ("Training language models to follow instructions
with human feedback"), section 3.5; the PPO pieces follow Schulman et al. 2017 and the implementation
details of Huang et al. ("The N implementation details of RLHF with PPO", 2024). Every function here is
tested on hand-computed tensors in ``tests/learner/test_losses.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instructloop.events import ranking_pairs

# ---------------------------------------------------------------------------------------------- masks


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true.

    values: any shape; mask: same shape, bool or 0/1. ``dim=None`` reduces everything to a scalar,
    otherwise reduces along ``dim``. A row with an empty mask gives 0 (not NaN).
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the positions where ``mask`` is true (a scalar).

    ``unbiased`` applies Bessel's correction n/(n-1); it needs at least two unmasked values.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.to(values.dtype).sum()
        if count < 2:  # CPU/GPU sync: a Python branch on a tensor value
            raise ValueError("masked_var(unbiased=True) needs at least two unmasked values")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``values`` with the mean and (unbiased) variance of the unmasked positions.

    values, mask: (B, T). Returns (B, T): ``(values - mean) / sqrt(var + 1e-8)``; with ``shift_mean=False``
    the mean is added back (used for rewards, whose sign matters). Masked positions are whitened too but
    carry no meaning: every consumer masks them again.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the first true value of each row; the row length where a row has none.

    bools: (B, T) bool. Returns (B,).
    """
    row_len = bools.size(-1)
    positions = torch.arange(row_len, dtype=dtype, device=bools.device)  # (T,)
    candidates = torch.where(bools, positions, torch.full_like(positions, row_len))  # (B, T)
    return candidates.min(-1).values


def truncate_response(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Replace every token after the first EOS by PAD (the EOS itself is kept).

    responses: (B, T) token ids. Returns a new (B, T) tensor. Rows without EOS are unchanged.
    """
    eos_index = first_true_indices(responses == eos_token_id)  # (B,)
    positions = torch.arange(responses.size(1), device=responses.device).unsqueeze(0)  # (1, T)
    after_eos = positions > eos_index.unsqueeze(1)  # (B, T)
    return responses.masked_fill(after_eos, pad_token_id)


def response_mask_from_lengths(last_index: torch.Tensor, length: int) -> torch.Tensor:
    """Named mask of real response tokens: position t is real iff t <= last_index.

    last_index: (B,) index of each response's last real token (its EOS, else the last position).
    Returns (B, length) bool.
    """
    positions = torch.arange(length, device=last_index.device).unsqueeze(0)  # (1, T)
    return positions <= last_index.unsqueeze(1)


# ------------------------------------------------------------------------------------- reward model


@dataclass(frozen=True)
class RankingPairs:
    """The (winner, loser) pairs of a batch of rankings, as indices into the flattened responses.

    winners, losers: (P,) indices into the N flattened responses; ranking_of_pair: (P,) the ranking
    (0..R-1) each pair belongs to; num_rankings: R.
    """

    winners: torch.Tensor
    losers: torch.Tensor
    ranking_of_pair: torch.Tensor
    num_rankings: int


def ranking_pairs_flat(
    rankings: Sequence[Sequence[Sequence[int]]], num_responses: Sequence[int]
) -> RankingPairs:
    """Flatten the pairs of several rankings into index tensors over the concatenated responses.

    rankings[r] is best-first groups of response indices of ranking r; its pairs are
    ``instructloop.events.ranking_pairs`` (the one ranking -> pairs rule: none between tied responses);
    num_responses[r] is K_r, the number of responses of ranking r. The responses of ranking r occupy
    positions ``offset_r .. offset_r + K_r - 1`` of the flattened batch.
    """
    winners, losers, owners = [], [], []
    offset = 0
    for r, (ranking, k) in enumerate(zip(rankings, num_responses, strict=True)):
        for w, lo in ranking_pairs(ranking):
            winners.append(offset + w)
            losers.append(offset + lo)
            owners.append(r)
        offset += k
    if not winners:
        raise ValueError("the rankings imply no (winner, loser) pair: every response is tied")
    return RankingPairs(
        winners=torch.tensor(winners, dtype=torch.long),
        losers=torch.tensor(losers, dtype=torch.long),
        ranking_of_pair=torch.tensor(owners, dtype=torch.long),
        num_rankings=len(num_responses),
    )


def kwise_ranking_loss(scores: torch.Tensor, pairs: RankingPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper eq. (1), the K-wise reward-model loss, averaged over the rankings of a batch.

    loss(θ) = -1/C(K,2) · Σ_(y_w, y_l) log σ(r_θ(x, y_w) - r_θ(x, y_l)) per ranking, then the mean over
    rankings, so each ranking (each prompt) weighs the same however many responses it has — which is why
    the paper trains on a whole ranking as one batch element (it does not overfit to prompts with big K).
    With ties the normaliser is the number of pairs the ranking actually implies (C(K,2) only when there
    is no tie): a ranking then stands for exactly the mean of its pairwise losses.

    scores: (N,) one reward per flattened response (one forward each). Returns (loss, accuracy): the
    scalar loss, and the fraction of pairs whose winner scores strictly higher (a float scalar, no grad).
    """
    margins = scores[pairs.winners] - scores[pairs.losers]  # (P,)
    pair_losses = -F.logsigmoid(margins)  # (P,)
    R = pairs.num_rankings
    owner = pairs.ranking_of_pair.to(scores.device)
    per_ranking_sum = torch.zeros(R, dtype=scores.dtype, device=scores.device).index_add(
        0, owner, pair_losses
    )
    per_ranking_count = torch.bincount(owner, minlength=R).to(scores.dtype)  # (R,)
    has_pairs = per_ranking_count > 0
    loss = (per_ranking_sum[has_pairs] / per_ranking_count[has_pairs]).mean()
    accuracy = (margins.detach() > 0).float().mean()
    return loss, accuracy


def normalisation_constants(raw_scores: torch.Tensor, min_std: float = 1e-3) -> tuple[float, float]:
    """Gain g and bias b such that ``g · raw_scores + b`` has mean 0 and (population) std 1: the reward
    normalisation of Ziegler et al. 2019 (lm-human-preferences), on the reference policy's samples.

    raw_scores: (N,), N >= 1. A std below ``min_std`` counts as ``min_std`` (a single sample, or an RM that
    scores everything alike, would otherwise get an unbounded gain). Returns (g, b) as floats.
    """
    raw = raw_scores.double()
    std = raw.std(unbiased=False).item() if raw.numel() > 1 else 0.0
    gain = 1.0 / max(std, min_std)
    return gain, -raw.mean().item() * gain


# ----------------------------------------------------------------------------------------------- PPO


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) for each position. logits: (B, T, V) already divided by the temperature;
    tokens: (B, T). Returns (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. logits: (B, T, V). Returns (B, T)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(π || π_ref) of the next-token distributions at each position (≥ 0, no sampling noise).

    logits, ref_logits: (B, T, V), already divided by the temperature. Returns (B, T).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    last_index: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper eq. (2), the per-token form of r_θ(x, y) - β·log(π_RL(y|x) / π_SFT(y|x)).

    Every response token gets ``non_score_reward = -β·(logprob - ref_logprob)``; the RM score is added at
    the last real token only (the EOS, or the last token of a response with no EOS).

    logprobs, ref_logprobs: (B, T) log-probabilities of the sampled response tokens under the policy
    (at sampling time) and under the frozen reference; scores: (B,); last_index: (B,) from
    ``response_mask_from_lengths``'s input; response_mask: (B, T) bool. Returns (rewards, non_score_reward,
    kl), each (B, T) and zero at masked positions; ``kl`` is the per-token log-ratio (k1 estimator).
    """
    kl = (logprobs - ref_logprobs) * response_mask  # (B, T)
    non_score_reward = -kl_coef * kl  # (B, T)
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    has_token = last_index >= 0  # (B,)
    rewards[rows[has_token], last_index[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, non_score_reward, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the response tokens.

    δ_t = r_t + γ·V_{t+1} - V_t, A_t = δ_t + γλ·A_{t+1}, with V and r taken as 0 past the last real token
    (the episode ends at the EOS). rewards, values: (B, T); response_mask: (B, T) bool.
    Returns (advantages, returns), each (B, T), zero at masked positions; returns = advantages + values.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.size(1)
    advantages_reversed = []
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, t])  # (B,)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


def leave_one_out_baseline(scores: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt baseline of RLOO (Ahmadian et al. 2024, after Kool et al. 2019): for each sample, the mean
    score of the *other* samples of the same prompt; 0 for a prompt sampled once.

    scores: (B,) float; groups: (B,) long, equal for samples of one prompt. Returns (baseline (B,), has_others
    (B,) bool: the prompt has other samples). Subtracting the baseline from the score removes each prompt's
    offset (eq. 1 fixes only differences within a prompt) and stays unbiased, since a sample's baseline never
    depends on its own score.
    """
    same = groups.unsqueeze(0) == groups.unsqueeze(1)  # (B, B)
    others = same.sum(1) - 1  # (B,) other samples of the row's prompt
    totals = (same.to(scores.dtype) * scores.unsqueeze(0)).sum(1)  # (B,)
    has_others = others > 0
    baseline = torch.where(has_others, (totals - scores) / others.clamp(min=1), torch.zeros_like(scores))
    return baseline, has_others


def baselined_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    last_index: torch.Tensor,
    baseline: torch.Tensor,
    has_baseline: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with the per-prompt baseline in the place of the value model's guess of the prompt's worth.

    Where ``has_baseline``, the row's score (in ``rewards`` at ``last_index``) is lowered by ``baseline`` and
    its values by V(s_0), the value before its first token: at λ = 1, A_t = G_t − b − (V(s_t) − V(s_0)), so
    the first token is judged against the other samples of its prompt (RLOO) and later tokens by how the
    value model's estimate moved since. Other rows get plain GAE. The value model's targets stay the
    unbaselined returns (it learns each prompt's worth; only its differences enter the advantages).

    rewards, values: (B, T); response_mask: (B, T) bool; last_index: (B,) long; baseline: (B,);
    has_baseline: (B,) bool. Returns (advantages, returns), each (B, T), zero at masked positions.
    """
    shift = has_baseline.to(values.dtype)  # (B,)
    baselined = rewards.clone()
    rows = torch.arange(rewards.size(0))
    baselined[rows, last_index] -= baseline * shift
    shifted_values = (values - values[:, :1] * shift.unsqueeze(1)) * response_mask.to(values.dtype)
    advantages, _ = gae_advantages(baselined, shifted_values, response_mask, gamma, lam)
    _, returns = gae_advantages(rewards, values, response_mask, gamma, lam)
    return advantages, returns


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ratio = exp(logprob - old_logprob); loss = masked mean of max(-A·ratio, -A·clip(ratio, 1±ε)).
    All inputs (B, T). Returns (loss, clip_fraction, approx_kl): scalars; clip_fraction is the share of
    tokens where the clipped term was the larger one; approx_kl = masked mean of ½(logprob - old)².
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, response_mask)
    return loss, clip_fraction.detach(), approx_kl


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½·masked mean of max((V - R)², (clip(V, V_old ± ε_v) - R)²).

    All inputs (B, T). Returns (loss, clip_fraction), scalars.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_sq, clipped_sq), response_mask)
    clip_fraction = masked_mean((clipped_sq > unclipped_sq).float(), response_mask)
    return loss, clip_fraction.detach()


def ptx_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, ptx_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining term of paper eq. (2), γ·E_{x~D_pretrain}[log π(x)], as a loss: -γ·mean log π(x_t).

    logits: (B, T, V) of the policy on ``input_ids`` (B, T) (no temperature: this is plain LM likelihood);
    attention_mask: (B, T). Token t is predicted from position t-1; padding is masked.
    Returns (loss, nll): loss = γ·nll, nll the masked mean next-token negative log-likelihood.
    """
    shifted_logits = logits[:, :-1]  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    target_mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # (B, T-1)
    nll = masked_mean(-logprobs_from_logits(shifted_logits, targets), target_mask)
    return ptx_coef * nll, nll.detach()


# ------------------------------------------------------------------------------------ KL controllers


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: a fixed β."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β (Ziegler et al. 2019, eq. 2): β ← β·(1 + K_β·e), e = clip(KL/KL_target - 1, -0.2, 0.2),
    K_β = n_steps/horizon. Pulls the observed KL toward ``target`` over about ``horizon`` steps (the learner
    counts PPO rounds: one step per round)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
