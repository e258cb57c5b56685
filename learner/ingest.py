"""Ingestion: a consumer group over the comparisons, demonstrations and completions streams.

Delivery is at-least-once and the dataset makes it exactly-once:

1. ``XREADGROUP`` a batch (new entries, ``>``);
2. parse every entry with its stream's event model; a malformed entry is appended to the ``dead-letter``
   stream with the reason (once: the dataset remembers which entries it dead-lettered);
3. write the parsed events and the dead-letter records to the dataset in one SQLite transaction and
   commit (``event_id`` is unique per table, so a re-delivered event is dropped there);
4. only then ``XACK`` the batch.

A crash before step 4 leaves the entries pending; on start the learner re-reads its own pending entries
(``XREADGROUP`` from id ``0``) and reclaims those of consumers idle longer than ``claim_min_idle_ms``
(``XAUTOCLAIM``), and step 3 drops whatever was already stored.

Trimming (``trim_acknowledged``, run by the learner every ``trim_interval_s``): each ingested stream is
cut (``XTRIM MINID``) below the oldest entry that some consumer group still needs: for every group on
the stream (``XINFO GROUPS``), its oldest pending entry (``XPENDING``) if it has pending entries, else
its last-delivered id. An entry is removed only once every group has been delivered it and acknowledged
it, so trimming never loses an event (the dataset holds every acknowledged one); a stream nobody reads
yet (no group) is never trimmed. The learner runs it because it is the one consumer (a single replica),
it knows when it acknowledged, and the gateway's Redis user then needs no trimming rights.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from instructloop.events import ComparisonEvent, CompletionEvent, DemonstrationEvent, Event
from instructloop.streams import Stream, stream_key
from learner.dataset import Dataset, IngestedEntry
from learner.metrics import LearnerMetrics

log = logging.getLogger(__name__)

INGESTED_STREAMS: dict[Stream, type[Event]] = {
    Stream.comparisons: ComparisonEvent,
    Stream.demonstrations: DemonstrationEvent,
    Stream.completions: CompletionEvent,
}
DEAD_LETTER_MAXLEN = 100_000


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class IngestStats:
    """What one call did, per outcome."""

    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    per_stream: dict[str, int] = field(default_factory=dict)

    def add(self, other: IngestStats) -> IngestStats:
        self.read += other.read
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.reclaimed += other.reclaimed
        for name, count in other.per_stream.items():
            self.per_stream[name] = self.per_stream.get(name, 0) + count
        return self


class Ingestor:
    """Moves stream entries into the dataset, acknowledging each only after it is committed.

    ``redis`` must be a client with ``decode_responses=False``: a malformed (non-UTF-8) entry must reach
    the dead-letter stream, not crash the client's decoder.
    """

    def __init__(
        self,
        redis: Any,
        dataset: Dataset,
        *,
        prefix: str,
        group: str,
        consumer: str,
        read_count: int = 256,
        block_ms: int = 1000,
        claim_min_idle_ms: int = 60_000,
        metrics: LearnerMetrics | None = None,
    ):
        self.redis = redis
        self.dataset = dataset
        self.group = group
        self.consumer = consumer
        self.read_count = read_count
        self.block_ms = block_ms
        self.claim_min_idle_ms = claim_min_idle_ms
        self.metrics = metrics
        self.event_types = {stream_key(s, prefix): cls for s, cls in INGESTED_STREAMS.items()}
        self.names = {stream_key(s, prefix): s.value for s in INGESTED_STREAMS}
        self.dead_letter_key = stream_key(Stream.dead_letter, prefix)
        self._next_trim = 0.0

    # ---- set-up and recovery ---------------------------------------------------------------------
    def ensure_groups(self) -> None:
        """Create the consumer group on each stream (from the first entry; the stream if missing)."""
        for key in self.event_types:
            try:
                self.redis.xgroup_create(key, self.group, id="0", mkstream=True)
                log.info("consumer group created", extra={"stream": key, "group": self.group})
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def recover(self) -> IngestStats:
        """Process this consumer's own pending entries, then reclaim idle ones of other consumers."""
        stats = IngestStats()
        for key in self.event_types:
            last_id = "0"
            while True:
                response = self.redis.xreadgroup(
                    self.group, self.consumer, {key: last_id}, count=self.read_count
                )
                entries = [
                    (key, entry_id, fields) for _, batch in response or [] for entry_id, fields in batch
                ]
                if not entries:
                    break
                last_id = _text(entries[-1][1])
                stats.add(self._process(entries))
            start = "0-0"
            while True:
                reply = self.redis.xautoclaim(
                    key,
                    self.group,
                    self.consumer,
                    self.claim_min_idle_ms,
                    start_id=start,
                    count=self.read_count,
                )
                start, claimed = _text(reply[0]), reply[1]
                entries = [(key, entry_id, fields) for entry_id, fields in claimed]
                if entries:
                    batch_stats = self._process(entries)
                    batch_stats.reclaimed = len(entries)
                    if self.metrics:
                        self.metrics.entries_reclaimed.labels(self.names[key]).inc(len(entries))
                    stats.add(batch_stats)
                if start == "0-0":
                    break
        if stats.read:
            log.info("recovered pending entries", extra=stats.__dict__)
        return stats

    # ---- steady state ----------------------------------------------------------------------------
    def poll(self, block_ms: int | None = None) -> IngestStats:
        """Read one batch of new entries from the three streams (waiting up to ``block_ms``; ``None`` = the
        configured wait, ``0`` = do not wait) and store it."""
        wait = self.block_ms if block_ms is None else block_ms
        response = self.redis.xreadgroup(
            self.group,
            self.consumer,
            {key: ">" for key in self.event_types},
            count=self.read_count,
            block=wait
            if wait > 0
            else None,  # redis-py: block=None returns at once, block=0 would wait forever
        )
        entries = [
            (_text(key), entry_id, fields) for key, batch in response or [] for entry_id, fields in batch
        ]
        return self._process(entries) if entries else IngestStats()

    def drain(self, max_entries: int | None = None) -> IngestStats:
        """Ingest everything available now (without waiting), up to ``max_entries``."""
        stats = IngestStats()
        while max_entries is None or stats.read < max_entries:
            batch = self.poll(block_ms=0)
            if not batch.read:
                break
            stats.add(batch)
        return stats

    def trim_every(self, interval_s: float) -> None:
        """``trim_acknowledged`` at most once per ``interval_s`` (the learner calls this every poll)."""
        if time.monotonic() >= self._next_trim:
            self.trim_acknowledged()
            self._next_trim = time.monotonic() + interval_s

    def trim_acknowledged(self) -> dict[str, int]:
        """``XTRIM MINID`` each ingested stream below what every consumer group has acknowledged.
        Returns the entries removed per stream."""
        removed: dict[str, int] = {}
        for key, name in self.names.items():
            try:
                groups = self.redis.xinfo_groups(key)
            except ResponseError:  # no such stream yet
                continue
            floors = []
            for group in groups:
                floor = _text(group.get("last-delivered-id") or "0-0")
                if int(group.get("pending") or 0):
                    summary = self.redis.xpending(key, _text(group.get("name")))
                    if summary.get("min") is not None:
                        floor = _text(summary["min"])
                floors.append(tuple(int(part) for part in floor.split("-")))
            if not floors or min(floors) == (0, 0):
                continue
            ms, seq = min(floors)
            removed[name] = int(self.redis.xtrim(key, minid=f"{ms}-{seq}", approximate=False))
            if self.metrics:
                self.metrics.stream_trimmed.labels(name).inc(removed[name])
                self.metrics.stream_length.labels(name).set(int(self.redis.xlen(key)))
        if any(removed.values()):
            log.info(
                "streams trimmed below what every consumer group acknowledged", extra={"removed": removed}
            )
        return removed

    def update_lag(self) -> dict[str, dict[str, int]]:
        """Consumer lag and pending count per stream (XINFO GROUPS); also set as metrics."""
        lag: dict[str, dict[str, int]] = {}
        for key, name in self.names.items():
            try:
                groups = self.redis.xinfo_groups(key)
            except ResponseError:
                continue
            for group in groups:
                if _text(group.get("name")) != self.group:
                    continue
                entry = {"lag": int(group.get("lag") or 0), "pending": int(group.get("pending") or 0)}
                lag[name] = entry
                if self.metrics:
                    self.metrics.consumer_lag.labels(name).set(entry["lag"])
                    self.metrics.consumer_pending.labels(name).set(entry["pending"])
        return lag

    # ---- one batch -------------------------------------------------------------------------------
    def _process(self, entries: list[tuple[str, Any, Any]]) -> IngestStats:
        stats = IngestStats(read=len(entries))
        parsed: list[IngestedEntry] = []
        dead: list[tuple[str, str, str]] = []
        to_ack: dict[str, list[str]] = {}
        for key, raw_id, fields in entries:
            entry_id = _text(raw_id)
            name = self.names[key]
            to_ack.setdefault(key, []).append(entry_id)
            stats.per_stream[name] = stats.per_stream.get(name, 0) + 1
            if fields is None:  # deleted from the stream (XTRIM/XDEL) while pending: nothing to store
                continue
            try:
                event = self.event_types[key].from_fields(fields)
            except Exception as exc:  # any parse failure is the entry's fault: dead-letter it, keep going
                reason = f"{type(exc).__name__}: {exc}"[:2000]
                self._dead_letter(key, entry_id, fields, reason)
                dead.append((name, entry_id, reason))
                continue
            parsed.append(IngestedEntry(stream=name, entry_id=entry_id, event=event))

        result = self.dataset.add(parsed, dead)  # committed (durable) when this returns
        pipe = self.redis.pipeline(transaction=False)
        for key, ids in to_ack.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()

        stats.inserted = sum(result.inserted.values())
        stats.duplicates = sum(result.duplicates.values())
        stats.dead_lettered = len(dead)
        if self.metrics:
            for name, n in result.inserted.items():
                self.metrics.events_ingested.labels(name).inc(n)
            for name, n in result.duplicates.items():
                self.metrics.events_duplicate.labels(name).inc(n)
            for name, _, _ in dead:
                self.metrics.events_dead_lettered.labels(name).inc()
        if stats.duplicates or dead:
            log.info(
                "batch ingested",
                extra={
                    "inserted": stats.inserted,
                    "duplicates": stats.duplicates,
                    "dead_lettered": stats.dead_lettered,
                },
            )
        return stats

    def _dead_letter(self, key: str, entry_id: str, fields: Any, reason: str) -> None:
        """Append the entry and the reason to the dead-letter stream, unless an earlier (crashed) pass did."""
        name = self.names[key]
        if self.dataset.has_dead_letter(name, entry_id):
            return
        payload = {_text(k): _text(v) for k, v in dict(fields).items()}
        self.redis.xadd(
            self.dead_letter_key,
            {
                "stream": name,
                "entry_id": entry_id,
                "reason": reason,
                "fields": json.dumps(payload),
                "group": self.group,
                "consumer": self.consumer,
                "time": f"{time.time():.3f}",
            },
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
        log.warning("entry dead-lettered", extra={"stream": name, "entry_id": entry_id, "reason": reason})
