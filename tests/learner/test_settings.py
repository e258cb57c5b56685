"""The learner's config is resolved in one place, with explicit precedence, and logged in full at start."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from learner.config import AdapterConfig, PPOConfig, RewardConfig
from learner.gate import GateConfig
from learner.loop import Learner
from learner.settings import Settings, resolve_learner_config
from tests.learner.helpers import PREFIX


def test_every_gate_default_is_gate_configs():
    assert resolve_learner_config(Settings()).gate == GateConfig()


def test_lora_rates_flat_knobs_and_json_overrides_resolve_in_one_order():
    lora = resolve_learner_config(Settings(training="lora", kl_coef=0.05, seed=3))
    assert lora.ppo.lr == AdapterConfig.ppo_lr and lora.reward.lr == AdapterConfig.reward_lr
    assert (lora.ppo.kl_coef, lora.ppo.seed, lora.evaluation.seed) == (0.05, 3, 3)
    full = resolve_learner_config(Settings(training="full"))
    assert full.ppo.lr == PPOConfig.lr and full.reward.lr == RewardConfig.lr and full.adapters is None
    chosen = resolve_learner_config(Settings(training="lora", ppo={"lr": 1e-5}, adapters={"ppo_lr": 1e-3}))
    assert chosen.ppo.lr == 1e-5  # an lr set in the PPO JSON is used as given, in either mode


@pytest.mark.parametrize("name", ["kl_coef", "ptx_coef"])
def test_a_flat_knob_is_not_set_again_in_json(name):
    with pytest.raises(ValidationError, match=f"INSTRUCTLOOP_LEARNER_{name.upper()} instead"):
        Settings(ppo={name: 0.5})


def test_gate_min_prompts_cannot_exceed_what_the_split_guarantees():
    with pytest.raises(ValidationError, match="GATE_MIN_PROMPTS"):
        Settings(heldout_min_prompts=2, gate_min_prompts=3)


def test_the_gate_cannot_extend_to_fewer_pairs_than_it_starts_with():
    with pytest.raises(ValidationError, match="GATE_MAX_SAMPLES"):
        Settings(gate_samples=64, gate_max_samples=32)
    assert resolve_learner_config(Settings(gate_samples=64, gate_max_samples=64)).gate.max_samples == 64


def test_bad_json_values_are_refused_before_anything_starts(redis_server, tmp_path):
    settings = Settings(
        redis_url=redis_server.url_for("learner"), state_dir=tmp_path, ppo={"mini_batch_size": 3}
    )
    with pytest.raises(ValueError, match="mini_batch_size"):
        Learner(settings, progress=False)


def test_learner_started_logs_the_resolved_config(redis_server, tmp_path, caplog):
    settings = Settings(
        redis_url=redis_server.url_for("learner"),
        stream_prefix=PREFIX,
        state_dir=tmp_path / "state",
        registry_dir=tmp_path / "reg",
        metrics_port=0,
    )
    learner = Learner(settings, progress=False)
    try:
        with caplog.at_level(logging.INFO, logger="learner.loop"):
            learner.start()
        [started] = [r for r in caplog.records if r.getMessage() == "learner started"]
        assert started.config["ppo"]["lr"] == AdapterConfig.ppo_lr
        assert started.config["gate"]["samples"] == GateConfig.samples
        assert started.settings["heldout_min_prompts"] == settings.heldout_min_prompts
    finally:
        learner.close()
