"""TGI error answers: 422 naming the field for every invalid parameter, 429 past the queue, and a client
that disconnects takes its sequence out of the batch."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import text_generation
from text_generation.errors import OverloadedError, ValidationError

PROMPT = "Tell me a story."

INVALID = [
    ("temperature", {"temperature": 0}),
    ("temperature", {"temperature": -1.0}),
    ("temperature", {"temperature": "hot"}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": 0}),
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("max_new_tokens", {"max_new_tokens": 100000}),
    ("max_new_tokens", {"max_new_tokens": "many"}),
    ("repetition_penalty", {"repetition_penalty": 0}),
    ("seed", {"seed": -1}),
    ("truncate", {"truncate": 0}),
    ("truncate", {"truncate": 100000}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": "not-a-list"}),
    ("do_sample", {"do_sample": "perhaps"}),
    ("details", {"details": "perhaps"}),
    ("return_full_text", {"return_full_text": "perhaps"}),
    ("best_of", {"best_of": 2}),
    ("typical_p", {"typical_p": 0.5}),
    ("watermark", {"watermark": True}),
    ("decoder_input_details", {"decoder_input_details": "perhaps"}),
    ("top_n_tokens", {"top_n_tokens": 6}),  # above max_top_n_tokens (5)
    ("top_n_tokens", {"top_n_tokens": -1}),
    ("frequency_penalty", {"frequency_penalty": 0.5}),
    ("grammar", {"grammar": {"type": "regex", "value": "a+"}}),
]


@pytest.mark.parametrize(
    ("field", "parameters"), INVALID, ids=[f"{f}={list(p.values())[0]!r}" for f, p in INVALID]
)
def test_invalid_parameter_is_422_naming_the_field(tiny_server, field, parameters):
    response = httpx.post(f"{tiny_server.url}/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 422
    body = response.json()
    assert body["error_type"] == "validation"
    assert f"`{field}`" in body["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": ""}, "inputs"),
        ({"parameters": {}}, "inputs"),
        ({"inputs": 12}, "inputs"),
        ({"inputs": "word " * 400}, "inputs"),  # over max_input_tokens = 256
    ],
)
def test_invalid_inputs_is_422(tiny_server, body, field):
    response = httpx.post(f"{tiny_server.url}/generate", json=body)
    assert response.status_code == 422 and f"`{field}`" in response.json()["error"]


def test_malformed_json_is_422(tiny_server):
    response = httpx.post(
        f"{tiny_server.url}/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error_type"] == "validation"


def test_client_raises_validation_error(tiny_server):
    with pytest.raises(ValidationError, match="max_new_tokens"):
        text_generation.Client(tiny_server.url).generate(PROMPT, max_new_tokens=100000)


async def test_queue_full_is_429(start_server, varied_model_dir):
    server = start_server(
        model=str(varied_model_dir),
        device="cpu",
        max_batch_size=1,
        max_queue=1,
        max_input_tokens=64,
        max_total_tokens=4096,
    )
    engine = server.runtime.engine
    client = text_generation.AsyncClient(server.url, timeout=120)
    async with httpx.AsyncClient(timeout=120) as http:
        running = http.stream(
            "POST",
            f"{server.url}/generate_stream",
            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4000}},
        )
        async with running as first:
            assert first.status_code == 200  # headers arrive after the first token: it is in the batch
            queued = asyncio.create_task(client.generate(PROMPT, max_new_tokens=2))
            deadline = time.monotonic() + 10
            while engine.queue_size() < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            with pytest.raises(OverloadedError):
                await client.generate(PROMPT, max_new_tokens=2)
            response = await http.post(f"{server.url}/generate", json={"inputs": PROMPT})
            assert response.status_code == 429 and response.json()["error_type"] == "overloaded"
        # leaving the block closed the stream: the running request is cancelled, the queued one now runs
        answer = await asyncio.wait_for(queued, 60)
        assert answer.details.generated_tokens == 2
    assert server.metric("tgi_request_failure_total", '{err="overloaded"}') == 2


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_stream_disconnect_cancels_the_sequence(start_server, varied_model_dir):
    server = start_server(
        model=str(varied_model_dir), device="cpu", max_input_tokens=64, max_total_tokens=8192
    )
    engine = server.runtime.engine
    with httpx.stream(
        "POST",
        f"{server.url}/generate_stream",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8000}},
        timeout=60,
    ) as stream:
        lines = stream.iter_lines()
        seen = [
            json.loads(line[5:])
            for line, _ in zip((x for x in lines if x.startswith("data:")), range(3), strict=False)
        ]
        assert len(seen) == 3
        assert engine.batch_size() == 1
    # the connection is closed: the sequence leaves the batch long before 8000 tokens
    _wait_for(lambda: engine.batch_size() == 0)
    _wait_for(lambda: server.metric("instructloop_serve_request_cancelled_total") == 1)
    assert server.metric("tgi_request_success_total") == 0


def test_non_streaming_disconnect_cancels_the_sequence(start_server, varied_model_dir):
    server = start_server(
        model=str(varied_model_dir), device="cpu", max_input_tokens=64, max_total_tokens=8192
    )
    engine = server.runtime.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/generate",
            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8000}},
            timeout=httpx.Timeout(60, read=0.5),
        )
    _wait_for(lambda: server.metric("instructloop_serve_request_cancelled_total") == 1)
    _wait_for(lambda: engine.batch_size() == 0)
    assert server.metric("tgi_request_success_total") == 0


def test_generation_failure_is_424_and_the_loop_survives(start_server, varied_model_dir):
    """A real failing forward (a weight of the wrong shape put into the served model) fails only the requests
    of that step with TGI's 424 `generation` error; the model loop keeps serving."""
    import torch

    server = start_server(model=str(varied_model_dir), device="cpu")
    model = server.runtime.base.model
    original = model.model.norm.weight
    model.model.norm.weight = torch.nn.Parameter(torch.ones(3))
    try:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
        response = httpx.post(f"{server.url}/generate", json=body)
        assert response.status_code == 424 and response.json()["error_type"] == "generation"
        streamed = httpx.post(f"{server.url}/generate_stream", json=body)
        assert streamed.status_code == 424 and streamed.json()["error_type"] == "generation"
        with pytest.raises(text_generation.errors.GenerationError):
            text_generation.Client(server.url).generate(PROMPT, max_new_tokens=3)
    finally:
        model.model.norm.weight = original
    assert httpx.post(f"{server.url}/generate", json=body).status_code == 200
    assert server.metric("tgi_request_failure_total", '{err="generation"}') == 3
    assert server.runtime.engine.alive


def test_decoder_input_details_report_the_prompt_ids_serve_generated_from(tiny_server, tokenizer):
    """The prompt contract: serve reports the input token ids (TGI ``details.prefill``), which are the
    tokenizer's ids of the text with its default special tokens, cut by ``truncate`` from the left."""
    ids = tokenizer(PROMPT)["input_ids"]
    for parameters, expected in (({}, ids), ({"truncate": 3}, ids[-3:])):
        response = httpx.post(
            f"{tiny_server.url}/generate",
            json={
                "inputs": PROMPT,
                "parameters": {
                    "max_new_tokens": 2,
                    "details": True,
                    "decoder_input_details": True,
                    **parameters,
                },
            },
        )
        assert response.status_code == 200, response.text
        prefill = response.json()["details"]["prefill"]
        assert [t["id"] for t in prefill] == expected
        assert [t["text"] for t in prefill] == [tokenizer.decode([i]) for i in expected]
    plain = httpx.post(
        f"{tiny_server.url}/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}},
    ).json()
    assert plain["details"]["prefill"] == []
