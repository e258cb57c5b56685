"""``instructloop learner export``: a dataset built through the real ingest path (real redis-server, real
events), exported by the CLI, loaded back with ``datasets.load_dataset`` and checked against the events."""

from __future__ import annotations

import json
import logging
from collections import Counter

import datasets
import pytest
from typer.testing import CliRunner

from instructloop.events import Choice, CompletionEvent, ranking_pairs
from instructloop.prompt import render_chat
from instructloop.stackfile import LEARNER_STATE_SUBDIR
from instructloop.streams import Stream
from launcher.cli import app
from learner.dataset import Dataset, is_heldout
from learner.export import ExportFormat, ExportKind, export_dataset
from learner.ingest import Ingestor
from tests.learner.helpers import PREFIX, comparison, completion, demonstration, xadd

HELDOUT_FRACTION = 0.5
CHAT_MESSAGES = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Name a prime  number 🙂\nand say why."},
]


@pytest.fixture(autouse=True)
def root_log_handlers():
    """The CLI points the root logger at CliRunner's stderr, closed after each run: put the handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def collected(redis_server, tmp_path, tokenizer):
    """A learner state folder whose dataset was filled by the Ingestor from real streams, and the events."""
    chat_prompt = render_chat(tokenizer, CHAT_MESSAGES)
    comparisons = [
        # K = 4 with a tie in the middle: 2 > {0, 3} > 1 gives 2·1 + 1·2 + ... = 5 pairs, none between 0 and 3
        comparison(
            0,
            prompt=chat_prompt,
            responses=["7, it has no divisors.", "Banana.", "2: the only even prime.", "11 \n"],
            ranking=[[2], [0, 3], [1]],
            policy_versions=["v0001", "v0001", "v0002", "base"],
            flags=[[], ["fails_instruction", "made_up_facts"], [], ["harmful"]],
            rationale="2 is right and explains why",
            completion_ids=["cmpl-chat"],
        ),
        comparison(1, source="pairwise", prompt="  Trailing spaces and ünïcode\t", ranking=[[1], [0]]),
        comparison(2, source="ab", ranking=[[0, 1]], policy_versions=["v0001", "v0002"]),  # a tie: no pair
        comparison(3, labeler_id="excluded-labeler"),
    ]
    comparisons += [
        comparison(i, responses=[f"a{i}", f"b{i}", f"c{i}"], ranking=[[1], [2], [0]]) for i in range(4, 12)
    ]
    completions = [
        CompletionEvent(
            event_id="cpl-chat",
            completion_id="cmpl-chat",
            prompt=chat_prompt,
            choices=[Choice(index=0, text="7, it has no divisors.")],
            policy_version="v0001",
            caller="caller-hash",
            chat=True,
            messages=CHAT_MESSAGES,
        ),
        completion(1, prompt="  Trailing spaces and ünïcode\t"),
    ]
    demonstrations = [
        demonstration(
            0, prompt=chat_prompt, chat=True, messages=CHAT_MESSAGES, response="2, divisible by 1 and 2."
        ),
        demonstration(1),
        demonstration(2, labeler_id="excluded-labeler"),
    ]
    client = redis_server.client(
        "learner"
    )  # the ingestor's user; its rules allow the XADDs standing in for the gateway
    for event in completions:
        xadd(client, Stream.completions, event)
    for event in comparisons:
        xadd(client, Stream.comparisons, event)
    for event in demonstrations:
        xadd(client, Stream.demonstrations, event)
    state_dir = tmp_path / "learner-state"
    dataset = Dataset(state_dir / "dataset.sqlite3", heldout_fraction=HELDOUT_FRACTION)
    ingestor = Ingestor(client, dataset, prefix=PREFIX, group="learner", consumer="c1", block_ms=50)
    ingestor.ensure_groups()
    assert ingestor.drain().inserted == len(comparisons) + len(completions) + len(demonstrations)
    dataset.close()
    client.close()
    return state_dir, comparisons, demonstrations


def run_export(*args: str):
    return CliRunner().invoke(app, ["learner", "export", *args])


def load(path, fmt: str, cache_dir) -> datasets.Dataset:
    builder = "json" if fmt == "jsonl" else "parquet"
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_round_trips_through_datasets(collected, tmp_path, fmt):
    state_dir, comparisons, demonstrations = collected
    out = tmp_path / "export"
    result = run_export(
        "--run-dir",
        str(state_dir),
        "--out",
        str(out),
        "--format",
        fmt,
        "--exclude-labeler",
        "excluded-labeler",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    kept = [c for c in comparisons if c.labeler_id != "excluded-labeler"]
    expected_pairs = [(c.event_id, w, lo) for c in kept for w, lo in ranking_pairs(c.ranking)]
    assert summary["rankings"] == len(kept) and summary["pairs"] == len(expected_pairs) == 5 + 1 + 0 + 8 * 3
    assert (summary["demonstrations"], summary["tied_rankings"]) == (2, 1)
    assert (summary["excluded_comparisons"], summary["excluded_demonstrations"]) == (1, 1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{k}.{fmt}" for k in ("rankings", "pairs", "demonstrations")
    )
    by_id = {c.event_id: c for c in comparisons}

    pairs = load(out / f"pairs.{fmt}", fmt, tmp_path / "hf-cache")
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)  # TRL's preference format
    seen = Counter((row["event_id"], row["chosen_index"], row["rejected_index"]) for row in pairs)
    assert sorted(seen) == sorted(expected_pairs) and set(seen.values()) == {
        1
    }  # each ordered pair exactly once
    for row in pairs:
        event = by_id[row["event_id"]]
        assert row["prompt"].encode() == event.prompt.encode()  # the exact model input, byte for byte
        assert row["chosen"] == event.responses[row["chosen_index"]]
        assert row["rejected"] == event.responses[row["rejected_index"]]
        assert row["labeler_id"] == event.labeler_id and row["source"] == event.source
        assert row["split"] == ("heldout" if is_heldout(event.prompt, HELDOUT_FRACTION) else "train")
        assert row["created_at"] == event.created_at
    chat_pairs = [row for row in pairs if row["event_id"] == "cmp-0"]
    assert {(r["chosen_index"], r["rejected_index"]) for r in chat_pairs} == {
        (2, 0),
        (2, 3),
        (2, 1),
        (0, 1),
        (3, 1),
    }
    top_over_last = next(r for r in chat_pairs if (r["chosen_index"], r["rejected_index"]) == (2, 1))
    assert (top_over_last["chosen_rank"], top_over_last["rejected_rank"]) == (0, 2)
    assert (top_over_last["chosen_policy_version"], top_over_last["rejected_policy_version"]) == (
        "v0002",
        "v0001",
    )
    assert top_over_last["rejected_flags"] == ["fails_instruction", "made_up_facts"]
    assert top_over_last["rationale"] == "2 is right and explains why" and top_over_last["chat"] is True
    assert next(r for r in pairs if r["event_id"] == "cmp-1")["chat"] is False  # served on /v1/completions
    assert next(r for r in pairs if r["event_id"] == "cmp-4")["chat"] is None  # no completion in the dataset

    rankings = load(out / f"rankings.{fmt}", fmt, tmp_path / "hf-cache")
    assert sorted(rankings["event_id"]) == sorted(c.event_id for c in kept)
    for row in rankings:
        event = by_id[row["event_id"]]
        assert row["prompt"].encode() == event.prompt.encode()
        assert (row["responses"], row["ranking"]) == (event.responses, event.ranking)
        assert len(row["policy_versions"]) == len(row["flags"]) == len(event.responses)
    chat_ranking = next(r for r in rankings if r["event_id"] == "cmp-0")
    assert chat_ranking["policy_versions"] == ["v0001", "v0001", "v0002", "base"]
    assert chat_ranking["flags"] == [[], ["fails_instruction", "made_up_facts"], [], ["harmful"]]
    tie = next(r for r in rankings if r["event_id"] == "cmp-2")
    assert tie["ranking"] == [[0, 1]] and tie["source"] == "ab"

    demos = load(out / f"demonstrations.{fmt}", fmt, tmp_path / "hf-cache")
    assert {"prompt", "completion"} <= set(demos.column_names)  # TRL's prompt-completion format
    by_demo = {d.event_id: d for d in demonstrations}
    assert sorted(demos["event_id"]) == ["dem-0", "dem-1"]
    for row in demos:
        event = by_demo[row["event_id"]]
        assert row["prompt"].encode() == event.prompt.encode() and row["completion"] == event.response
        assert row["chat"] == event.chat and row["labeler_id"] == event.labeler_id
    chat_demo = next(r for r in demos if r["event_id"] == "dem-0")
    assert chat_demo["messages"] == CHAT_MESSAGES


def test_paged_export_equals_the_cli_export_and_kind_selects_files(collected, tmp_path, caplog):
    state_dir, _, _ = collected
    dataset = Dataset(state_dir / "dataset.sqlite3")
    try:  # before the CLI run: the CLI's logging setup replaces caplog's handler on the root logger
        with caplog.at_level(logging.INFO, logger="learner.export"):
            counts = export_dataset(
                dataset,
                tmp_path / "paged",
                [ExportKind.pairs],
                ExportFormat.jsonl,
                page_size=3,
                progress_every_s=0,
            )
    finally:
        dataset.close()
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export progress")]
    assert len(progress) == 4  # 12 comparisons, 3 a page
    assert progress[-1].startswith("export progress: comparisons 12/12 rows read")

    result = run_export("--run-dir", str(state_dir), "--out", str(tmp_path / "cli"), "--kind", "pairs")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "cli").iterdir()] == ["pairs.jsonl"]
    assert counts.pairs == json.loads(result.stdout)["pairs"] == 5 + 1 + 0 + 1 + 8 * 3
    paged, whole = tmp_path / "paged" / "pairs.jsonl", tmp_path / "cli" / "pairs.jsonl"
    assert paged.read_bytes() == whole.read_bytes()


def test_cli_errors_name_the_fix_and_never_show_a_traceback(collected, tmp_path):
    state_dir, _, _ = collected
    missing = run_export("--run-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert missing.exit_code == 2 and "no learner dataset" in missing.stderr and "--run-dir" in missing.stderr
    assert not (tmp_path / "nowhere").exists()  # nothing created where there was no dataset

    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database, just text " * 100)
    bad = run_export("--dataset", str(not_sqlite), "--out", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "is not a learner dataset" in bad.stderr

    both = run_export("--dataset", str(not_sqlite), "--run-dir", str(state_dir), "--out", str(tmp_path / "x"))
    assert both.exit_code == 2 and "not both" in both.stderr

    out = tmp_path / "again"
    assert run_export("--run-dir", str(state_dir), "--out", str(out)).exit_code == 0
    again = run_export("--run-dir", str(state_dir), "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert run_export("--run-dir", str(state_dir), "--out", str(out), "--force").exit_code == 0

    unknown = run_export("--run-dir", str(state_dir), "--out", str(out), "--format", "csv")
    assert unknown.exit_code == 2 and "csv" in unknown.stderr
    for result in (missing, bad, both, again, unknown):
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_a_stacks_run_folder_is_found_as_make_run_lays_it_out(collected, tmp_path, monkeypatch):
    """`instructloop up --run-dir run` keeps the learner's state in run/learner: `--run-dir run` (and no
    option at all, from the folder `make run` ran in) finds its dataset."""
    state_dir, comparisons, _ = collected
    stack = tmp_path / "stack"
    (stack / "run").mkdir(parents=True)
    (stack / "run" / LEARNER_STATE_SUBDIR).symlink_to(state_dir, target_is_directory=True)
    by_run_dir = run_export(
        "--run-dir", str(stack / "run"), "--out", str(tmp_path / "a"), "--kind", "rankings"
    )
    assert by_run_dir.exit_code == 0, by_run_dir.output
    assert json.loads(by_run_dir.stdout)["rankings"] == len(comparisons)

    monkeypatch.chdir(stack)
    monkeypatch.setenv("INSTRUCTLOOP_LEARNER_STATE_DIR", str(tmp_path / "no-learner-here"))
    by_default = run_export("--out", str(tmp_path / "b"), "--kind", "rankings")
    assert by_default.exit_code == 0, by_default.output
    assert (tmp_path / "b" / "rankings.jsonl").read_text() == (tmp_path / "a" / "rankings.jsonl").read_text()
