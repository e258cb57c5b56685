"""The learner's own durable dataset: SQLite (stdlib), WAL, ``synchronous=FULL``.

One table per kind of event, ``event_id`` unique in each, so a re-delivered event is dropped by the
database itself. Every row gets an increasing ``seq`` (the dataset cursor: the checkpoint remembers up to
which ``seq`` the reward model has trained) and a ``heldout`` flag that follows its ``prompt`` (the exact
model input), fixed when the prompt is first seen: a prompt lives in one split only, for good, and a prompt
asked, ranked or demonstrated again lands where it landed before. A new prompt is held out when its hash
falls in the ``heldout_fraction`` share, or when fewer than ``heldout_count_floor`` prompts are held out yet
(``min(heldout_min_prompts, prompts // 4)``): the hash share alone holds out none of 16 prompts 18 % of the
time, this holds out at least 2 of 8 and 4 of 16. The share part depends on the prompt alone, the floor part
on the order prompts arrive in; nothing trained on ever becomes held out, and the gate and the RM's held-out
accuracy are measured on prompts that nothing trained on.

Tables:
    comparisons      a ``ComparisonEvent`` per row (prompt, K responses, ranking, policy versions)
    demonstrations   a ``DemonstrationEvent`` per row
    prompts          the prompt of a ``CompletionEvent`` per row — the exact model input serve generated from
                     (the prompt contract), its route (``chat``) and the traffic's ``max_tokens`` (PPO
                     rollouts and the gate cut responses there, as serve did); PPO and the gate sample these
    dead_letters     (stream, entry_id) of every malformed entry sent to the dead-letter stream, with the
                     reason

Writes happen in one transaction per ingested batch; the ingestor acknowledges the Redis entries only
after ``commit`` returned (see ``learner/ingest.py``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from instructloop.events import ComparisonEvent, CompletionEvent, DemonstrationEvent, Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    entry_id    TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    heldout     INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    ingested_at REAL NOT NULL,
    event       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS demonstrations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    entry_id    TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    heldout     INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    ingested_at REAL NOT NULL,
    event       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT NOT NULL UNIQUE,
    entry_id       TEXT NOT NULL,
    prompt         TEXT NOT NULL,
    heldout        INTEGER NOT NULL,
    policy_version TEXT NOT NULL,
    chat           INTEGER NOT NULL,
    created_at     REAL NOT NULL,
    ingested_at    REAL NOT NULL,
    max_tokens     INTEGER
);
CREATE TABLE IF NOT EXISTS dead_letters (
    stream      TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    ingested_at REAL NOT NULL,
    PRIMARY KEY (stream, entry_id)
);
CREATE TABLE IF NOT EXISTS prompt_split (
    prompt      TEXT PRIMARY KEY,
    heldout     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS prompt_split_heldout ON prompt_split (heldout);
CREATE INDEX IF NOT EXISTS prompts_split ON prompts (heldout, prompt);
CREATE INDEX IF NOT EXISTS comparisons_split ON comparisons (heldout, seq);
"""

TABLE_OF = {ComparisonEvent: "comparisons", DemonstrationEvent: "demonstrations", CompletionEvent: "prompts"}


HELDOUT_MIN_SHARE = 4
"""The guaranteed held-out prompts never exceed one in this many distinct prompts."""


def is_heldout(prompt: str, fraction: float) -> bool:
    """True when the prompt's hash alone holds it out: the first 8 bytes of sha256(prompt) as a number in
    [0, 1) below ``fraction``. (``Dataset`` also holds out new prompts up to ``heldout_count_floor``.)"""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64 < fraction


def heldout_count_floor(prompts: int, heldout_min_prompts: int) -> int:
    """Held-out prompts the split guarantees among ``prompts`` distinct ones: ``heldout_min_prompts``, but no
    more than one in ``HELDOUT_MIN_SHARE`` (2 of 8, 4 of 16 with the default 4)."""
    return min(heldout_min_prompts, prompts // HELDOUT_MIN_SHARE)


@dataclass(frozen=True)
class IngestedEntry:
    """One stream entry that parsed: where it came from and the event."""

    stream: str
    entry_id: str
    event: Event


@dataclass
class AddResult:
    """Outcome of one ``Dataset.add``: per stream, events stored and events dropped as duplicates."""

    inserted: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0


@dataclass(frozen=True)
class TrafficPrompt:
    """A model input from the traffic and the longest ``max_tokens`` it was served with (None: unknown)."""

    text: str
    max_tokens: int | None = None


@dataclass(frozen=True)
class StoredComparison:
    seq: int
    comparison: ComparisonEvent


@dataclass(frozen=True)
class StoredEvent:
    """One row of ``comparisons`` or ``demonstrations`` as stored: its cursor, its split and the event."""

    seq: int
    heldout: bool
    event: ComparisonEvent | DemonstrationEvent


def _seeded_rank(seed: int, text: str) -> int:
    """A seeded pseudo-random rank of ``text`` (64 bits of blake2b): ordering by it is a seeded shuffle."""
    digest = hashlib.blake2b(
        text.encode("utf-8", errors="replace"), digest_size=8, key=str(seed).encode()[:64]
    )
    return int.from_bytes(digest.digest(), "big") >> 1  # SQLite integers are signed 64-bit


class Dataset:
    """The learner's dataset. One connection, guarded by a lock (the metrics thread reads counts)."""

    def __init__(self, path: str | Path, heldout_fraction: float = 0.1, heldout_min_prompts: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.heldout_fraction = heldout_fraction
        self.heldout_min_prompts = heldout_min_prompts
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._conn.create_function("seeded_rank", 2, _seeded_rank, deterministic=True)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(prompts)")}
        if "max_tokens" not in columns:  # a dataset written before the traffic's max_tokens was kept
            self._conn.execute("ALTER TABLE prompts ADD COLUMN max_tokens INTEGER")
        if not self._one("SELECT COUNT(*) FROM prompt_split"):  # a dataset written before the split table
            for table in ("comparisons", "demonstrations", "prompts"):
                self._conn.execute(
                    f"INSERT OR IGNORE INTO prompt_split (prompt, heldout) SELECT prompt, MAX(heldout) "
                    f"FROM {table} GROUP BY prompt ORDER BY MIN(seq)"
                )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- writes ----------------------------------------------------------------------------------
    def add(
        self, entries: Iterable[IngestedEntry], dead_letters: Iterable[tuple[str, str, str]] = ()
    ) -> AddResult:
        """Store parsed entries and dead-letter records ``(stream, entry_id, reason)`` in ONE transaction.

        When this returns the rows are committed and on disk (WAL + synchronous=FULL).
        """
        now = time.time()
        result = AddResult()
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for entry in entries:
                    outcome = result.inserted if self._insert(cur, entry, now) else result.duplicates
                    outcome[entry.stream] = outcome.get(entry.stream, 0) + 1
                for stream, entry_id, reason in dead_letters:
                    cur.execute(
                        "INSERT OR IGNORE INTO dead_letters (stream, entry_id, reason, ingested_at)"
                        " VALUES (?, ?, ?, ?)",
                        (stream, entry_id, reason, now),
                    )
                    result.dead_letters += cur.rowcount
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return result

    def _insert(self, cur: sqlite3.Cursor, entry: IngestedEntry, now: float) -> bool:
        event = entry.event
        if not isinstance(event, CompletionEvent | ComparisonEvent | DemonstrationEvent):
            raise TypeError(f"the dataset stores no {type(event).__name__}")
        heldout = self._register_prompt(cur, event.prompt)
        if isinstance(event, CompletionEvent):
            max_tokens = event.sampling.get("max_tokens")
            max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
            cur.execute(
                "INSERT OR IGNORE INTO prompts (event_id, entry_id, prompt, heldout, policy_version, chat, "
                "created_at, ingested_at, max_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.event_id,
                    entry.entry_id,
                    event.prompt,
                    heldout,
                    event.policy_version,
                    int(event.chat),
                    event.created_at,
                    now,
                    max_tokens,
                ),
            )
        else:
            table = TABLE_OF[type(event)]
            cur.execute(
                f"INSERT OR IGNORE INTO {table} (event_id, entry_id, prompt, heldout, created_at, "
                "ingested_at, event) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.event_id,
                    entry.entry_id,
                    event.prompt,
                    heldout,
                    event.created_at,
                    now,
                    event.model_dump_json(),
                ),
            )
        return cur.rowcount == 1

    def _register_prompt(self, cur: sqlite3.Cursor, prompt: str) -> int:
        """The split of ``prompt``: where it landed before, or (a new prompt) held out when its hash is in the
        share or the held-out prompts are fewer than ``heldout_count_floor`` of the prompts with it."""
        row = cur.execute("SELECT heldout FROM prompt_split WHERE prompt = ?", (prompt,)).fetchone()
        if row is not None:
            return int(row[0])
        heldout = is_heldout(prompt, self.heldout_fraction)
        if not heldout and self.heldout_min_prompts:
            (prompts,) = cur.execute("SELECT COUNT(*) FROM prompt_split").fetchone()
            (held,) = cur.execute("SELECT COUNT(*) FROM prompt_split WHERE heldout = 1").fetchone()
            heldout = held < heldout_count_floor(prompts + 1, self.heldout_min_prompts)
        cur.execute("INSERT INTO prompt_split (prompt, heldout) VALUES (?, ?)", (prompt, int(heldout)))
        return int(heldout)

    def count_split_prompts(self, *, heldout: bool) -> int:
        """Distinct prompts of one split, whatever carried them (completions, comparisons, demonstrations)."""
        return self._one("SELECT COUNT(*) FROM prompt_split WHERE heldout = ?", (int(heldout),))

    def heldout_queries(self, n: int) -> list[TrafficPrompt]:
        """Up to ``n`` held-out prompts (whatever carried them), earliest first, each with its traffic's
        largest ``max_tokens``: a set that only grows until it holds ``n`` and then stays fixed (the gate's
        prompts, so the compared versions' samples stay valid gate after gate)."""
        return [
            TrafficPrompt(text, max_tokens)
            for text, max_tokens in self._all(
                "SELECT s.prompt, (SELECT MAX(p.max_tokens) FROM prompts p WHERE p.heldout = 1"
                " AND p.prompt = s.prompt) FROM prompt_split s WHERE s.heldout = 1 ORDER BY s.rowid LIMIT ?",
                (n,),
            )
        ]

    def has_dead_letter(self, stream: str, entry_id: str) -> bool:
        return (
            self._one(
                "SELECT COUNT(*) FROM dead_letters WHERE stream = ? AND entry_id = ?", (stream, entry_id)
            )
            > 0
        )

    # ---- reads -----------------------------------------------------------------------------------
    def _one(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            row = self._conn.execute(sql, args).fetchone()
        return int(row[0] or 0)

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def counts(self) -> dict[str, int]:
        """Rows per table (the ``dataset_rows`` metric)."""
        return {
            table: self._one(f"SELECT COUNT(*) FROM {table}")
            for table in ("comparisons", "demonstrations", "prompts", "dead_letters")
        }

    def event_ids(self, table: str) -> list[str]:
        if table not in ("comparisons", "demonstrations", "prompts"):
            raise ValueError(f"unknown table {table}")
        return [row[0] for row in self._all(f"SELECT event_id FROM {table} ORDER BY seq")]

    def max_comparison_seq(self) -> int:
        return self._one("SELECT MAX(seq) FROM comparisons")

    def count_new_comparisons(self, after_seq: int) -> int:
        """Training comparisons the reward model has not seen (``seq`` past the checkpoint's cursor)."""
        return self._one("SELECT COUNT(*) FROM comparisons WHERE heldout = 0 AND seq > ?", (after_seq,))

    def comparisons(
        self,
        *,
        after_seq: int = 0,
        up_to_seq: int | None = None,
        heldout: bool = False,
        limit: int | None = None,
    ) -> list[StoredComparison]:
        """Comparisons of one split in ``seq`` order, ``after_seq < seq <= up_to_seq``."""
        sql = "SELECT seq, event FROM comparisons WHERE heldout = ? AND seq > ?"
        args: list = [int(heldout), after_seq]
        if up_to_seq is not None:
            sql += " AND seq <= ?"
            args.append(up_to_seq)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [
            StoredComparison(seq, ComparisonEvent.model_validate_json(event))
            for seq, event in self._all(sql, tuple(args))
        ]

    def demonstrations(
        self, *, heldout: bool | None = None, limit: int | None = None
    ) -> list[DemonstrationEvent]:
        sql = "SELECT event FROM demonstrations"
        args: list = []
        if heldout is not None:
            sql += " WHERE heldout = ?"
            args.append(int(heldout))
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [DemonstrationEvent.model_validate_json(row[0]) for row in self._all(sql, tuple(args))]

    def stored_events(self, table: str, *, after_seq: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to ``limit`` rows of ``comparisons`` or ``demonstrations``, both splits, ``seq > after_seq`` in
        ``seq`` order: a reader pages through a table of any size with it (the export does)."""
        kinds = {"comparisons": ComparisonEvent, "demonstrations": DemonstrationEvent}
        if table not in kinds:
            raise ValueError(f"stored_events reads comparisons or demonstrations, not {table}")
        rows = self._all(
            f"SELECT seq, heldout, event FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        )
        return [
            StoredEvent(seq, bool(heldout), kinds[table].model_validate_json(raw))
            for seq, heldout, raw in rows
        ]

    def chat_of_prompts(self, prompts: Iterable[str]) -> dict[str, bool]:
        """For each of ``prompts`` that traffic served (a row of ``prompts``): whether it came from the chat
        route (True if any completion of that exact model input was a chat one). Others are absent."""
        found: dict[str, bool] = {}
        distinct = list(dict.fromkeys(prompts))
        for start in range(0, len(distinct), 500):  # well under SQLite's bound-parameter limit
            chunk = distinct[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._all(
                f"SELECT prompt, MAX(chat) FROM prompts WHERE heldout IN (0, 1) AND prompt IN ({marks}) "
                "GROUP BY prompt",
                tuple(chunk),
            )
            found.update((prompt, bool(chat)) for prompt, chat in rows)
        return found

    def count_prompts(self, *, heldout: bool = False) -> int:
        """Distinct prompt texts of one split."""
        return self._one("SELECT COUNT(DISTINCT prompt) FROM prompts WHERE heldout = ?", (int(heldout),))

    def count_new_prompts(self, after_seq: int, *, heldout: bool = False) -> int:
        """Distinct prompt texts of one split first served after row ``after_seq``: a prompt asked
        again is not new (it probes the (heldout, prompt) index for an earlier row, so the cost
        follows the new rows)."""
        return self._one(
            "SELECT COUNT(DISTINCT p.prompt) FROM prompts p WHERE p.heldout = ? AND p.seq > ? AND NOT EXISTS "
            "(SELECT 1 FROM prompts q WHERE q.heldout = p.heldout AND q.prompt = p.prompt AND q.seq <= ?)",
            (int(heldout), after_seq, after_seq),
        )

    def max_prompt_seq(self) -> int:
        return self._one("SELECT MAX(seq) FROM prompts")

    def sample_prompts(self, n: int, *, heldout: bool = False, seed: int = 0) -> list[str]:
        """Up to ``n`` distinct prompts of one split, a seeded
        sample (the same seed gives the same prompts)."""
        return [query.text for query in self.sample_queries(n, heldout=heldout, seed=seed)]

    def sample_queries(self, n: int, *, heldout: bool = False, seed: int = 0) -> list[TrafficPrompt]:
        """``sample_prompts`` with each prompt's traffic ``max_tokens`` (the largest it was served with).

        Sampled inside SQLite: distinct prompts come grouped off the (heldout, prompt) index and ordered by a
        seeded hash with ``LIMIT n``, so memory stays O(n) however many prompts traffic has brought."""
        return self._queries("seeded_rank(?, prompt)", (int(heldout), seed, n))

    def _queries(self, order: str, args: tuple) -> list[TrafficPrompt]:
        """Distinct prompts of one split (args: heldout, the ``order`` expression's arguments, limit)."""
        return [
            TrafficPrompt(text, max_tokens)
            for text, max_tokens in self._all(
                "SELECT prompt, MAX(max_tokens) FROM prompts WHERE heldout = ? GROUP BY prompt "
                f"ORDER BY {order} LIMIT ?",
                args,
            )
        ]

    def live_win_rate(self, version: str, against: str) -> tuple[float, int]:
        """Win-rate of ``version`` over ``against`` in live comparisons that ranked responses of both.

        Every (winner, loser) pair of a ranking whose two responses came from these two versions counts
        once; returns (win rate, number of pairs) — (0.5, 0) when there are none.
        """
        wins = total = 0
        rows = self._all(
            "SELECT event FROM comparisons WHERE event LIKE ? AND event LIKE ?",
            (f"%{json.dumps(version)}%", f"%{json.dumps(against)}%"),
        )
        for (raw,) in rows:
            comparison = ComparisonEvent.model_validate_json(raw)
            versions = comparison.policy_versions
            if len(versions) != len(comparison.responses):
                continue
            for winner, loser in comparison.pairs():
                pair = (versions[winner], versions[loser])
                if pair == (version, against):
                    wins += 1
                    total += 1
                elif pair == (against, version):
                    total += 1
        return (wins / total, total) if total else (0.5, 0)
