"""Logprobs and ``top_n_tokens`` parity: what serve reports equals a plain HF forward over the same tokens.

Like TGI, serve reports logprobs under the distribution each token was drawn from: the log-softmax of the
raw logits for greedy requests, of the logits divided by the temperature (after top-k / top-p) for
sampled ones. Each check compares against that same distribution computed by one HF forward over
prompt + generated tokens.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from text_generation import Client
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Write a haiku about autumn leaves"


@torch.inference_mode()
def hf_log_distributions(
    model_dir, prompt: str, generated: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """(len(generated), V): log-softmax(logits / temperature) at each generated position, one forward."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + generated])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (T_gen, V)
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize(
    "sampling", [{}, {"do_sample": True, "temperature": 0.7, "seed": 11}], ids=["greedy", "sampled-t0.7"]
)
def test_logprobs_and_top_n_tokens_match_an_hf_forward(start_server, varied_model_dir, sampling):
    server = start_server(model=str(varied_model_dir), device="cpu")
    response = Client(server.url, timeout=120).generate(PROMPT, max_new_tokens=8, top_n_tokens=5, **sampling)
    details = response.details
    generated = [t.id for t in details.tokens]
    expected = hf_log_distributions(varied_model_dir, PROMPT, generated, sampling.get("temperature", 1.0))

    positions = torch.arange(len(generated))
    torch.testing.assert_close(
        torch.tensor([t.logprob for t in details.tokens]),
        expected[positions, torch.tensor(generated)],
        rtol=1e-4,
        atol=1e-4,
    )
    assert len(details.top_tokens) == len(generated)
    for step, alternatives in enumerate(details.top_tokens):
        top = torch.topk(expected[step], 5)
        assert [t.id for t in alternatives] == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in alternatives]), top.values, rtol=1e-4, atol=1e-4
        )


def test_top_n_tokens_streams_and_is_bounded(start_server, varied_model_dir):
    server = start_server(model=str(varied_model_dir), device="cpu", max_top_n_tokens=3)
    client = Client(server.url, timeout=120)
    events = list(client.generate_stream(PROMPT, max_new_tokens=4, top_n_tokens=3))
    assert [len(e.top_tokens) for e in events] == [3, 3, 3, 3]
    assert all(e.top_tokens[0].logprob >= e.top_tokens[-1].logprob for e in events)
    refused = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"top_n_tokens": 4}})
    assert refused.status_code == 422 and "top_n_tokens" in refused.json()["error"]
