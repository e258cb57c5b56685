"""The promotion gate (pure decision) and publishing to the registry (real redis-server, real tiny models)."""

from __future__ import annotations

import math

import pytest
import redis as redis_lib

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from learner.gate import GateConfig, GateResult, gate_decision, paired_standard_error
from learner.publish import publish_candidate
from tests.learner.helpers import (
    PREFIX,
)

CONFIG = GateConfig(min_reward_gain=0.05, kl_ceiling=2.0, min_live_comparisons=10, min_win_rate=0.5)


def test_better_candidate_under_the_kl_ceiling_is_promoted():
    result = gate_decision({"reward_mean": 0.40, "kl": 1.2}, {"reward_mean": 0.30, "kl": 0.0}, CONFIG)
    assert result.promote
    assert result.metrics["reward_gain"] == pytest.approx(0.10)
    assert result.metrics["candidate_kl"] == 1.2 and result.metrics["incumbent_reward_mean"] == 0.30
    assert any("gain 0.1000 > 0.05" in r for r in result.reasons) and any(
        "under ceiling" in r for r in result.reasons
    )


def test_paired_standard_error_by_hand():
    # differences 1, 3, -1, 5: mean 2, sample variance ((-1)^2 + 1^2 + (-3)^2 + 3^2) / 3 = 20/3, se sqrt(20/3)/2
    assert paired_standard_error([2.0, 4.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(
        math.sqrt(20 / 3) / 2
    )
    assert paired_standard_error([3.0, 5.0], [1.0, 3.0]) == 0.0  # the same gain on every prompt: no noise
    assert paired_standard_error([1.0], [0.0]) == 0.0
    with pytest.raises(ValueError, match="2 candidate scores but 1"):
        paired_standard_error([1.0, 2.0], [0.0])


def test_a_shortfall_within_the_noise_passes_and_one_beyond_it_is_rejected():
    config = GateConfig(min_reward_gain=0.0, reward_tolerance_se=1.0)
    incumbent = {"reward_mean": 7.46, "kl": 0.0}
    close = gate_decision({"reward_mean": 7.36, "kl": 1.0}, incumbent, config, reward_gain_se=1.5)
    assert close.promote, close.reasons
    assert (
        close.metrics["reward_gain_needed"] == pytest.approx(-1.5) and close.metrics["reward_gain_se"] == 1.5
    )
    assert "less 1.0 × standard error 1.5000" in close.reasons[0]
    worse = gate_decision({"reward_mean": 5.0, "kl": 1.0}, incumbent, config, reward_gain_se=1.5)
    assert not worse.promote and "does not beat" in worse.reasons[0]
    strict = gate_decision(
        {"reward_mean": 7.36, "kl": 1.0}, incumbent, GateConfig(reward_tolerance_se=0.0), reward_gain_se=1.5
    )
    assert not strict.promote  # tolerance 0: the gain itself must clear the margin
    margin = gate_decision(
        {"reward_mean": 8.0, "kl": 1.0}, incumbent, GateConfig(min_reward_gain=2.0), reward_gain_se=1.0
    )
    assert not margin.promote and margin.metrics["reward_gain_needed"] == pytest.approx(1.0)
    unknown = gate_decision({"reward_mean": 7.36, "kl": 1.0}, incumbent, config, reward_gain_se=math.nan)
    assert not unknown.promote  # a noise estimate that is not a number fails closed


@pytest.mark.parametrize(
    ("candidate", "incumbent", "live", "why"),
    [
        ({"reward_mean": 0.20, "kl": 0.5}, {"reward_mean": 0.30, "kl": 0.0}, None, "does not beat"),
        (
            {"reward_mean": 0.33, "kl": 0.5},
            {"reward_mean": 0.30, "kl": 0.0},
            None,
            "does not beat",
        ),  # gain < margin
        ({"reward_mean": 0.90, "kl": 2.0}, {"reward_mean": 0.30, "kl": 0.0}, None, "not under ceiling"),
        ({"reward_mean": 0.90, "kl": math.nan}, {"reward_mean": 0.30, "kl": 0.0}, None, "not finite"),
        ({"reward_mean": math.inf, "kl": 0.1}, {"reward_mean": 0.30, "kl": 0.0}, None, "not finite"),
        (
            {"reward_mean": 0.90, "kl": 0.1},
            {"reward_mean": 0.30, "kl": 0.0},
            (0.4, 25),
            "live win-rate 0.400 < 0.5",
        ),
    ],
)
def test_worse_candidates_are_rejected_with_the_reason(candidate, incumbent, live, why):
    result = gate_decision(candidate, incumbent, CONFIG, live_win_rate=live)
    assert not result.promote
    assert any(why in reason for reason in result.reasons), result.reasons


def test_live_win_rate_counts_only_with_enough_pairs():
    better = {"reward_mean": 0.9, "kl": 0.1}
    incumbent = {"reward_mean": 0.3, "kl": 0.0}
    few = gate_decision(better, incumbent, CONFIG, live_win_rate=(0.1, 3))
    assert few.promote and any("not checked" in r for r in few.reasons) and few.metrics["live_pairs"] == 3
    good = gate_decision(better, incumbent, CONFIG, live_win_rate=(0.6, 30))
    assert good.promote and good.metrics["live_win_rate"] == 0.6


def test_gate_config_refuses_nonsense():
    with pytest.raises(ValueError, match="kl_ceiling"):
        GateConfig(kl_ceiling=0)
    with pytest.raises(ValueError, match="reward_tolerance_se"):
        GateConfig(reward_tolerance_se=-1)
    with pytest.raises(ValueError, match="min_win_rate"):
        GateConfig(min_win_rate=1.5)


def _policy_events(client):
    return [PolicyEvent.from_fields(f) for _, f in client.xrange(stream_key(Stream.policies, PREFIX))]


def test_publish_promotes_and_rejected_never_becomes_current(redis_server, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = redis_lib.Redis.from_url(redis_server.url)
    registry = Registry(tmp_path / "registry", redis=client, prefix=PREFIX)
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

    config = EvalConfig(max_new_tokens=12, batch_size=4, max_prompt_tokens=64)
    evaluations = {
        name: evaluate_policy(policy, reference, reward_model, tokenizer, PROMPTS, config)
        for name, policy in (("reference", reference), ("good", good), ("bad", bad))
    }
    assert evaluations["good"]["reward_mean"] > evaluations["bad"]["reward_mean"]
    gate = GateConfig(min_reward_gain=0.0, kl_ceiling=1000.0)

    client = redis_lib.Redis.from_url(redis_server.url)
    registry = Registry(tmp_path / "registry", redis=client, prefix=PREFIX)
    assert len(evaluations["good"]["scores"]) == len(PROMPTS)
    assert sum(evaluations["good"]["scores"]) / len(PROMPTS) == pytest.approx(
        evaluations["good"]["reward_mean"]
    )
    first = gate_decision(
        evaluations["good"],
        evaluations["reference"],
        gate,
        reward_gain_se=paired_standard_error(
            evaluations["good"]["scores"], evaluations["reference"]["scores"]
        ),
    )
    assert first.promote, first.reasons
    publish_candidate(registry, "v0001", good, tokenizer, first, parent=None)

    worse = gate_decision(
        evaluations["bad"],
        evaluations["good"],
        gate,
        reward_gain_se=paired_standard_error(evaluations["bad"]["scores"], evaluations["good"]["scores"]),
    )
    assert not worse.promote and "does not beat" in worse.reasons[0]
    publish_candidate(registry, "v0002", bad, tokenizer, worse, parent="v0001")

    assert registry.current() == "v0001"
    assert registry.manifest("v0002").status == PolicyStatus.rejected
    rejected = [e for e in _policy_events(client) if e.status == PolicyStatus.rejected]
    assert [e.version for e in rejected] == ["v0002"]
    assert rejected[0].metrics["reward_gain"] < 0 and "does not beat" in rejected[0].reason
    client.close()
