"""OpenAI logprobs end to end, through the official ``openai`` client: ``/v1/completions`` ``logprobs``
(0-5) and chat ``logprobs`` + ``top_logprobs`` (0-5), against one HF forward over the same tokens.

The requests are greedy (temperature 0), so the distribution serve reports is the model's own
(log-softmax of the raw logits): the one OpenAI's logprobs describe. The serve-level test
(tests/serve/test_logprobs.py) covers sampled requests, whose logprobs are under the processed distribution.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import build_tiny_model_dir
from tests.gateway.conftest import MODEL_NAME, ServeProcess


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, tokenizer):
    """A tiny random Llama with a wide init: peaked distributions, so the top-5 have no near ties."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("varied-model"), tokenizer, seed=0, initializer_range=0.3
    )


@pytest.fixture(scope="module")
def varied_serve(varied_model, tmp_path_factory):
    process = ServeProcess(varied_model, tmp_path_factory.mktemp("serve-log") / "serve.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@torch.inference_mode()
def hf_greedy_logprobs(
    model_dir, prompt: str, steps: int, top: int
) -> tuple[list[float], list[dict[str, float]]]:
    """Greedy continuation of ``prompt``; per step the chosen token's logprob and the top-``top`` alternatives
    (text -> logprob), from one forward over prompt + continuation."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False)[0].tolist()
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([generated])).logits[0].float(), dim=-1)
    chosen, alternatives = [], []
    for position in range(len(prompt_ids), len(generated)):
        row = logprobs[position - 1]  # (V,): the distribution token `position` was chosen from
        chosen.append(float(row[generated[position]]))
        values, ids = torch.topk(row, top)
        alternatives.append(
            {tokenizer.decode([i]): float(v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
        )
    return chosen, alternatives


def _assert_alternatives(got: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    assert [set(g) for g in got] == [set(e) for e in expected]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(
            torch.tensor([g[k] for k in e]), torch.tensor(list(e.values())), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("logprobs", [0, 5])
def test_completion_logprobs_match_an_hf_forward(start_gateway, varied_serve, varied_model, logprobs):
    gateway = start_gateway([varied_serve.url])
    prompt = "Write a haiku about autumn leaves"
    completion = gateway.openai("alice").completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=logprobs
    )
    got = completion.choices[0].logprobs
    chosen, alternatives = hf_greedy_logprobs(varied_model, prompt, 6, max(logprobs, 1))
    torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(chosen), rtol=1e-4, atol=1e-4)
    assert got.text_offset[0] == len(prompt) and len(got.tokens) == len(chosen)
    if logprobs:
        _assert_alternatives(got.top_logprobs, alternatives)
    else:
        assert got.top_logprobs is None


@pytest.mark.parametrize("top_logprobs", [None, 0, 3])
def test_chat_logprobs_match_an_hf_forward(
    start_gateway, varied_serve, varied_model, tokenizer, top_logprobs
):
    gateway = start_gateway([varied_serve.url])
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = gateway.openai("alice").chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=top_logprobs,
    )
    content = chat.choices[0].logprobs.content
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chosen, alternatives = hf_greedy_logprobs(varied_model, prompt, 5, top_logprobs or 1)
    torch.testing.assert_close(
        torch.tensor([c.logprob for c in content]), torch.tensor(chosen[: len(content)]), rtol=1e-4, atol=1e-4
    )
    assert all(bytes(c.bytes).decode("utf-8") == c.token for c in content)
    if top_logprobs:
        _assert_alternatives(
            [{t.token: t.logprob for t in c.top_logprobs} for c in content], alternatives[: len(content)]
        )
    else:
        assert all(c.top_logprobs == [] for c in content)


def test_logprobs_errors_are_openai_errors(start_gateway, varied_serve):
    gateway = start_gateway([varied_serve.url])
    with gateway.http("alice") as http:
        no_flag = http.post(
            "/v1/chat/completions",
            json={"model": MODEL_NAME, "top_logprobs": 2, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert (
            no_flag.status_code == 400 and "top_logprobs needs logprobs" in no_flag.json()["error"]["message"]
        )
        too_many = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "logprobs": 6})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "logprobs"
        streamed = http.post(
            "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "logprobs": 0, "stream": True}
        )
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "logprobs"
