"""Admin decisions bind the learner (learner/admin.py), and a waiting learner says why (learner/waiting.py).

In process on a tiny model with real Redis: a pinned current version is never replaced (the candidate that
passes the gate is recorded ``held_back``); after an admin rollback the working policy restarts from the
version rolled back to (its weights equal that version's, not the line the admin rejected)."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import ADAPTER_WEIGHTS, Registry
from instructloop.streams import Stream, stream_key
from learner.cli import app
from learner.loop import Learner
from learner.metrics import LearnerMetrics
from learner.settings import Settings
from tests.conftest import free_port
from tests.learner.helpers import PREFIX, PTX_TEXT, comparison, completion, learner_env, xadd


@pytest.fixture
def learner_settings(redis_server, tmp_path, tiny_model_dir, monkeypatch):
    corpus = tmp_path / "ptx.txt"
    corpus.write_text(PTX_TEXT)
    # the gate always passes: these tests are about what happens to a candidate that passed it
    env = learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        corpus,
        gate_min_reward_gain=-1e9,
        gate_margin=1e9,
        min_new_comparisons=8,
        min_prompts=8,
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def push(client, n: int, offset: int) -> None:
    for i in range(offset, offset + n):
        xadd(client, Stream.comparisons, comparison(i))
        xadd(client, Stream.completions, completion(i))


def policy_weights(learner) -> dict[str, torch.Tensor]:
    """The trained weights of the working policy: its LoRA tensors (lora) or its state dict (full)."""
    if learner.settings.training == "lora":
        return learner.models.adapter_base.state_of("policy")
    return {name: t.detach() for name, t in learner._ppo_trainer().policy.state_dict().items()}


def version_weights(registry: Registry, version: str) -> dict[str, torch.Tensor]:
    folder = registry.version_dir(version)
    if (folder / ADAPTER_WEIGHTS).exists():
        return load_file(str(folder / ADAPTER_WEIGHTS))
    return registry.load_state_dict(version)


def weights_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    shared = set(ours) & set(theirs)
    assert len(shared) >= len(theirs) // 2, (sorted(ours)[:3], sorted(theirs)[:3])
    return all(torch.equal(ours[name].cpu(), theirs[name].cpu()) for name in shared)


@pytest.mark.parametrize("training", ["lora", "full"])
def test_pin_holds_back_candidates_and_rollback_restarts_the_policy(
    redis_server, learner_settings, monkeypatch, training
):
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_TRAINING", training)
    client = redis_server.client()
    learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
    registry = Registry(learner.settings.registry_dir, redis=client, prefix=PREFIX)
    try:
        push(client, 24, 0)
        first = learner.round()
        assert first.gate is not None and first.gate.promote and registry.current() == "v0001"

        # an admin pins v0001: the next candidate passes the gate but is held back, v0001 stays current
        registry.set_current("v0001", status=PolicyStatus.pinned, reason="pinned by ada")
        push(client, 24, 100)
        second = learner.round()
        assert second.version == "v0002" and second.gate.held_back_by == "v0001" and not second.gate.promote
        assert registry.current() == "v0001"
        manifest = registry.manifest("v0002")
        assert manifest.status == PolicyStatus.held_back and "v0001 is pinned" in manifest.reason
        assert learner.state.held_back == 1 and learner.metrics.held_back._value.get() == 1
        events = [PolicyEvent.from_fields(f) for _, f in client.xrange(stream_key(Stream.policies, PREFIX))]
        assert (events[-1].version, events[-1].status) == ("v0002", PolicyStatus.held_back)

        # the admin promotes v0002, then rolls back to v0001 (what the gateway's rollback route does)
        registry.set_current("v0002", status=PolicyStatus.promoted, reason="promoted by ada")
        registry.set_current("v0001", status=PolicyStatus.promoted, reason="rolled back by ada")
        registry.set_status("v0002", PolicyStatus.rolled_back, reason="rolled back by ada")
        learner._ppo_trainer()
        v0001 = version_weights(registry, "v0001")
        assert not weights_equal(policy_weights(learner), v0001)  # the working policy had moved on from v0001
        assert learner.follow_rollback() == "v0001"
        learner._ppo_trainer()
        assert weights_equal(policy_weights(learner), v0001)
        assert learner.state.history[-1]["kind"] == "rollback" and learner.state.history[-1][
            "rolled_back"
        ] == ["v0002"]
        assert learner.follow_rollback() is None  # each rollback is followed once

        # the restart is durable: a new learner process resumes from the rolled-back-to weights
        learner.close()
        learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
        assert learner.follow_rollback() is None
        learner._ppo_trainer()
        assert weights_equal(policy_weights(learner), v0001)
    finally:
        learner.close()
        client.close()


def test_a_waiting_learner_says_why_with_the_knob(redis_server, learner_settings, monkeypatch):
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS", "20")
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_MIN_PROMPTS", "30")
    metrics = LearnerMetrics()
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    learner = Learner(Settings(), metrics=metrics, progress=False)
    client = redis_server.client()
    try:
        push(client, 10, 0)
        assert not learner.round().trained
        waits = {w.step: w for w in learner.report_waiting()}
        rm, ppo = waits["reward_model"], waits["ppo"]
        assert rm.need == 20 and rm.have == learner.dataset.count_new_comparisons(0) < 20
        assert rm.knob == "INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS" and rm.knob in rm.message
        assert (ppo.need, ppo.have, ppo.knob) == (
            30,
            learner.dataset.count_prompts(),
            "INSTRUCTLOOP_LEARNER_MIN_PROMPTS",
        )
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert (
            f'learner_waiting{{knob="INSTRUCTLOOP_LEARNER_MIN_PROMPTS",step="ppo"}} {float(ppo.missing)}'
            in body
        )

        status = CliRunner().invoke(
            app,
            ["status"],
            env={
                **learner_settings,
                "INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS": "20",
                "INSTRUCTLOOP_LEARNER_MIN_PROMPTS": "30",
            },
        )
        assert status.exit_code == 0, status.output
        assert json.loads(status.output)["waiting"] == [rm.message, ppo.message]

        push(
            client, 24, 10
        )  # 22 training comparisons of 34: enough for the RM; 23 training prompts, fewer than 30
        assert learner.round().reward is not None and learner.state.rm_updates == 1
        waits = {w.step: w for w in learner.report_waiting()}
        assert waits["reward_model"].have == 0  # it just trained on them: it waits for the next 20
        ppo = waits["ppo"]
        assert (
            ppo.knob == "INSTRUCTLOOP_LEARNER_MIN_PROMPTS"
            and ppo.have == learner.dataset.count_prompts() < 30
        )
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert (
            f'learner_waiting{{knob="INSTRUCTLOOP_LEARNER_MIN_PROMPTS",step="ppo"}} {float(ppo.missing)}'
            in body
        )
    finally:
        learner.close()
        client.close()


def test_ppo_waits_for_a_reward_model_trained_on_min_rm_comparisons(
    redis_server, learner_settings, monkeypatch
):
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_MIN_RM_COMPARISONS", "16")
    learner = Learner(Settings(), metrics=LearnerMetrics(), progress=False)
    client = redis_server.client()
    try:
        push(client, 14, 0)
        report = learner.round()
        trained = learner.state.rm_comparisons_trained
        assert report.reward is not None and report.ppo is None and 8 <= trained < 16
        wait = {w.step: w for w in learner.report_waiting()}["ppo"]
        assert (wait.have, wait.need, wait.knob) == (trained, 16, "INSTRUCTLOOP_LEARNER_MIN_RM_COMPARISONS")
        assert wait.knob in wait.message
        push(client, 14, 14)
        report = learner.round()
        assert report.reward is not None and learner.state.rm_comparisons_trained >= 16
        assert report.ppo is not None
        assert "INSTRUCTLOOP_LEARNER_MIN_RM_COMPARISONS" not in {w.knob for w in learner.report_waiting()}
    finally:
        learner.close()
        client.close()
