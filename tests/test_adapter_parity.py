"""Learner ↔ serve parity for adapter versions: train a policy adapter in the learner, publish it to the
registry, let serve hot-swap to it, and check that serve computes the learner's policy logits.

Two views of the same numbers: serve's last-position logits for a prompt (the active ``PolicyModel`` of the
running server, called between requests) and the per-token logprobs serve reports over HTTP for a greedy
answer, against the learner's ``PolicyAdapter`` forward on the same ids.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from torch.testing import assert_close

from instructloop.registry import Registry, VersionKind
from learner.adapters import AdapterBase, PolicyAdapter, ReferenceModel
from learner.config import AdapterConfig
from learner.ptx import PtxSource
from learner.utils import disable_dropout
from serve.batch import Batch, SequenceState
from serve.sampling import NextTokenChooser, SamplingParams, StopSequences
from tests.conftest import build_tiny_model_dir
from tests.learner.helpers import PTX_TEXT
from tests.serve.conftest import ServerThread

PROMPT = "Hello, who are you? Tell me about the sea."


@pytest.mark.parametrize("top_layers", [None, 1], ids=["every-layer", "top-layer-only"])
def test_serve_computes_the_learner_policy_after_publish_and_hot_swap(tmp_path, tokenizer, top_layers):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # serve runs in this process; one thread on the shared CPU
    try:
        _parity(tmp_path, tokenizer, top_layers)
    finally:
        torch.set_num_threads(threads)


def _parity(tmp_path, tokenizer, top_layers: int | None) -> None:
    varied_model_dir = build_tiny_model_dir(tmp_path / "base", tokenizer, seed=0, initializer_range=0.3)
    torch.manual_seed(0)
    # learner side: a policy adapter trained a few steps (pretraining loss: any training will do)
    base = AdapterBase(str(varied_model_dir), AdapterConfig(r=8, alpha=16, top_layers=top_layers), tokenizer)
    base.add("policy")
    policy = disable_dropout(PolicyAdapter(base, "policy"))
    corpus = tmp_path / "ptx.txt"
    corpus.write_text(PTX_TEXT)
    ptx = PtxSource(tokenizer, str(corpus), seq_len=32, batch_size=4, seed=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-2)
    for _ in range(5):
        ids, mask = ptx.next_batch()
        loss = policy(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    registry = Registry(tmp_path / "registry")
    manifest = policy.write_version(registry, "v0001", served_base=True, tokenizer=tokenizer, parent=None)
    assert manifest.kind == VersionKind.adapter

    server = ServerThread(
        model=str(varied_model_dir), device="cpu", registry_dir=str(registry.root), poll_interval_s=0.1
    ).start()
    try:
        registry.set_current("v0001")
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/info").json()["policy_version"] != "v0001":
            assert time.monotonic() < deadline, "serve did not swap to v0001"
            time.sleep(0.1)

        # 1. over HTTP: serve's logprob of each greedy token = the learner's log-softmax at that position
        response = httpx.post(
            f"{server.url}/generate",
            timeout=120,
            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True}},
        ).json()
        assert response["policy_version"] == "v0001"
        generated = [t["id"] for t in response["details"]["tokens"]]
        served_logprobs = torch.tensor([t["logprob"] for t in response["details"]["tokens"]])
        prompt_ids = tokenizer(PROMPT)["input_ids"]
        ids = torch.tensor([prompt_ids + generated])
        with torch.no_grad():
            logits = policy(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]  # (T_gen, V)
        learner_logprobs = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(generated)[:, None])[
            :, 0
        ]
        assert generated == logits.argmax(-1).tolist()  # serve's greedy tokens are the learner's argmax
        assert_close(served_logprobs, learner_logprobs, rtol=1e-4, atol=1e-4)

        # 2. serve's own forward (the active version of the running engine, called while it is idle)
        served = server.runtime.engine.active_policy
        assert served.version == "v0001" and served.adapter is not None
        state = SequenceState(
            request_id=10**9,
            prompt_ids=prompt_ids,
            max_new_tokens=1,
            chooser=NextTokenChooser(SamplingParams()),
            stop=StopSequences([]),
        )
        with torch.inference_mode():
            serve_logits, _ = served.forward(Batch.prefill("v0001", [state], served.device))
        with torch.no_grad():
            learner_logits = policy(input_ids=torch.tensor([prompt_ids])).logits[:, -1]
        assert_close(serve_logits, learner_logits.float())
        with torch.no_grad():  # the parity is about a trained adapter, not the base
            base_logits = ReferenceModel(base)(input_ids=torch.tensor([prompt_ids])).logits[:, -1]
        assert (learner_logits - base_logits).abs().max() > 1e-2
    finally:
        server.stop()
