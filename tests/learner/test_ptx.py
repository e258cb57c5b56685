"""The ptx corpus and the alignment-tax text: where they come from, and the NLL measured on them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.losses import ptx_loss
from learner.ptx import alignment_tax_windows, load_documents, mean_nll, python_docstrings


def test_the_alignment_tax_text_is_stdlib_docstrings_and_not_the_ptx_corpus(tokenizer):
    documents = python_docstrings(max_chars=20_000)
    assert len(documents) >= 5 and sum(map(len, documents)) >= 20_000
    assert all(len(d.split()) >= 20 for d in documents)
    ptx = set(load_documents())  # the default ptx corpus (WordNet glosses, or the shipped fallback)
    assert not ptx & set(documents)
    windows, mask = alignment_tax_windows(tokenizer, 8, 64)
    assert windows.shape == (8, 64) and bool(mask.all())
    first = tokenizer(documents[0], add_special_tokens=False).input_ids
    assert windows[0].tolist() == first[:64]  # the text itself, from its start
    assert alignment_tax_windows(tokenizer, 8, 64)[0].equal(windows)  # deterministic


def test_mean_nll_is_the_ptx_nll_over_chunks(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    batch = alignment_tax_windows(tokenizer, 6, 32)
    with torch.no_grad():
        expected = torch.stack(
            [
                ptx_loss(
                    model.eval()(input_ids=batch[0][i : i + 1]).logits,
                    batch[0][i : i + 1],
                    batch[1][i : i + 1],
                    1.0,
                )[1]
                for i in range(6)
            ]
        ).mean()
    model.train()
    assert mean_nll(model, batch, chunk=4) == pytest.approx(expected.item(), rel=1e-5)
    assert model.training  # its mode is restored
