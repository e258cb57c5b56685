"""The prompt contract end to end (instructloop/prompt.py): for a chat and a raw completion sent through the
gateway to a real serve, the token ids the learner's PPO query and reward-model input start with are the
token ids serve generated from (serve reports them with TGI's ``decoder_input_details``), and the HF
reference agrees (the chat template applied once, by the gateway; the raw prompt tokenized as is)."""

from __future__ import annotations

import httpx
import torch
from transformers import AutoModelForCausalLM

from instructloop.events import CompletionEvent
from instructloop.prompt import CHAT_ROUTE, COMPLETIONS_ROUTE
from instructloop.streams import DEFAULT_PREFIX, Stream, stream_key
from learner.dataset import Dataset
from learner.ingest import Ingestor
from learner.rollout import generate_rollouts, scoring_inputs
from learner.utils import encode_sequence
from tests.gateway.conftest import MODEL_NAME

MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a prime (contract)."},
]
RAW_PROMPT = "A raw prompt for the contract test: the capital of France is"


def serve_input_ids(serve_url: str, text: str) -> list[int]:
    """The token ids serve generates from for ``text`` (TGI
    ``details.prefill`` with decoder_input_details)."""
    response = httpx.post(
        f"{serve_url}/generate",
        timeout=60,
        json={
            "inputs": text,
            "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True},
        },
    )
    response.raise_for_status()
    return [token["id"] for token in response.json()["details"]["prefill"]]


def test_learner_query_and_rm_input_are_the_ids_serve_generated_from(
    gateway, serve, redis_server, tokenizer, tiny_model_dir, tmp_path
):
    client = gateway.openai("alice")
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=7, n=2, temperature=0.7
    )
    raw = client.completions.create(model=MODEL_NAME, prompt=RAW_PROMPT, max_tokens=5, n=2, temperature=0.7)

    # the events the gateway recorded: the exact model input, the route, the messages for chat
    events = {
        e.completion_id: e
        for e in (
            CompletionEvent.from_fields(f)
            for _, f in redis_server.client().xrange(stream_key(Stream.completions))
        )
    }
    chat_event, raw_event = events[chat.id], events[raw.id]
    assert (chat_event.route, chat_event.messages) == (CHAT_ROUTE, MESSAGES)
    assert (raw_event.route, raw_event.messages, raw_event.prompt) == (COMPLETIONS_ROUTE, None, RAW_PROMPT)

    # the learner's dataset, filled by its real ingestor from the streams
    dataset = Dataset(tmp_path / "dataset.sqlite3", heldout_fraction=0.0)
    ingestor = Ingestor(
        redis_server.client("learner"),
        dataset,
        prefix=DEFAULT_PREFIX,
        group="contract-test",
        consumer="c1",
    )
    ingestor.ensure_groups()
    ingestor.drain()
    queries = {q.text: q for q in dataset.sample_queries(10_000)}
    learned = [queries[chat_event.prompt], queries[raw_event.prompt]]
    assert [q.max_tokens for q in learned] == [7, 5]  # the traffic's own max_tokens

    # what PPO rolls out from and what the RM scores, built by the learner's own functions
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    rollouts = generate_rollouts(
        policy,
        tokenizer,
        [q.text for q in learned],
        512,
        [q.max_tokens for q in learned],
        do_sample=True,
        temperature=1.0,
    )
    rm_ids, rm_mask = scoring_inputs(rollouts, tokenizer.eos_token_id)
    assert rollouts.limits.tolist() == [7, 5] and (rollouts.response_mask.sum(1) <= rollouts.limits).all()

    references = {
        chat_event.prompt: tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True),
        raw_event.prompt: tokenizer(RAW_PROMPT)["input_ids"],
    }
    usage = {chat_event.prompt: chat.usage.prompt_tokens, raw_event.prompt: raw.usage.prompt_tokens}
    for row, query in enumerate(learned):
        served = serve_input_ids(serve.url, query.text)
        reference = references[query.text]
        if hasattr(reference, "input_ids"):  # a BatchEncoding from newer transformers
            reference = reference["input_ids"]
        assert served == list(reference)
        assert usage[query.text] == len(served)
        context = rollouts.query_responses[row, : rollouts.context_length]
        ppo_query = context[rollouts.attention_mask[row, : rollouts.context_length].bool()].tolist()
        assert ppo_query == served
        rm_input = rm_ids[row][rm_mask[row].bool()].tolist()
        assert rm_input[: len(served)] == served and rm_input[-1] == tokenizer.eos_token_id
        response = tokenizer.decode(
            rollouts.responses[row][rollouts.response_mask[row]], skip_special_tokens=True
        )
        assert encode_sequence(tokenizer, query.text, response, 512)[: len(served)] == served
    dataset.close()


def test_scripted_labeler_ranks_chat_completions(gateway, redis_server):
    """``GatewayClient(chat=True)`` asks /v1/chat/completions with the prompt as one user message and ranks
    those answers: the completion event is a chat one, and the ranking is stored against it."""
    from instructloop.events import ComparisonEvent
    from labeler.client import GatewayClient, label_one
    from labeler.preferences import shorter

    with GatewayClient(gateway.url, gateway.keys["lara"], chat=True) as client:
        labeled = label_one(
            client, "Say something (labeler chat).", shorter, k=3, max_tokens=6, temperature=1.0, seed=5
        )
    assert labeled.completion.id.startswith("chatcmpl-") and len(labeled.completion.texts) == 3
    events = [
        CompletionEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.completions))
    ]
    [event] = [e for e in events if e.completion_id == labeled.completion.id]
    assert event.route == CHAT_ROUTE and event.messages == [
        {"role": "user", "content": "Say something (labeler chat)."}
    ]
    assert [c.text for c in event.choices] == labeled.completion.texts
    if labeled.ranking is not None:
        comparisons = [
            ComparisonEvent.from_fields(f)
            for _, f in redis_server.client().xrange(stream_key(Stream.comparisons))
        ]
        [comparison] = [
            c for c in comparisons if c.completion_ids and c.completion_ids[0] == labeled.completion.id
        ]
        assert comparison.prompt == event.prompt and comparison.ranking == labeled.ranking
