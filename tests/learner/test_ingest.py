"""Ingestion against a real redis-server: store-then-ack, duplicates, dead letters, reclaiming."""

from __future__ import annotations

import json

import pytest

from instructloop.events import ComparisonEvent
from instructloop.streams import Stream, stream_key
from learner.dataset import Dataset, IngestedEntry
from learner.ingest import Ingestor
from learner.metrics import LearnerMetrics
from tests.learner.helpers import PREFIX, comparison, completion, demonstration, pending, xadd


@pytest.fixture
def client(redis_server):
    """The learner's own user: the ingestor under test reads and acknowledges with it (and the tests' XADDs,
    which the learner's rules allow, stand in for the gateway's)."""
    client = redis_server.client("learner")
    yield client
    client.close()


def make_ingestor(client, dataset, consumer="c1", **kwargs) -> Ingestor:
    ingestor = Ingestor(
        client,
        dataset,
        prefix=PREFIX,
        group="learner",
        consumer=consumer,
        block_ms=50,
        metrics=kwargs.pop("metrics", None),
        **kwargs,
    )
    ingestor.ensure_groups()
    return ingestor


def test_events_land_in_the_dataset_and_are_acked(client, tmp_path):
    dataset = Dataset(tmp_path / "dataset.sqlite3", heldout_fraction=0.0)
    metrics = LearnerMetrics()
    ingestor = make_ingestor(client, dataset, metrics=metrics)
    comparisons = [comparison(i) for i in range(5)]
    for i, event in enumerate(comparisons):
        xadd(client, Stream.comparisons, event)
        xadd(client, Stream.completions, completion(i))
    xadd(client, Stream.demonstrations, demonstration(0))

    stats = ingestor.drain()

    assert (stats.read, stats.inserted, stats.duplicates, stats.dead_lettered) == (11, 11, 0, 0)
    assert dataset.counts() == {"comparisons": 5, "demonstrations": 1, "prompts": 5, "dead_letters": 0}
    assert dataset.event_ids("comparisons") == [f"cmp-{i}" for i in range(5)]
    stored = dataset.comparisons()
    assert [s.comparison for s in stored] == comparisons
    assert dataset.demonstrations()[0].response == demonstration(0).response
    assert sorted(dataset.sample_prompts(10)) == sorted(completion(i).prompt for i in range(5))
    for stream in (Stream.comparisons, Stream.completions, Stream.demonstrations):
        assert pending(client, stream) == 0
    lag = ingestor.update_lag()
    assert lag["comparisons"] == {"lag": 0, "pending": 0}
    assert metrics.registry.get_sample_value("learner_events_ingested_total", {"stream": "comparisons"}) == 5
    # The dataset is durable: a fresh connection to the same file sees everything.
    dataset.close()
    assert Dataset(tmp_path / "dataset.sqlite3").counts()["prompts"] == 5


def test_duplicate_event_id_is_dropped(client, tmp_path):
    dataset = Dataset(tmp_path / "dataset.sqlite3")
    metrics = LearnerMetrics()
    ingestor = make_ingestor(client, dataset, metrics=metrics)
    xadd(client, Stream.comparisons, comparison(1))
    ingestor.drain()
    # The gateway retried the XADD (same event_id, new stream entry), in the same and a later batch.
    xadd(client, Stream.comparisons, comparison(1))
    xadd(client, Stream.comparisons, comparison(1, labeler_id="someone-else"))
    xadd(client, Stream.comparisons, comparison(2))

    stats = ingestor.drain()

    assert (stats.read, stats.inserted, stats.duplicates) == (3, 1, 2)
    assert dataset.event_ids("comparisons") == ["cmp-1", "cmp-2"]
    assert pending(client, Stream.comparisons) == 0
    assert metrics.registry.get_sample_value("learner_events_duplicate_total", {"stream": "comparisons"}) == 2


def test_malformed_entry_goes_to_dead_letter_and_ingestion_continues(client, tmp_path):
    dataset = Dataset(tmp_path / "dataset.sqlite3")
    metrics = LearnerMetrics()
    ingestor = make_ingestor(client, dataset, metrics=metrics)
    key = stream_key(Stream.comparisons, PREFIX)
    xadd(client, Stream.comparisons, comparison(1))
    bad_json = client.xadd(key, {"event": "{not json"}).decode()
    no_field = client.xadd(key, {"payload": "x"}).decode()
    bad_ranking = client.xadd(
        key, {"event": comparison(9).model_dump_json().replace('"ranking":[[0],[1]]', '"ranking":[[0,0]]')}
    ).decode()
    wrong_kind = client.xadd(key, demonstration(3).to_fields()).decode()
    not_utf8 = client.xadd(key, {"event": b"\xff\xfe\x00"}).decode()
    xadd(client, Stream.comparisons, comparison(2))

    stats = ingestor.drain()

    assert (stats.read, stats.inserted, stats.dead_lettered) == (7, 2, 5)
    assert dataset.event_ids("comparisons") == ["cmp-1", "cmp-2"]
    assert pending(client, Stream.comparisons) == 0
    dead = client.xrange(stream_key(Stream.dead_letter, PREFIX))
    by_entry = {fields[b"entry_id"].decode(): fields for _, fields in dead}
    assert set(by_entry) == {bad_json, no_field, bad_ranking, wrong_kind, not_utf8}
    assert b"no 'event' field" in by_entry[no_field][b"reason"]
    assert b"appears more than once" in by_entry[bad_ranking][b"reason"]
    assert b"ValidationError" in by_entry[bad_json][b"reason"]
    assert json.loads(by_entry[bad_json][b"fields"]) == {"event": "{not json"}
    assert all(fields[b"stream"] == b"comparisons" for fields in by_entry.values())
    assert dataset.counts()["dead_letters"] == 5
    assert (
        metrics.registry.get_sample_value("learner_events_dead_lettered_total", {"stream": "comparisons"})
        == 5
    )


def test_pending_entries_of_a_dead_consumer_are_reclaimed(client, tmp_path):
    dataset = Dataset(tmp_path / "dataset.sqlite3")
    dead = make_ingestor(client, dataset, consumer="dead")
    for i in range(4):
        xadd(client, Stream.comparisons, comparison(i))
    xadd(client, Stream.demonstrations, demonstration(1))
    # "dead" reads everything, stores only part of it and dies before acknowledging anything.
    response = client.xreadgroup("learner", "dead", {key: ">" for key in dead.event_types}, count=100)
    assert sum(len(batch) for _, batch in response) == 5
    first = next(batch for key, batch in response if key.decode().endswith("comparisons"))[0]
    dataset.add([])  # nothing; then store one event by hand as the dead consumer did before the crash

    dataset.add([IngestedEntry("comparisons", first[0].decode(), ComparisonEvent.from_fields(first[1]))])
    assert pending(client, Stream.comparisons) == 4

    # New consumer: nothing new to read, but the dead one's pending entries are claimed on start.
    fresh = make_ingestor(client, dataset, consumer="fresh", claim_min_idle_ms=0)
    assert fresh.drain().read == 0
    stats = fresh.recover()

    assert stats.reclaimed == 5 and stats.inserted == 4 and stats.duplicates == 1
    assert dataset.event_ids("comparisons") == [f"cmp-{i}" for i in range(4)]
    assert dataset.counts()["demonstrations"] == 1
    assert pending(client, Stream.comparisons) == 0 and pending(client, Stream.demonstrations) == 0


def test_own_pending_entries_are_reprocessed_after_a_restart(client, tmp_path):
    dataset = Dataset(tmp_path / "dataset.sqlite3")
    first = make_ingestor(client, dataset, consumer="learner-0")
    xadd(client, Stream.completions, completion(1))
    client.xreadgroup("learner", "learner-0", {stream_key(Stream.completions, PREFIX): ">"}, count=10)
    # Same consumer name after a restart, entries not idle long enough for XAUTOCLAIM: still recovered.
    restarted = make_ingestor(client, dataset, consumer="learner-0", claim_min_idle_ms=3_600_000)
    assert first is not restarted
    stats = restarted.recover()
    assert stats.inserted == 1
    assert dataset.event_ids("prompts") == ["cpl-1"]
    assert pending(client, Stream.completions) == 0


def test_streams_are_trimmed_only_below_what_every_group_acknowledged(client, tmp_path):
    """Finding 2: the streams no longer grow forever, and trimming never removes an entry some consumer group
    has not acknowledged (pending in the learner's group, or not yet read/acked by another group)."""
    dataset = Dataset(tmp_path / "dataset.sqlite3", heldout_fraction=0.0)
    metrics = LearnerMetrics()
    ingestor = make_ingestor(client, dataset, metrics=metrics)
    key = stream_key(Stream.comparisons, PREFIX)
    ids = [xadd(client, Stream.comparisons, comparison(i)) for i in range(10)]
    client.xgroup_create(key, "audit", id="0")
    audit = client.xreadgroup("audit", "a1", {key: ">"}, count=5)[0][1]
    client.xack(key, "audit", *[entry_id for entry_id, _ in audit[:3]])  # ids[3], ids[4] pending in "audit"
    assert ingestor.drain().inserted == 10  # the learner's group: all 10 delivered and acknowledged

    removed = ingestor.trim_acknowledged()
    assert removed["comparisons"] == 3 and client.xlen(key) == 7
    assert [e[0].decode() for e in client.xrange(key)] == ids[3:]  # the oldest pending entry is kept
    assert metrics.registry.get_sample_value("learner_stream_trimmed_total", {"stream": "comparisons"}) == 3

    client.xack(key, "audit", ids[3], ids[4])
    client.xgroup_destroy(key, "audit")
    more = [xadd(client, Stream.comparisons, comparison(i)) for i in range(10, 13)]
    client.xreadgroup(
        "learner", "c1", {key: ">"}, count=2
    )  # delivered to the learner, not acknowledged (a crash)
    ingestor.trim_acknowledged()
    assert [e[0].decode() for e in client.xrange(key)] == more  # everything before the learner's pending one
    assert ingestor.recover().inserted == 2 and ingestor.drain().inserted == 1
    assert dataset.counts()["comparisons"] == 13  # nothing was lost to trimming
