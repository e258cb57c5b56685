"""Every OpenAI field of /v1/completions and /v1/chat/completions is honoured or refused by name, through
the official ``openai`` client in front of a real serve (issue 21): refusals are ``BadRequestError`` (400,
OpenAI's error shape, ``param`` naming the field), nulls mean the default, text content parts are joined,
and ``stream_options.include_usage`` ends a stream with a usage chunk."""

from __future__ import annotations

import openai
import pytest

from instructloop.events import CompletionEvent
from instructloop.prompt import encode_prompt
from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import MODEL_NAME

USER = [{"role": "user", "content": "Hi"}]


def completion_events(redis_server) -> list[CompletionEvent]:
    entries = redis_server.client().xrange(stream_key(Stream.completions))
    return [CompletionEvent.from_fields(fields) for _, fields in entries]


def refused(call, param: str, code: str = "unsupported_parameter") -> openai.BadRequestError:
    """The call raises the SDK's BadRequestError (a 400) whose error names ``param``."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.body
    assert caught.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["code"] == code, error
    if code in ("unsupported_parameter", "unrecognized_argument"):
        assert param in error["message"], error
    return caught.value


# ---- refused fields, by name, on both routes ----------------------------------------------------------

REFUSED_ON_BOTH = [
    ("frequency_penalty", 0.5),
    ("presence_penalty", -1.0),
    ("logit_bias", {"50256": -100}),
]


@pytest.mark.parametrize(("field", "value"), REFUSED_ON_BOTH)
def test_penalties_and_logit_bias_are_refused_on_both_routes(gateway, field, value):
    client = gateway.openai("alice")
    refused(
        lambda: client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, **{field: value}), field
    )
    refused(
        lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=2, **{field: value}
        ),
        field,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("metadata", {"project": "eval"}),
        ("modalities", ["text", "audio"]),
    ],
)
def test_chat_fields_without_support_are_refused_by_name(gateway, field, value):
    client = gateway.openai("alice")
    error = refused(
        lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=2, **{field: value}
        ),
        field,
    )
    if field == "response_format":
        assert value["type"] in error.body["message"]
    assert gateway.metric("gateway_refused_fields_total", f'{{field="{field}"}}') == 1


@pytest.mark.parametrize(("field", "value"), [("suffix", "end"), ("best_of", 2)])
def test_completion_fields_without_support_are_refused_by_name(gateway, field, value):
    client = gateway.openai("alice")
    refused(
        lambda: client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, **{field: value}), field
    )


def test_unknown_fields_are_refused_as_openai_does(gateway):
    client = gateway.openai("alice")
    calls = {
        "temprature": lambda: client.completions.create(
            model=MODEL_NAME, prompt="x", extra_body={"temprature": 0.5}
        ),
        "service_tier": lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=USER, service_tier="flex"
        ),
        "messages.0.audio": lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi", "audio": {"id": "a"}}]
        ),
    }
    for param, call in calls.items():
        error = refused(call, param, "unrecognized_argument")
        assert error.body["message"] == f"Unrecognized request argument supplied: {param}"
    assert gateway.metric("gateway_refused_fields_total", '{field="unrecognized"}') == 3


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "42", "tool_call_id": "call_1"}, "messages.1.role"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "messages.1.tool_calls",
        ),
        ({"role": "assistant", "content": None}, "messages.1.content"),
        ({"role": "user", "content": "Hello", "name": "bob"}, "messages.1.name"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]},
            "messages.1.content",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            },
            "messages.1.content",
        ),
    ],
)
def test_tool_messages_and_non_text_parts_are_refused_clearly(gateway, message, param):
    client = gateway.openai("alice")
    code = (
        "invalid_value"
        if param.endswith("content") and message["content"] is None
        else "unsupported_parameter"
    )
    error = refused(
        lambda: client.chat.completions.create(model=MODEL_NAME, messages=[*USER, message], max_tokens=2),
        param,
        code,
    )
    if isinstance(message["content"], list):  # the part's type is named
        assert message["content"][0]["type"] in error.body["message"]
    elif message["role"] == "tool":
        assert "'tool' messages are not supported" in error.body["message"]


def test_neutral_values_are_accepted(gateway):
    client = gateway.openai("alice")
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=2,
        response_format={"type": "text"},
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        metadata={},
        parallel_tool_calls=False,
        tool_choice="none",
        modalities=["text"],
    )
    completion = client.completions.create(
        model=MODEL_NAME, prompt="x", max_tokens=2, frequency_penalty=0, presence_penalty=0, logit_bias={}
    )
    assert chat.choices[0].message.role == "assistant" and completion.choices[0].finish_reason


# ---- valid requests OpenAI accepts ----------------------------------------------------------------------


def test_null_means_the_default(gateway):
    nulls = dict(
        temperature=None, top_p=None, n=None, stream=None, max_tokens=None, stop=None, seed=None, user=None
    )
    client = gateway.openai("alice")
    completion = client.completions.create(
        model=MODEL_NAME, prompt="Hello", logprobs=None, echo=None, **nulls
    )
    assert len(completion.choices) == 1 and completion.usage.completion_tokens == 16  # max_tokens' default
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, logprobs=None, top_logprobs=None, store=None, **nulls
    )
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    with gateway.http("alice") as http:  # required fields stay required
        missing = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"].startswith("prompt")


def test_content_parts_are_joined_text(gateway, redis_server, tokenizer):
    client = gateway.openai("alice")
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": parts},
        ],
        max_tokens=3,
        temperature=0,
    )
    joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is\n2+2?"}]
    same = client.chat.completions.create(model=MODEL_NAME, messages=joined, max_tokens=3, temperature=0)
    assert chat.choices[0].message.content == same.choices[0].message.content
    event = next(e for e in completion_events(redis_server) if e.completion_id == chat.id)
    assert event.messages == joined
    assert event.prompt == tokenizer.apply_chat_template(joined, tokenize=False, add_generation_prompt=True)


def test_too_long_prompt_is_context_length_exceeded(start_gateway, serve, redis_server):
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), max_prompt_tokens=8)
    client = gateway.openai("alice")
    long = "one two three four five six seven eight nine ten eleven"
    refused(
        lambda: client.completions.create(model=MODEL_NAME, prompt=long), "prompt", "context_length_exceeded"
    )
    refused(
        lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": long}]
        ),
        "messages",
        "context_length_exceeded",
    )


def test_more_than_serve_holds_is_context_length_exceeded(gateway):
    """The limits serve reports on /info (the test serve: 1024 prompt tokens, 1536 in all)."""
    client = gateway.openai("alice")
    refused(
        lambda: client.completions.create(model=MODEL_NAME, prompt="word " * 1100, max_tokens=2),
        "prompt",
        "context_length_exceeded",
    )
    error = refused(
        lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 900}], max_tokens=700
        ),
        "max_tokens",
        "context_length_exceeded",
    )
    assert "maximum context length is 1536 tokens" in error.body["message"]


# ---- stream_options.include_usage ----------------------------------------------------------------------


def test_stream_include_usage_ends_with_a_usage_chunk(gateway):
    client = gateway.openai("alice")
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt="The sky is",
            max_tokens=4,
            n=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and all(c.usage is None for c in chunks[:-1])
    plain = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=4, n=2, temperature=0)
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert last.usage.completion_tokens == plain.usage.completion_tokens == 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8

    chat_chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=USER,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat_chunks[-1].choices == [] and chat_chunks[-1].usage.completion_tokens == 3
    without = list(client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in without)
    refused(
        lambda: client.chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=2, stream_options={"include_usage": True}
        ),
        "stream_options",
        "invalid_value",
    )


# ---- token-id prompts ----------------------------------------------------------------------------------


def test_token_id_prompts_generate_from_exactly_those_ids(gateway, redis_server, tokenizer):
    client = gateway.openai("alice")
    texts = ["Once upon a time", "The capital of France"]
    ids = [encode_prompt(tokenizer, t) for t in texts]
    by_text = client.completions.create(model=MODEL_NAME, prompt=texts, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    one = client.completions.create(model=MODEL_NAME, prompt=ids[0], max_tokens=5, temperature=0, echo=True)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)
    assert one.choices[0].text == texts[0] + by_text.choices[0].text  # echo shows the decoded ids
    # recorded with their text, which encodes back to the same ids (the learner's prompt contract)
    event = next(e for e in completion_events(redis_server) if e.completion_id == by_ids.id)
    assert event.prompt == texts[0] and encode_prompt(tokenizer, event.prompt) == ids[0]
    refused(
        lambda: client.completions.create(model=MODEL_NAME, prompt=[1, len(tokenizer) + 5], max_tokens=2),
        "prompt",
        "invalid_value",
    )


# ---- store's default -----------------------------------------------------------------------------------


def test_store_default_is_a_gateway_setting(start_gateway, serve, redis_server):
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), store_default=False)
    client = gateway.openai("alice")
    unset = client.completions.create(model=MODEL_NAME, prompt="Not kept", max_tokens=2)
    kept = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2, store=True)
    assert [e.completion_id for e in completion_events(redis_server)] == [kept.id]
    with gateway.http("alice") as http:
        feedback = http.post(
            "/v1/feedback", json={"type": "ranking", "completion_id": unset.id, "ranking": [[0], [1]]}
        )
    assert feedback.status_code == 404
