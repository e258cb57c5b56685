"""SFT smoke: a few TRL SFTTrainer steps on a tiny model lower the completion loss on the demonstrations."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructloop.events import DemonstrationEvent
from learner.config import SFTConfig
from learner.sft import completion_nll, run_sft

DEMOS = [
    DemonstrationEvent(prompt=f"What is {a} plus {b}?", response=f"{a} plus {b} is {a + b}.", labeler_id="l1")
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (4, 4), (7, 2), (1, 1)]
]


def test_run_sft_lowers_completion_loss(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = completion_nll(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, DEMOS)
    config = SFTConfig(lr=5e-3, epochs=3, batch_size=4, max_length=128, logging_steps=1, min_demonstrations=1)
    out = run_sft(tiny_model_dir, DEMOS, tmp_path / "sft", config)
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["demonstrations"] == 8
    after = completion_nll(
        AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), DEMOS
    )
    assert after < before - 1.0, (before, after)


def test_run_sft_refuses_empty(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="at least one demonstration"):
        run_sft(tiny_model_dir, [], tmp_path / "sft", SFTConfig())


def test_sft_trains_on_the_token_ids_the_rm_and_ppo_see(tiny_model_dir, tmp_path, tokenizer):
    """The prompt contract for SFT: TRL's batch holds ``encode_sequence`` of each demonstration (the query
    tokenized alone, as serve did; then the response and EOS) with the loss on the response only, for a
    rendered chat, a raw prompt, and a raw prompt ending in a space (where tokenizing prompt + completion as
    one string, TRL's own way, merges tokens across the boundary), and for a long one cut to max_length."""
    from instructloop.prompt import render_chat
    from learner.sft import build_sft_trainer
    from learner.utils import encode_pair, encode_sequence

    demos = [
        DemonstrationEvent(
            prompt=render_chat(tokenizer, [{"role": "user", "content": "Name a prime."}]),
            response="Seven.",
            labeler_id="l1",
            chat=True,
            route="chat.completions",
        ),
        DemonstrationEvent(prompt="The capital of France is", response=" Paris.", labeler_id="l1"),
        DemonstrationEvent(prompt="The capital of France is ", response="Paris.", labeler_id="l1"),
        DemonstrationEvent(prompt="word " * 100, response="end " * 40, labeler_id="l1"),
    ]
    joined = tokenizer(demos[2].prompt + demos[2].response)["input_ids"]
    assert (
        joined != encode_sequence(tokenizer, demos[2].prompt, demos[2].response, 512)[:-1]
    )  # the case is real
    config = SFTConfig(batch_size=4, max_length=64, min_demonstrations=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = build_sft_trainer(model, tokenizer, demos, tmp_path, config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(demos))])
    for row, demo in enumerate(demos):
        query, response = encode_pair(tokenizer, demo.prompt, demo.response, config.max_length)
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert (
            ids
            == encode_sequence(tokenizer, demo.prompt, demo.response, config.max_length)
            == query + response
        )
        trained = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert trained == response and response[-1] == tokenizer.eos_token_id
