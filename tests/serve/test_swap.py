"""Policy hot-swap: under concurrent load a newly published version takes over with no failed request, every
response is produced by exactly one version (its tokens equal HF generate of that version's weights), and a
corrupt / NaN / wrong-shape checkpoint is never served."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from instructloop.registry import CURRENT_FILE, Registry
from tests.conftest import build_tiny_model_dir
from tests.serve.test_parity import hf_greedy

PROMPTS = ["Hello, who are you?", "Name a color.", "Count to five:", "Why do cats purr? Explain briefly."]
MAX_NEW = 40


@dataclass
class Outcome:
    prompt: int
    sent_at: float
    done_at: float
    status: int
    version: str | None
    tokens: list[int]


async def _worker(url: str, worker: int, stop: asyncio.Event, out: list[Outcome]) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        i = worker
        while not stop.is_set():
            prompt = i % len(PROMPTS)
            body = {"inputs": PROMPTS[prompt], "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
            sent = time.monotonic()
            if i % 2:  # half streaming: every event carries the version
                async with http.stream("POST", f"{url}/generate_stream", json=body) as response:
                    events = [
                        json.loads(line[5:])
                        async for line in response.aiter_lines()
                        if line.startswith("data:")
                    ]
                versions = {e.get("policy_version") for e in events}
                assert len(versions) == 1, f"one stream, several versions: {versions}"
                assert response.headers.get("x-policy-version") in versions
                out.append(
                    Outcome(
                        prompt,
                        sent,
                        time.monotonic(),
                        response.status_code,
                        versions.pop(),
                        [e["token"]["id"] for e in events if "token" in e],
                    )
                )
            else:
                response = await http.post(f"{url}/generate", json=body)
                payload = response.json()
                assert response.headers.get("x-policy-version") == payload.get("policy_version")
                out.append(
                    Outcome(
                        prompt,
                        sent,
                        time.monotonic(),
                        response.status_code,
                        payload.get("policy_version"),
                        [t["id"] for t in payload.get("details", {}).get("tokens", [])],
                    )
                )
            i += 1


def _save_version(registry: Registry, version: str, model_dir: Path, tokenizer, mutate=None) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mutate is not None:
        mutate(model)
    registry.write_pretrained(version, model, tokenizer, parent=None)


async def test_hot_swap_under_load(start_server, varied_model_dir, tokenizer, tmp_path, redis_server):
    new_dir = build_tiny_model_dir(tmp_path / "new-weights", tokenizer, seed=1, initializer_range=0.3)
    registry_dir = tmp_path / "registry"
    registry = Registry(registry_dir, redis=redis_server.client("learner"))
    _save_version(registry, "v0001", new_dir, tokenizer)
    expected = {
        "base": hf_greedy(varied_model_dir, PROMPTS, [MAX_NEW] * len(PROMPTS)),
        "v0001": hf_greedy(new_dir, PROMPTS, [MAX_NEW] * len(PROMPTS)),
    }
    assert expected["base"] != expected["v0001"]  # the swap must visibly change the outputs

    # poll every 30 s: the swap below can only come from the pub/sub message
    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        max_batch_size=8,
        registry_dir=str(registry_dir),
        redis_url=redis_server.url_for("serve"),
        poll_interval_s=30,
    )
    assert httpx.get(f"{server.url}/info").json()["policy_version"] == "base"
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_worker(server.url, w, stop, outcomes)) for w in range(6)]
    await asyncio.sleep(1.0)
    published_at = time.monotonic()
    await asyncio.to_thread(registry.set_current, "v0001")
    deadline = time.monotonic() + 30
    while not any(o.version == "v0001" for o in outcomes):
        assert time.monotonic() < deadline, "no response from the new version"
        await asyncio.sleep(0.05)
    first_new = min(o.done_at for o in outcomes if o.version == "v0001")
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*workers)

    assert outcomes and all(o.status == 200 for o in outcomes), "a request failed during the swap"
    assert {o.version for o in outcomes} == {"base", "v0001"}
    for o in outcomes:
        assert o.tokens == expected[o.version][o.prompt], f"{o.version} prompt {o.prompt} mixed weights"
    # requests in flight at the switch finished on the old weights ...
    assert any(o.version == "base" and o.done_at > published_at for o in outcomes)
    # ... and everything sent after the first new response went to the new version
    assert all(o.version == "v0001" for o in outcomes if o.sent_at > first_new)
    assert httpx.get(f"{server.url}/info").json()["policy_version"] == "v0001"
    assert server.metric("instructloop_serve_policy_swaps_total") == 1
    assert server.metric("instructloop_serve_policy_swap_failures_total") == 0
    assert server.metric("instructloop_serve_policy_version", '{version="v0001"}') == 1
    # the old model is dropped once its batch drained
    assert list(server.runtime.engine._policies) == ["v0001"]


def _tamper(registry: Registry, version: str) -> None:
    path = next(registry.version_dir(version).glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))


def _nan(model) -> None:
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")


def _untie(model) -> None:
    """An lm_head that differs from the embedding, where the served architecture ties them."""
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.5)


@pytest.mark.parametrize("kind", ["tampered", "nan", "wrong_shape", "untied_lm_head"])
def test_bad_checkpoint_is_never_served(start_server, varied_model_dir, tokenizer, tmp_path, kind):
    registry_dir = tmp_path / "registry"
    registry = Registry(registry_dir)
    good_dir = build_tiny_model_dir(tmp_path / "good", tokenizer, seed=2, initializer_range=0.3)
    if kind == "wrong_shape":
        bad_dir = build_tiny_model_dir(tmp_path / "bad", tokenizer, seed=1, head_dim=8)
        _save_version(registry, "v0001", bad_dir, tokenizer)
    elif kind == "untied_lm_head":
        _save_version(registry, "v0001", good_dir, tokenizer, mutate=_untie)
    else:
        _save_version(registry, "v0001", good_dir, tokenizer, mutate=_nan if kind == "nan" else None)
    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        registry_dir=str(registry_dir),
        poll_interval_s=0.05,
        swap_retry_s=60,
    )
    if kind == "tampered":
        _tamper(registry, "v0001")
        (registry_dir / CURRENT_FILE).write_text("v0001\n")  # set_current would refuse it: write the pointer
    else:
        registry.set_current("v0001")

    deadline = time.monotonic() + 20
    while server.metric("instructloop_serve_policy_swap_failures_total") < 1:
        assert time.monotonic() < deadline, "the bad version was not refused"
        time.sleep(0.05)
    time.sleep(0.5)  # ten more polls: a refused version is not retried in a tight loop
    assert server.metric("instructloop_serve_policy_swap_failures_total") == 1
    assert server.metric("instructloop_serve_policy_swaps_total") == 0
    assert httpx.get(f"{server.url}/info").json()["policy_version"] == "base"
    response = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
    )
    assert response.status_code == 200 and response.json()["policy_version"] == "base"
    reason = {"tampered": "sha256", "nan": "non-finite", "wrong_shape": "shape", "untied_lm_head": "tied"}[
        kind
    ]
    assert reason in server.runtime.watcher.last_error

    # a good version published afterwards is served
    _save_version(registry, "v0002", good_dir, tokenizer)
    registry.set_current("v0002")
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/info").json()["policy_version"] != "v0002":
        assert time.monotonic() < deadline, "the good version was not installed"
        time.sleep(0.05)
    expected = hf_greedy(good_dir, ["Hi"], [3])[0]
    payload = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "details": True}}
    ).json()
    assert payload["policy_version"] == "v0002"
    assert [t["id"] for t in payload["details"]["tokens"]] == expected


def test_starts_on_the_registry_current_version(start_server, varied_model_dir, tokenizer, tmp_path):
    registry = Registry(tmp_path / "registry")
    new_dir = build_tiny_model_dir(tmp_path / "v1", tokenizer, seed=3, initializer_range=0.3)
    _save_version(registry, "v0001", new_dir, tokenizer)
    registry.set_current("v0001")
    server = start_server(model=str(varied_model_dir), device="cpu", registry_dir=str(tmp_path / "registry"))
    assert httpx.get(f"{server.url}/info").json()["policy_version"] == "v0001"
    payload = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}}
    )
    assert payload.headers["x-policy-version"] == "v0001"
    assert [t["id"] for t in payload.json()["details"]["tokens"]] == hf_greedy(new_dir, ["Hi"], [4])[0]


def test_missed_message_is_caught_by_polling_the_current_file(
    start_server, varied_model_dir, tokenizer, tmp_path, redis_server
):
    registry = Registry(tmp_path / "registry", redis=redis_server.client("learner"))
    new_dir = build_tiny_model_dir(tmp_path / "v1", tokenizer, seed=4, initializer_range=0.3)
    _save_version(registry, "v0001", new_dir, tokenizer)
    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        registry_dir=str(tmp_path / "registry"),
        redis_url=redis_server.url_for("serve"),
        poll_interval_s=0.2,
    )
    Registry(tmp_path / "registry").set_current("v0001")  # the pointer changes, no message is published
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/info").json()["policy_version"] != "v0001":
        assert time.monotonic() < deadline, "the pointer change was not noticed"
        time.sleep(0.05)


def test_candidate_is_prefetched_and_promotion_is_a_switch(
    start_server, varied_model_dir, tokenizer, tmp_path
):
    registry = Registry(tmp_path / "registry")
    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        registry_dir=str(tmp_path / "registry"),
        poll_interval_s=0.05,
    )
    new_dir = build_tiny_model_dir(tmp_path / "v1", tokenizer, seed=5, initializer_range=0.3)
    _save_version(registry, "v0001", new_dir, tokenizer)  # a candidate: not served yet
    deadline = time.monotonic() + 20
    while server.metric("instructloop_serve_policy_prefetches_total") < 1:
        assert time.monotonic() < deadline, "the candidate was not prefetched"
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/info").json()["policy_version"] == "base"
    loads_before = server.metric("instructloop_serve_policy_swap_duration_count")
    registry.set_current("v0001")
    while httpx.get(f"{server.url}/info").json()["policy_version"] != "v0001":
        assert time.monotonic() < deadline, "the promoted candidate was not installed"
        time.sleep(0.05)
    assert server.metric("instructloop_serve_policy_swap_duration_count") == loads_before  # no second load
    payload = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}}
    ).json()
    assert [t["id"] for t in payload["details"]["tokens"]] == hf_greedy(new_dir, ["Hi"], [4])[0]


def test_watcher_survives_an_unreadable_manifest_and_health_reflects_a_dead_watcher(
    start_server, varied_model_dir, tokenizer, tmp_path
):
    """Finding 7: a manifest that cannot be read (here: replaced by a folder after the candidate was
    prefetched) used to kill the watcher thread silently; serve then never swapped again and stayed
    healthy. Now the error is logged and counted, the watcher goes on (it swaps once the manifest is
    back), and /health fails if the thread ends anyway."""
    registry_dir = tmp_path / "registry"
    registry = Registry(registry_dir)
    server = start_server(
        model=str(varied_model_dir), device="cpu", registry_dir=str(registry_dir), poll_interval_s=0.05
    )
    new_dir = build_tiny_model_dir(tmp_path / "v1", tokenizer, seed=6, initializer_range=0.3)
    _save_version(registry, "v0001", new_dir, tokenizer)
    deadline = time.monotonic() + 30
    while server.metric("instructloop_serve_policy_prefetches_total") < 1:
        assert time.monotonic() < deadline, "the candidate was not prefetched"
        time.sleep(0.05)
    manifest = registry.version_dir("v0001") / "manifest.json"
    saved = manifest.read_text()
    manifest.unlink()
    manifest.mkdir()  # reading it raises IsADirectoryError, not a ValueError
    (registry_dir / CURRENT_FILE).write_text("v0001\n")  # set_current would refuse it: write the pointer
    while server.metric("instructloop_serve_policy_watcher_errors_total") < 1:
        assert time.monotonic() < deadline, "the watcher error was not counted"
        time.sleep(0.05)
    assert server.runtime.watcher.alive()
    assert httpx.get(f"{server.url}/health").status_code == 200
    manifest.rmdir()
    manifest.write_text(saved)
    while httpx.get(f"{server.url}/info").json()["policy_version"] != "v0001":
        assert time.monotonic() < deadline, "the watcher did not swap once the manifest was readable again"
        time.sleep(0.05)

    server.runtime.watcher.stop()  # the thread has ended, whatever the reason: the replica is not healthy
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "policy watcher not running"
