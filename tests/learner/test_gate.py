"""The promotion gate (pure decision) and publishing to the registry (real redis-server, real tiny models)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from learner.gate import (
    GateConfig,
    GateResult,
    gain_lower_bound,
    gate_decision,
    merge_evaluations,
    paired_standard_error,
    worth_more_samples,
)
from learner.publish import publish_candidate
from tests.learner.helpers import (
    PREFIX,
)

CONFIG = GateConfig(kl_ceiling=2.0, min_live_comparisons=10, min_win_rate=0.5)
PROMPTS_N, SAMPLES_N = 4, 8  # 32 (prompt, sample) pairs: the gate's default minimum


def evaluation(scores: list[float], kl: float = 0.5) -> dict:
    """An ``evaluate_policy`` result with these per-pair scores."""
    return {"reward_mean": sum(scores) / len(scores), "kl": kl, "scores": scores}


def paired_draws(rng: random.Random, gain: float, shared: float) -> tuple[list[float], list[float]]:
    """Scores of two policies on 4 prompts x 8 seeds, normalised RM units: a per-prompt offset common to both
    (std 1), a per-(prompt, seed) part shared by both with weight ``shared`` (1: the same samples, 0:
    independent ones; same seeds make similar policies draw similar answers), and the candidate's ``gain``."""
    candidate, incumbent = [], []
    for _ in range(PROMPTS_N):
        offset = rng.gauss(0, 1)
        for _ in range(SAMPLES_N):
            common = rng.gauss(0, 1)
            own_c, own_i = rng.gauss(0, 1), rng.gauss(0, 1)
            mix = math.sqrt(1 - shared**2)
            candidate.append(offset + gain + shared * common + mix * own_c)
            incumbent.append(offset + shared * common + mix * own_i)
    return candidate, incumbent


def pass_rate(gain: float, shared: float, cases: int = 1000) -> float:
    rng = random.Random(1234)
    passed = 0
    for _ in range(cases):
        candidate, incumbent = paired_draws(rng, gain, shared)
        passed += gate_decision(evaluation(candidate), evaluation(incumbent, kl=0.0), GateConfig()).promote
    return passed / cases


@pytest.mark.parametrize("shared", [0.0, 0.5, 0.99])
def test_a_candidate_as_good_as_the_incumbent_rarely_passes(shared):
    """An equal candidate (independent samples, half-shared ones, near-identical ones) must not random-walk
    the served policy: it passes well under half the time (the bound's 95 % plus the minimum gain)."""
    assert pass_rate(0.0, shared) < 0.15


def two_look_pass_rate(gain: float, shared: float, cases: int = 1000) -> float:
    """The learner's gate (``learner/gating.judge``): 32 pairs, then all of ``max_samples`` where open."""
    rng, config, passed = random.Random(1234), GateConfig(), 0
    for _ in range(cases):
        candidate, incumbent = [], []
        while len(candidate) < config.max_samples:
            more_c, more_i = paired_draws(rng, gain, shared)
            candidate, incumbent = candidate + more_c, incumbent + more_i
        result = gate_decision(evaluation(candidate[:32]), evaluation(incumbent[:32], kl=0.0), config)
        if worth_more_samples(result, config, 32):
            result = gate_decision(evaluation(candidate), evaluation(incumbent, kl=0.0), config)
        passed += result.promote
    return passed / cases


@pytest.mark.parametrize("shared", [0.0, 0.5])
def test_more_pairs_for_open_decisions_find_real_gains_and_rarely_pass_equal_candidates(shared):
    """Where seeds hardly pair answers, the second look finds a gain of 0.2 std about twice as often as
    32 pairs alone, and an equal candidate still passes under a quarter of gates (two looks, not one)."""
    assert two_look_pass_rate(0.2, shared) > 1.5 * pass_rate(0.2, shared)
    assert two_look_pass_rate(0.0, shared) < 0.25


def test_an_identical_candidate_never_passes():
    rng = random.Random(7)
    for _ in range(50):
        _, scores = paired_draws(rng, 0.0, 0.0)
        result = gate_decision(evaluation(scores), evaluation(scores, kl=0.0), GateConfig())
        assert not result.promote and "does not beat" in result.reasons[0]


def test_a_small_gain_measured_surely_passes():
    """A gain under min_reward_gain passes when its lower bound is above 0 (pairs that agree closely)."""
    incumbent = [0.1 * (i % 4) for i in range(32)]
    candidate = [s + 0.03 + (0.01 if i % 2 else -0.01) for i, s in enumerate(incumbent)]
    result = gate_decision(evaluation(candidate), evaluation(incumbent, kl=0.0), CONFIG)
    assert result.promote, result.reasons
    assert any("surely above 0" in r for r in result.reasons)
    strict = gate_decision(
        evaluation(candidate), evaluation(incumbent, kl=0.0), replace(CONFIG, sure_gain_suffices=False)
    )
    assert not strict.promote and "does not beat" in strict.reasons[0]


def test_a_clearly_better_candidate_passes():
    """A gain of one reference standard deviation passes almost always, even with independent samples."""
    assert pass_rate(1.0, 0.0) > 0.95
    assert pass_rate(0.3, 0.9) > 0.95  # a smaller gain, with the seeds pairing the samples


def test_better_candidate_under_the_kl_ceiling_is_promoted_and_explains_itself():
    incumbent = [0.1 * (i % 4) for i in range(32)]
    result = gate_decision(evaluation([s + 0.5 for s in incumbent], kl=1.2), evaluation(incumbent), CONFIG)
    assert result.promote, result.reasons
    assert result.metrics["reward_gain"] == pytest.approx(0.5)
    assert result.metrics["gain_lower_bound_incumbent"] == pytest.approx(0.5)  # the same gain on every pair
    assert result.metrics["candidate_kl"] == 1.2 and "candidate_scores" not in result.metrics
    assert any("gain 0.5000 > 0.05" in r for r in result.reasons)
    assert any("lower bound of the gain over incumbent 0.5000 > -0.1" in r for r in result.reasons)
    assert any("under ceiling" in r for r in result.reasons)


def test_lower_bound_by_hand():
    # differences 1, 3, -1, 5: mean 2, se sqrt(20/3)/2; 95 %: z = 1.6449
    config = GateConfig(samples=4)
    bound = gain_lower_bound([2.0, 4.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0], config)
    assert config.z == pytest.approx(1.6449, abs=1e-4)
    assert bound == pytest.approx(2 - 1.6449 * math.sqrt(20 / 3) / 2, abs=1e-4)
    assert paired_standard_error([3.0, 5.0], [1.0, 3.0]) == 0.0  # the same gain on every pair: no noise
    assert gain_lower_bound([1.0], [0.0], config) == -math.inf
    with pytest.raises(ValueError, match="2 candidate scores but 1"):
        paired_standard_error([1.0, 2.0], [0.0])


def test_never_below_the_base_or_the_best_version_so_far():
    incumbent = [0.0] * 32
    candidate = [0.3] * 32
    result = gate_decision(
        evaluation(candidate), evaluation(incumbent), CONFIG, floors={"base": [0.2] * 32, "v0003": [1.0] * 32}
    )
    assert not result.promote
    assert any("not shown within the margin of v0003" in r for r in result.reasons)
    assert not any("margin of base" in r for r in result.reasons)
    assert result.drifted and any("over v0003 -0.7000 < 0: worse" in r for r in result.reasons)
    assert result.metrics["gain_lower_bound_v0003"] == pytest.approx(-0.7)


def test_too_few_pairs_or_unpaired_scores_fail():
    few = gate_decision(evaluation([1.0] * 8), evaluation([0.0] * 8), CONFIG)
    assert not few.promote and any("fewer than 32" in r for r in few.reasons)
    unpaired = gate_decision(evaluation([1.0] * 32), evaluation([0.0] * 31), CONFIG)
    assert not unpaired.promote and any("31 scores of incumbent" in r for r in unpaired.reasons)


BETTER, INCUMBENT = [0.9] * 32, [0.3] * 32


@pytest.mark.parametrize(
    ("candidate", "incumbent", "live", "why"),
    [
        (evaluation([0.2] * 32), evaluation(INCUMBENT), None, "does not beat"),
        # gain 0.03 < min_reward_gain, and not sure (pairs differ by +0.23 / -0.17)
        (
            evaluation([0.3 + 0.03 + (0.2 if i % 2 else -0.2) for i in range(32)]),
            evaluation(INCUMBENT),
            None,
            "does not beat",
        ),
        (evaluation(BETTER, kl=2.0), evaluation(INCUMBENT), None, "not under ceiling"),
        (evaluation(BETTER, kl=math.nan), evaluation(INCUMBENT), None, "not finite"),
        ({**evaluation(BETTER), "reward_mean": math.inf}, evaluation(INCUMBENT), None, "not finite"),
        (evaluation(BETTER, kl=0.1), evaluation(INCUMBENT), (0.4, 25), "live win-rate 0.400 < 0.5"),
    ],
)
def test_worse_candidates_are_rejected_with_the_reason(candidate, incumbent, live, why):
    result = gate_decision(candidate, incumbent, CONFIG, live_win_rate=live)
    assert not result.promote
    assert any(why in reason for reason in result.reasons), result.reasons


@pytest.mark.parametrize(
    ("candidate", "live", "drifted"),
    [
        # gain 0.03, not surely above 0 (pairs differ by +0.23 / -0.17): not yet better, keeps training
        (evaluation([0.33 + (0.2 if i % 2 else -0.2) for i in range(32)]), None, False),
        (evaluation(BETTER, kl=0.1), None, False),  # promoted
        (evaluation([0.0] * 32), None, True),  # surely worse than the incumbent (by 0.3, no noise)
        (evaluation(BETTER, kl=2.0), None, True),  # past the KL ceiling
        (evaluation(BETTER, kl=math.nan), None, True),
        (evaluation(BETTER, kl=0.1), (0.4, 25), True),  # lost the live comparisons
    ],
)
def test_only_a_worse_or_runaway_candidate_is_drifted(candidate, live, drifted):
    """The restart rule's input: a rejection for not yet beating the incumbent is not drift."""
    result = gate_decision(candidate, evaluation(INCUMBENT), CONFIG, live_win_rate=live)
    assert result.drifted is drifted, result.reasons
    assert not (result.promote and result.drifted)


def wobbly(mean: float) -> dict:
    """32 pairs of mean ``mean`` that differ from ``INCUMBENT`` by ±0.2 in turn: no sure gain or loss."""
    return evaluation([mean + (0.2 if i % 2 else -0.2) for i in range(32)])


def test_an_open_decision_with_a_positive_gain_is_worth_more_samples():
    open_gain = gate_decision(wobbly(0.33), evaluation(INCUMBENT), CONFIG)
    assert not open_gain.promote and not open_gain.drifted
    assert worth_more_samples(open_gain, CONFIG, 32)
    assert not worth_more_samples(open_gain, CONFIG, CONFIG.max_samples)  # extended already
    assert not worth_more_samples(open_gain, replace(CONFIG, max_samples=32), 32)  # extension off
    open_loss = gate_decision(wobbly(0.27), evaluation(INCUMBENT), CONFIG)
    assert not open_loss.drifted and not worth_more_samples(open_loss, CONFIG, 32)  # lost on average
    promoted = gate_decision(evaluation(BETTER, kl=0.1), evaluation(INCUMBENT), CONFIG)
    assert promoted.promote and not worth_more_samples(promoted, CONFIG, 32)
    worse = gate_decision(evaluation([0.0] * 32), evaluation(INCUMBENT), CONFIG)
    assert worse.drifted and not worth_more_samples(worse, CONFIG, 32)


def test_merged_evaluations_by_hand():
    first = {
        "kl": 2.0,
        "eos_rate": 1.0,
        "length_mean": 10.0,
        "n": 2.0,
        "scores": [0.0, 2.0],
        "duration_s": 1.0,
    }
    second = {"kl": 5.0, "eos_rate": 0.0, "length_mean": 4.0, "n": 1.0, "scores": [4.0], "duration_s": 2.0}
    merged = merge_evaluations(first, second)
    assert merged["scores"] == [0.0, 2.0, 4.0] and merged["n"] == 3.0 and merged["duration_s"] == 3.0
    assert merged["reward_mean"] == pytest.approx(2.0) and merged["reward_std"] == pytest.approx(2.0)
    assert merged["kl"] == pytest.approx(3.0)  # (2 * 2 + 5) / 3
    assert merged["eos_rate"] == pytest.approx(2 / 3) and merged["length_mean"] == pytest.approx(8.0)


def test_live_win_rate_counts_only_with_enough_pairs():
    better, incumbent = evaluation(BETTER, kl=0.1), evaluation(INCUMBENT)
    few = gate_decision(better, incumbent, CONFIG, live_win_rate=(0.1, 3))
    assert few.promote and any("not checked" in r for r in few.reasons) and few.metrics["live_pairs"] == 3
    good = gate_decision(better, incumbent, CONFIG, live_win_rate=(0.6, 30))
    assert good.promote and good.metrics["live_win_rate"] == 0.6


def test_gate_config_refuses_nonsense():
    with pytest.raises(ValueError, match="kl_ceiling"):
        GateConfig(kl_ceiling=0)
    with pytest.raises(ValueError, match="margin"):
        GateConfig(margin=-1)
    with pytest.raises(ValueError, match="confidence"):
        GateConfig(confidence=1.0)
    with pytest.raises(ValueError, match="samples"):
        GateConfig(samples=1)
    with pytest.raises(ValueError, match="max_samples"):
        GateConfig(samples=64, max_samples=32)
    with pytest.raises(ValueError, match="min_win_rate"):
        GateConfig(min_win_rate=1.5)


def _policy_events(client):
    return [PolicyEvent.from_fields(f) for _, f in client.xrange(stream_key(Stream.policies, PREFIX))]


def test_publish_promotes_and_rejected_never_becomes_current(redis_server, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = redis_server.client()
    registry = Registry(tmp_path / "registry", redis=redis_server.client("learner"), prefix=PREFIX)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    good = GateResult(promote=True, reasons=["reward up"], metrics={"candidate_reward_mean": 1.0})
    bad = GateResult(promote=False, reasons=["reward down"], metrics={"candidate_reward_mean": -1.0})

    publish_candidate(registry, "v0001", model, tokenizer, good, parent=None, base_model="tiny")
    assert registry.current() == "v0001"

    manifest = publish_candidate(registry, "v0002", model, tokenizer, bad, parent="v0001")
    assert manifest.status == PolicyStatus.rejected and "reward down" in manifest.reason
    assert registry.current() == "v0001"
    assert registry.manifest("v0002").metrics == {"candidate_reward_mean": -1.0}

    # Publishing again (a learner restarted half-way through) changes nothing and fails on nothing.
    publish_candidate(registry, "v0002", model, tokenizer, bad, parent="v0001")
    publish_candidate(registry, "v0001", model, tokenizer, good, parent=None)
    assert registry.current() == "v0001"

    events = [(e.version, e.status) for e in _policy_events(client)]
    assert events == [
        ("v0001", PolicyStatus.candidate),
        ("v0001", PolicyStatus.promoted),
        ("v0002", PolicyStatus.candidate),
        ("v0002", PolicyStatus.rejected),
    ]
    assert _policy_events(client)[3].metrics == {"candidate_reward_mean": -1.0}
    client.close()


# ---- a genuinely worse candidate: real tiny policies scored by a trained reward model ---------------

GOOD = "Sure, here is a careful answer."
BAD = "no no no no no"
PROMPTS = [f"Please explain topic {i}." for i in range(4)]


def _teach(model_dir, tokenizer, response: str, steps: int = 25):
    """A tiny policy fine-tuned to answer every prompt with ``response`` (then EOS)."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.utils import encode_sequence

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sequences = [torch.tensor([encode_sequence(tokenizer, p, response, 64)]) for p in PROMPTS]
    for _ in range(steps):
        for ids in sequences:
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_gate_on_real_models_rejects_the_worse_policy_and_keeps_the_incumbent(
    redis_server, tmp_path, tiny_model_dir
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructloop.events import ComparisonEvent
    from learner.config import EvalConfig, RewardConfig
    from learner.evaluate import evaluate_policy
    from learner.reward import build_reward_model, train_reward_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    comparisons = [
        ComparisonEvent(prompt=p, responses=[BAD, GOOD], ranking=[[1], [0]], labeler_id="l") for p in PROMPTS
    ]
    reward_model = build_reward_model(str(tiny_model_dir))
    stats = train_reward_model(
        reward_model,
        tokenizer,
        comparisons * 4,
        RewardConfig(
            lr=3e-3, epochs=3, rankings_per_batch=4, max_length=64, single_pass_above=len(comparisons) * 4
        ),
        comparisons,
    )
    assert stats["heldout_accuracy"] == 1.0
    good, bad = _teach(tiny_model_dir, tokenizer, GOOD), _teach(tiny_model_dir, tokenizer, BAD)

    config = EvalConfig(max_new_tokens=12, batch_size=8, max_prompt_tokens=64)  # sampled, seeded per batch
    pairs = [p for p in PROMPTS for _ in range(8)]  # 32 (prompt, seed) pairs, as the learner's gate
    evaluations = {
        name: evaluate_policy(policy, reference, reward_model, tokenizer, pairs, config)
        for name, policy in (("reference", reference), ("good", good), ("bad", bad))
    }
    assert evaluations["good"]["reward_mean"] > evaluations["bad"]["reward_mean"]
    gate = GateConfig(kl_ceiling=1000.0)

    same = evaluate_policy(reference, reference, reward_model, tokenizer, pairs, config)
    assert same["scores"] == evaluations["reference"]["scores"]  # the same seeds draw the same answers
    identical = gate_decision(same, evaluations["reference"], gate)
    assert not identical.promote and "does not beat" in identical.reasons[0]

    client = redis_server.client()
    registry = Registry(tmp_path / "registry", redis=redis_server.client("learner"), prefix=PREFIX)
    assert len(evaluations["good"]["scores"]) == len(pairs)
    first = gate_decision(evaluations["good"], evaluations["reference"], gate)
    assert first.promote, first.reasons
    publish_candidate(registry, "v0001", good, tokenizer, first, parent=None)

    worse = gate_decision(evaluations["bad"], evaluations["good"], gate)
    assert not worse.promote and "does not beat" in worse.reasons[0]
    publish_candidate(registry, "v0002", bad, tokenizer, worse, parent="v0001")

    assert registry.current() == "v0001"
    assert registry.manifest("v0002").status == PolicyStatus.rejected
    rejected = [e for e in _policy_events(client) if e.status == PolicyStatus.rejected]
    assert [e.version for e in rejected] == ["v0002"]
    assert rejected[0].metrics["reward_gain"] < 0 and "does not beat" in rejected[0].reason
    client.close()
