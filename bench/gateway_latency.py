"""Latency the gateway adds over calling serve directly (target: < 5% at p50 and p95).

Starts redis-server, serve (the real default model unless --model says otherwise) and the gateway as
processes, then sends the same greedy request alternately to serve's ``POST /generate`` (the baseline) and
to the gateway's ``POST /v1/completions`` (auth, rate limit, validation, backend call, completion stored in
Redis and logged to the completions stream), one at a time, alternating which goes first. Reports p50/p95
of both and the added latency as a ratio of the baseline, all from the same run.

    python bench/gateway_latency.py --requests 200 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from gateway_stack import Stack

PROMPT = "Explain in one sentence why the sky is blue."


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=200, help="per path")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    with Stack(args.model) as stack:
        direct = httpx.Client(base_url=stack.serve_url, timeout=120)
        gateway = httpx.Client(
            base_url=stack.gateway_url, timeout=120, headers={"Authorization": f"Bearer {stack.keys['user']}"}
        )
        direct_body = {
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": args.max_tokens, "do_sample": False, "details": True},
        }
        gateway_body = {
            "model": "instructloop",
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }

        def call_direct() -> float:
            started = time.perf_counter()
            response = direct.post("/generate", json=direct_body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            return elapsed

        def call_gateway() -> float:
            started = time.perf_counter()
            response = gateway.post("/v1/completions", json=gateway_body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            return elapsed

        for _ in range(args.warmup):
            call_direct()
            call_gateway()
        # both paths do the same work: greedy, so the same text
        same = direct.post("/generate", json=direct_body).json()["generated_text"]
        if gateway.post("/v1/completions", json=gateway_body).json()["choices"][0]["text"] != same:
            raise SystemExit("the gateway and serve returned different greedy texts: not the same work")
        direct_s, gateway_s = [], []
        for i in range(args.requests):
            if i % 2:
                direct_s.append(call_direct())
                gateway_s.append(call_gateway())
            else:
                gateway_s.append(call_gateway())
                direct_s.append(call_direct())
        metrics = httpx.get(f"{stack.gateway_url}/metrics").text
    logged = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("gateway_completions_logged_total ")
    )
    result = {
        "model": args.model,
        "requests_per_path": args.requests,
        "max_tokens": args.max_tokens,
        "serve_p50_ms": round(pct(direct_s, 50), 2),
        "serve_p95_ms": round(pct(direct_s, 95), 2),
        "gateway_p50_ms": round(pct(gateway_s, 50), 2),
        "gateway_p95_ms": round(pct(gateway_s, 95), 2),
        "added_p50_ms": round(pct(gateway_s, 50) - pct(direct_s, 50), 2),
        "added_p95_ms": round(pct(gateway_s, 95) - pct(direct_s, 95), 2),
        "added_p50_ratio": round(pct(gateway_s, 50) / pct(direct_s, 50) - 1, 4),
        "added_p95_ratio": round(pct(gateway_s, 95) / pct(direct_s, 95) - 1, 4),
        "median_paired_added_ms": round(
            statistics.median(g - d for g, d in zip(gateway_s, direct_s, strict=True)) * 1000, 2
        ),
        "completions_logged": logged,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
