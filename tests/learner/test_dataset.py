"""The SQLite dataset: split, cursor, sampling, atomic batches, live win-rate."""

from __future__ import annotations

import sqlite3

import pytest

from instructloop.events import PolicyEvent
from learner.dataset import Dataset, IngestedEntry, TrafficPrompt, is_heldout
from tests.learner.helpers import comparison, completion


def entries(events, stream):
    return [IngestedEntry(stream, f"{i}-0", event) for i, event in enumerate(events)]


def test_heldout_split_is_a_fixed_function_of_the_prompt(tmp_path):
    prompts = [f"prompt {i}" for i in range(2000)]
    share = sum(is_heldout(p, 0.1) for p in prompts) / len(prompts)
    assert 0.07 < share < 0.13
    assert [is_heldout(p, 0.1) for p in prompts] == [is_heldout(p, 0.1) for p in prompts]
    assert not any(is_heldout(p, 0.0) for p in prompts)

    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.3)
    events = [comparison(i) for i in range(40)]
    again = [comparison(100 + i, prompt=e.prompt) for i, e in enumerate(events)]  # each prompt ranked twice
    served = [completion(i, prompt=e.prompt) for i, e in enumerate(events)]
    dataset.add(entries(events + again, "comparisons"))
    dataset.add(entries(served, "completions"))
    heldout = {s.comparison.prompt for s in dataset.comparisons(heldout=True)}
    train = {s.comparison.prompt for s in dataset.comparisons(heldout=False)}
    assert heldout == {e.prompt for e in events if is_heldout(e.prompt, 0.3)} and 0 < len(heldout) < 40
    assert heldout.isdisjoint(train) and len(heldout | train) == 40  # a prompt lives in one split only
    assert len(dataset.comparisons(heldout=True)) == 2 * len(heldout)
    assert set(dataset.sample_prompts(100, heldout=True)) == heldout  # completions follow the same split
    assert set(dataset.sample_prompts(100)) == train


def test_comparison_cursor_counts_only_new_training_rows(tmp_path):
    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.0)
    dataset.add(entries([comparison(i) for i in range(5)], "comparisons"))
    assert dataset.count_new_comparisons(after_seq=0) == 5
    cursor = dataset.max_comparison_seq()
    dataset.add(entries([comparison(i) for i in range(5, 8)], "comparisons"))
    assert dataset.count_new_comparisons(after_seq=cursor) == 3
    assert [s.comparison.event_id for s in dataset.comparisons(after_seq=cursor)] == [
        "cmp-5",
        "cmp-6",
        "cmp-7",
    ]
    assert [s.seq for s in dataset.comparisons(after_seq=0, up_to_seq=2)] == [1, 2]


def test_prompt_sampling_is_distinct_and_seeded(tmp_path):
    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.0)
    events = [completion(i) for i in range(30)] + [
        completion(100 + i, prompt=completion(i).prompt) for i in range(5)
    ]
    dataset.add(entries(events, "completions"))
    assert dataset.count_prompts() == 30
    assert dataset.count_new_prompts(0) == 30
    last = dataset.max_prompt_seq()
    dataset.add(
        entries(
            [
                completion(200, prompt=completion(3).prompt),
                completion(201, prompt="never asked before"),
                completion(202, prompt="never asked before"),
            ],
            "completions",
        )
    )
    assert dataset.count_new_prompts(last) == 1  # a prompt asked again is not new; a new one counts once
    assert dataset.count_prompts() == 31
    first = dataset.sample_prompts(8, seed=3)
    assert len(set(first)) == 8
    assert dataset.sample_prompts(8, seed=3) == first
    assert dataset.sample_prompts(8, seed=4) != first
    assert len(dataset.sample_prompts(100)) == 31


def test_the_gates_heldout_prompts_grow_to_n_then_stay_fixed(tmp_path):
    """The gate evaluates on ``heldout_queries``: new traffic never changes a full set, so the compared
    versions' samples on it stay valid gate after gate (a seeded sample of a growing pool changed with every
    prompt). Prompts carried by comparisons count too, with the traffic's max_tokens where served."""
    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.9999)  # (nearly) everything held out
    dataset.add(entries([completion(i, sampling={"max_tokens": 7}) for i in range(3)], "completions"))
    assert dataset.heldout_queries(5) == [TrafficPrompt(completion(i).prompt, 7) for i in range(3)]
    dataset.add(entries([comparison(0)], "comparisons"))
    dataset.add(entries([completion(i) for i in range(3, 30)], "completions"))
    full = [q.text for q in dataset.heldout_queries(5)]
    assert full == [completion(i).prompt for i in range(3)] + [comparison(0).prompt, completion(3).prompt]
    dataset.add(
        entries(
            [completion(i) for i in range(30, 60)] + [completion(99, prompt=completion(7).prompt)],
            "completions",
        )
    )
    assert [q.text for q in dataset.heldout_queries(5)] == full
    assert Dataset(tmp_path / "e.sqlite3", heldout_fraction=0.0).heldout_queries(5) == []


def test_prompt_sampling_memory_does_not_grow_with_the_number_of_prompts(tmp_path):
    """Finding 9: a round sampled its prompts from a list of EVERY distinct prompt (memory grew with traffic).
    With 4000 distinct 2 kB prompts (8 MB of text), sampling 8 allocates well under 1 MB."""
    import tracemalloc

    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.0)
    events = [completion(i, prompt=f"{i:05d} " + "x" * 2000) for i in range(4000)]
    dataset.add(entries(events, "completions"))
    del events
    tracemalloc.start()
    try:
        sample = dataset.sample_prompts(8, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(set(sample)) == 8
    assert peak < 1_000_000, f"sampling 8 prompts allocated {peak} bytes"
    counts: dict[str, int] = {}
    for seed in range(200):  # every prompt has the same chance (a uniform sample, not the first ones)
        for prompt in dataset.sample_prompts(1, seed=seed):
            counts[prompt[:5]] = counts.get(prompt[:5], 0) + 1
    assert len(counts) > 150


def test_a_failed_batch_stores_nothing(tmp_path):
    dataset = Dataset(tmp_path / "d.sqlite3")
    dataset.add(entries([comparison(0)], "comparisons"))
    batch = entries([comparison(1), comparison(2)], "comparisons") + [
        IngestedEntry("policies", "9-0", PolicyEvent(version="v1", status="promoted"))
    ]
    with pytest.raises(TypeError):
        dataset.add(batch)
    assert dataset.event_ids("comparisons") == ["cmp-0"]
    with sqlite3.connect(tmp_path / "d.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_live_win_rate_between_two_versions(tmp_path):
    dataset = Dataset(tmp_path / "d.sqlite3")
    events = [
        comparison(0, policy_versions=["v2", "v1"]),  # v2 beats v1
        comparison(1, policy_versions=["v2", "v1"]),  # v2 beats v1
        comparison(2, policy_versions=["v1", "v2"]),  # v1 beats v2
        comparison(3, policy_versions=["v2", "v2"]),  # same version: no information
        comparison(4, responses=["a", "b", "c"], ranking=[[0], [1, 2]], policy_versions=["v1", "v2", "v3"]),
    ]
    dataset.add(entries(events, "comparisons"))
    rate, pairs = dataset.live_win_rate("v2", against="v1")
    assert pairs == 4 and rate == pytest.approx(2 / 4)
    assert dataset.live_win_rate("v9", against="v1") == (0.5, 0)


def test_a_dataset_from_before_the_split_table_keeps_its_split(tmp_path):
    dataset = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.3)
    dataset.add(entries([comparison(i) for i in range(20)], "comparisons"))
    heldout = {s.comparison.prompt for s in dataset.comparisons(heldout=True)}
    dataset.close()
    with sqlite3.connect(tmp_path / "d.sqlite3") as conn:
        conn.execute("DROP TABLE prompt_split")
    reopened = Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.3, heldout_min_prompts=4)
    assert {q.text for q in reopened.heldout_queries(100)} == heldout and heldout
    assert reopened.count_split_prompts(heldout=False) == 20 - len(heldout)
