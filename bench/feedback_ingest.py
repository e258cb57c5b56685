"""Feedback ingestion rate through the gateway with a real Redis (target: >= 2,000 events/s on 2 cores).

Starts redis-server, serve and the gateway as processes, creates some completions (n=4), then posts
ranking feedback on them from an asyncio load generator (aiohttp, persistent connections) and checks that
every accepted event is on the comparisons stream. Baseline in the same run: the rate of ``GET /healthz``
on the same gateway (the HTTP floor of the stack), so the ratio says what validation + auth + Redis cost.
It also measures the CPU seconds the gateway (all workers) and redis-server spent per accepted event, and
projects the rate 2 dedicated cores would sustain (2 / CPU per event): on a shared machine the wall-clock
rate mostly measures the neighbours.

    python bench/feedback_ingest.py --events 20000 --concurrency 64 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import aiohttp
import redis
from gateway_stack import Stack


async def hammer(
    url: str, key: str, bodies: list[dict | None], concurrency: int
) -> tuple[float, list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(bodies)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            for body in queue:
                started = time.perf_counter()
                if body is None:
                    async with session.get(f"{url}/healthz") as response:
                        await response.read()
                else:
                    async with session.post(f"{url}/v1/feedback", data=json.dumps(body)) as response:
                        await response.read()
                latencies.append(time.perf_counter() - started)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, statuses


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--completions", type=int, default=100)
    args = parser.parse_args()
    random.seed(0)
    with Stack(args.model, gateway_workers=args.workers) as stack:
        import httpx

        ids = []
        with httpx.Client(
            base_url=stack.gateway_url, headers={"Authorization": f"Bearer {stack.keys['user']}"}, timeout=120
        ) as http:
            for i in range(args.completions):
                response = http.post(
                    "/v1/completions",
                    json={"model": "instructloop", "prompt": f"Question {i}:", "max_tokens": 4, "n": 4},
                )
                response.raise_for_status()
                ids.append(response.json()["id"])
        bodies = []
        for _ in range(args.events):
            order = random.sample(range(4), 4)
            bodies.append(
                {
                    "type": "ranking",
                    "completion_id": random.choice(ids),
                    "ranking": [[order[0]], order[1:3], [order[3]]],
                }
            )
        # warm up both paths, then the baseline and the measured run
        asyncio.run(
            hammer(stack.gateway_url, stack.keys["user"], [None] * 500 + bodies[:500], args.concurrency)
        )
        r = redis.Redis.from_url(stack.redis_url)
        before = r.xlen("instructloop:stream:comparisons")
        base_s, base_lat, base_status = asyncio.run(
            hammer(stack.gateway_url, stack.keys["user"], [None] * args.events, args.concurrency)
        )
        gateway_cpu, redis_cpu = stack.cpu_seconds("gateway"), stack.cpu_seconds("redis")
        feed_s, feed_lat, feed_status = asyncio.run(
            hammer(stack.gateway_url, stack.keys["user"], bodies, args.concurrency)
        )
        gateway_cpu, redis_cpu = (
            stack.cpu_seconds("gateway") - gateway_cpu,
            stack.cpu_seconds("redis") - redis_cpu,
        )
        written = r.xlen("instructloop:stream:comparisons") - before
    accepted = feed_status.get(202, 0)
    result = {
        "events": args.events,
        "concurrency": args.concurrency,
        "gateway_workers": args.workers,
        "feedback_events_per_s": round(accepted / feed_s, 1),
        "feedback_p50_ms": round(pct(feed_lat, 50), 2),
        "feedback_p99_ms": round(pct(feed_lat, 99), 2),
        "healthz_requests_per_s": round(args.events / base_s, 1),
        "ratio_feedback_to_healthz": round((accepted / feed_s) / (args.events / base_s), 3),
        "statuses": feed_status,
        "baseline_statuses": base_status,
        "accepted": accepted,
        "on_stream": written,
        "lost": accepted - written,
        "gateway_cpu_ms_per_event": round(gateway_cpu / max(accepted, 1) * 1000, 3),
        "redis_cpu_ms_per_event": round(redis_cpu / max(accepted, 1) * 1000, 3),
        "projected_events_per_s_on_2_cores": round(
            2 / max((gateway_cpu + redis_cpu) / max(accepted, 1), 1e-9), 1
        ),
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
