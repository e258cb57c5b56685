"""Every route × anonymous / wrong key / user / labeler / admin, and the per-key rate limit."""

from __future__ import annotations

import time

import pytest

from tests.gateway.conftest import MODEL_NAME

CALLERS = [None, "wrong", "alice", "lara", "ada"]
RANK = {"alice": 0, "lara": 1, "ada": 2}

# (method, path, json body, minimum role, status when allowed)
ROUTES = [
    ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, "alice", 200),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "alice",
        200,
    ),
    ("GET", "/v1/models", None, "alice", 200),
    ("GET", f"/v1/models/{MODEL_NAME}", None, "alice", 200),
    (
        "POST",
        "/v1/feedback",
        {"type": "pairwise", "completion_id": "cmpl-unknown", "chosen": 0, "rejected": 1},
        "alice",
        404,
    ),
    ("POST", "/v1/demonstrations", {"prompt": "p", "response": "r"}, "lara", 202),
    ("GET", "/v1/admin/policies", None, "ada", 200),
    ("POST", "/v1/admin/policies/v0042/promote", None, "ada", 404),
    ("POST", "/v1/admin/policies/v0042/pin", None, "ada", 404),
    ("POST", "/v1/admin/policies/rollback", {}, "ada", 409),
]


def test_authorization_matrix(gateway):
    gateway.keys["wrong"] = "il-" + "x" * 43
    failures = []
    for method, path, body, needed, allowed_status in ROUTES:
        for caller in CALLERS:
            with gateway.http(caller) as http:
                response = http.request(method, path, json=body)
            if caller is None or caller == "wrong":
                expected = 401
            elif RANK[caller] < RANK[needed]:
                expected = 403
            else:
                expected = allowed_status
            if response.status_code != expected:
                failures.append(
                    f"{method} {path} as {caller}: {response.status_code} != {expected} {response.text[:200]}"
                )
                continue
            if expected >= 400:
                error = response.json()["error"]
                if set(error) != {"message", "type", "param", "code"}:
                    failures.append(f"{method} {path} as {caller}: not OpenAI's error shape: {error}")
                if expected == 401 and response.headers.get("WWW-Authenticate") != "Bearer":
                    failures.append(f"{method} {path} as {caller}: 401 without WWW-Authenticate")
                if expected == 403 and error["type"] != "permission_error":
                    failures.append(f"{method} {path} as {caller}: 403 type {error['type']}")
    assert failures == []


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_need_no_key(gateway, path):
    with gateway.http() as http:
        assert http.get(path).status_code == 200


def test_rate_limit_per_key(start_gateway, serve, redis_server):
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), rate_limit_per_minute=3)
    if time.time() % 60 > 55:  # keep the four calls inside one fixed one-minute window
        time.sleep(61 - time.time() % 60)
    with gateway.http("alice") as alice, gateway.http("bob") as bob:
        assert [alice.get("/v1/models").status_code for _ in range(3)] == [200, 200, 200]
        limited = alice.get("/v1/models")
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert bob.get("/v1/models").status_code == 200  # per key
    assert gateway.metric("gateway_rate_limited_total") == 1
