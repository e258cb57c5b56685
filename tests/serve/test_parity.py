"""Greedy parity under concurrency: every greedy request in a mixed, staggered batch gets exactly the tokens
HF ``generate`` gives for its prompt alone (fp32 on CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from text_generation import AsyncClient
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Hi",
    "What is the capital of France? Answer in one word.",
    "Write a haiku about autumn leaves falling on a quiet pond at dusk.",
    "List three prime numbers.",
    "Explain in one sentence why the sky looks blue during the day and red at sunset, for a child.",
    "2 + 2 =",
]


@torch.inference_mode()
def hf_greedy(model_dir, prompts: list[str], max_new_tokens: list[int]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt, n in zip(prompts, max_new_tokens, strict=True):
        inputs = tokenizer(prompt, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return out


async def _mixed_load(url: str, prompts: list[str], max_new_tokens: list[int], stagger_s: float):
    client = AsyncClient(url, timeout=600)

    async def greedy(i: int):
        await asyncio.sleep(stagger_s * i)  # join at different decode steps
        if i % 2:
            events = [e async for e in client.generate_stream(prompts[i], max_new_tokens=max_new_tokens[i])]
            return [e.token.id for e in events], events[-1].details.finish_reason.value
        response = await client.generate(prompts[i], max_new_tokens=max_new_tokens[i])
        return [t.id for t in response.details.tokens], response.details.finish_reason.value

    async def sampled(i: int):
        await asyncio.sleep(stagger_s * i / 2)
        return await client.generate(
            prompts[i],
            max_new_tokens=max_new_tokens[i] + 5,
            do_sample=True,
            temperature=0.9,
            top_p=0.9,
            seed=i,
            repetition_penalty=1.2,
        )

    tasks = [greedy(i) for i in range(len(prompts))] + [sampled(i) for i in range(len(prompts))]
    results = await asyncio.gather(*tasks)
    return results[: len(prompts)], results[len(prompts) :]


async def test_concurrent_mixed_batch_greedy_parity_tiny(start_server, varied_model_dir):
    max_new = [30, 24, 18, 28, 12, 20]
    server = start_server(model=str(varied_model_dir), device="cpu", max_batch_size=8, max_queue=32)
    greedy, sampled = await _mixed_load(server.url, PROMPTS, max_new, stagger_s=0.02)
    expected = hf_greedy(varied_model_dir, PROMPTS, max_new)
    for i, ((tokens, _finish), want) in enumerate(zip(greedy, expected, strict=True)):
        assert tokens == want, f"request {i}: {PROMPTS[i]!r}"
    assert all(s.details.generated_tokens == n + 5 for s, n in zip(sampled, max_new, strict=True))
    # max_batch_size 8 < 12 requests: some waited in the queue and joined later
    assert server.metric("tgi_request_success_total") == 12


@pytest.mark.slow
async def test_concurrent_greedy_parity_default_model(start_server, default_model_dir):
    prompts = PROMPTS[1:5]
    max_new = [12, 16, 10, 14]
    server = start_server(model=str(default_model_dir), device="cpu", max_batch_size=8)
    greedy, _ = await _mixed_load(server.url, prompts, max_new, stagger_s=0.3)
    expected = hf_greedy(default_model_dir, prompts, max_new)
    for i, ((tokens, finish), want) in enumerate(zip(greedy, expected, strict=True)):
        assert tokens == want, f"request {i}: {prompts[i]!r}"
        assert finish in ("length", "eos_token")
