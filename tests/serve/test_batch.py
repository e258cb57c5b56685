"""Batch.filter / Batch.concatenate on hand-built tensors (exact asserts), and the decode step on a real model
with requests joining at different steps (greedy parity with HF generate, deterministic schedule)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from serve.batch import Batch, SequenceState
from serve.model import FinishReason, PolicyModel
from serve.sampling import NextTokenChooser, SamplingParams, StopSequences


def _seq(
    request_id: int, prompt: list[int] | None = None, max_new_tokens: int = 8, **sampling
) -> SequenceState:
    return SequenceState(
        request_id=request_id,
        prompt_ids=prompt or [1, 2, 3],
        max_new_tokens=max_new_tokens,
        chooser=NextTokenChooser(SamplingParams(**sampling)),
        stop=StopSequences([]),
    )


def _cache(
    batch: int, past: int, layers: int = 2, heads: int = 1, dim: int = 2, offset: float = 0.0
) -> DynamicCache:
    data = []
    for layer in range(layers):
        keys = torch.arange(batch * heads * past * dim, dtype=torch.float32).reshape(batch, heads, past, dim)
        data.append((keys + offset + 1000 * layer, -(keys + offset + 1000 * layer)))
    return DynamicCache(ddp_cache_data=data)


def _decode_batch(ids: list[int], mask: list[list[int]], positions: list[int], offset: float = 0.0) -> Batch:
    mask_t = torch.tensor(mask)  # (B, T_past + 1)
    past = mask_t.shape[1] - 1
    return Batch(
        policy_version="v1",
        sequences=[_seq(i) for i in ids],
        input_ids=torch.tensor([[100 + i] for i in ids]),
        attention_mask=mask_t,
        position_ids=torch.tensor([[p] for p in positions]),
        past_key_values=_cache(len(ids), past, offset=offset),
    )


def test_filter_keeps_rows_and_cuts_shared_left_padding():
    batch = _decode_batch([7, 8, 9], [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [2, 3, 4])
    original_keys = [layer.keys.clone() for layer in batch.past_key_values.layers]
    original_values = [layer.values.clone() for layer in batch.past_key_values.layers]

    kept = batch.filter([7, 8])

    assert kept.request_ids == [7, 8]
    # column 0 is padding for both remaining rows: it is cut from mask and cache
    torch.testing.assert_close(
        kept.attention_mask, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), rtol=0, atol=0
    )
    torch.testing.assert_close(kept.input_ids, torch.tensor([[107], [108]]), rtol=0, atol=0)
    torch.testing.assert_close(kept.position_ids, torch.tensor([[2], [3]]), rtol=0, atol=0)
    for layer, keys, values in zip(kept.past_key_values.layers, original_keys, original_values, strict=True):
        torch.testing.assert_close(layer.keys, keys[[0, 1], :, 1:, :], rtol=0, atol=0)
        torch.testing.assert_close(layer.values, values[[0, 1], :, 1:, :], rtol=0, atol=0)
    assert kept.past_length == 3


def test_filter_single_row_and_edge_cases():
    batch = _decode_batch([7, 8, 9], [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [2, 3, 4])
    keys0 = batch.past_key_values.layers[0].keys.clone()

    only_first = batch.filter([7])
    torch.testing.assert_close(only_first.attention_mask, torch.tensor([[1, 1, 1]]), rtol=0, atol=0)
    torch.testing.assert_close(
        only_first.past_key_values.layers[0].keys, keys0[[0], :, 2:, :], rtol=0, atol=0
    )

    only_last = batch.filter({9})
    torch.testing.assert_close(only_last.attention_mask, torch.tensor([[1, 1, 1, 1, 1]]), rtol=0, atol=0)
    torch.testing.assert_close(only_last.past_key_values.layers[0].keys, keys0[[2]], rtol=0, atol=0)

    assert batch.filter([7, 8, 9]) is batch
    assert batch.filter([]) is None
    assert batch.filter([42]) is None


def test_concatenate_left_pads_the_shorter_cache():
    short = _decode_batch([1], [[1, 1, 1]], [2])  # past 2
    long = _decode_batch([2, 3], [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [3, 4], offset=0.5)  # past 4

    joined = Batch.concatenate([short, long])

    assert joined.request_ids == [1, 2, 3]
    assert joined.past_length == 4
    torch.testing.assert_close(
        joined.attention_mask,
        torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(joined.input_ids, torch.tensor([[101], [102], [103]]), rtol=0, atol=0)
    torch.testing.assert_close(joined.position_ids, torch.tensor([[2], [3], [4]]), rtol=0, atol=0)
    for i, layer in enumerate(joined.past_key_values.layers):
        short_keys = short.past_key_values.layers[i].keys  # (1, 1, 2, 2)
        long_keys = long.past_key_values.layers[i].keys  # (2, 1, 4, 2)
        expected = torch.cat([torch.cat([torch.zeros(1, 1, 2, 2), short_keys], dim=2), long_keys], dim=0)
        torch.testing.assert_close(layer.keys, expected, rtol=0, atol=0)
        expected_values = torch.cat(
            [
                torch.cat([torch.zeros(1, 1, 2, 2), short.past_key_values.layers[i].values], dim=2),
                long.past_key_values.layers[i].values,
            ],
            dim=0,
        )
        torch.testing.assert_close(layer.values, expected_values, rtol=0, atol=0)


def test_concatenate_then_filter_round_trips():
    a = _decode_batch([1], [[1, 1, 1]], [2])
    b = _decode_batch([2], [[1, 1, 1, 1, 1]], [4], offset=0.5)
    back = Batch.concatenate([a, b]).filter([1])
    torch.testing.assert_close(back.attention_mask, a.attention_mask, rtol=0, atol=0)
    torch.testing.assert_close(
        back.past_key_values.layers[1].keys, a.past_key_values.layers[1].keys, rtol=0, atol=0
    )
    torch.testing.assert_close(
        back.past_key_values.layers[1].values, a.past_key_values.layers[1].values, rtol=0, atol=0
    )


def test_concatenate_refuses_mixed_versions_and_prefill_batches():
    a = _decode_batch([1], [[1, 1, 1]], [2])
    b = _decode_batch([2], [[1, 1, 1]], [2])
    b.policy_version = "v2"
    with pytest.raises(ValueError, match="different policy versions"):
        Batch.concatenate([a, b])
    prefill = Batch.prefill("v1", [_seq(3)], pad_token_id=0, device="cpu")
    with pytest.raises(ValueError, match="decode state"):
        Batch.concatenate([a, prefill])


def test_prefill_left_pads_and_counts_positions_over_real_tokens():
    batch = Batch.prefill("v1", [_seq(1, [5, 6, 7]), _seq(2, [8])], pad_token_id=0, device="cpu")
    torch.testing.assert_close(batch.input_ids, torch.tensor([[5, 6, 7], [0, 0, 8]]), rtol=0, atol=0)
    torch.testing.assert_close(batch.attention_mask, torch.tensor([[1, 1, 1], [0, 0, 1]]), rtol=0, atol=0)
    torch.testing.assert_close(batch.position_ids, torch.tensor([[0, 1, 2], [1, 1, 0]]), rtol=0, atol=0)


@torch.inference_mode()
def test_requests_joining_at_different_steps_match_hf_generate(varied_model_dir, tokenizer):
    """Deterministic schedule: 2 greedy + 1 sampled start, one joins at step 2, two more (one sampled) at
    step 5; every greedy sequence equals HF ``generate`` for its prompt alone, token for token."""
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32).eval()
    policy = PolicyModel("base", model, tokenizer, torch.device("cpu"))
    prompts = [
        "Hello there, how are",
        "The capital of France is a city that",
        "a",
        "Once upon a time in a land far away, there lived a",
    ]
    expected = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected.append(out[0, inputs["input_ids"].shape[1] :].tolist())

    def seq(i: int, prompt: str, n: int, sample: bool = False) -> SequenceState:
        return _seq(i, tokenizer(prompt)["input_ids"], n, do_sample=sample, seed=i)

    schedule = {
        0: [seq(0, prompts[0], 12), seq(1, prompts[1], 12), seq(9, prompts[3], 5, True)],
        2: [seq(2, prompts[2], 12)],
        5: [seq(3, prompts[3], 12), seq(10, prompts[1], 30, True)],
    }
    got: dict[int, list[int]] = {}
    finished: dict[int, FinishReason] = {}
    running: Batch | None = None
    step = 0
    while running is not None or any(s >= step for s in schedule):
        if step in schedule:
            generations, joined = policy.generate_token(
                Batch.prefill("base", schedule[step], policy.pad_token_id, "cpu")
            )
            for g in generations:
                got.setdefault(g.request_id, []).append(g.token_id)
            running = joined if running is None else Batch.concatenate([running, joined])
        if running is not None:
            generations, running = policy.generate_token(running)
            for g in generations:
                got.setdefault(g.request_id, []).append(g.token_id)
                if g.finish_reason is not None:
                    finished[g.request_id] = g.finish_reason
        step += 1
    for i in range(4):
        assert got[i] == expected[i], f"prompt {i}"
    assert len(got[9]) == 5 and len(got[10]) == 30
    assert finished == {i: FinishReason.length for i in (0, 1, 2, 3, 9, 10)}


def test_incremental_token_texts_join_to_the_full_decode(tokenizer):
    from serve.model import decode_next

    text = "Hello 🤗 wörld, naïve café — 漢字 <|im_end|> done."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, prefix_offset, read_offset = [], 0, 0
    for end in range(1, len(ids) + 1):
        piece, prefix_offset, read_offset = decode_next(tokenizer, ids[:end], prefix_offset, read_offset)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)
    assert read_offset == len(ids) and read_offset - prefix_offset <= 4  # a short window, not the whole text
