"""The labeling page's Redis use as shipped: every call of ``LabelingStore`` as the stack's ``gateway`` user
(the ACL file ``instructloop up`` writes), the labeling flow (task, then ranking) over HTTP with that user,
and a command the ACL lacks answered as what it is (500 naming the command and the user, logged), never
as "redis unavailable"."""

from __future__ import annotations

import logging

import pytest

from gateway.labeling.protocol import LabelingConfig
from gateway.labeling.store import LabelingStore
from gateway.metrics import GatewayMetrics
from gateway.store import Store, StoredChoice, StoredCompletion
from instructloop.events import ComparisonEvent, CompletionEvent
from instructloop.labeling import excluded_labelers_key
from instructloop.streams import Stream, stream_key
from tests.conftest import free_port
from tests.learner.helpers import comparison, completion


async def test_every_labeling_store_call_works_as_the_gateway_user(redis_server):
    store = Store(
        redis_server.url_for("gateway"),
        "instructloop",
        GatewayMetrics(),
        completion_ttl_s=60,
        idempotency_ttl_s=60,
    )
    labeling = LabelingStore(store, LabelingConfig(live_prompts=True), task_ttl_s=60)
    admin = redis_server.client()
    chat = completion(
        1, prompt="<|im_start|>user\nHi<|im_end|>\n", chat=True, messages=[{"role": "user", "content": "Hi"}]
    )
    admin.xadd(stream_key(Stream.completions), chat.to_fields())
    admin.xadd(stream_key(Stream.comparisons), comparison(1).to_fields())
    try:
        await labeling.set_config(LabelingConfig(live_prompts=True))
        assert (await labeling.config()).live_prompts
        assert await labeling.add_prompts(["a", "b", "a"]) == (2, 2)
        assert await labeling.uploaded_count() == 2 and await labeling.uploaded_prompts() == ["a", "b"]
        assert await labeling.live_prompts() == {chat.prompt: [{"role": "user", "content": "Hi"}]}
        await labeling.mark_seen("rank", "lara", "a")
        assert await labeling.unseen("rank", "lara", ["a", "b"]) == ["b"]
        await labeling.save_task({"task_id": "t1", "labeler": "lara"})
        assert (await labeling.task("t1"))["labeler"] == "lara"
        await labeling.delete_task("t1")
        assert await labeling.task("t1") is None
        await labeling.offer_overlap({"labeler": "other", "prompt": "b", "completion_id": "c"})
        assert (await labeling.take_overlap("lara"))["completion_id"] == "c"
        assert await labeling.record_answer("c", "lara", [[0], [1]]) == {"lara": [[0], [1]]}
        await labeling.count("lara", "Lara", rankings=1, flagged=0)
        assert (await labeling.labeler("lara"))["rankings"] == "1"
        assert set(await labeling.labelers()) == {"lara"}
        await labeling.set_guidelines("Be kind.")
        assert await labeling.guidelines() == "Be kind."
        await labeling.exclude("lara", {"name": "Lara", "by": "ada", "at": 1.0, "reason": None})
        assert await labeling.is_excluded("lara") and await store.labeler_excluded("lara")
        assert set(await labeling.excluded()) == {"lara"}
        assert await labeling.include("lara") and not await labeling.is_excluded("lara")
        [(_, event)] = await labeling.read_stream(Stream.comparisons, ComparisonEvent, 10)
        assert event.event_id == comparison(1).event_id
        saved = StoredCompletion("cmpl-x", "k", ["p"], [StoredChoice(0, "t", "stop", 0, 1)], "base", False)
        assert await store.save_completion(saved, [completion(2)], required=True)
        assert (await store.get_completion("cmpl-x")).id == "cmpl-x"
    finally:
        await store.close()


@pytest.mark.parametrize("user", ["serve", "exporter"])
def test_only_the_gateway_and_the_learner_see_the_exclusions(redis_server, user):
    """The learner reads the hash (HKEYS) and cannot change it; other users cannot read it at all."""
    import redis as redis_lib

    key = excluded_labelers_key()
    redis_server.client("gateway").hset(key, "lara", "{}")
    learner = redis_server.client("learner")
    assert learner.hkeys(key) == [b"lara"]
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        learner.hset(key, "mallory", "{}")
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        redis_server.client(user).hkeys(key)


def test_a_command_the_acl_lacks_is_a_500_naming_it_and_the_user_not_redis_unavailable(
    start_gateway, redis_server, caplog
):
    """Take XREVRANGE from the gateway's user (as the ACL shipped before this test lacked it): asking for a
    labeling task with live prompts on reads the completions stream and Redis answers NOPERM."""
    redis_server.client().execute_command("ACL", "SETUSER", "gateway", "-xrevrange")
    gateway = start_gateway(
        [f"http://127.0.0.1:{free_port()}"], redis_server.url_for("gateway"), label_live_prompts=True
    )
    with caplog.at_level(logging.ERROR), gateway.http("lara") as http:
        answer = http.post("/v1/label/tasks", json={"mode": "rank"})
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "redis_permission_denied"
    assert "XREVRANGE" in error["message"] and "'gateway'" in error["message"]
    assert "unavailable" not in error["message"]
    denied = [r for r in caplog.records if "NOPERM" in r.getMessage()]
    assert denied and denied[0].command == "XREVRANGE" and denied[0].redis_user == "gateway"


def test_the_labeling_flow_works_against_the_acl_as_the_gateway_user(start_gateway, serve, redis_server):
    """Regression for the ``make run`` defect: tasks -> ranking, with the gateway on its own ACL user."""
    gateway = start_gateway(
        [serve.url], redis_server.url_for("gateway"), label_k=2, label_max_tokens=3, label_live_prompts=True
    )
    gateway.openai("alice").completions.create(model="instructloop", prompt="Tell me a joke.", max_tokens=2)
    with gateway.http("lara") as http:
        task = http.post("/v1/label/tasks", json={"mode": "rank"})
        assert task.status_code == 200, task.text
        assert task.json()["source"] == "live"
        answer = http.post(f"/v1/label/tasks/{task.json()['task_id']}/ranking", json={"ranking": [[1], [0]]})
        assert answer.status_code == 202, answer.text
        assert http.get("/v1/label/me").json()["counts"]["rankings"] == 1
    [event] = [
        ComparisonEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.comparisons))
    ]
    assert event.event_id == answer.json()["id"] and event.prompt == "Tell me a joke."
    events = [
        CompletionEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.completions))
    ]
    assert len(events) == 2  # the user's completion and the labeling queue's own
