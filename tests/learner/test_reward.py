"""Reward model on a tiny random-init Llama: parity with a plain HF forward, K-wise training learns a
synthetic preference, bias normalisation survives a save/load."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from instructloop.events import ComparisonEvent
from learner.config import RewardConfig
from learner.reward import (
    accuracy_lower_bound,
    build_reward_model,
    kwise_batch_loss,
    normalize_reward,
    pairwise_accuracy,
    ranking_metrics,
    replay_sample,
    restore_snapshot,
    reward_normalisation,
    reward_scores,
    rm_ready,
    score_head,
    sequence_scores,
    train_reward_model,
    trainable_snapshot,
    update_is_worse,
    update_selection,
)
from learner.utils import encode_sequence, left_pad
from tests.conftest import build_tiny_model_dir

WORDS = ["river", "stone", "cloud", "paper", "green", "quiet", "north", "table", "light", "music"]
TARGET = " wonderful"
PROMPTS = ["Describe your day.", "Say something.", "Write a short line.", "Tell me a thing.", "Any news?"]


def synthetic_comparison(rng: random.Random, k: int = 4) -> ComparisonEvent:
    """K responses of random words; each carries the target word 0, 1 or 2 times. The ranking is by that
    count, best first, and responses with the same count are tied (no pair between them)."""
    counts = [rng.choice([0, 1, 2]) for _ in range(k)]
    while len(set(counts)) < 2:
        counts = [rng.choice([0, 1, 2]) for _ in range(k)]
    responses = []
    for count in counts:
        words = [" " + rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        for _ in range(count):
            words.insert(rng.randint(0, len(words)), TARGET)
        responses.append("".join(words).strip())
    ranking = [[i for i in range(k) if counts[i] == c] for c in sorted(set(counts), reverse=True)]
    return ComparisonEvent(
        prompt=rng.choice(PROMPTS), responses=responses, ranking=ranking, labeler_id="synthetic"
    )


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-rm"), tokenizer, seed=1)


def test_scores_match_plain_hf_forward_with_left_padding(rm_dir, tokenizer):
    model = build_reward_model(str(rm_dir))
    assert model.config.pad_token_id == tokenizer.pad_token_id
    sequences = [
        encode_sequence(tokenizer, p, r, 128)
        for p, r in [("Hi", "Hello there, friend."), ("A much longer prompt here", "ok")]
    ]
    input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(model, input_ids, attention_mask)
        theirs = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])
    assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_kwise_training_learns_synthetic_preference_and_bias_normalisation(rm_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    rng = random.Random(0)
    train = [synthetic_comparison(rng) for _ in range(192)]
    heldout = [synthetic_comparison(rng) for _ in range(48)]
    model = build_reward_model(str(rm_dir))
    before = pairwise_accuracy(model, tokenizer, heldout)
    config = RewardConfig(lr=2e-3, epochs=2, rankings_per_batch=8, max_length=96, single_pass_above=192)
    stats = train_reward_model(model, tokenizer, train, config, heldout=heldout)
    assert stats["steps"] == 48 and stats["rankings"] == 384
    assert stats["heldout_accuracy"] >= 0.9, (before, stats)
    assert stats["heldout_loss"] < 0.5

    # normalise: these (prompt, response) pairs now score mean 0, std 1; a saved RM keeps gain and bias
    prompts = [c.prompt for c in heldout]
    responses = [c.responses[0] for c in heldout]
    raw = reward_scores(model, tokenizer, prompts, responses, normalised=False)
    gain, bias = normalize_reward(model, tokenizer, prompts, responses)
    scores = reward_scores(model, tokenizer, prompts, responses)
    assert abs(scores.mean().item()) < 1e-4
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert gain == pytest.approx(1 / raw.std(unbiased=False).item(), rel=1e-4)
    assert_close(scores, raw * gain + bias)
    # held-out accuracy and loss are on raw scores: the normalisation changes neither
    assert ranking_metrics(model, tokenizer, heldout, max_length=96) == pytest.approx(
        (stats["heldout_accuracy"], stats["heldout_loss"]), rel=1e-4
    )
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reloaded = build_reward_model(str(tmp_path / "rm"))
    assert reward_normalisation(reloaded) == pytest.approx((gain, bias))
    assert_close(reward_scores(reloaded, tokenizer, prompts, responses), scores, atol=1e-5, rtol=1e-4)


def test_reward_scores_refuses_mismatched_lengths(rm_dir, tokenizer):
    model = build_reward_model(str(rm_dir))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward_scores(model, tokenizer, ["a", "b"], ["x"])


def test_heldout_metrics_from_one_scoring_pass_equal_the_training_loss_and_per_pair_scores(rm_dir, tokenizer):
    """``ranking_metrics`` scores each ranked response once; its loss must be the training path's
    (``kwise_batch_loss``, one ranking per batch, averaged) and its accuracy the share of pairs whose winner's
    own ``reward_scores`` is higher."""
    rng = random.Random(3)
    comparisons = [synthetic_comparison(rng) for _ in range(6)]
    model = build_reward_model(str(rm_dir)).eval()
    accuracy, loss = ranking_metrics(model, tokenizer, comparisons, batch_size=5, max_length=96)
    with torch.no_grad():
        expected_loss = sum(kwise_batch_loss(model, tokenizer, [c], 96)[0].item() for c in comparisons) / 6
    right = total = 0
    for c in comparisons:
        scores = reward_scores(
            model, tokenizer, [c.prompt] * len(c.responses), c.responses, max_length=96
        ).tolist()
        right += sum(scores[w] > scores[lo] for w, lo in c.pairs())
        total += len(c.pairs())
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    assert accuracy == pytest.approx(right / total)
    assert pairwise_accuracy(model, tokenizer, comparisons, 5, 96) == accuracy


def test_ties_are_skipped_and_a_batch_of_only_ties_is_refused(rm_dir, tokenizer):
    model = build_reward_model(str(rm_dir))
    tie = ComparisonEvent(
        prompt="Say hi", responses=["hi", "hello"], ranking=[[0, 1]], labeler_id="l", source="ab"
    )
    vote = ComparisonEvent(prompt="Say hi", responses=["hi", "go away"], ranking=[[0], [1]], labeler_id="l")
    config = RewardConfig(epochs=1, rankings_per_batch=2)
    stats = train_reward_model(model, tokenizer, [tie, vote], config, heldout=[tie, vote])
    assert stats["pairs"] == 1.0 and stats["rankings"] == 1.0
    with pytest.raises(ValueError, match="implies a"):
        train_reward_model(model, tokenizer, [tie], config)


def test_a_backlog_above_single_pass_above_is_trained_once(rm_dir, tokenizer):
    model = build_reward_model(str(rm_dir))
    votes = [
        ComparisonEvent(prompt=f"Say hi {i}", responses=["hi", "go away"], ranking=[[0], [1]], labeler_id="l")
        for i in range(3)
    ]
    config = RewardConfig(epochs=2, rankings_per_batch=1, single_pass_above=2)
    assert train_reward_model(model, tokenizer, votes[:2], config)["steps"] == 4.0  # 2 rankings: 2 passes
    stats = train_reward_model(model, tokenizer, votes, config)  # 3 > 2: one pass
    assert (stats["steps"], stats["epochs"], stats["rankings"]) == (3.0, 1.0, 3.0)


def test_training_a_frozen_reward_model_trains_it_but_keeps_the_normalisation(rm_dir, tokenizer):
    model = build_reward_model(str(rm_dir))
    normalisation = normalize_reward(model, tokenizer, ["Say hi", "Say hi"], ["hi", "hello there"])
    weight = score_head(model).weight.detach().clone()
    model.requires_grad_(False)  # as the PPO trainer leaves the RM it scores with
    vote = ComparisonEvent(prompt="Say hi", responses=["hi", "go away"], ranking=[[0], [1]], labeler_id="l")
    train_reward_model(model, tokenizer, [vote], RewardConfig(epochs=1, rankings_per_batch=1))
    assert not torch.equal(score_head(model).weight, weight)
    assert reward_normalisation(model) == normalisation


def test_normalisation_puts_reference_samples_at_mean_0_std_1_and_the_loss_in_raw_units(rm_dir, tokenizer):
    """The reference policy's own samples (the tiny model's answers) score mean 0, std 1 after
    ``normalize_reward``; the K-wise training loss is the raw head's, whatever the normalisation."""
    from learner.rollout import generate_rollouts

    reference = AutoModelForCausalLM.from_pretrained(rm_dir)
    torch.manual_seed(0)
    prompts = PROMPTS * 4
    rollouts = generate_rollouts(reference, tokenizer, prompts, 64, 12, do_sample=True, temperature=1.0)
    responses = [
        tokenizer.decode(ids[mask], skip_special_tokens=True)
        for ids, mask in zip(rollouts.responses, rollouts.response_mask, strict=True)
    ]
    model = build_reward_model(str(rm_dir))
    rng = random.Random(5)
    votes = [synthetic_comparison(rng) for _ in range(4)]
    with torch.no_grad():
        raw_loss = kwise_batch_loss(model, tokenizer, votes, 96)[0].item()
    normalize_reward(model, tokenizer, prompts, responses)
    scores = reward_scores(model, tokenizer, prompts, responses)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        assert kwise_batch_loss(model, tokenizer, votes, 96)[0].item() == pytest.approx(raw_loss, rel=1e-5)


def test_an_update_trains_on_the_newest_rankings_up_to_the_cap_and_replays_the_rest():
    config = RewardConfig(max_new_per_update=3, replay_ratio=1.0)
    older, new = [f"old{i}" for i in range(2)], [f"new{i}" for i in range(5)]
    trained, replayed = update_selection(new, older, config, seed=1)
    assert trained == ["new2", "new3", "new4"]  # the newest 3, in order
    assert len(replayed) == 3 and set(replayed) <= {
        "old0",
        "old1",
        "new0",
        "new1",
    }  # past the cap: replayable
    assert update_selection(new[:2], older, config, seed=1)[0] == ["new0", "new1"]  # under the cap: all
    no_replay = RewardConfig(max_new_per_update=3, replay_ratio=0.0)
    assert update_selection(new, older, no_replay, seed=1) == (["new2", "new3", "new4"], [])


def test_replay_sample_takes_ratio_times_the_new_rankings_of_the_older_ones():
    older = list(range(10))
    picked = replay_sample(older, new_count=4, ratio=1.0, seed=3)
    assert len(picked) == 4 and picked == sorted(picked) and set(picked) <= set(older)
    assert picked == replay_sample(older, 4, 1.0, seed=3)  # seeded
    assert replay_sample(older, 4, 0.5, seed=3).__len__() == 2
    assert replay_sample(older, 8, 2.0, seed=3) == older  # fewer older ones than asked: all of them
    assert replay_sample(older, 4, 0.0, seed=3) == []


def test_accuracy_lower_bound_and_rm_ready_hand_computed():
    # Wilson, one-sided 95 % (z = 1.6449): accuracy 0.8 on 18 pairs
    z = 1.6448536
    centre = 0.8 + z * z / 36
    spread = z * math.sqrt(0.8 * 0.2 / 18 + z * z / (4 * 18 * 18))
    expected = (centre - spread) / (1 + z * z / 18)
    assert accuracy_lower_bound(0.8, 18, 0.95) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.611, abs=1e-3)
    assert accuracy_lower_bound(0.8, 0, 0.95) == 0.0
    ready, reason = rm_ready({"heldout_accuracy": 0.8, "heldout_pairs": 18.0})
    assert ready and "0.611 is above chance" in reason
    # the same accuracy on 4 pairs is not confidently above chance; 0.55 on 1000 pairs is
    assert not rm_ready({"heldout_accuracy": 0.8, "heldout_pairs": 4.0})[0]
    assert rm_ready({"heldout_accuracy": 0.55, "heldout_pairs": 1000.0})[0]
    assert not rm_ready({"heldout_accuracy": 0.5, "heldout_pairs": 100000.0})[0]
    ready, reason = rm_ready({"heldout_accuracy": None, "heldout_pairs": None})
    assert not ready and "no held-out comparisons" in reason
    assert rm_ready({}, confidence=0.0)[0]


def test_snapshot_restores_a_trained_reward_model(rm_dir, tokenizer):
    model = build_reward_model(str(rm_dir))
    rng = random.Random(6)
    votes = [synthetic_comparison(rng) for _ in range(4)]
    before = reward_scores(model, tokenizer, [v.prompt for v in votes], [v.responses[0] for v in votes])
    snapshot = trainable_snapshot(model)
    train_reward_model(model, tokenizer, votes, RewardConfig(lr=1e-2, epochs=1))
    after = reward_scores(model, tokenizer, [v.prompt for v in votes], [v.responses[0] for v in votes])
    assert not torch.allclose(after, before)
    restore_snapshot(model, snapshot)
    restored = reward_scores(model, tokenizer, [v.prompt for v in votes], [v.responses[0] for v in votes])
    assert_close(restored, before)


def test_an_update_is_refused_only_when_clearly_worse_on_heldout_pairs():
    tolerance = RewardConfig().refuse_tolerance
    assert update_is_worse(1.02, 0.023, tolerance)  # contradicting rankings: clearly worse
    assert not update_is_worse(7e-15, 7e-19, tolerance)  # both fit the held-out pairs: noise, not worse
    assert not update_is_worse(0.30, 0.31, tolerance)
    assert update_is_worse(0.30 + tolerance + 1e-6, 0.30, tolerance)
    assert not update_is_worse(5.0, None, tolerance)  # the first RM has nothing to be worse than
