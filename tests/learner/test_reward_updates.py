"""The learner's RM updates on a tiny model: replay, normalisation on reference samples, a worse update
refused, and PPO held back until the RM is confidently better than chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from instructloop.streams import Stream
from learner.config import RewardConfig
from learner.loop import Learner
from learner.reward import reward_normalisation, reward_scores
from learner.settings import Settings
from tests.learner.helpers import PTX_TEXT, TINY_REWARD, comparison, completion, learner_env, xadd


@pytest.fixture
def ptx_corpus(tmp_path) -> Path:
    path = tmp_path / "ptx.txt"
    path.write_text(PTX_TEXT)
    return path


def push(client, first: int, n: int) -> None:
    for i in range(first, first + n):
        xadd(client, Stream.comparisons, comparison(i))
        xadd(client, Stream.completions, completion(i))


def test_updates_replay_older_rankings_normalise_on_reference_samples_and_refuse_a_worse_one(
    redis_server, tmp_path, tiny_model_dir, ptx_corpus, monkeypatch
):
    reward = {
        **TINY_REWARD,
        "epochs": 2,
        "single_pass_above": 1000,
        "lr": 3e-3,
        "replay_ratio": 1.0,
        "max_new_per_update": 1000,
    }
    env = learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        ptx_corpus,
        min_prompts=1000,  # no PPO round: this test is about the RM
        reward=json.dumps(reward),
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    learner = Learner(Settings(), progress=False)
    learner.start()
    client = redis_server.client("learner")
    try:
        # 1. the first update: no previous RM to compare with; normalised on the reference's samples
        push(client, 0, 24)
        learner.ingest()
        first_new = learner.dataset.count_new_comparisons(learner.state.rm_cursor)
        stats = learner.maybe_update_reward_model()
        assert stats is not None and stats["rankings"] == 2 * first_new  # nothing older to replay
        assert learner.state.rm_updates == 1 and learner.state.rm_heldout_pairs == stats["heldout_pairs"] > 0
        model = learner.reward_model
        assert reward_normalisation(model) == pytest.approx((stats["gain"], stats["bias"]))
        prompts, responses = learner._normalisation_samples()  # kept: the same samples again
        assert len(prompts) == len(responses) >= 8
        scores = reward_scores(model, learner.tokenizer, prompts, responses, max_length=64)
        assert scores.mean().item() == pytest.approx(0.0, abs=1e-3)
        assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
        gauges = learner.metrics.reward_normalisation
        assert gauges.labels("gain")._value.get() == pytest.approx(stats["gain"])

        # 2. the training prompts ranked again the other way round, three times over: trained with as many
        # older rankings replayed, the update's held-out loss is worse, so it is not used and the previous
        # RM's weights are back
        trained = [s.comparison for s in learner.dataset.comparisons(heldout=False)]
        for repeat in range(3):
            for j, old in enumerate(trained):
                flipped = old.model_copy(update={"event_id": f"flip-{repeat}-{j}", "ranking": [[1], [0]]})
                xadd(client, Stream.comparisons, flipped)
        learner.ingest()
        new = learner.dataset.count_new_comparisons(learner.state.rm_cursor)
        assert new == 3 * first_new
        probe = [comparison(i).responses[0] for i in range(4)]
        probe_prompts = [comparison(i).prompt for i in range(4)]
        before = reward_scores(model, learner.tokenizer, probe_prompts, probe)
        cursor = learner.dataset.max_comparison_seq()
        stats = learner.maybe_update_reward_model()
        assert stats["rankings"] == 2 * (new + min(new, first_new))  # 2 passes over new + replayed
        tolerance = RewardConfig().refuse_tolerance
        assert stats["refused"] == 1.0
        assert stats["heldout_loss"] > stats["previous_heldout_loss"] + tolerance
        assert learner.state.rm_updates == 1 and learner.state.rm_updates_refused == 1
        assert learner.state.rm_cursor == cursor  # the rankings stay in the replay pool, not retried as new
        assert learner.metrics.rm_updates_refused._value.get() == 1.0
        assert learner.state.history[-1]["kind"] == "reward_refused"
        with torch.no_grad():
            assert_close(reward_scores(model, learner.tokenizer, probe_prompts, probe), before)
    finally:
        learner.close()
        client.close()


def test_ppo_waits_until_the_rm_is_confidently_better_than_chance(
    redis_server, tmp_path, tiny_model_dir, ptx_corpus, monkeypatch
):
    env = learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        ptx_corpus,
        min_prompts=8,
        reward=json.dumps({**TINY_REWARD, "ready_confidence": 0.95}),
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    learner = Learner(Settings(), progress=False)
    learner.start()
    client = redis_server.client("learner")
    try:
        push(client, 0, 24)
        learner.ingest()
        assert learner.maybe_update_reward_model() is not None
        # a coin-flip RM: 0.6 on 10 held-out pairs is not confidently above chance
        learner.state.rm_heldout_accuracy, learner.state.rm_heldout_pairs = 0.6, 10.0
        assert not learner.ppo_round_due()
        waits = [w for w in learner.waiting() if w.step == "ppo"]
        assert len(waits) == 1 and "confidently better than chance" in waits[0].message
        assert "0.600 on 10 pairs" in waits[0].message and "INSTRUCTLOOP_LEARNER_REWARD" == waits[0].knob
        # the same accuracy on 200 pairs is
        learner.state.rm_heldout_pairs = 200.0
        assert learner.ppo_round_due() and learner.rm_ready()[0]
        assert not [w for w in learner.waiting() if w.step == "ppo"]
    finally:
        learner.close()
        client.close()
