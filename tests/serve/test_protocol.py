"""The TGI protocol over real HTTP: the text-generation client (sync and async, generate and stream, with
details) parses our answers; /info, /health, /metrics; the policy version on every answer."""

from __future__ import annotations

import json

import httpx
import pytest
from text_generation import AsyncClient, Client
from text_generation.types import FinishReason

PROMPT = "Write one short sentence about the sea."


def test_client_generate_with_details(tiny_server):
    response = Client(tiny_server.url).generate(PROMPT, max_new_tokens=7)
    details = response.details
    assert details.finish_reason == FinishReason.Length
    assert details.generated_tokens == 7 == len(details.tokens)
    assert details.seed is None  # greedy
    assert details.prefill == []
    assert response.generated_text == "".join(t.text for t in details.tokens)
    assert all(t.logprob is not None and t.logprob <= 0.0 for t in details.tokens)


def test_client_generate_stream_with_details(tiny_server):
    client = Client(tiny_server.url)
    events = list(client.generate_stream(PROMPT, max_new_tokens=6))
    assert len(events) == 6
    assert all(e.details is None and e.generated_text is None for e in events[:-1])
    last = events[-1]
    assert last.details.finish_reason == FinishReason.Length and last.details.generated_tokens == 6
    assert last.generated_text == "".join(e.token.text for e in events)
    # streaming and non-streaming greedy give the same tokens
    response = client.generate(PROMPT, max_new_tokens=6)
    assert [t.id for t in response.details.tokens] == [e.token.id for e in events]


async def test_async_client_generate_and_stream(tiny_server):
    client = AsyncClient(tiny_server.url)
    response = await client.generate(
        PROMPT, max_new_tokens=5, do_sample=True, seed=7, top_k=20, temperature=0.8
    )
    assert response.details.seed == 7 and response.details.generated_tokens == 5
    streamed = [
        e
        async for e in client.generate_stream(
            PROMPT, max_new_tokens=5, do_sample=True, seed=7, top_k=20, temperature=0.8
        )
    ]
    # same seed, same parameters: same tokens, whatever else was in the batch
    assert [e.token.id for e in streamed] == [t.id for t in response.details.tokens]
    assert streamed[-1].details.seed == 7


def test_return_full_text_and_stop_sequence(tiny_server):
    client = Client(tiny_server.url)
    plain = client.generate(PROMPT, max_new_tokens=6)
    full = client.generate(PROMPT, max_new_tokens=6, return_full_text=True)
    assert full.generated_text == PROMPT + plain.generated_text
    texts = [t.text for t in plain.details.tokens]
    stop = next(t for t in texts[2:] if t.strip())  # a token text that appears from the 3rd token on
    cut = client.generate(PROMPT, max_new_tokens=6, stop_sequences=[stop])
    assert cut.details.finish_reason == FinishReason.StopSequence
    assert cut.generated_text.endswith(stop)
    assert cut.details.generated_tokens == texts.index(stop) + 1


def test_policy_version_in_header_body_and_every_event(tiny_server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}}
    response = httpx.post(f"{tiny_server.url}/generate", json=body)
    assert response.status_code == 200
    assert response.headers["x-policy-version"] == "base"
    payload = response.json()
    assert payload["policy_version"] == "base" and payload["details"]["generated_tokens"] == 3

    compat = httpx.post(f"{tiny_server.url}/", json=body)
    assert isinstance(compat.json(), list) and compat.json()[0]["policy_version"] == "base"

    with httpx.stream("POST", f"{tiny_server.url}/generate_stream", json=body) as stream:
        assert stream.headers["x-policy-version"] == "base"
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[len("data:") :]) for line in stream.iter_lines() if line.startswith("data:")
        ]
    assert len(events) == 3 and all(e["policy_version"] == "base" for e in events)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert events[-1]["details"]["input_length"] > 0
    assert not any("[DONE]" in json.dumps(e) for e in events)


def test_generate_without_details_omits_them(tiny_server):
    payload = httpx.post(
        f"{tiny_server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    ).json()
    assert payload["details"] is None and isinstance(payload["generated_text"], str)


def test_truncate_keeps_the_last_tokens(tiny_server, tokenizer):
    long_prompt = "one two three four five six seven eight nine ten"
    tail = tokenizer.decode(tokenizer(long_prompt)["input_ids"][-3:])
    client = Client(tiny_server.url)
    truncated = client.generate(long_prompt, max_new_tokens=4, truncate=3)
    direct = client.generate(tail, max_new_tokens=4)
    assert [t.id for t in truncated.details.tokens] == [t.id for t in direct.details.tokens]


def test_info_health_metrics(tiny_server):
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert info["policy_version"] == "base"
    assert info["max_input_tokens"] == 256 and info["max_total_tokens"] == 512
    assert info["model_device_type"] == "cpu" and info["model_dtype"] == "float32"
    assert info["max_batch_size"] == 8 and info["model_id"]
    health = httpx.get(f"{tiny_server.url}/health")
    assert health.status_code == 200 and health.json()["policy_version"] == "base"
    Client(tiny_server.url).generate(PROMPT, max_new_tokens=2)
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in (
        "tgi_request_count_total",
        "tgi_request_success_total",
        "tgi_request_duration_bucket",
        "tgi_request_queue_duration_bucket",
        "tgi_request_generated_tokens_bucket",
        "tgi_batch_current_size",
        "tgi_queue_size",
        'instructloop_serve_policy_version{version="base"} 1.0',
        "instructloop_serve_policy_swap_failures_total",
    ):
        assert name in text, name
    assert tiny_server.metric("tgi_request_success_total") >= 1


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_every_route_answers_the_client_schema(tiny_server, route):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}, "stream": route == "/"}
    response = httpx.post(f"{tiny_server.url}{route}", json=body)
    assert response.status_code == 200 and response.headers["x-policy-version"] == "base"


def test_token_id_inputs_and_prompt_logprobs(tiny_server, tokenizer):
    """Our extensions of TGI's /generate: ``inputs`` as token ids (generated from exactly those), and
    ``decoder_input_details`` with the prompt tokens' logprobs (the first null) and, with ``top_n_tokens``,
    ``prefill_top_tokens``."""
    ids = tokenizer(PROMPT)["input_ids"]
    parameters = {"max_new_tokens": 4, "details": True, "decoder_input_details": True, "top_n_tokens": 2}
    by_text = httpx.post(f"{tiny_server.url}/generate", json={"inputs": PROMPT, "parameters": parameters})
    by_ids = httpx.post(f"{tiny_server.url}/generate", json={"inputs": ids, "parameters": parameters})
    assert by_text.status_code == by_ids.status_code == 200, by_ids.text
    text_details, ids_details = by_text.json()["details"], by_ids.json()["details"]
    assert by_ids.json()["generated_text"] == by_text.json()["generated_text"]
    assert ids_details["prefill"] == text_details["prefill"]
    prefill = ids_details["prefill"]
    assert [t["id"] for t in prefill] == ids and prefill[0]["logprob"] is None
    assert all(t["logprob"] is not None and t["logprob"] <= 0.0 for t in prefill[1:])
    top = ids_details["prefill_top_tokens"]
    assert len(top) == len(ids) and top[0] == [] and all(len(row) == 2 for row in top[1:])
    assert all(row[0]["logprob"] >= t["logprob"] - 1e-6 for row, t in zip(top[1:], prefill[1:], strict=True))
    plain = httpx.post(f"{tiny_server.url}/generate", json={"inputs": ids, "parameters": {"details": True}})
    assert "prefill_top_tokens" not in plain.json()["details"] and plain.json()["details"]["prefill"] == []
    too_big = httpx.post(f"{tiny_server.url}/generate", json={"inputs": [1, len(tokenizer)]})
    assert too_big.status_code == 422 and "`inputs`" in too_big.json()["error"]
