"""Policy admin against a real registry, followed by a real serve; and n choices kept on one policy version
when two replicas serve different versions."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from instructloop.registry import Registry
from tests.conftest import build_tiny_model_dir
from tests.gateway.conftest import MODEL_NAME, ServeProcess


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, tokenizer) -> Path:
    """A registry with three candidate versions of the tiny architecture (different seeds)."""
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root)
    for seed, version in enumerate(("v0001", "v0002", "v0003"), start=1):
        registry.write_version(
            version,
            lambda folder, seed=seed: build_tiny_model_dir(folder, tokenizer, seed=seed),
            metrics={"rm_score": 0.1 * seed, "kl": 0.01 * seed},
        )
    return root


@pytest.fixture(scope="module")
def registry_serve(tiny_model_dir, registry_dir, tmp_path_factory):
    """A serve that follows the registry's CURRENT file (polled every 0.2 s)."""
    process = ServeProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve-registry") / "serve.log",
        INSTRUCTLOOP_SERVE_REGISTRY_DIR=str(registry_dir),
        INSTRUCTLOOP_SERVE_POLL_INTERVAL_S="0.2",
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def served_version(gateway) -> str:
    completion = gateway.openai("alice").completions.with_raw_response.create(
        model=MODEL_NAME, prompt="v?", max_tokens=1
    )
    return completion.headers["X-Policy-Version"]


def wait_for_version(gateway, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_version(gateway) == version:
            return
        time.sleep(0.3)
    pytest.fail(f"serve did not swap to {version}")


def admin(gateway, method: str, path: str, **kwargs):
    with gateway.http("ada") as http:
        return http.request(method, f"/v1/admin{path}", **kwargs)


def test_list_promote_pin_rollback(start_gateway, registry_serve, registry_dir, redis_server):
    gateway = start_gateway([registry_serve.url], redis_server.url_for("gateway"), registry_dir=registry_dir)
    listed = admin(gateway, "GET", "/policies").json()
    assert [p["version"] for p in listed["data"]] == ["v0001", "v0002", "v0003"]
    assert {p["status"] for p in listed["data"]} == {"candidate"}
    assert listed["data"][1]["metrics"] == {"rm_score": pytest.approx(0.2), "kl": pytest.approx(0.02)}

    promoted = admin(gateway, "POST", "/policies/v0001/promote", json={"reason": "passed the gate"})
    assert (
        promoted.status_code == 200 and promoted.json()["current"] and promoted.json()["status"] == "promoted"
    )
    assert (registry_dir / "CURRENT").read_text().strip() == "v0001"
    wait_for_version(gateway, "v0001")

    assert admin(gateway, "POST", "/policies/v0002/promote").status_code == 200
    wait_for_version(gateway, "v0002")
    rolled = admin(gateway, "POST", "/policies/rollback", json={})
    assert rolled.status_code == 200 and rolled.json()["version"] == "v0001"
    wait_for_version(gateway, "v0001")
    statuses = {p["version"]: p["status"] for p in admin(gateway, "GET", "/policies").json()["data"]}
    assert statuses == {"v0001": "promoted", "v0002": "rolled_back", "v0003": "candidate"}

    pinned = admin(gateway, "POST", "/policies/v0003/pin", json={"reason": "hold for the demo"})
    assert pinned.json()["status"] == "pinned"
    wait_for_version(gateway, "v0003")
    listed = admin(gateway, "GET", "/policies").json()
    assert listed["current"] == "v0003"
    assert [p["version"] for p in listed["data"] if p["current"]] == ["v0003"]

    assert admin(gateway, "POST", "/policies/v9999/promote").status_code == 404
    assert admin(gateway, "POST", "/policies/bad name!/promote").status_code == 400
    assert (
        admin(gateway, "POST", "/policies/rollback", json={"to": "v0003"}).status_code == 409
    )  # already current

    # Finding 6: a manual rollback while Redis is down works (CURRENT is the one pointer) and stays
    # rolled back when Redis returns (before: refused with 503; with a Redis copy it would be undone)
    redis_server.stop()
    down = admin(gateway, "POST", "/policies/rollback", json={"to": "v0001", "reason": "incident"})
    assert down.status_code == 200, down.text
    assert (registry_dir / "CURRENT").read_text().strip() == "v0001"
    wait_for_version(gateway, "v0001")
    redis_server.start()
    time.sleep(1.0)  # several polls of serve's watcher
    assert served_version(gateway) == "v0001"
    assert admin(gateway, "GET", "/policies").json()["current"] == "v0001"


def test_n_choices_come_from_one_policy_version(
    start_gateway, serve, registry_serve, registry_dir, redis_server
):
    """Two replicas on different versions (base and a registry version): the n choices of one completion
    are spread over both, detected, and regenerated on the replicas of one version."""
    Registry(registry_dir).set_current("v0002")
    deadline = time.monotonic() + 60
    while httpx.get(f"{registry_serve.url}/health").headers["X-Policy-Version"] != "v0002":
        assert time.monotonic() < deadline, "serve did not swap to v0002"
        time.sleep(0.2)
    gateway = start_gateway([serve.url, registry_serve.url], redis_server.url_for("gateway"))
    versions = {r.url: r.policy_version for r in gateway.state.backend.replicas}
    assert len(set(versions.values())) == 2, versions
    client = gateway.openai("alice")
    for _ in range(3):
        raw = client.completions.with_raw_response.create(
            model=MODEL_NAME, prompt="Consistent?", max_tokens=3, n=4, temperature=1.0
        )
        assert raw.headers["X-Policy-Version"] in versions.values()
        assert raw.parse().model_extra["policy_version"] == raw.headers["X-Policy-Version"]
    assert gateway.metric("gateway_policy_version_regenerations_total") >= 2
    streamed = list(
        client.completions.create(model=MODEL_NAME, prompt="Consistent?", max_tokens=3, n=4, stream=True)
    )
    assert len({c.model_extra["policy_version"] for c in streamed}) == 1
