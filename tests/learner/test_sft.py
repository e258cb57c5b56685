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
    after = completion_nll(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), DEMOS)
    assert after < before - 1.0, (before, after)


def test_run_sft_refuses_empty(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="at least one demonstration"):
        run_sft(tiny_model_dir, [], tmp_path / "sft", SFTConfig())
