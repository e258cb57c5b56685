"""The loop end to end on a tiny model: events in Redis → RM → PPO-ptx → gate → registry (+ metrics, CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Registry, VersionKind, base_weights_sha256
from instructloop.streams import Stream, stream_key
from learner.cli import app
from learner.loop import Learner
from learner.metrics import LearnerMetrics
from learner.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.learner.helpers import (
    PREFIX,
    PTX_TEXT,
    comparison,
    completion,
    learner_env,
    pending,
    xadd,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ptx_corpus(tmp_path) -> Path:
    path = tmp_path / "ptx.txt"
    path.write_text(PTX_TEXT)
    return path


def push_round_of_events(client, n: int = 24, offset: int = 0) -> None:
    for i in range(offset, offset + n):
        xadd(client, Stream.comparisons, comparison(i))
        xadd(client, Stream.completions, completion(i))


@pytest.mark.parametrize("training", ["lora", "full"])
def test_learner_once_trains_and_publishes(redis_server, tmp_path, tiny_model_dir, ptx_corpus, training):
    client = redis_server.client()
    push_round_of_events(client)
    xadd(client, Stream.comparisons, comparison(0))  # a duplicate delivery
    client.xadd(stream_key(Stream.comparisons, PREFIX), {"event": "garbage"})
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **learner_env(
            redis_server.url_for("learner"),
            tiny_model_dir,
            tmp_path / "state",
            tmp_path / "registry",
            ptx_corpus,
            training=training,
        ),
    }

    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "learner", "once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ingested"] == 48 and summary["duplicates"] == 1 and summary["dead_lettered"] == 1
    assert summary["reward"]["rankings"] > 0 and 0.0 <= summary["reward"]["heldout_accuracy"] <= 1.0
    assert summary["ppo"]["round"] == 1.0
    version = summary["version"]
    assert version == "v0001" and isinstance(summary["promoted"], bool)

    registry = Registry(tmp_path / "registry", redis=redis_server.client("learner"), prefix=PREFIX)
    manifest = registry.verify(version)
    if training == "lora":  # a standard PEFT folder over the base, which it names by sha256
        assert manifest.kind == VersionKind.adapter and set(manifest.files) == {
            ADAPTER_CONFIG,
            ADAPTER_WEIGHTS,
        }
        assert manifest.base_sha256 == base_weights_sha256(tiny_model_dir)
    else:
        assert manifest.kind == VersionKind.full and "model.safetensors" in manifest.files
    assert {"candidate_reward_mean", "incumbent_reward_mean", "candidate_kl", "reward_gain"} <= set(
        manifest.metrics
    )
    events = [PolicyEvent.from_fields(f) for _, f in client.xrange(stream_key(Stream.policies, PREFIX))]
    statuses = [(e.version, e.status) for e in events]
    if summary["promoted"]:
        assert statuses == [(version, PolicyStatus.candidate), (version, PolicyStatus.promoted)]
        assert registry.current() == version
    else:
        assert statuses == [(version, PolicyStatus.candidate), (version, PolicyStatus.rejected)]
        assert registry.current() is None
    assert events[-1].metrics == manifest.metrics
    # Every entry was acknowledged; the JSON log lines are structured.
    assert pending(client, Stream.comparisons) == 0 and pending(client, Stream.completions) == 0
    logs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "gate done" for entry in logs)
    client.close()


def test_learner_thresholds_metrics_and_graceful_stop(
    redis_server, tmp_path, tiny_model_dir, ptx_corpus, monkeypatch
):
    """In process: nothing trains below the thresholds; a round above them trains; metrics are served."""
    env = learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        ptx_corpus,
        min_new_comparisons=20,
        min_prompts=30,
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    metrics = LearnerMetrics()
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    learner = Learner(settings, metrics=metrics, progress=False)
    client = redis_server.client()
    try:
        push_round_of_events(client, n=10)
        report = learner.round()
        assert report.ingest.inserted == 20 and not report.trained  # 10 comparisons < 20, no RM yet

        push_round_of_events(client, n=24, offset=10)  # 22 training comparisons (of 34), but < 30 prompts
        report = learner.round()
        assert report.reward is not None and report.ppo is None and report.gate is None
        assert learner.state.rm_updates == 1 and learner.store.model_dir("reward") is not None
        assert learner.state.rm_comparisons_trained == learner.dataset.count_new_comparisons(0)

        learner.request_stop()  # SIGTERM: the next round does nothing but ingest
        push_round_of_events(client, n=26, offset=34)
        report = learner.round()
        assert not report.trained and learner.state.ppo_rounds == 0

        status = CliRunner().invoke(app, ["status"], env=env)
        assert status.exit_code == 0, status.output
        reported = json.loads(status.output)
        assert reported["state"]["rm_updates"] == 1 and reported["dataset"]["comparisons"] == 60
        assert reported["lag"]["comparisons"] == {"lag": 0, "pending": 0}

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'learner_events_ingested_total{stream="comparisons"} 60.0' in body
        assert "learner_rm_heldout_accuracy" in body and "learner_consumer_lag" in body
        assert 'learner_step_duration_seconds_count{step="reward_model"} 1.0' in body
    finally:
        learner.close()
        client.close()


def test_a_ppo_round_waits_for_an_rm_update_or_prompts_never_served_before(
    redis_server, tmp_path, tiny_model_dir, ptx_corpus, monkeypatch
):
    """After a round, traffic that only asks the same prompts again is not new data: the next round waits
    (and says so) until the RM changes or ``min_prompts`` prompts never served before arrive."""
    for name, value in learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        ptx_corpus,
        min_prompts=8,
    ).items():
        monkeypatch.setenv(name, value)
    learner = Learner(Settings(), progress=False)
    client = redis_server.client()
    try:
        push_round_of_events(client, n=24)
        assert learner.round().ppo is not None and learner.state.ppo_rounds == 1

        for i in range(24):  # the same prompts served again (new events), no new ranking
            xadd(client, Stream.completions, completion(1000 + i, prompt=completion(i).prompt))
        report = learner.round()
        assert report.ingest.inserted == 24 and report.reward is None and report.ppo is None
        waits = [w for w in learner.waiting() if w.step == "ppo"]
        assert len(waits) == 1 and waits[0].have == 0 and "never served before" in waits[0].message

        for i in range(24, 48):  # prompts never served before: about 18 of them in the training split
            xadd(client, Stream.completions, completion(i))
        learner.ingest()
        assert learner.dataset.count_new_prompts(learner.state.ppo_prompt_cursor) >= 8
        assert learner.round().ppo is not None and learner.state.ppo_rounds == 2
    finally:
        learner.close()
        client.close()


@pytest.mark.slow
def test_the_learner_waits_for_a_redis_that_starts_after_it_and_names_the_knob_when_it_never_does(
    tmp_path, tiny_model_dir, ptx_corpus
):
    """Components of one deployment start together: a learner up before its Redis waits (and says so)
    instead of exiting; one whose Redis never answers exits (2) after REDIS_CONNECT_TIMEOUT_S, naming it."""
    (tmp_path / "redis").mkdir()
    late = RedisServer(tmp_path / "redis", prefix=PREFIX)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **learner_env(
            late.url_for("learner"), tiny_model_dir, tmp_path / "state", tmp_path / "registry", ptx_corpus
        ),
    }
    learner = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "learner", "once"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        assert learner.poll() is None  # still waiting, not exited
        late.start()
        out, err = learner.communicate(timeout=120)
    finally:
        learner.kill()
        late.stop()
    assert learner.returncode == 0, err[-3000:]
    waited = [json.loads(line) for line in err.splitlines() if '"learner waiting for redis"' in line]
    assert len(waited) == 1 and waited[0]["knob"] == "INSTRUCTLOOP_LEARNER_REDIS_CONNECT_TIMEOUT_S"
    assert json.loads(out.strip().splitlines()[-1])["ingested"] == 0

    never = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "learner", "once"],
        cwd=tmp_path,
        timeout=120,
        env={
            **env,
            "INSTRUCTLOOP_LEARNER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "INSTRUCTLOOP_LEARNER_REDIS_CONNECT_TIMEOUT_S": "1",
        },
        capture_output=True,
        text=True,
    )
    assert never.returncode == 2
    assert (
        "cannot reach Redis" in never.stderr
        and "INSTRUCTLOOP_LEARNER_REDIS_CONNECT_TIMEOUT_S" in never.stderr
    )


def test_settings_parse_json_hyperparameters_and_refuse_bad_values(monkeypatch):
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_PPO", '{"ppo_epochs": 3, "lr": 1e-6}')
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_KL_COEF", "0.05")
    settings = Settings()
    assert settings.ppo == {"ppo_epochs": 3, "lr": 1e-6} and settings.kl_coef == 0.05
    with pytest.raises(ValueError, match="INSTRUCTLOOP_LEARNER_REDIS_URL"):
        settings.require_redis()
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_HELDOUT_FRACTION", "1.5")
    with pytest.raises(ValueError, match="heldout_fraction"):
        Settings()
    monkeypatch.delenv("INSTRUCTLOOP_LEARNER_HELDOUT_FRACTION")
    result = CliRunner().invoke(app, ["once"])
    assert result.exit_code == 2 and "INSTRUCTLOOP_LEARNER_REDIS_URL" in result.output
