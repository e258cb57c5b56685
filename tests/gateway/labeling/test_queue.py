"""The labeling task API over real HTTP (real serve on the tiny model, real redis-server): where prompts come
from, that none is shown twice, agreement on shared items, retries, and per-output flags."""

from __future__ import annotations

import json

import pytest

from gateway.labeling.quality import pair_agreement
from instructloop.events import ComparisonEvent
from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import MODEL_NAME


@pytest.fixture
def labeling_gateway(start_gateway, serve, redis_server):
    def start(**overrides):
        settings = {"label_k": 3, "label_max_tokens": 4, "label_overlap_rate": 0.0, **overrides}
        return start_gateway([serve.url], redis_server.url_for("gateway"), **settings)

    return start


def comparisons(redis_server) -> list[ComparisonEvent]:
    return [
        ComparisonEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.comparisons))
    ]


def slots(redis_server, task_id: str) -> list[list]:
    return json.loads(redis_server.client().get(f"instructloop:gateway:labeling:task:{task_id}"))["slots"]


def test_live_prompts_are_used_once_per_labeler_and_an_admin_can_turn_them_off(
    labeling_gateway, redis_server
):
    gateway = labeling_gateway()
    client = gateway.openai("alice")
    for prompt in ("Tell me a joke.", "What is rain?"):
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    seen = []
    with gateway.http("lara") as http:
        for _ in range(2):
            task = http.post("/v1/label/tasks", json={"mode": "rank"})
            assert task.status_code == 200, task.text
            body = task.json()
            assert body["source"] == "live" and len(body["responses"]) == 3  # K from the setting
            assert [r["slot"] for r in body["responses"]] == [0, 1, 2]
            seen.append(body["prompt"])
        empty = http.post("/v1/label/tasks", json={"mode": "rank"})
    assert sorted(seen) == [
        "Tell me a joke.",
        "What is rain?",
    ]  # each once, although each now has 2 completions
    assert empty.status_code == 404 and empty.json()["error"]["code"] == "no_prompts_left"

    with gateway.http("ada") as admin:
        assert admin.put("/v1/admin/labeling/config", json={"live_prompts": False}).status_code == 200
        refused = admin.post("/v1/label/tasks", json={"mode": "rank"})  # ada has seen nothing yet
        assert (
            refused.status_code == 404 and "live prompts are turned off" in refused.json()["error"]["message"]
        )
        assert admin.post(
            "/v1/admin/labeling/prompts", json={"prompts": ["Uploaded one", "Uploaded one"]}
        ).json() == {"added": 1, "total": 1}
        task = admin.post("/v1/label/tasks", json={"mode": "demonstration"}).json()
        assert task["prompt"] == "Uploaded one" and task["source"] == "uploaded" and task["responses"] == []
    with gateway.http("alice") as user:  # the task API is for labelers
        assert user.post("/v1/label/tasks", json={"mode": "rank"}).status_code == 403


def test_shared_items_give_both_labelers_an_agreement_rate(labeling_gateway, redis_server):
    gateway = labeling_gateway(label_overlap_rate=1.0)
    with gateway.http("ada") as admin:
        admin.post("/v1/admin/labeling/prompts", json={"prompts": ["Describe a cat."]})
    with gateway.http("lara") as lara, gateway.http("ada") as ada:
        first = lara.post("/v1/label/tasks", json={"mode": "rank"}).json()
        first_slots = slots(redis_server, first["task_id"])
        assert not first["overlap"]
        answer = lara.post(f"/v1/label/tasks/{first['task_id']}/ranking", json={"ranking": [[0], [1], [2]]})
        assert answer.status_code == 202 and answer.json()["agreement"] is None
        lara_choices = [first_slots[s][1] for s in (0, 1, 2)]  # choice indices, best first

        second = ada.post("/v1/label/tasks", json={"mode": "rank"}).json()
        assert second["overlap"] and second["prompt"] == "Describe a cat."
        second_slots = slots(redis_server, second["task_id"])
        assert {cid for cid, _ in second_slots} == {first_slots[0][0]}  # the same responses, new order
        slot_of = {index: slot for slot, (_, index) in enumerate(second_slots)}
        a, b, c = lara_choices
        ada_ranking = [[slot_of[a]], [slot_of[c]], [slot_of[b]]]  # agrees on (a,b) and (a,c), not on (b,c)
        answer = ada.post(f"/v1/label/tasks/{second['task_id']}/ranking", json={"ranking": ada_ranking})
        assert answer.status_code == 202, answer.text
        assert answer.json()["agreement"] == pytest.approx(2 / 3)
        assert lara.post("/v1/label/tasks", json={"mode": "rank"}).status_code == 404  # no third showing

    with gateway.http("ada") as admin:
        board = admin.get("/v1/admin/labeling").json()
    stats = {row["name"]: row for row in board["labelers"]}
    for name in ("lara", "ada"):
        assert stats[name]["overlaps"] == 1 and stats[name]["agreement_pairs"] == 3
        assert stats[name]["agreement"] == pytest.approx(2 / 3) and stats[name]["rankings"] == 1
    first_event, second_event = comparisons(redis_server)
    assert pair_agreement(first_event.ranking, second_event.ranking) == (2, 3)
    assert board["volume"] and sum(b["comparisons"] for b in board["volume"]) == 2


def test_a_retried_answer_is_stored_once_and_a_second_answer_is_refused(labeling_gateway, redis_server):
    gateway = labeling_gateway()
    with gateway.http("ada") as admin:
        admin.post("/v1/admin/labeling/prompts", json={"prompts": ["Say hello."]})
    with gateway.http("lara") as http:
        task = http.post("/v1/label/tasks", json={"mode": "rank"}).json()
        url = f"/v1/label/tasks/{task['task_id']}/ranking"
        body = {"ranking": [[2], [0, 1]], "flags": {"2": ["harmful", "made_up_facts"]}}
        first = http.post(url, json=body, headers={"Idempotency-Key": "answer-1"})
        again = http.post(url, json=body, headers={"Idempotency-Key": "answer-1"})
        other = http.post(url, json={"ranking": [[0], [1], [2]]}, headers={"Idempotency-Key": "answer-2"})
        bad = http.post("/v1/label/tasks/nope/ranking", json=body)
        out_of_range = http.post("/v1/label/tasks", json={"mode": "rank"})
    assert first.status_code == 202 and again.status_code == 202
    assert again.json() == {**first.json(), "duplicate": True, "agreement": None}
    assert other.status_code == 409 and other.json()["error"]["code"] == "task_already_answered"
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "task_not_found"
    assert out_of_range.status_code == 404  # the only prompt was shown already
    for outcome, count in (("created", 1), ("answered", 2), ("refused_409", 1), ("refused_404", 2)):
        assert (
            gateway.metric("gateway_labeling_tasks_total", f'{{mode="rank",outcome="{outcome}"}}') == count
        ), outcome
    [event] = comparisons(redis_server)
    choice = [index for _, index in slots(redis_server, task["task_id"])]
    assert event.ranking == [[choice[2]], [choice[0], choice[1]]]
    assert event.flags[choice[2]] == ["harmful", "made_up_facts"] and sum(map(len, event.flags)) == 2


def test_compare_mode_without_a_second_version_says_why(labeling_gateway):
    gateway = labeling_gateway()
    with gateway.http("ada") as admin:
        admin.post("/v1/admin/labeling/prompts", json={"prompts": ["Compare me."]})
        refused = admin.post("/v1/label/tasks", json={"mode": "compare"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_versions_to_compare"


def test_flags_travel_through_v1_feedback(labeling_gateway, redis_server):
    gateway = labeling_gateway()
    completion = gateway.openai("alice").completions.create(
        model=MODEL_NAME, prompt="Flag me", max_tokens=2, n=3
    )
    with gateway.http("alice") as http:
        ok = http.post(
            "/v1/feedback",
            json={
                "type": "ranking",
                "completion_id": completion.id,
                "ranking": [[1], [0]],
                "flags": {"2": ["fails_instruction"]},
            },
        )
        unknown_flag = http.post(
            "/v1/feedback",
            json={
                "type": "ranking",
                "completion_id": completion.id,
                "ranking": [[1], [0]],
                "flags": {"0": ["rude"]},
            },
        )
        out_of_range = http.post(
            "/v1/feedback",
            json={
                "type": "ranking",
                "completion_id": completion.id,
                "ranking": [[1], [0]],
                "flags": {"7": ["harmful"]},
            },
        )
    assert ok.status_code == 202, ok.text
    assert unknown_flag.status_code == 422 and "flags" in unknown_flag.json()["error"]["param"]
    assert out_of_range.status_code == 422 and out_of_range.json()["error"]["param"] == "flags"
    [event] = comparisons(redis_server)
    assert event.flags == [[], [], ["fails_instruction"]]
