"""Ingestion throughput: what durability (parse + SQLite commit with fsync + ack after commit) costs.

    PYTHONPATH=. python bench/ingest_throughput.py [--events 5000] [--read-count 256]

Starts a throwaway ``redis-server`` on a free port (AOF off), XADDs ``--events`` comparison events, then
drains them twice with a fresh consumer group each time:

- baseline: ``XREADGROUP`` + ``XACK`` only (no parsing, nothing stored) — the floor of any consumer;
- learner: ``learner.ingest.Ingestor.drain`` — parse each entry with ``ComparisonEvent``, write the batch
  to the SQLite dataset in one transaction (WAL, ``synchronous=FULL``), commit, then ``XACK``.

Prints events/s for both and the ratio (learner / baseline). The dataset lives in a temp folder on the
same disk as the working directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from instructloop.events import ComparisonEvent
from instructloop.streams import Stream, stream_key
from learner.dataset import Dataset
from learner.ingest import Ingestor

PREFIX = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def baseline(client: redis.Redis, key: str, read_count: int) -> float:
    client.xgroup_create(key, "baseline", id="0")
    started = time.perf_counter()
    while True:
        response = client.xreadgroup("baseline", "b", {key: ">"}, count=read_count)
        if not response:
            break
        ids = [entry_id for _, batch in response for entry_id, _ in batch]
        client.xack(key, "baseline", *ids)
    return time.perf_counter() - started


def learner(client: redis.Redis, workdir: Path, read_count: int) -> float:
    dataset = Dataset(workdir / "dataset.sqlite3", heldout_fraction=0.1)
    ingestor = Ingestor(client, dataset, prefix=PREFIX, group="learner", consumer="l", read_count=read_count)
    ingestor.ensure_groups()
    started = time.perf_counter()
    stats = ingestor.drain()
    elapsed = time.perf_counter() - started
    assert stats.inserted == dataset.counts()["comparisons"]
    dataset.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--read-count", type=int, default=256)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir="."))
    proc, port = start_redis(workdir)
    try:
        client = redis.Redis(port=port)
        key = stream_key(Stream.comparisons, PREFIX)
        pipe = client.pipeline(transaction=False)
        for i in range(args.events):
            event = ComparisonEvent(
                prompt=f"Question {i}: explain something.",
                responses=[f"A good answer number {i}.", f"A worse answer {i}.", "meh"],
                ranking=[[0], [1, 2]],
                labeler_id="bench",
            )
            pipe.xadd(key, event.to_fields())
        pipe.execute()
        base_s = baseline(client, key, args.read_count)
        ours_s = learner(client, workdir, args.read_count)
        result = {
            "events": args.events,
            "read_count": args.read_count,
            "baseline_events_per_s": round(args.events / base_s),
            "learner_events_per_s": round(args.events / ours_s),
            "ratio_learner_over_baseline": round(base_s / ours_s, 3),
        }
        print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
