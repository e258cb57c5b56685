"""Completions, chat and models through the official ``openai`` client, in front of a real serve."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from instructloop.events import CompletionEvent
from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import MODEL_NAME


def completion_events(redis_server) -> list[CompletionEvent]:
    entries = redis_server.client().xrange(stream_key(Stream.completions))
    return [CompletionEvent.from_fields(fields) for _, fields in entries]


def test_completion_n_choices_one_version_logged(gateway, redis_server):
    client = gateway.openai("alice")
    raw = client.completions.with_raw_response.create(
        model=MODEL_NAME, prompt="The sky is", max_tokens=6, n=3, temperature=1.0, seed=7, user="u-1"
    )
    completion = raw.parse()
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert completion.model == MODEL_NAME
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in completion.choices)
    # the policy version is in the body and in the header, and it is the one serve reports
    version = completion.model_extra["policy_version"]
    assert raw.headers["X-Policy-Version"] == version
    assert httpx.get(f"{gateway.state.backend.replicas[0].url}/health").headers["X-Policy-Version"] == version
    assert completion.usage.prompt_tokens == len(gateway.state.tokenizer("The sky is")["input_ids"])
    assert 3 <= completion.usage.completion_tokens <= 18
    # the completion is on the completions stream, self-contained
    events = completion_events(redis_server)
    assert len(events) == 1
    event = events[0]
    assert event.completion_id == completion.id and event.prompt == "The sky is"
    assert [c.text for c in event.choices] == [c.text for c in completion.choices]
    assert event.policy_version == version
    assert event.caller == gateway.state.keys.authenticate(gateway.keys["alice"]).key_id
    assert event.sampling["n"] == 3 and event.sampling["seed"] == 7 and event.sampling["user"] == "u-1"


def test_seeded_sampling_is_reproducible_and_greedy_is_deterministic(gateway):
    client = gateway.openai("alice")
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, n=2, temperature=0.9, seed=123)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    second = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == second
    assert first[0] != first[1]  # choice i samples with seed + i
    greedy = [
        client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0]


def test_list_prompt_and_logprobs(gateway, redis_server):
    client = gateway.openai("alice")
    completion = client.completions.create(
        model=MODEL_NAME, prompt=["Hello", "Goodbye"], max_tokens=4, n=2, temperature=0.8, logprobs=0
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for choice in completion.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 4
        assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs)
    events = completion_events(redis_server)
    assert [e.prompt for e in events] == ["Hello", "Goodbye"]
    assert [[c.index for c in e.choices] for e in events] == [[0, 1], [2, 3]]


def test_stop_sequence_is_trimmed(gateway):
    client = gateway.openai("alice")
    greedy = (
        client.completions.create(model=MODEL_NAME, prompt="Tell me", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    words = greedy.split()
    assert len(words) >= 3
    stop = words[2]
    stopped = client.completions.create(
        model=MODEL_NAME, prompt="Tell me", max_tokens=12, temperature=0, stop=[stop]
    )
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert greedy.startswith(choice.text)


def test_stream_completion_n2_ends_with_done(gateway, redis_server):
    client = gateway.openai("alice")
    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    ids, versions = set(), set()
    with client.completions.with_streaming_response.create(
        model=MODEL_NAME, prompt="Why", max_tokens=6, n=2, stream=True, temperature=1.0, seed=3
    ) as response:
        assert response.headers["X-Policy-Version"]
        header_version = response.headers["X-Policy-Version"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        ids.add(chunk["id"])
        versions.add(chunk["policy_version"])
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    assert len(ids) == 1 and versions == {header_version}
    assert finish == {0: "length", 1: "length"}
    # the same choices as the non-streamed call with the same seed
    same = client.completions.create(
        model=MODEL_NAME, prompt="Why", max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert [c.text for c in same.choices] == [texts[0], texts[1]]
    completion_id = ids.pop()
    streamed = [e for e in completion_events(redis_server) if e.completion_id == completion_id]
    assert [c.text for c in streamed[0].choices] == [texts[0], texts[1]]


def test_stream_with_openai_client(gateway):
    client = gateway.openai("alice")
    chunks = list(
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, stream=True, temperature=0)
    )
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert (
        text
        == client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, temperature=0)
        .choices[0]
        .text
    )


def test_chat_completion_uses_chat_template(gateway, redis_server, tokenizer):
    client = gateway.openai("alice")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=5, n=2, temperature=0.7
    )
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert [c.message.role for c in chat.choices] == ["assistant", "assistant"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    event = completion_events(redis_server)[-1]
    assert event.chat and event.prompt == rendered
    assert event.completion_id == chat.id
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_chat_stream(gateway):
    client = gateway.openai("alice")
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    full = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert streamed == full.choices[0].message.content


def test_models(gateway):
    models = gateway.openai("alice").models.list()
    assert [m.id for m in models.data] == [MODEL_NAME, "base"]  # no registry: no promoted versions
    assert gateway.openai("alice").models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        gateway.openai("alice").models.retrieve("gpt-4")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL_NAME, "prompt": "x", "n": 10}, 400, "n"),  # above max_n (9)
        ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ({"model": MODEL_NAME}, 400, "prompt"),
        ({"model": MODEL_NAME, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": MODEL_NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": MODEL_NAME, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL_NAME, "prompt": "word " * 7000}, 400, "prompt"),  # > max_prompt_chars
        ({"model": MODEL_NAME, "prompt": "x", "suffix": "y"}, 400, "suffix"),  # refused, not silently ignored
        ({"model": MODEL_NAME, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ],
)
def test_bad_completion_requests_get_openai_errors(gateway, body, status, param):
    with gateway.http("alice") as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] is not None and error["param"].split(".")[0] == param


def test_body_size_limit_and_unknown_route(gateway):
    with gateway.http("alice") as http:
        big = http.post(
            "/v1/completions",
            content=b"{" + b" " * (2 << 20) + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        missing = http.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"]["message"].startswith("Invalid URL")


def test_redis_down_never_fails_a_completion(gateway, redis_server):
    client = gateway.openai("alice")
    before = gateway.metric("gateway_redis_failures_total")
    redis_server.stop()
    completion = client.completions.create(model=MODEL_NAME, prompt="Still up?", max_tokens=4, n=2)
    assert len(completion.choices) == 2
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Still up?", max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert gateway.metric("gateway_redis_failures_total") >= before + 2


def test_a_vanishing_temperature_decodes_greedily(gateway):
    """Found by the schemathesis run: temperature 5e-273 made serve's logits / temperature overflow."""
    client = gateway.openai("alice")
    tiny = client.completions.create(model=MODEL_NAME, prompt="Tiny", max_tokens=5, temperature=5e-273)
    greedy = client.completions.create(model=MODEL_NAME, prompt="Tiny", max_tokens=5, temperature=0)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_store_false_keeps_an_answer_out_of_the_learners_data(gateway, redis_server):
    """``store: false`` (OpenAI's field): the answer is served as usual, but neither logged to the completions
    stream nor kept for feedback, so evaluation traffic never becomes training data."""
    client = gateway.openai("alice")
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        n=2,
        temperature=0.7,
        store=False,
    )
    raw = client.completions.create(
        model=MODEL_NAME, prompt="The sea is", max_tokens=4, extra_body={"store": False}
    )
    assert len(chat.choices) == 2 and raw.choices[0].text is not None
    kept = client.completions.create(model=MODEL_NAME, prompt="The sea is", max_tokens=4)
    assert [e.completion_id for e in completion_events(redis_server)] == [kept.id]
    with gateway.http("alice") as http:
        refused = http.post(
            "/v1/feedback", json={"type": "ranking", "completion_id": chat.id, "ranking": [[0], [1]]}
        )
        metrics = http.get("/metrics").text
    assert refused.status_code == 404 and "store=false" in refused.json()["error"]["message"]
    assert "gateway_completions_unstored_total 2.0" in metrics
