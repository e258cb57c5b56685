"""Rounds the gate can judge, and no more of them than the data supports: the held-out minimum, the wait
for held-out prompts, the bound on rounds per reward model, the restart after rejections, β's horizon."""

from __future__ import annotations

import pytest

from instructloop.streams import Stream
from learner.config import PPOConfig
from learner.dataset import Dataset, IngestedEntry, is_heldout
from learner.loop import Learner
from learner.metrics import LearnerMetrics
from learner.ppo import PPOPtxTrainer
from learner.settings import Settings
from tests.learner.helpers import PTX_TEXT, comparison, completion, learner_env, xadd


def unlucky_prompts(n: int) -> list[str]:
    """``n`` prompts none of which the 10 % hash share holds out (16 such prompts: 18 % of 16-prompt sets)."""
    prompts = (f"Unlucky question {i}: name a colour." for i in range(10_000))
    return [p for p in prompts if not is_heldout(p, 0.1)][:n]


@pytest.fixture
def settings_env(redis_server, tmp_path, tiny_model_dir, monkeypatch):
    corpus = tmp_path / "ptx.txt"
    corpus.write_text(PTX_TEXT)

    def apply(**overrides) -> None:
        env = learner_env(
            redis_server.url_for("learner"),
            tiny_model_dir,
            tmp_path / "state",
            tmp_path / "registry",
            corpus,
            **{"heldout_fraction": 0.1, "min_prompts": 4, "min_rm_comparisons": 8, **overrides},
        )
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return apply


def feed(client, prompts: list[str], offset: int = 0, comparisons: int = 16) -> None:
    for i in range(comparisons):
        xadd(client, Stream.comparisons, comparison(offset + i, prompt=prompts[i % len(prompts)]))
    for i, prompt in enumerate(prompts):
        xadd(client, Stream.completions, completion(offset + i, prompt=prompt))


def test_the_split_holds_out_a_minimum_however_the_hash_falls(tmp_path):
    prompts = unlucky_prompts(40)
    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.1, heldout_min_prompts=4)
    held: list[set[str]] = []
    for n, prompt in enumerate(prompts, start=1):
        dataset.add([IngestedEntry("completions", f"{n}-0", completion(n, prompt=prompt))])
        held.append({q.text for q in dataset.heldout_queries(100)})
        assert len(held[-1]) == min(4, n // 4) == dataset.count_split_prompts(heldout=True)
        assert dataset.count_prompts(heldout=True) + dataset.count_prompts() == n
    for n in range(1, 40):  # a prompt never changes split: nothing trained on becomes held out, or back
        assert held[n - 1] <= held[n] and held[n] - held[n - 1] <= {prompts[n]}
    again = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.1, heldout_min_prompts=4)  # after a restart
    assert {q.text for q in again.heldout_queries(100)} == held[-1]
    again.add([IngestedEntry("comparisons", "99-0", comparison(99, prompt=sorted(held[-1])[0]))])
    assert len(again.comparisons(heldout=True)) == 1  # a held-out prompt ranked later stays held out
    assert not any(is_heldout(p, 0.1) for p in held[-1])  # the 10 % share alone held out none of them


def test_prompt_sets_whose_hash_split_is_empty_still_promote(redis_server, settings_env):
    """16 prompts, none in the 10 % hash share (the issue's case: 7 candidates rejected, "no held-out
    prompts"): the split holds 4 out, the gate judges on them, and a candidate that passes is promoted."""
    settings_env(gate_min_reward_gain=-1e9, gate_margin=1e9)
    client = redis_server.client("learner")
    learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
    try:
        feed(client, unlucky_prompts(16), comparisons=24)
        report = learner.round()
        assert learner.dataset.count_split_prompts(heldout=True) == 4
        assert report.ppo is not None and report.gate is not None, learner.waiting()
        assert report.gate.promote, report.gate.reasons
        assert report.gate.metrics["candidate_n"] >= 32  # 4 prompts x 8 seeds
        assert learner.registry.current() == "v0001"
    finally:
        learner.close()
        client.close()


def test_ppo_waits_while_the_gate_has_too_few_heldout_prompts(redis_server, settings_env):
    settings_env()
    client = redis_server.client("learner")
    metrics = LearnerMetrics()
    learner = Learner(Settings(), metrics=metrics, progress=False)
    try:
        feed(client, unlucky_prompts(6), comparisons=16)  # 6 prompts: 1 held out, 5 for training
        report = learner.round()
        assert report.reward is not None and report.ppo is None and learner.state.ppo_rounds == 0
        [wait] = [w for w in learner.report_waiting() if w.knob.endswith("GATE_MIN_PROMPTS")]
        assert (wait.have, wait.need) == (1, 2) and "held-out prompts" in wait.message
        assert metrics.waiting.labels("gate", wait.knob)._value.get() == 1

        feed(client, unlucky_prompts(8), offset=100, comparisons=0)  # 8 prompts: 2 held out
        assert learner.round().ppo is not None
    finally:
        learner.close()
        client.close()


def test_rounds_per_reward_model_are_bounded_and_rejections_restart_from_the_incumbent(
    redis_server, settings_env
):
    """New prompts alone run at most max_rounds_per_rm_update rounds on one RM; after
    restart_after_rejections drifted rejections (here: past a KL ceiling of ~0) the working policy is the
    incumbent's again (here: the base)."""
    settings_env(
        max_rounds_per_rm_update=2, restart_after_rejections=2, gate_kl_ceiling=1e-9, training="full"
    )
    client = redis_server.client("learner")
    learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
    prompts = [f"Fresh prompt {i}: say something." for i in range(60)]
    try:
        feed(client, prompts[:16], comparisons=16)
        first = learner.round()
        assert first.ppo is not None and not first.gate.promote and learner.state.consecutive_rejections == 1
        trained = {k: v.clone() for k, v in learner._ppo_trainer().policy.state_dict().items()}
        reference = learner.reference.state_dict()
        assert any(not v.equal(reference[k]) for k, v in trained.items())

        feed(client, prompts[16:32], offset=100, comparisons=0)  # new prompts, the same RM: round 2 of 2
        second = learner.round()
        assert second.ppo is not None and not second.gate.promote
        assert learner.state.history[-1]["kind"] == "restart" and learner.state.consecutive_rejections == 0
        restarted = learner._ppo_trainer().policy.state_dict()
        assert all(v.equal(reference[k]) for k, v in restarted.items())  # the incumbent is the base

        feed(client, prompts[32:48], offset=200, comparisons=0)  # more new prompts: round 3 must wait
        assert learner.round().ppo is None and learner.state.ppo_rounds == 2
        [wait] = [w for w in learner.waiting() if w.knob.endswith("MAX_ROUNDS_PER_RM_UPDATE")]
        assert (wait.have, wait.need) == (2, 2) and "next reward model update" in wait.message

        feed(client, prompts[:16], offset=300, comparisons=16)  # an RM update lifts the bound
        report = learner.round()
        assert report.reward is not None and report.ppo is not None and learner.state.ppo_rounds_on_rm == 1
    finally:
        learner.close()
        client.close()


def test_a_candidate_not_yet_better_keeps_training_without_a_restart(redis_server, settings_env):
    """A rejection only for not beating the incumbent (no check shows it worse) is not drift: with
    restart_after_rejections=1 the working policy still continues from the rejected candidate."""
    settings_env(
        restart_after_rejections=1,
        gate_min_reward_gain=1e9,  # no candidate beats the incumbent ...
        gate_sure_gain_suffices=False,
        gate_margin=1e9,  # ... and none is shown worse
        training="full",
    )
    client = redis_server.client("learner")
    learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
    try:
        feed(client, [f"Fresh prompt {i}: say something." for i in range(16)], comparisons=16)
        report = learner.round()
        assert report.ppo is not None and not report.gate.promote and not report.gate.drifted
        assert any("does not beat" in reason for reason in report.gate.reasons)
        assert learner.state.consecutive_rejections == 0
        assert not any(entry["kind"] == "restart" for entry in learner.state.history)
        reference = learner.reference.state_dict()
        kept = learner._ppo_trainer().policy.state_dict()
        assert any(not v.equal(reference[k]) for k, v in kept.items())  # the rejected weights, not the base
    finally:
        learner.close()
        client.close()


def test_an_open_gate_samples_more_pairs_and_decides_on_all_of_them(redis_server, settings_env, monkeypatch):
    """When the first pairs leave the decision open (forced here: whether a tiny model's candidate gains is
    chance), every version is sampled on gate_max_samples - gate_samples more pairs with other seeds, and
    the decision is taken on all of them."""
    import learner.gating

    settings_env(gate_samples=8, gate_max_samples=20, training="full")
    calls = []

    def open_once(result, config, pairs):
        calls.append(pairs)
        return len(calls) == 1

    monkeypatch.setattr(learner.gating, "worth_more_samples", open_once)
    client = redis_server.client("learner")
    learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
    try:
        feed(client, [f"Fresh prompt {i}: say something." for i in range(16)], comparisons=16)
        report = learner.round()
        first_pairs = calls[0]
        assert report.ppo is not None and first_pairs >= 8
        metrics = report.gate.metrics
        assert metrics["gate_extended"] == 1.0 and metrics["gate_pairs"] == 20.0
        assert metrics["candidate_n"] == 20.0 and metrics["incumbent_n"] == 20.0
        assert any("over base" in reason or "over incumbent" in reason for reason in report.gate.reasons)
        # the extra pairs are other draws: the base's first and extra samples are both kept, under 2 seeds
        seeds = {key[3] for key in learner.models._samples_cache if key[0] == "base"}
        assert len(seeds) == 2
    finally:
        learner.close()
        client.close()


def test_the_adaptive_kl_horizon_is_in_rounds(tiny_model_dir, tokenizer):
    """β moves by at most 0.2 / kl_horizon per round, whatever the round's size."""
    from transformers import AutoModelForCausalLM

    from learner.reward import build_reward_model

    config = PPOConfig(
        rollout_batch_size=8,
        mini_batch_size=4,
        max_new_tokens=6,
        max_prompt_tokens=32,
        adaptive_kl=True,
        kl_coef=0.1,
        kl_target=1e6,
        kl_horizon=10,
        ptx_coef=0.0,
        ptx_eval_windows=0,
        lr=1e-3,
    )
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    value = build_reward_model(str(tiny_model_dir))
    reward = build_reward_model(str(tiny_model_dir)).eval()
    trainer = PPOPtxTrainer(policy, reference, value, reward, tokenizer, config, None, progress=False)
    trainer.round([f"Prompt {i}" for i in range(8)])
    # KL far below its target: -20 % / 10 for the round (8 rollouts as 8 steps would give -16 %)
    assert trainer.kl_controller.value == pytest.approx(0.1 * 0.98)
