"""Feedback and demonstrations: the validation matrix, idempotency, Redis down (real redis, real serve)."""

from __future__ import annotations

import time

import pytest

from instructloop.events import ComparisonEvent, DemonstrationEvent
from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import MODEL_NAME


def make_completion(gateway, who: str = "alice", prompt: str = "Rank these", n: int = 4) -> dict:
    completion = gateway.openai(who).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, n=n, temperature=1.0
    )
    return completion.model_dump()


def comparisons(redis_server) -> list[ComparisonEvent]:
    return [
        ComparisonEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.comparisons))
    ]


def post(gateway, who, body, path="/v1/feedback", **headers):
    with gateway.http(who) as http:
        return http.post(path, json=body, headers=headers)


def key_id(gateway, who):
    return gateway.state.keys.authenticate(gateway.keys[who]).key_id


def test_ranking_with_ties_becomes_one_self_contained_comparison(gateway, redis_server):
    completion = make_completion(gateway)
    response = post(
        gateway,
        "alice",
        {
            "type": "ranking",
            "completion_id": completion["id"],
            "ranking": [[0], [2, 1], [3]],
            "rationale": "0 is on topic",
        },
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "accepted" and body["duplicate"] is False
    [event] = comparisons(redis_server)
    assert event.event_id == body["id"]
    assert event.prompt == "Rank these"
    assert event.responses == [c["text"] for c in completion["choices"]]
    assert event.ranking == [[0], [2, 1], [3]]
    assert event.pairs() == [(0, 2), (0, 1), (0, 3), (2, 3), (1, 3)]
    assert event.labeler_id == key_id(gateway, "alice")
    assert event.rationale == "0 is on topic" and event.source == "ranking"
    assert event.completion_ids == [completion["id"]]
    assert event.policy_versions == [completion["policy_version"]] * 4
    assert gateway.metric("gateway_feedback_total", '{kind="ranking",outcome="accepted"}') == 1


def test_pairwise_vote(gateway, redis_server):
    completion = make_completion(gateway, n=2)
    response = post(
        gateway, "alice", {"type": "pairwise", "completion_id": completion["id"], "chosen": 1, "rejected": 0}
    )
    assert response.status_code == 202, response.text
    [event] = comparisons(redis_server)
    assert event.source == "pairwise" and event.ranking == [[1], [0]]
    assert event.responses == [c["text"] for c in completion["choices"]]


def test_ab_vote_between_two_completions_of_one_prompt(gateway, redis_server):
    first = make_completion(gateway, prompt="Same prompt", n=1)
    second = make_completion(gateway, prompt="Same prompt", n=2)
    response = post(
        gateway,
        "alice",
        {
            "type": "ab",
            "a": {"completion_id": first["id"]},
            "b": {"completion_id": second["id"], "index": 1},
            "preferred": "b",
        },
    )
    assert response.status_code == 202, response.text
    [event] = comparisons(redis_server)
    assert event.source == "ab"
    assert event.responses == [first["choices"][0]["text"], second["choices"][1]["text"]]
    assert event.ranking == [[1], [0]]
    assert event.completion_ids == [first["id"], second["id"]]


def test_list_prompt_ranking_uses_the_choices_of_one_prompt(gateway, redis_server):
    completion = (
        gateway.openai("alice")
        .completions.create(model=MODEL_NAME, prompt=["P one", "P two"], max_tokens=3, n=2)
        .model_dump()
    )
    mixed = post(
        gateway, "alice", {"type": "ranking", "completion_id": completion["id"], "ranking": [[1], [2]]}
    )
    assert mixed.status_code == 422 and "different prompts" in mixed.json()["error"]["message"]
    ok = post(gateway, "alice", {"type": "ranking", "completion_id": completion["id"], "ranking": [[3], [2]]})
    assert ok.status_code == 202
    [event] = comparisons(redis_server)
    assert event.prompt == "P two" and event.ranking == [[1], [0]]
    assert event.responses == [completion["choices"][2]["text"], completion["choices"][3]["text"]]


def test_an_all_tied_ranking_is_recorded_without_pairs(gateway, redis_server):
    completion = make_completion(gateway)
    response = post(
        gateway, "alice", {"type": "ranking", "completion_id": completion["id"], "ranking": [[0, 1]]}
    )
    assert response.status_code == 202, response.text
    [event] = comparisons(redis_server)
    assert event.ranking == [[0, 1]] and event.pairs() == []


@pytest.mark.parametrize(
    ("feedback", "status", "code"),
    [
        ({"type": "ranking", "ranking": [[0], [7]]}, 422, "invalid_feedback"),  # out of range
        ({"type": "ranking", "ranking": [[-1], [0]]}, 422, "invalid_feedback"),
        ({"type": "ranking", "ranking": [[0], [0]]}, 422, "invalid_feedback"),  # repeated
        ({"type": "ranking", "ranking": [[1], [2, 1]]}, 422, "invalid_feedback"),
        ({"type": "ranking", "ranking": [[0]]}, 422, "invalid_feedback"),  # one response
        ({"type": "ranking", "ranking": []}, 422, "validation_error"),
        ({"type": "ranking", "ranking": [[0], []]}, 422, "validation_error"),
        ({"type": "pairwise", "chosen": 1, "rejected": 1}, 422, "invalid_feedback"),
        ({"type": "pairwise", "chosen": 0, "rejected": 4}, 422, "invalid_feedback"),
        (
            {"type": "ranking", "completion_id": "cmpl-doesnotexist", "ranking": [[0], [1]]},
            404,
            "completion_not_found",
        ),
        ({"type": "pairwise"}, 422, "validation_error"),
        ({"type": "stars", "ranking": [[0], [1]]}, 422, "validation_error"),
        ({"type": "ranking", "ranking": [[0], [1]], "extra": 1}, 422, "validation_error"),
    ],
)
def test_feedback_validation_matrix(gateway, redis_server, feedback, status, code):
    completion = make_completion(gateway)
    body = {"completion_id": completion["id"], **feedback}
    response = post(gateway, "alice", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert comparisons(redis_server) == []


@pytest.mark.parametrize("kind", [None, "stars", 3], ids=["missing", "unknown", "not-a-string"])
def test_a_missing_or_unknown_type_is_named_with_the_accepted_kinds(gateway, redis_server, kind):
    body = {"completion_id": "cmpl-x", "ranking": [[0], [1]]} | ({} if kind is None else {"type": kind})
    response = post(gateway, "alice", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "type" and error["code"] == "validation_error"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("type: ") and all(
        f"{k}" in error["message"] for k in ("ranking", "pairwise", "ab")
    )
    assert "discriminator" not in error["message"]
    assert comparisons(redis_server) == []


def test_ab_refusals(gateway, redis_server):
    a = make_completion(gateway, prompt="Prompt A", n=1)
    b = make_completion(gateway, prompt="Prompt B", n=1)
    same = make_completion(gateway, prompt="Prompt A", n=1)
    different = post(
        gateway,
        "alice",
        {"type": "ab", "a": {"completion_id": a["id"]}, "b": {"completion_id": b["id"]}, "preferred": "a"},
    )
    assert different.status_code == 422 and different.json()["error"]["code"] == "different_prompts"
    tie = post(
        gateway,
        "alice",
        {
            "type": "ab",
            "a": {"completion_id": a["id"]},
            "b": {"completion_id": same["id"]},
            "preferred": "tie",
        },
    )
    assert tie.status_code == 202, tie.text
    recorded = comparisons(redis_server)
    assert len(recorded) == 1 and recorded[0].ranking == [[0, 1]] and recorded[0].source == "ab"
    assert recorded[0].pairs() == []
    itself = post(
        gateway,
        "alice",
        {"type": "ab", "a": {"completion_id": a["id"]}, "b": {"completion_id": a["id"]}, "preferred": "a"},
    )
    assert itself.status_code == 422
    out_of_range = post(
        gateway,
        "alice",
        {
            "type": "ab",
            "a": {"completion_id": a["id"]},
            "b": {"completion_id": same["id"], "index": 3},
            "preferred": "a",
        },
    )
    assert out_of_range.status_code == 422 and out_of_range.json()["error"]["param"] == "b.index"
    assert len(comparisons(redis_server)) == 1  # only the tie was recorded


def test_who_may_rate_which_completion(gateway, redis_server):
    alices = make_completion(gateway, "alice", n=2)
    body = {"type": "pairwise", "completion_id": alices["id"], "chosen": 0, "rejected": 1}
    refused = post(gateway, "bob", body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_your_completion"
    assert post(gateway, "lara", body).status_code == 202  # labelers rate any completion
    assert post(gateway, "ada", body).status_code == 202
    assert post(gateway, "alice", body).status_code == 202
    assert [e.labeler_id for e in comparisons(redis_server)] == [
        key_id(gateway, w) for w in ("lara", "ada", "alice")
    ]
    bobs = make_completion(gateway, "bob", prompt="Rank these", n=1)
    cross = post(
        gateway,
        "alice",
        {
            "type": "ab",
            "a": {"completion_id": alices["id"]},
            "b": {"completion_id": bobs["id"]},
            "preferred": "a",
        },
    )
    assert cross.status_code == 403


def test_expired_completion_is_refused(start_gateway, serve, redis_server):
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), completion_ttl_s=1)
    completion = make_completion(gateway, n=2)
    time.sleep(2.1)
    response = post(
        gateway, "alice", {"type": "pairwise", "completion_id": completion["id"], "chosen": 0, "rejected": 1}
    )
    assert response.status_code == 404 and "unknown or expired" in response.json()["error"]["message"]


def test_idempotency_key_returns_the_same_id_without_a_second_event(gateway, redis_server):
    completion = make_completion(gateway)
    body = {"type": "ranking", "completion_id": completion["id"], "ranking": [[3], [0], [1, 2]]}
    first = post(gateway, "alice", body, **{"Idempotency-Key": "retry-1"})
    second = post(gateway, "alice", body, **{"Idempotency-Key": "retry-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.json()["duplicate"] is True
    assert len(comparisons(redis_server)) == 1
    conflict = post(gateway, "alice", {**body, "ranking": [[0], [3]]}, **{"Idempotency-Key": "retry-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    # keys are scoped per caller: the same key from a labeler is a different request
    other = post(gateway, "lara", body, **{"Idempotency-Key": "retry-1"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert len(comparisons(redis_server)) == 2


def test_concurrent_retries_with_one_key_write_one_event(gateway, redis_server):
    import concurrent.futures

    completion = make_completion(gateway)
    body = {"type": "ranking", "completion_id": completion["id"], "ranking": [[0], [1]]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: post(gateway, "alice", body, **{"Idempotency-Key": "race"}), range(16))
        )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    assert len(comparisons(redis_server)) == 1


def test_redis_down_feedback_503_then_retry_succeeds(start_gateway, serve, redis_server_aof):
    gateway = start_gateway([serve.url], redis_server_aof.url_for("gateway"))
    completion = make_completion(gateway, n=2)
    body = {"type": "pairwise", "completion_id": completion["id"], "chosen": 0, "rejected": 1}
    redis_server_aof.stop()
    down = post(gateway, "alice", body, **{"Idempotency-Key": "k1"})
    assert down.status_code == 503 and down.headers["Retry-After"] == "5"
    assert down.json()["error"]["code"] == "storage_unavailable"
    demo = post(gateway, "lara", {"prompt": "p", "response": "r"}, path="/v1/demonstrations")
    assert demo.status_code == 503 and demo.headers["Retry-After"]
    # completions keep working while Redis is down
    assert (
        len(gateway.openai("alice").completions.create(model=MODEL_NAME, prompt="up", max_tokens=2).choices)
        == 1
    )
    redis_server_aof.start()  # AOF: the served completion is still there, no comparison was half-written
    assert comparisons(redis_server_aof) == []
    retried = post(gateway, "alice", body, **{"Idempotency-Key": "k1"})
    assert retried.status_code == 202, retried.text
    again = post(gateway, "alice", body, **{"Idempotency-Key": "k1"})
    assert again.json()["id"] == retried.json()["id"]
    assert len(comparisons(redis_server_aof)) == 1


def test_demonstrations(gateway, redis_server):
    body = {
        "prompt": "Write a haiku about Redis.",
        "response": "Streams flow in order\nentries wait for the learner\nnothing is ever lost",
    }
    accepted = post(gateway, "lara", body, path="/v1/demonstrations", **{"Idempotency-Key": "d1"})
    assert accepted.status_code == 202, accepted.text
    assert (
        post(gateway, "lara", body, path="/v1/demonstrations", **{"Idempotency-Key": "d1"}).json()["id"]
        == accepted.json()["id"]
    )
    entries = redis_server.client().xrange(stream_key(Stream.demonstrations))
    [event] = [DemonstrationEvent.from_fields(f) for _, f in entries]
    assert event.event_id == accepted.json()["id"]
    assert (event.prompt, event.response, event.labeler_id) == (
        body["prompt"],
        body["response"],
        key_id(gateway, "lara"),
    )
    assert post(gateway, "alice", body, path="/v1/demonstrations").status_code == 403
    blank = post(gateway, "lara", {"prompt": "  ", "response": "x"}, path="/v1/demonstrations")
    assert blank.status_code == 422 and blank.json()["error"]["type"] == "invalid_request_error"
    assert (event.chat, event.route, event.messages) == (
        False,
        "completions",
        None,
    )  # raw text, learned as is


def test_chat_demonstration_carries_the_rendered_model_input(gateway, redis_server, tokenizer):
    """The prompt contract for demonstrations: messages are rendered once, by the gateway, as for a chat
    completion; the event carries the rendered text, the route and the messages."""
    messages = [{"role": "user", "content": "Say hi (demonstration)."}]
    accepted = post(gateway, "lara", {"messages": messages, "response": "Hi!"}, path="/v1/demonstrations")
    assert accepted.status_code == 202, accepted.text
    entries = redis_server.client().xrange(stream_key(Stream.demonstrations))
    [event] = [
        e
        for e in (DemonstrationEvent.from_fields(f) for _, f in entries)
        if e.event_id == accepted.json()["id"]
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (event.prompt, event.chat, event.route, event.messages) == (
        rendered,
        True,
        "chat.completions",
        messages,
    )
    both = post(
        gateway, "lara", {"prompt": "p", "messages": messages, "response": "r"}, path="/v1/demonstrations"
    )
    neither = post(gateway, "lara", {"response": "r"}, path="/v1/demonstrations")
    for refused in (both, neither):
        assert refused.status_code == 422 and "exactly one of prompt" in refused.json()["error"]["message"]


def test_feedback_through_the_openai_client_as_in_the_readme(gateway, redis_server):
    client = gateway.openai("alice")
    completion = client.completions.create(
        model=MODEL_NAME, prompt="Write a haiku about autumn.", max_tokens=4, n=4, temperature=0.8
    )
    accepted = client.post(
        "/feedback",
        cast_to=object,
        body={"type": "pairwise", "completion_id": completion.id, "chosen": 2, "rejected": 0},
    )
    assert accepted["status"] == "accepted"
    [event] = comparisons(redis_server)
    assert event.event_id == accepted["id"]
    assert event.responses[event.ranking[0][0]] == completion.choices[2].text
