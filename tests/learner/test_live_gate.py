"""A candidate collects live A/B votes before the gate (gate_live_wait_s), and those votes decide it."""

from __future__ import annotations

import pytest

from instructloop.events import ComparisonEvent, PolicyEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from instructloop.wire import BASE_VERSION
from learner.loop import Learner
from learner.settings import Settings
from tests.learner.helpers import PREFIX, PTX_TEXT, comparison, completion, learner_env, xadd


def test_a_listed_candidate_waits_for_live_votes_which_then_decide_the_gate(
    redis_server, tmp_path, tiny_model_dir, monkeypatch
):
    corpus = tmp_path / "ptx.txt"
    corpus.write_text(PTX_TEXT)
    env = learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        corpus,
        gate_live_wait_s=3600,
        gate_min_live_comparisons=3,
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    learner = Learner(Settings(), progress=False)
    client = redis_server.client()
    registry = Registry(tmp_path / "registry", redis=redis_server.client("learner"), prefix=PREFIX)
    try:
        for i in range(24):
            xadd(client, Stream.comparisons, comparison(i))
            xadd(client, Stream.completions, completion(i))
        report = learner.round()
        version = learner.state.pending_candidate
        assert report.ppo is not None and report.gate is None and version == "v0001"
        assert registry.manifest(version).status is PolicyStatus.candidate  # servable by name, not current
        assert registry.current() is None

        for i in range(2):  # two votes are not enough: the gate keeps waiting
            xadd(
                client,
                Stream.comparisons,
                ComparisonEvent(
                    prompt=f"Compare {i}",
                    responses=["from the candidate", "from the base"],
                    ranking=[[1], [0]],
                    labeler_id="lara",
                    source="ab",
                    policy_versions=[version, BASE_VERSION],
                ),
            )
        assert learner.round().gate is None and learner.state.pending_candidate == version

        xadd(
            client,
            Stream.comparisons,
            ComparisonEvent(
                prompt="Compare 2",
                responses=["from the base", "from the candidate"],
                ranking=[[0], [1]],
                labeler_id="lara",
                source="ab",
                policy_versions=[BASE_VERSION, version],
            ),
        )
        report = learner.round()
        assert report.gate is not None and not report.gate.promote
        assert "live win-rate 0.000 < 0.5 over 3 pairs" in report.gate.summary()
        assert report.gate.metrics["live_pairs"] == pytest.approx(3)
        assert (
            learner.state.pending_candidate is None
            and registry.manifest(version).status is PolicyStatus.rejected
        )
        statuses = [
            PolicyEvent.from_fields(f).status for _, f in client.xrange(stream_key(Stream.policies, PREFIX))
        ]
        assert statuses == [PolicyStatus.candidate, PolicyStatus.rejected]
    finally:
        learner.close()
        client.close()
