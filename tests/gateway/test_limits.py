"""Issue 11 on the gateway: request-size bounds, per-key generation/token/feedback budgets that do not fail
open, one feedback per (caller, completion), Redis full (maxmemory), and every 5xx logged with its request id
(real serve, real redis-server, real HTTP)."""

from __future__ import annotations

import logging
import time

import pytest

from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import MODEL_NAME
from tests.gateway.test_feedback import comparisons, make_completion, post


def complete(gateway, who="alice", **body):
    with gateway.http(who) as http:
        return http.post("/v1/completions", json={"model": MODEL_NAME, "max_tokens": 2, **body})


# ---- finding 2: bounds on every request size that reaches Redis or serve ----------------------------------


def test_request_sizes_are_bounded(gateway):
    long_stop = complete(gateway, prompt="hi", stop=["x" * 65])
    assert long_stop.status_code == 400 and "stop" in long_stop.json()["error"]["message"]
    assert complete(gateway, prompt="hi", stop="y" * 65).status_code == 400
    assert complete(gateway, prompt="hi", stop=["a", "b", "c", "d", "e"]).status_code == 400
    assert complete(gateway, prompt="hi", stop=["z" * 64]).status_code == 200

    many = complete(gateway, prompt=["p"] * 16, n=9)  # 144 generations in one request
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_generations"

    wide = complete(
        gateway, prompt=["w" * 20_000] * 4
    )  # each under max_prompt_chars, together over the total
    assert wide.status_code == 400 and wide.json()["error"]["code"] == "prompt_too_long"

    with gateway.http("alice") as http:
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL_NAME,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "m" * 32_001}],
            },
        )
    assert chat.status_code == 400


def test_generations_and_tokens_are_budgeted_per_key(start_gateway, serve, redis_server):
    gateway = start_gateway(
        [serve.url],
        redis_server.url_for("gateway"),
        rate_limit_generations_per_minute=10,
        rate_limit_tokens_per_minute=100_000,
    )
    assert complete(gateway, prompt=["a", "b"], n=4).status_code == 200  # 8 generations
    refused = complete(gateway, prompt="c", n=4)  # 12 > 10
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "generations per minute" in refused.json()["error"]["message"] and refused.headers["Retry-After"]
    assert complete(gateway, "bob", prompt="c", n=4).status_code == 200  # another key has its own budget
    assert gateway.metric("gateway_rate_limited_budget_total", '{budget="generations"}') == 1

    tokens = start_gateway([serve.url], redis_server.url_for("gateway"), rate_limit_tokens_per_minute=50)
    assert complete(tokens, prompt="hello", max_tokens=8, n=2).status_code == 200  # ~2×1 + 16 tokens
    over = complete(tokens, prompt="hello", max_tokens=40)
    assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]


def test_rate_limit_does_not_fail_open_when_redis_is_down(start_gateway, serve, redis_server):
    """Finding 9: with Redis down the in-process limiter enforces the same budget (before: every request
    passed)."""
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), rate_limit_per_minute=3)
    redis_server.stop()
    with gateway.http("alice") as http:
        statuses = [http.get("/v1/models").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert gateway.metric("gateway_rate_limit_fallback_total") >= 4
    assert complete(gateway, "bob", prompt="still served").status_code == 200  # completions keep serving


# ---- finding 4: feedback flooding --------------------------------------------------------------------------


def test_one_feedback_per_caller_and_completion_first_wins(gateway, redis_server):
    completion = make_completion(gateway, n=2)
    body = {"type": "ranking", "completion_id": completion["id"], "ranking": [[0], [1]]}
    first = post(gateway, "alice", body, **{"Idempotency-Key": "k1"})
    assert first.status_code == 202
    replay = post(gateway, "alice", body, **{"Idempotency-Key": "k1"})  # a retry: same event, not a new one
    assert (
        replay.status_code == 202 and replay.json()["id"] == first.json()["id"] and replay.json()["duplicate"]
    )
    for flood in range(5):  # the same ranking again (or a different one), under fresh keys: refused
        again = post(
            gateway,
            "alice",
            {**body, "ranking": [[1], [0]] if flood % 2 else [[0], [1]]},
            **{"Idempotency-Key": f"flood-{flood}"},
        )
        assert again.status_code == 409 and again.json()["error"]["code"] == "feedback_already_given"
        assert first.json()["id"] in again.json()["error"]["message"]
    pairwise = post(
        gateway, "alice", {"type": "pairwise", "completion_id": completion["id"], "chosen": 1, "rejected": 0}
    )
    assert pairwise.status_code == 409
    assert post(gateway, "lara", body).status_code == 202  # a labeler's own judgement of the same completion
    assert [e.labeler_id for e in comparisons(redis_server)].count(
        gateway.state.keys.authenticate(gateway.keys["alice"]).key_id
    ) == 1
    assert len(comparisons(redis_server)) == 2


def test_feedback_has_its_own_per_key_budget(start_gateway, serve, redis_server):
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), feedback_rate_limit_per_minute=2)
    completions = [make_completion(gateway, prompt=f"budget {i}", n=2) for i in range(3)]
    statuses = [
        post(
            gateway, "alice", {"type": "ranking", "completion_id": c["id"], "ranking": [[0], [1]]}
        ).status_code
        for c in completions
    ]
    assert statuses == [202, 202, 429]
    assert gateway.metric("gateway_rate_limited_budget_total", '{budget="feedback"}') == 1


# ---- finding 2: Redis full ---------------------------------------------------------------------------------


def _fill(client) -> None:
    """Redis over its maxmemory (noeviction): about 2 MB of small ballast values, a pause for Redis to shrink
    its client buffers (a big write's query buffer is counted until then), then maxmemory 1 MB below what is
    used, so no routine free can bring Redis back under the limit during the test."""
    import redis as redis_lib

    client.config_set("maxmemory-policy", "noeviction")
    for batch in range(20):
        with client.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.set(f"ballast:{batch}:{i}", b"x" * 1024)
            pipe.execute()
    time.sleep(0.5)
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1024 * 1024)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        client.set("probe", b"x")


def test_redis_full_completions_serve_feedback_503_nothing_half_written_alert(gateway, redis_server):
    client = redis_server.client()
    completion = make_completion(gateway, n=2)
    comparisons_key = stream_key(Stream.comparisons)

    def stored_keys() -> set[bytes]:
        return {k for k in client.keys("instructloop:gateway:*") if b"ratelimit" not in k}

    keys_before = stored_keys()
    _fill(client)

    served = complete(gateway, prompt="serve me while redis is full")
    assert served.status_code == 200  # completions keep serving (they are not logged meanwhile)
    feedback = post(
        gateway,
        "alice",
        {"type": "ranking", "completion_id": completion["id"], "ranking": [[0], [1]]},
        **{"Idempotency-Key": "while-full"},
    )
    assert feedback.status_code == 503 and feedback.headers["Retry-After"], feedback.text
    assert "full" in feedback.json()["error"]["message"]
    assert client.xlen(comparisons_key) == 0  # nothing half-written: no event, no idempotency or "rated" key
    assert stored_keys() == keys_before
    assert gateway.metric("gateway_redis_full") == 1  # the alert
    assert gateway.metric("gateway_redis_oom_total") >= 2

    client.config_set("maxmemory", 0)  # the operator adds memory
    retried = post(
        gateway,
        "alice",
        {"type": "ranking", "completion_id": completion["id"], "ranking": [[0], [1]]},
        **{"Idempotency-Key": "while-full"},
    )
    assert retried.status_code == 202 and client.xlen(comparisons_key) == 1
    assert gateway.metric("gateway_redis_full") == 0


# ---- every 5xx is logged with its request id ---------------------------------------------------------------


def test_every_5xx_is_logged_with_the_request_id(start_gateway, redis_server, caplog):
    from tests.conftest import free_port

    gateway = start_gateway(
        [f"http://127.0.0.1:{free_port()}"], redis_server.url_for("gateway")
    )  # no backend listens
    caplog.set_level(logging.ERROR, logger="gateway.errors")
    with gateway.http("alice") as http:
        answer = http.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": "anyone?", "max_tokens": 2},
            headers={"X-Request-Id": "req-abc.123"},
        )
        generated_id = http.post(
            "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}
        )
    assert answer.status_code == 503 and answer.headers["X-Request-Id"] == "req-abc.123"
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "req-abc.123"]
    assert records and records[0].status == 503 and records[0].code == "backend_unavailable"
    assert "no healthy inference backend" in records[0].getMessage()
    rid = generated_id.headers["X-Request-Id"]
    assert len(rid) == 32 and any(getattr(r, "request_id", None) == rid for r in caplog.records)
