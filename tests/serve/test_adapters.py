"""Adapter versions in serve: the base is loaded once and adapter versions are attached beside it.

- A request naming a version (TGI's ``parameters.adapter_id``) is answered by that version, concurrently
  with requests for other versions (one running batch per version), and its greedy tokens equal HF
  ``generate`` with that version's weights (``PeftModel.from_pretrained`` over the base); the answer's
  ``X-Policy-Version`` names it.
- An unknown version is a 404 TGI error, an invalid one a 422; neither is served.
- Promoting an adapter version hot-swaps to it with no failed request.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructloop.registry import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    Registry,
    base_weights_sha256,
    combined_sha256,
    sha256_file,
)
from instructloop.wire import POLICY_VERSION_HEADER

PROMPTS = ["Hello, who are you?", "Name a color.", "Count to five:", "Why do cats purr?"]
MAX_NEW = 24


def write_adapter_version(registry: Registry, version: str, base_dir, seed: int) -> None:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(base, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # big enough that greedy tokens differ from the base's
            param.data.normal_(0, 0.5)
    registry.write_adapter(
        version, peft_model, base_sha256=base_weights_sha256(base_dir), base_model=str(base_dir)
    )


def peft_greedy(base_dir, adapter_dir, prompts: list[str]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return out


@pytest.fixture
def adapter_registry(tmp_path, varied_model_dir):
    registry = Registry(tmp_path / "registry")
    write_adapter_version(registry, "v0001", varied_model_dir, seed=1)
    write_adapter_version(registry, "v0002", varied_model_dir, seed=2)
    return registry


async def _ask(http: httpx.AsyncClient, url: str, prompt: str, version: str | None, stream: bool):
    parameters = {"max_new_tokens": MAX_NEW, "details": True}
    if version is not None:
        parameters["adapter_id"] = version
    body = {"inputs": prompt, "parameters": parameters}
    if stream:
        async with http.stream("POST", f"{url}/generate_stream", json=body) as response:
            events = [
                json.loads(line[5:]) async for line in response.aiter_lines() if line.startswith("data:")
            ]
        assert {e["policy_version"] for e in events} == {response.headers[POLICY_VERSION_HEADER]}
        return response.headers[POLICY_VERSION_HEADER], [e["token"]["id"] for e in events]
    response = await http.post(f"{url}/generate", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["policy_version"] == response.headers[POLICY_VERSION_HEADER]
    return payload["policy_version"], [t["id"] for t in payload["details"]["tokens"]]


async def test_named_versions_answer_with_their_own_weights(start_server, varied_model_dir, adapter_registry):
    registry = adapter_registry
    expected = {"base": peft_greedy(varied_model_dir, None, PROMPTS)}
    for version in ("v0001", "v0002"):
        expected[version] = peft_greedy(varied_model_dir, registry.version_dir(version), PROMPTS)
    assert expected["v0001"] != expected["base"] and expected["v0002"] != expected["v0001"]
    registry.set_current("v0001")

    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        max_batch_size=16,
        registry_dir=str(registry.root),
        poll_interval_s=0.2,
        max_loaded_versions=1,
    )
    assert httpx.get(f"{server.url}/info").json()["policy_version"] == "v0001"
    async with httpx.AsyncClient(timeout=120) as http:
        # all versions at once: each request is answered by the version it names (none = the current one)
        asks = [
            (i, version, bool(i % 2))
            for i in range(len(PROMPTS))
            for version in (None, "base", "v0001", "v0002")
        ]
        answers = await asyncio.gather(*(_ask(http, server.url, PROMPTS[i], v, s) for i, v, s in asks))
        for (i, version, _), (answered_by, tokens) in zip(asks, answers, strict=True):
            assert answered_by == (version or "v0001")
            assert tokens == expected[answered_by][i], (i, version)
        # max_loaded_versions=1: v0002 was evicted after base/v0001 traffic? it reloads and still answers
        # right
        assert (await _ask(http, server.url, PROMPTS[0], "v0002", False)) == ("v0002", expected["v0002"][0])

        missing = await http.post(
            f"{server.url}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "v0042"}}
        )
        assert missing.status_code == 404
        assert missing.json()["error_type"] == "validation" and "v0042" in missing.json()["error"]
        bad_name = await http.post(
            f"{server.url}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "../x"}}
        )
        assert bad_name.status_code == 404 and "adapter_id" in bad_name.json()["error"]

    # the base module is shared: every adapter version's tensors sit on the one base model
    shared = server.runtime.base.shared
    assert shared is not None and shared.peft is not None
    assert server.runtime.engine.base.model is server.runtime.base.model


async def test_invalid_adapter_is_refused_and_never_served(start_server, varied_model_dir, adapter_registry):
    registry = adapter_registry
    folder = registry.version_dir("v0002")
    state = load_file(folder / ADAPTER_WEIGHTS)
    first = sorted(state)[0]
    state[first][0, 0] = float("nan")
    save_file(state, str(folder / ADAPTER_WEIGHTS))  # re-seal the manifest: only the value check can catch it
    manifest = registry.manifest("v0002")
    manifest.files = {name: sha256_file(folder / name) for name in manifest.files}
    manifest.sha256 = combined_sha256(manifest.files)
    (folder / MANIFEST).write_text(manifest.model_dump_json())

    server = start_server(
        model=str(varied_model_dir), device="cpu", registry_dir=str(registry.root), poll_interval_s=0.2
    )
    refused = httpx.post(
        f"{server.url}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "v0002"}}
    )
    assert refused.status_code == 422
    assert "non-finite" in refused.json()["error"] and refused.json()["error_type"] == "validation"
    assert "v0002" not in server.runtime.base.shared.attached


async def test_promoting_an_adapter_version_hot_swaps_without_failures(
    start_server, varied_model_dir, adapter_registry
):
    registry = adapter_registry
    expected = {
        "base": peft_greedy(varied_model_dir, None, PROMPTS),
        "v0001": peft_greedy(varied_model_dir, registry.version_dir("v0001"), PROMPTS),
    }
    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        max_batch_size=8,
        registry_dir=str(registry.root),
        poll_interval_s=0.1,
    )
    results: list[tuple[int, int, str, list[int]]] = []
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            i = w
            while not stop.is_set():
                body = {
                    "inputs": PROMPTS[i % len(PROMPTS)],
                    "parameters": {"max_new_tokens": MAX_NEW, "details": True},
                }
                response = await http.post(f"{server.url}/generate", json=body)
                payload = response.json()
                tokens = [t["id"] for t in payload.get("details", {}).get("tokens", [])]
                results.append(
                    (i % len(PROMPTS), response.status_code, payload.get("policy_version"), tokens)
                )
                i += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(4)]
    deadline = asyncio.get_running_loop().time() + 120
    while len(results) < 4 and asyncio.get_running_loop().time() < deadline:  # answers from the base first
        await asyncio.sleep(0.1)
    await asyncio.to_thread(registry.set_current, "v0001")
    deadline = asyncio.get_running_loop().time() + 60
    while (
        not any(v == "v0001" for _, _, v, _ in results[-4:]) and asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert all(status == 200 for _, status, _, _ in results)
    assert {v for _, _, v, _ in results} == {"base", "v0001"}
    for prompt, _, version, tokens in results:
        assert tokens == expected[version][prompt]
