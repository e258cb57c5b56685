"""An admin excludes a labeler (the gateway writes ``instructloop/labeling.py``'s hash): the learner, reading
the hash as its own ACL user, leaves every comparison of theirs, given before or after, out of each
reward-model update (training and held-out). Real redis-server with the stack's ACL, tiny models."""

from __future__ import annotations

import json

import pytest

from instructloop.labeling import excluded_labelers_key
from instructloop.streams import Stream
from learner.exclusion import excluded_labelers, without_excluded
from learner.loop import Learner
from learner.settings import Settings
from tests.learner.helpers import PREFIX, PTX_TEXT, comparison, learner_env, xadd


def test_without_excluded_keeps_the_others_in_order():
    events = [comparison(i, labeler_id=who) for i, who in enumerate(["a", "bad", "b", "bad", "a"])]
    kept = without_excluded(events, frozenset({"bad"}))
    assert [e.event_id for e in kept] == ["cmp-0", "cmp-2", "cmp-4"]
    assert without_excluded(events, frozenset()) == events


@pytest.fixture
def learner(redis_server, tmp_path, tiny_model_dir, monkeypatch):
    corpus = tmp_path / "ptx.txt"
    corpus.write_text(PTX_TEXT)
    env = learner_env(
        redis_server.url_for("learner"),
        tiny_model_dir,
        tmp_path / "state",
        tmp_path / "registry",
        corpus,
        min_new_comparisons=8,
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    learner = Learner(Settings(), progress=False)
    learner.start()
    yield learner
    learner.close()


def exclude(redis_server, labeler: str) -> None:
    """What the gateway's admin route writes, as the gateway's user."""
    record = {"name": labeler, "by": "ada", "at": 0.0, "reason": "test"}
    redis_server.client("gateway").hset(excluded_labelers_key(PREFIX), labeler, json.dumps(record))


def training_comparisons(learner, labeler: str) -> int:
    return sum(1 for s in learner.dataset.comparisons() if s.comparison.labeler_id == labeler)


def test_an_excluded_labelers_past_and_future_comparisons_never_train_the_reward_model(learner, redis_server):
    admin = redis_server.client()
    for i in range(16):  # before the exclusion: ingested into the learner's dataset
        xadd(admin, Stream.comparisons, comparison(i, labeler_id="mallory"))
    learner.ingest()
    exclude(redis_server, "mallory")
    assert excluded_labelers(redis_server.client("learner"), PREFIX) == {"mallory"}
    for i in range(16, 40):  # after it: an honest labeler and more of the excluded one's
        xadd(admin, Stream.comparisons, comparison(i, labeler_id="mallory" if i % 3 == 0 else "alice"))
    learner.ingest()
    assert training_comparisons(learner, "mallory") > 0 and training_comparisons(learner, "alice") > 0

    stats = learner.maybe_update_reward_model()

    assert stats is not None and learner.state.rm_updates == 1
    assert learner.state.rm_comparisons_trained == training_comparisons(learner, "alice")
    [record] = [r for r in learner.state.history if r.get("kind") == "reward"]
    assert record["comparisons"] == training_comparisons(learner, "alice")

    # only the excluded labeler's new comparisons: nothing to learn, the cursor moves past them
    for i in range(40, 56):
        xadd(admin, Stream.comparisons, comparison(i, labeler_id="mallory"))
    learner.ingest()
    assert learner.maybe_update_reward_model() is None and learner.state.rm_updates == 1
    assert learner.dataset.count_new_comparisons(learner.state.rm_cursor) == 0
