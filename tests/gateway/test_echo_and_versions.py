"""``echo`` with prompt logprobs (evaluation harnesses' loglikelihood requests) and choosing a policy version
with ``model``, through the official ``openai`` client, against a real serve that holds a registry of LoRA
adapter versions (issue 21).

The echoed prompt logprobs are checked against a plain HF forward pass over the same token ids (the base, and
an adapter version through ``PeftModel``): ``torch.testing.assert_close``.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from instructloop.events import PolicyStatus
from instructloop.prompt import encode_prompt
from instructloop.registry import Registry
from instructloop.wire import POLICY_VERSION_HEADER
from tests.conftest import build_tiny_model_dir
from tests.gateway.conftest import MODEL_NAME, ServeProcess
from tests.serve.test_adapters import write_adapter_version

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, tokenizer):
    """A tiny random Llama with a wide init: peaked distributions, no near ties among the top tokens."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("varied-model"), tokenizer, seed=0, initializer_range=0.3
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory, varied_model) -> Registry:
    """v0001 promoted earlier, v0002 current, v0003 a candidate (never served as current)."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    for seed, version in enumerate(("v0001", "v0002", "v0003"), start=1):
        write_adapter_version(registry, version, varied_model, seed=seed)
    registry.set_current("v0001", status=PolicyStatus.promoted)
    registry.set_current("v0002", status=PolicyStatus.promoted)
    return registry


@pytest.fixture(scope="module")
def versioned_serve(varied_model, registry, tmp_path_factory):
    process = ServeProcess(
        varied_model,
        tmp_path_factory.mktemp("serve-log") / "serve.log",
        INSTRUCTLOOP_SERVE_REGISTRY_DIR=str(registry.root),
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def gateway(start_gateway, versioned_serve, registry, redis_server):
    gateway = start_gateway(
        [versioned_serve.url], redis_server.url_for("gateway"), registry_dir=registry.root
    )
    deadline = 60
    while httpx.get(f"{versioned_serve.url}/health").headers.get(POLICY_VERSION_HEADER) != "v0002":
        deadline -= 1  # serve swaps to the registry's current version at start
        assert deadline > 0, "serve did not take the current version v0002"
        time.sleep(0.5)
    return gateway


@torch.inference_mode()
def hf_prompt_logprobs(
    model_dir, adapter_dir, ids: list[int], top: int
) -> tuple[torch.Tensor, list[list[float]]]:
    """Per prompt token after the first: its logprob given the tokens before it, and the ``top`` best ones."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]  # (T-1, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)  # (T-1,)
    return chosen, [row.topk(top).values.tolist() for row in logprobs]


@pytest.mark.parametrize("model", ["base", "v0001"])
def test_echo_prompt_logprobs_match_an_hf_forward(gateway, varied_model, registry, tokenizer, model):
    """An evaluation harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    client = gateway.openai("alice")
    ids = encode_prompt(tokenizer, PROMPT)
    completion = client.completions.create(
        model=model, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0, temperature=0
    )
    choice = completion.choices[0]
    got = choice.logprobs
    assert choice.text == PROMPT and completion.usage.completion_tokens == 0
    assert completion.model_extra["policy_version"] == model
    assert len(got.tokens) == len(ids) and "".join(got.tokens) == PROMPT
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None  # nothing precedes the first token
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(ids))]
    adapter_dir = None if model == "base" else registry.version_dir(model)
    chosen, top = hf_prompt_logprobs(varied_model, adapter_dir, ids, 2)
    torch.testing.assert_close(torch.tensor(got.token_logprobs[1:]), chosen, rtol=1e-4, atol=1e-4)
    for position, expected in enumerate(top, start=1):
        torch.testing.assert_close(
            sorted(got.top_logprobs[position].values(), reverse=True), expected, rtol=1e-4, atol=1e-4
        )


def test_echo_with_generated_tokens(gateway, tokenizer):
    client = gateway.openai("alice")
    plain = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0
    )
    echoed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0, echo=True
    )
    n_prompt = len(encode_prompt(tokenizer, PROMPT))
    got = echoed.choices[0].logprobs
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert got.token_logprobs[n_prompt:] == plain.choices[0].logprobs.token_logprobs
    assert (
        got.text_offset[n_prompt:] == plain.choices[0].logprobs.text_offset
    )  # counted from the prompt start
    assert got.top_logprobs is None
    no_logprobs = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert no_logprobs.choices[0].text == echoed.choices[0].text and no_logprobs.choices[0].logprobs is None
    for bad in ({"stream": True}, {"max_tokens": 0, "echo": False}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, **{"echo": True, **bad})
        assert caught.value.body["param"] == ("echo" if "stream" in bad else "max_tokens")


def test_models_list_the_versions_and_model_selects_one(gateway):
    client = gateway.openai("alice")
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_NAME, "base", "v0001", "v0002"]  # v0003 is a candidate: never served as current
    assert client.models.retrieve("v0001").id == "v0001"
    answers = {}
    for model in (MODEL_NAME, "v0001", "v0002", "base"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, temperature=0
        )
        chat = raw.parse()
        assert chat.model == model
        answers[model] = (raw.headers[POLICY_VERSION_HEADER], chat.choices[0].message.content)
    assert answers[MODEL_NAME][0] == "v0002" and answers[MODEL_NAME] == answers["v0002"]
    assert [answers[m][0] for m in ("v0001", "base")] == ["v0001", "base"]
    assert len({answers[m][1] for m in ("v0001", "v0002", "base")}) == 3  # each version's own weights
    for unknown in ("v0003", "v9999", "gpt-4", "no/such"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=unknown, prompt="x", max_tokens=2)
        assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("v0003")
