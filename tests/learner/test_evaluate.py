"""evaluate_policy: KL is 0 for policy == reference, greedy evaluation is deterministic, numbers are sane."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.config import EvalConfig
from learner.evaluate import evaluate_policy
from learner.reward import build_reward_model
from tests.conftest import build_tiny_model_dir

PROMPTS = ["Say hello.", "What is the capital of France?", "Write a haiku about rain.", "Count to three."]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reward_model = build_reward_model(
        str(build_tiny_model_dir(tmp_path_factory.mktemp("eval-rm"), tokenizer, seed=2))
    )
    return policy, reward_model


def test_kl_is_zero_for_the_reference_itself(models, tokenizer):
    policy, reward_model = models
    config = EvalConfig(max_new_tokens=8, batch_size=3, max_prompt_tokens=64)
    same = evaluate_policy(policy, policy, reward_model, tokenizer, PROMPTS, config)
    copied = evaluate_policy(policy, copy.deepcopy(policy), reward_model, tokenizer, PROMPTS, config)
    assert same["kl"] == 0.0
    assert copied["kl"] == pytest.approx(0.0, abs=1e-5)
    assert same["n"] == 4 and 1 <= same["length_mean"] <= 8 and 0 <= same["eos_rate"] <= 1
    assert same["reward_mean"] == pytest.approx(copied["reward_mean"])  # greedy: deterministic


def test_a_different_policy_has_positive_kl_and_sampling_is_seeded(models, tokenizer):
    policy, reward_model = models
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = EvalConfig(
        max_new_tokens=8, do_sample=True, temperature=1.0, batch_size=4, max_prompt_tokens=64, seed=5
    )
    first = evaluate_policy(other, policy, reward_model, tokenizer, PROMPTS, config)
    second = evaluate_policy(other, policy, reward_model, tokenizer, PROMPTS, config)
    assert first["kl"] > 0.0
    assert first == {**second, "duration_s": first["duration_s"]}
    with pytest.raises(ValueError):
        evaluate_policy(other, policy, reward_model, tokenizer, [], config)
