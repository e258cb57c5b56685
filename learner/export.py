"""The learner's collected data in standard forms (``instructloop learner export``; schema: docs/data.md).

Three kinds of file, each JSONL or parquet, each loadable with ``datasets.load_dataset``:

    rankings.*        one K-wise record per comparison: the prompt, the K responses, the best-first ranking
                      (groups of tied indices), per-response policy versions and flags
    pairs.*           one chosen/rejected row per ordered (winner, loser) pair a ranking implies, ties giving
                      none (``instructloop.events.ranking_pairs``): TRL's preference format plus metadata
    demonstrations.*  one prompt/completion row per demonstration (TRL's prompt-completion format)

``prompt`` is always the exact model input (the prompt contract, ``instructloop/prompt.py``): the rendered
chat template for chat traffic, byte for byte what serve generated from, so a trainer must not render it
again. The source is the learner's durable dataset only (``learner/dataset.py``), read through its public
API while the learner may be running: events still in the Redis streams, not yet ingested, are not
exported (the dataset is the one validated, de-duplicated record; a running learner ingests within a
second or two).

Pure record builders (``ranking_record``, ``pair_records``, ``demonstration_record``) and one streaming
``export_dataset``: pages of ``page_size`` rows, written as they are read, each file written to a
temporary name and renamed once complete. pyarrow is imported only for parquet.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from instructloop.events import ComparisonEvent, DemonstrationEvent, ranking_pairs
from instructloop.stackfile import LEARNER_STATE_SUBDIR

log = logging.getLogger("learner.export")

DATASET_FILE = "dataset.sqlite3"
"""The dataset's file name inside the learner's ``state_dir`` (``learner/loop.py`` opens it there)."""


class ExportKind(str, Enum):
    rankings = "rankings"
    pairs = "pairs"
    demonstrations = "demonstrations"
    all = "all"

    def expand(self) -> list[ExportKind]:
        """The concrete kinds this choice names (``all``: every kind)."""
        if self is ExportKind.all:
            return [ExportKind.rankings, ExportKind.pairs, ExportKind.demonstrations]
        return [self]


class ExportFormat(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"


class ExportError(Exception):
    """An export that cannot run; the message names the fix (the CLI prints it and exits 2)."""


@dataclass
class ExportCounts:
    """What an export wrote and left out."""

    rankings: int = 0
    pairs: int = 0
    demonstrations: int = 0
    tied_rankings: int = 0
    """Comparisons whose ranking is one group of tied responses: a rankings record, no pair."""
    excluded_comparisons: int = 0
    excluded_demonstrations: int = 0
    files: dict[str, str] = field(default_factory=dict)


def split_name(heldout: bool) -> str:
    """The learner's split of a prompt: ``heldout`` prompts are never trained on (the gate measures there)."""
    return "heldout" if heldout else "train"


def _messages(messages: list[dict[str, str]] | None) -> list[dict[str, str]] | None:
    """Chat messages as ``{"role", "content"}`` records (the parquet struct has exactly these fields)."""
    if messages is None:
        return None
    for message in messages:
        extra = set(message) - {"role", "content"}
        if extra:
            raise ExportError(
                f"a chat message has fields {sorted(extra)} the export schema does not hold; add them to "
                "learner/export.py (arrow_schema) and docs/data.md"
            )
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


def _per_response(values: list, k: int, empty) -> list:
    """``values`` (one per response, or empty when the event carries none) as exactly ``k`` entries."""
    return list(values) if len(values) == k else [empty() if callable(empty) else empty for _ in range(k)]


def ranking_record(comparison: ComparisonEvent, *, heldout: bool, chat: bool | None) -> dict[str, Any]:
    """The K-wise record of one comparison. ``chat``: whether traffic served this prompt on the chat route
    (None: the dataset holds no completion with this exact prompt)."""
    k = len(comparison.responses)
    return {
        "prompt": comparison.prompt,
        "responses": list(comparison.responses),
        "ranking": [list(group) for group in comparison.ranking],
        "policy_versions": _per_response(comparison.policy_versions, k, None),
        "flags": _per_response([list(f) for f in comparison.flags], k, list),
        "chat": chat,
        "messages": None,
        "labeler_id": comparison.labeler_id,
        "rationale": comparison.rationale,
        "source": comparison.source,
        "completion_ids": list(comparison.completion_ids),
        "event_id": comparison.event_id,
        "created_at": comparison.created_at,
        "split": split_name(heldout),
    }


def pair_records(ranking: dict[str, Any]) -> list[dict[str, Any]]:
    """One chosen/rejected row per (winner, loser) pair of a ``ranking_record``; tied responses give none.

    ``chosen_rank`` / ``rejected_rank`` are the positions of their groups in the ranking (0 = best)."""
    rank_of = {index: g for g, group in enumerate(ranking["ranking"]) for index in group}
    shared = {key: ranking[key] for key in ("chat", "messages", "labeler_id", "rationale", "source")}
    tail = {key: ranking[key] for key in ("completion_ids", "event_id", "created_at", "split")}
    rows = []
    for winner, loser in ranking_pairs(ranking["ranking"]):
        rows.append(
            {
                "prompt": ranking["prompt"],
                "chosen": ranking["responses"][winner],
                "rejected": ranking["responses"][loser],
                "chosen_index": winner,
                "rejected_index": loser,
                "chosen_rank": rank_of[winner],
                "rejected_rank": rank_of[loser],
                "chosen_policy_version": ranking["policy_versions"][winner],
                "rejected_policy_version": ranking["policy_versions"][loser],
                "chosen_flags": ranking["flags"][winner],
                "rejected_flags": ranking["flags"][loser],
                **shared,
                **tail,
            }
        )
    return rows


def demonstration_record(demonstration: DemonstrationEvent, *, heldout: bool) -> dict[str, Any]:
    """The prompt/completion record of one demonstration (a labeler wrote ``completion``)."""
    return {
        "prompt": demonstration.prompt,
        "completion": demonstration.response,
        "chat": demonstration.chat,
        "messages": _messages(demonstration.messages),
        "labeler_id": demonstration.labeler_id,
        "event_id": demonstration.event_id,
        "created_at": demonstration.created_at,
        "split": split_name(heldout),
    }


def arrow_schema(kind: ExportKind):
    """The parquet schema of one kind (docs/data.md has the same table): fixed, so a column that is null in
    every row still has its type and files of different exports concatenate."""
    import pyarrow as pa

    strings = pa.list_(pa.string())
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    common_tail = [
        ("labeler_id", pa.string()),
        ("rationale", pa.string()),
        ("source", pa.string()),
        ("completion_ids", strings),
        ("event_id", pa.string()),
        ("created_at", pa.float64()),
        ("split", pa.string()),
    ]
    if kind is ExportKind.rankings:
        fields = [
            ("prompt", pa.string()),
            ("responses", strings),
            ("ranking", pa.list_(pa.list_(pa.int64()))),
            ("policy_versions", strings),
            ("flags", pa.list_(strings)),
            ("chat", pa.bool_()),
            ("messages", messages),
            *common_tail,
        ]
    elif kind is ExportKind.pairs:
        fields = [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("chosen_index", pa.int64()),
            ("rejected_index", pa.int64()),
            ("chosen_rank", pa.int64()),
            ("rejected_rank", pa.int64()),
            ("chosen_policy_version", pa.string()),
            ("rejected_policy_version", pa.string()),
            ("chosen_flags", strings),
            ("rejected_flags", strings),
            ("chat", pa.bool_()),
            ("messages", messages),
            *common_tail,
        ]
    elif kind is ExportKind.demonstrations:
        fields = [
            ("prompt", pa.string()),
            ("completion", pa.string()),
            ("chat", pa.bool_()),
            ("messages", messages),
            ("labeler_id", pa.string()),
            ("event_id", pa.string()),
            ("created_at", pa.float64()),
            ("split", pa.string()),
        ]
    else:
        raise ValueError(f"no schema for {kind}")
    return pa.schema(fields)


class _RecordWriter:
    """Writes records of one kind to ``<out>/<kind>.<format>`` through a temporary file, renamed by
    ``commit`` (an export that fails half-way leaves no half-written file under the final name)."""

    def __init__(self, out_dir: Path, kind: ExportKind, fmt: ExportFormat, buffer_rows: int = 10_000):
        self.kind = kind
        self.fmt = fmt
        self.path = out_dir / f"{kind.value}.{fmt.value}"
        self.tmp_path = out_dir / f".{kind.value}.{fmt.value}.partial"
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffer_rows = buffer_rows
        if fmt is ExportFormat.jsonl:
            self._file = open(self.tmp_path, "w", encoding="utf-8", newline="\n")
        else:
            import pyarrow.parquet as pq

            self._schema = arrow_schema(kind)
            self._parquet = pq.ParquetWriter(self.tmp_path, self._schema)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.rows += 1
            if self.fmt is ExportFormat.jsonl:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                self._buffer.append(record)
        if len(self._buffer) >= self._buffer_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(self._buffer, schema=self._schema))
            self._buffer = []

    def commit(self) -> None:
        if self.fmt is ExportFormat.jsonl:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        else:
            self._flush()
            self._parquet.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            if self.fmt is ExportFormat.jsonl:
                self._file.close()
            else:
                self._parquet.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def resolve_dataset_path(run_dir: Path | None, dataset: Path | None, default_run_dir: Path) -> Path:
    """The dataset file to read: ``dataset`` itself, else ``<run_dir>/dataset.sqlite3`` or, for the run
    folder of a stack ``up`` started, ``<run_dir>/learner/dataset.sqlite3`` (``run_dir`` defaulting to
    ``default_run_dir``). Raises ``ExportError`` naming the options when it is not a learner dataset; never
    creates one (``Dataset`` would create an empty file)."""
    if run_dir is not None and dataset is not None:
        raise ExportError("pass --run-dir or --dataset, not both")
    if dataset is not None:
        path = dataset
    else:  # the learner's state folder, or the run folder of a stack `instructloop up` started
        folder = run_dir or default_run_dir
        candidates = [folder / DATASET_FILE, folder / LEARNER_STATE_SUBDIR / DATASET_FILE]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        how = (
            "--dataset"
            if dataset is not None
            else "the stack's run folder (instructloop up --run-dir) "
            "or the learner's state folder as --run-dir"
            if run_dir is not None
            else "--run-dir (the stack's run folder, e.g. run) or --dataset"
        )
        raise ExportError(f"no learner dataset at {path}; pass {how}")
    try:  # read-only: a file that is not a learner dataset is refused, never written to
        probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            probe.close()
    except sqlite3.Error as exc:
        raise ExportError(
            f"{path} is not a learner dataset ({exc}); pass the learner's dataset.sqlite3"
        ) from exc
    missing = {"comparisons", "demonstrations", "prompts"} - tables
    if missing:
        raise ExportError(
            f"{path} is not a learner dataset (no table {', '.join(sorted(missing))}); pass the learner's "
            f"{DATASET_FILE}"
        )
    return path


def prepare_out_dir(out_dir: Path, kinds: list[ExportKind], fmt: ExportFormat, overwrite: bool) -> None:
    """Create ``out_dir``; refuse (``ExportError``) to replace an earlier export unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file; pass a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create --out {out_dir} ({exc}); pass a writable folder") from exc
    existing = [out_dir / f"{kind.value}.{fmt.value}" for kind in kinds]
    existing = [path for path in existing if path.exists()]
    if existing and not overwrite:
        names = ", ".join(path.name for path in existing)
        raise ExportError(f"{out_dir} already holds {names}; pass --force to overwrite or another --out")


def export_dataset(
    dataset,
    out_dir: Path,
    kinds: Collection[ExportKind],
    fmt: ExportFormat,
    *,
    excluded_labelers: Collection[str] = (),
    page_size: int = 1000,
    progress_every_s: float = 5.0,
) -> ExportCounts:
    """Write ``kinds`` (rankings, pairs, demonstrations; ``all``: every one) of ``dataset`` (a
    ``learner.dataset.Dataset``) into ``out_dir`` (created) as ``fmt``, paging ``page_size`` rows at a time.

    Events by a labeler in ``excluded_labelers`` are left out of every kind (counted). This is where an
    admin's exclusion list plugs in once the learner keeps one: pass it here, as the CLI's
    ``--exclude-labeler`` does. Logs a progress line at most every ``progress_every_s``."""
    counts = ExportCounts()
    kinds = list(dict.fromkeys(concrete for kind in kinds for concrete in kind.expand()))
    excluded = frozenset(excluded_labelers)
    writers: dict[ExportKind, _RecordWriter] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = dataset.counts()
    started = last_log = time.monotonic()

    def progress(table: str, done: int) -> None:
        nonlocal last_log
        if time.monotonic() - last_log >= progress_every_s:
            last_log = time.monotonic()
            log.info(
                "export progress: %s %d/%d rows read (%.0f s)",
                table,
                done,
                totals[table],
                last_log - started,
            )

    try:
        for kind in kinds:
            writers[kind] = _RecordWriter(out_dir, kind, fmt)
        if ExportKind.rankings in writers or ExportKind.pairs in writers:
            cursor = done = 0
            while page := dataset.stored_events("comparisons", after_seq=cursor, limit=page_size):
                cursor = page[-1].seq
                done += len(page)
                kept = [s for s in page if s.event.labeler_id not in excluded]
                counts.excluded_comparisons += len(page) - len(kept)
                chat = dataset.chat_of_prompts(s.event.prompt for s in kept)
                rankings = [
                    ranking_record(s.event, heldout=s.heldout, chat=chat.get(s.event.prompt)) for s in kept
                ]
                counts.rankings += len(rankings)
                counts.tied_rankings += sum(len(r["ranking"]) == 1 for r in rankings)
                if ExportKind.rankings in writers:
                    writers[ExportKind.rankings].write(rankings)
                pairs = [pair for r in rankings for pair in pair_records(r)]
                counts.pairs += len(pairs)
                if ExportKind.pairs in writers:
                    writers[ExportKind.pairs].write(pairs)
                progress("comparisons", done)
        if ExportKind.demonstrations in writers:
            cursor = done = 0
            while page := dataset.stored_events("demonstrations", after_seq=cursor, limit=page_size):
                cursor = page[-1].seq
                done += len(page)
                kept = [s for s in page if s.event.labeler_id not in excluded]
                counts.excluded_demonstrations += len(page) - len(kept)
                records = [demonstration_record(s.event, heldout=s.heldout) for s in kept]
                counts.demonstrations += len(records)
                writers[ExportKind.demonstrations].write(records)
                progress("demonstrations", done)
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            if writer.tmp_path.exists():
                writer.abort()
        raise
    if ExportKind.rankings not in writers:
        counts.rankings = 0
    if ExportKind.pairs not in writers:
        counts.pairs = 0
    counts.files = {kind.value: str(writer.path) for kind, writer in writers.items()}
    return counts


def summary(counts: ExportCounts) -> dict[str, Any]:
    """The counts as the CLI prints them (JSON on stdout)."""
    return asdict(counts)
