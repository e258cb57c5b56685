"""Batch.filter / Batch.concatenate on hand-built tensors (exact asserts), and the decode step on a real model
with requests joining at different steps (greedy parity with HF generate, deterministic schedule)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.batch import Batch, KVStore, SequenceState
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


def _store(lengths: list[int], layers: int = 2, heads: int = 1, dim: int = 2, offset: float = 0.0) -> KVStore:
    """Row r column j of layer l holds keys ``1000 l + 100 r + 10 j + k + offset`` (k < dim; values negated)
    for j < lengths[r], zeros after: every cached entry is distinct and readable in a failure message."""
    store = KVStore(rows=len(lengths), capacity=max(lengths) + 1)
    for layer in range(layers):
        keys = torch.zeros(len(lengths), heads, store.capacity, dim)
        for row, n in enumerate(lengths):
            for j in range(n):
                keys[row, :, j] = torch.arange(dim) + 1000 * layer + 100 * row + 10 * j + offset
        store.keys.append(keys)
        store.values.append(-keys)
    return store


def _decode_batch(ids: list[int], lengths: list[int], offset: float = 0.0) -> Batch:
    return Batch(
        policy_version="v1",
        sequences=[_seq(i) for i in ids],
        input_ids=torch.tensor([[100 + i] for i in ids]),  # (B, 1)
        lengths=list(lengths),
        kv=_store(lengths, offset=offset),
    )


def test_filter_moves_the_last_kept_rows_into_the_rows_that_leave():
    batch = _decode_batch([7, 8, 9, 10], [2, 4, 3, 1])
    before_keys = [k.clone() for k in batch.kv.keys]
    before_values = [v.clone() for v in batch.kv.values]

    kept = batch.filter([8, 10])

    # row 0 (7) leaves and the last kept row (10) moves into it; row 1 (8) stays where it is
    assert kept.request_ids == [10, 8]
    assert kept.lengths == [1, 4]
    assert kept.kv is batch.kv
    torch.testing.assert_close(kept.input_ids, torch.tensor([[110], [108]]), rtol=0, atol=0)
    for layer in range(2):
        for now, before in ((kept.kv.keys, before_keys), (kept.kv.values, before_values)):
            torch.testing.assert_close(now[layer][0, :, :1], before[layer][3, :, :1], rtol=0, atol=0)
            torch.testing.assert_close(now[layer][1], before[layer][1], rtol=0, atol=0)


def test_filter_edge_cases():
    batch = _decode_batch([7, 8, 9], [3, 4, 5])
    before = batch.kv.keys[0].clone()

    first_two = batch.filter([7, 8])  # the last row leaves: nothing moves
    assert first_two.request_ids == [7, 8] and first_two.lengths == [3, 4]
    torch.testing.assert_close(batch.kv.keys[0], before, rtol=0, atol=0)

    batch = _decode_batch([7, 8, 9], [3, 4, 5])
    only_last = batch.filter({9})
    assert only_last.request_ids == [9] and only_last.lengths == [5]
    torch.testing.assert_close(only_last.kv.keys[0][0, :, :5], before[2, :, :5], rtol=0, atol=0)

    batch = _decode_batch([7, 8, 9], [3, 4, 5])
    assert batch.filter([7, 8, 9]) is batch
    assert batch.filter([]) is None
    assert batch.filter([42]) is None


def test_concatenate_copies_the_other_rows_into_the_first_store_and_grows_it():
    short = _decode_batch([1], [2])  # 1 row, capacity 64
    long = _decode_batch([2, 3], [70, 3], offset=0.5)  # needs 71 columns
    short_keys = short.kv.keys[1].clone()

    joined = Batch.concatenate([short, long])

    assert joined.request_ids == [1, 2, 3]
    assert joined.lengths == [2, 70, 3]
    assert joined.kv is short.kv and joined.kv.rows >= 3 and joined.kv.capacity >= 71
    torch.testing.assert_close(joined.input_ids, torch.tensor([[101], [102], [103]]), rtol=0, atol=0)
    for layer in range(2):
        keys, values = joined.kv.keys[layer], joined.kv.values[layer]
        torch.testing.assert_close(keys[1:3, :, :70], long.kv.keys[layer][:2, :, :70], rtol=0, atol=0)
        torch.testing.assert_close(values[1:3, :, :70], long.kv.values[layer][:2, :, :70], rtol=0, atol=0)
    torch.testing.assert_close(joined.kv.keys[1][0, :, :2], short_keys[0, :, :2], rtol=0, atol=0)
    torch.testing.assert_close(joined.kv.keys[1][2, :, 2, 0], torch.tensor([1000 + 100 + 20 + 0.5]))


def test_concatenate_then_filter_round_trips():
    a = _decode_batch([1], [2])
    b = _decode_batch([2], [4], offset=0.5)
    a_keys = a.kv.keys[1][0, :, :2].clone()
    back = Batch.concatenate([a, b]).filter([2])
    assert back.request_ids == [2] and back.lengths == [4]
    torch.testing.assert_close(back.kv.keys[1][0, :, :4], b.kv.keys[1][0, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(back.kv.values[1][0, :, :4], b.kv.values[1][0, :, :4], rtol=0, atol=0)
    again = Batch.concatenate([_decode_batch([1], [2]), _decode_batch([2], [4], offset=0.5)]).filter([1])
    torch.testing.assert_close(again.kv.keys[1][0, :, :2], a_keys, rtol=0, atol=0)


def test_concatenate_refuses_mixed_versions_and_prefill_batches():
    a = _decode_batch([1], [2])
    b = _decode_batch([2], [2])
    b.policy_version = "v2"
    with pytest.raises(ValueError, match="different policy versions"):
        Batch.concatenate([a, b])
    prefill = Batch.prefill("v1", [_seq(3)], device="cpu")
    with pytest.raises(ValueError, match="decode state"):
        Batch.concatenate([a, prefill])


def test_prefill_packs_prompts_into_one_row_with_positions_restarting_per_prompt():
    batch = Batch.prefill("v1", [_seq(1, [5, 6, 7]), _seq(2, [8]), _seq(3, [9, 4])], device="cpu")
    torch.testing.assert_close(batch.input_ids, torch.tensor([[5, 6, 7, 8, 9, 4]]), rtol=0, atol=0)
    inputs = batch.model_inputs()
    torch.testing.assert_close(inputs["position_ids"], torch.tensor([[0, 1, 2, 0, 0, 1]]), rtol=0, atol=0)
    torch.testing.assert_close(inputs["logits_to_keep"], torch.tensor([2, 3, 5]), rtol=0, atol=0)
    assert inputs["serve_prefill_lengths"] == [3, 1, 2]
    cache = inputs["cache"]
    torch.testing.assert_close(cache.rows, torch.tensor([0, 0, 0, 1, 2, 2]), rtol=0, atol=0)
    torch.testing.assert_close(cache.columns, torch.tensor([0, 1, 2, 0, 0, 1]), rtol=0, atol=0)
    # the forward's keys/values (1, H_kv, N, D) land in their rows and columns, and come back unchanged
    new_keys = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1)
    keys, values = cache.update(new_keys, -new_keys, 0)
    assert keys is new_keys
    stored = cache.store.keys[0][:, 0, :3, 0]  # (rows, columns)
    torch.testing.assert_close(stored, torch.tensor([[0.0, 1, 2], [3, 0, 0], [4, 5, 0]]), rtol=0, atol=0)
    decoded = batch.advance([11, 12, 13], cache.store)
    assert decoded.lengths == [3, 1, 2] and not decoded.is_prefill
    torch.testing.assert_close(decoded.input_ids, torch.tensor([[11], [12], [13]]), rtol=0, atol=0)


def test_decode_inputs_mask_each_row_past_its_own_length_and_write_in_place():
    batch = _decode_batch([1, 2], [2, 4])
    inputs = batch.model_inputs()
    low = torch.finfo(torch.float32).min
    torch.testing.assert_close(inputs["position_ids"], torch.tensor([[2], [4]]), rtol=0, atol=0)
    torch.testing.assert_close(
        inputs["attention_mask"],
        torch.tensor([[0, 0, 0, low, low], [0, 0, 0, 0, 0]]).reshape(2, 1, 1, 5),
        rtol=0,
        atol=0,
    )
    new_keys = torch.tensor([[[[7.0, 7.0]]], [[[8.0, 8.0]]]])  # (B, H_kv, 1, D)
    keys, _ = inputs["cache"].update(new_keys, -new_keys, 1)
    assert keys.shape == (2, 1, 5, 2)
    assert keys.data_ptr() == batch.kv.keys[1].data_ptr()  # a view of the store, no copy
    torch.testing.assert_close(keys[0, 0, 2], torch.tensor([7.0, 7.0]), rtol=0, atol=0)
    torch.testing.assert_close(keys[1, 0, 4], torch.tensor([8.0, 8.0]), rtol=0, atol=0)
    torch.testing.assert_close(keys[1, 0, 3], torch.tensor([1130.0, 1131.0]), rtol=0, atol=0)


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
            generations, joined = policy.generate_token(Batch.prefill("base", schedule[step], "cpu"))
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
