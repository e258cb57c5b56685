"""Every loss, mask and advantage function of learner/losses.py against tiny hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from learner.losses import (
    AdaptiveKLController,
    FixedKLController,
    baselined_advantages,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    first_true_indices,
    gae_advantages,
    kl_from_logits,
    kl_penalized_rewards,
    kwise_ranking_loss,
    leave_one_out_baseline,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    normalisation_constants,
    ptx_loss,
    ranking_pairs_flat,
    response_mask_from_lengths,
    truncate_response,
)


def _nls(x: float) -> float:
    """-log σ(x), by hand."""
    return math.log1p(math.exp(-x))


def test_masked_mean_and_var():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert_close(masked_mean(values, mask), torch.tensor(2.5))  # (1+2+3+4)/4
    assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 4.0]))
    # unbiased variance of [1,2,3,4]: mean 2.5, squared deviations 2.25+.25+.25+2.25 = 5, /3
    assert_close(masked_var(values, mask), torch.tensor(5.0 / 3.0))
    assert_close(masked_var(values, mask, unbiased=False), torch.tensor(5.0 / 4.0))
    assert_close(masked_mean(values, torch.zeros_like(mask), dim=1), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError):
        masked_var(values, torch.tensor([[True, False, False], [False, False, False]]))


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 97.5, 97.5]]) / std
    assert_close(masked_whiten(values, mask), expected)
    assert_close(masked_whiten(values, mask, shift_mean=False), expected + 2.5)
    whitened = masked_whiten(values, mask)
    assert_close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(whitened, mask), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_first_true_indices():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_truncate_response_and_lengths():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 9, 2, 9], [5, 6, 7, 2]])
    truncated = truncate_response(responses, eos, pad)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 2]]
    last = torch.tensor([1, 3, 0, 3])  # each response's EOS, else its last position
    assert response_mask_from_lengths(last, 4).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, True],
    ]


def test_kwise_loss_hand_computed():
    # one ranking of K=3, fully ordered: 0 > 1 > 2; pairs (0,1), (0,2), (1,2), C(3,2) = 3
    scores = torch.tensor([2.0, 1.0, -1.0])
    pairs = ranking_pairs_flat([[[0], [1], [2]]], [3])
    loss, accuracy = kwise_ranking_loss(scores, pairs)
    expected = (_nls(1.0) + _nls(3.0) + _nls(2.0)) / 3
    assert_close(loss, torch.tensor(expected))
    assert accuracy.item() == 1.0


def test_kwise_loss_with_ties_equals_mean_of_pairwise():
    # ranking A (K=4): [1] > [0, 3] (tied) > [2]: pairs (1,0), (1,3), (1,2), (0,2), (3,2) — 5, not C(4,2)=6
    # ranking B (K=2): [1] > [0]: one pair; it is offset by 4 in the flattened batch
    scores = torch.tensor([0.5, 1.5, -0.25, 3.0, 0.1, -0.7], requires_grad=True)
    pairs = ranking_pairs_flat([[[1], [0, 3], [2]], [[1], [0]]], [4, 2])
    assert list(zip(pairs.winners.tolist(), pairs.losers.tolist(), strict=True)) == [
        (1, 0),
        (1, 3),
        (1, 2),
        (0, 2),
        (3, 2),
        (5, 4),
    ]
    loss, accuracy = kwise_ranking_loss(scores, pairs)
    s = scores.tolist()
    pairwise_a = [_nls(s[w] - s[lo]) for w, lo in [(1, 0), (1, 3), (1, 2), (0, 2), (3, 2)]]
    pairwise_b = [_nls(s[5] - s[4])]
    # each ranking is the mean of the pairwise losses it stands for; the batch is the mean over rankings
    expected = (sum(pairwise_a) / 5 + sum(pairwise_b) / 1) / 2
    assert_close(loss, torch.tensor(expected))
    # accuracy over pairs: (1,3) wrong (1.5 < 3.0), (5,4) wrong (-0.7 < 0.1): 4 of 6 right
    assert_close(accuracy, torch.tensor(4 / 6))
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    with pytest.raises(ValueError):
        ranking_pairs_flat([[[0, 1]]], [2])


def test_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    assert_close(logprobs_from_logits(logits, tokens), torch.tensor([[math.log(0.5), math.log(0.75)]]))
    expected_entropy = [math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert_close(entropy_from_logits(logits), torch.tensor([expected_entropy]))


def test_kl_penalized_rewards():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -0.25, -1.0]])
    last = torch.tensor([2, 1])
    mask = response_mask_from_lengths(last, 3)
    scores = torch.tensor([10.0, -4.0])
    rewards, non_score, kl = kl_penalized_rewards(logprobs, ref_logprobs, scores, last, mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.5, -0.25, 0.0]]))
    assert_close(non_score, torch.tensor([[-0.05, 0.1, 0.0], [-0.05, 0.025, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.05, 0.1, 10.0], [-0.05, -3.975, 0.0]]))


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    gamma, lam = 1.0, 0.95
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0: δ2 = 2 - 1.5 = 0.5; δ1 = 0 + 1.5 - 1 = 0.5; δ0 = 1 + 1 - 0.5 = 1.5
    a2 = 0.5
    a1 = 0.5 + 0.95 * a2
    a0 = 1.5 + 0.95 * a1
    # row 1 ends at t=1: δ1 = 1 + 0 - 3 = -2; δ0 = 0.5 + 3 - 2 = 1.5
    b1 = -2.0
    b0 = 1.5 + 0.95 * b1
    assert_close(advantages, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5], [b0 + 2.0, b1 + 3.0, 0.0]]))
    # γ=0.5, λ=1 on one row: A_t = Σ_k γ^k δ_{t+k}
    adv, _ = gae_advantages(
        torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[True, True]]), 0.5, 1.0
    )
    assert_close(adv, torch.tensor([[1.5, 1.0]]))


def test_clipped_policy_loss():
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[True, True, True]])
    loss, clip_fraction, approx_kl = clipped_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    # token 0: A=1, r=1.5 → max(-1.5, -1.2) = -1.2 (clipped); token 1: A=1, r=0.5 → max(-0.5, -0.8) = -0.5;
    # token 2: A=-2, r=1.1 → max(2.2, 2.2) = 2.2 (inside the range)
    assert_close(loss, torch.tensor((-1.2 - 0.5 + 2.2) / 3))
    assert_close(clip_fraction, torch.tensor(1 / 3))
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert_close(approx_kl, torch.tensor(expected_kl))
    # a masked token does not count
    loss_masked, _, _ = clipped_policy_loss(
        logprobs, old, advantages, torch.tensor([[True, True, False]]), 0.2
    )
    assert_close(loss_masked, torch.tensor((-1.2 - 0.5) / 2))


def test_clipped_value_loss():
    old_values = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, -1.0]])
    loss, clip_fraction = clipped_value_loss(values, old_values, returns, torch.tensor([[True, True]]), 0.2)
    # token 0: unclipped (1-2)² = 1, clipped (0.2-2)² = 3.24 → 3.24;
    # token 1: (0.1+1)² = 1.21, same clipped → 1.21
    assert_close(loss, torch.tensor(0.5 * (3.24 + 1.21) / 2))
    assert_close(clip_fraction, torch.tensor(0.5))


def test_ptx_loss():
    # vocab 2, uniform logits except position 1 favouring token 0 (p = 0.75)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    input_ids = torch.tensor([[1, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 1]])
    loss, nll = ptx_loss(logits, input_ids, attention_mask, ptx_coef=2.0)
    # predicted: token 1 from position 0 (p=.5), token 0 from position 1 (p=.75)
    expected_nll = (math.log(2.0) - math.log(0.75)) / 2
    assert_close(nll, torch.tensor(expected_nll))
    assert_close(loss, torch.tensor(2.0 * expected_nll))
    _, nll_padded = ptx_loss(logits, input_ids, torch.tensor([[1, 1, 0]]), ptx_coef=1.0)
    assert_close(nll_padded, torch.tensor(math.log(2.0)))


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=64)
    assert fixed.value == 0.05
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10)  # the learner's horizon is in rounds
    adaptive.update(current_kl=12.0, n_steps=1)  # one round; error clipped to +0.2 → ×1.02
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(current_kl=5.4, n_steps=1)  # error -0.1 → ×0.99
    assert adaptive.value == pytest.approx(0.102 * 0.99)
    restored = AdaptiveKLController(0.1, target=6.0, horizon=10)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_kl_from_logits():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # p = (.75, .25), (.5, .5)
    ref_logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # q = (.5, .5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert_close(kl_from_logits(logits, ref_logits), torch.tensor([[expected, 0.0]]))


def test_normalisation_constants_hand_computed():
    # [2, 4, 6, 8]: mean 5, population variance (9 + 1 + 1 + 9) / 4 = 5
    gain, bias = normalisation_constants(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert gain == pytest.approx(1 / math.sqrt(5)) and bias == pytest.approx(-math.sqrt(5))
    normalised = gain * torch.tensor([2.0, 4.0, 6.0, 8.0]) + bias
    assert_close(normalised, torch.tensor([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(5))
    assert normalised.std(unbiased=False).item() == pytest.approx(1.0)
    assert normalisation_constants(torch.tensor([1.0, 3.0])) == pytest.approx((1.0, -2.0))
    # one sample, or an RM that scores all alike: the spread is taken as min_std, not 0
    assert normalisation_constants(torch.tensor([3.0]), min_std=0.5) == pytest.approx((2.0, -6.0))
    assert normalisation_constants(torch.tensor([3.0, 3.0]), min_std=0.5) == pytest.approx((2.0, -6.0))


def test_leave_one_out_baseline_hand_computed():
    scores = torch.tensor([1.0, 2.0, 6.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 2])  # prompt 0 sampled three times, prompts 1 and 2 once
    baseline, has_others = leave_one_out_baseline(scores, groups)
    assert_close(baseline, torch.tensor([4.0, 3.5, 1.5, 0.0, 0.0]))
    assert has_others.tolist() == [True, True, True, False, False]
    # interleaved groups: the baseline follows the group ids, not the positions
    baseline, _ = leave_one_out_baseline(torch.tensor([1.0, 10.0, 3.0, 20.0]), torch.tensor([4, 9, 4, 9]))
    assert_close(baseline, torch.tensor([3.0, 20.0, 1.0, 10.0]))


def test_baselined_advantages_hand_computed():
    # row 0: three tokens, baseline 1 from its prompt's other samples; row 1: two tokens, no other sample
    rewards = torch.tensor([[-0.1, -0.2, 3.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.7, 1.0], [0.4, 0.9, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    last_index = torch.tensor([2, 1])
    advantages, returns = baselined_advantages(
        rewards, values, mask, last_index, torch.tensor([1.0, 0.0]), torch.tensor([True, False])
    )
    # row 0: G = [2.7, 2.8, 3.0]; A_t = G_t - b - (V_t - V_0) = [1.7, 1.8, 2.0] - [0, 0.2, 0.5]
    # row 1: plain GAE at λ = 1: A = G - V = [2.0 - 0.4, 2.0 - 0.9]
    assert_close(advantages, torch.tensor([[1.7, 1.6, 1.5], [1.6, 1.1, 0.0]]))
    # the value model's targets are the unbaselined returns
    assert_close(returns, torch.tensor([[2.7, 2.8, 3.0], [2.0, 2.0, 0.0]]))


def test_baselined_advantages_drop_a_prompts_offset_and_are_plain_gae_without_a_baseline():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 5) * 0.1, torch.randn(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    last_index = torch.full((4,), 4)
    scores = torch.tensor([1.0, 2.0, 0.5, 3.0])
    groups = torch.tensor([0, 0, 1, 1])

    def advantages(offsets: torch.Tensor, value_offsets: torch.Tensor) -> torch.Tensor:
        shifted = scores + offsets
        with_score = rewards.clone()
        with_score[:, 4] += shifted
        baseline, has_others = leave_one_out_baseline(shifted, groups)
        return baselined_advantages(
            with_score, values + value_offsets.unsqueeze(1), mask, last_index, baseline, has_others, 1.0, 0.9
        )[0]

    # prompt 1's RM offset (+5) and the value model's guess of it (-2) change none of the advantages
    assert_close(
        advantages(torch.zeros(4), torch.zeros(4)),
        advantages(torch.tensor([0.0, 0.0, 5.0, 5.0]), torch.tensor([0.0, 0.0, -2.0, -2.0])),
    )
    no_baseline = baselined_advantages(
        rewards, values, mask, last_index, torch.zeros(4), torch.zeros(4, dtype=torch.bool), 1.0, 0.9
    )
    assert_close(no_baseline, gae_advantages(rewards, values, mask, 1.0, 0.9))
