"""Hot-swap under load: time from publishing a new policy version to the first token and the first complete
response produced by it, and failed requests during the swap (default model, CPU).

8 streaming clients keep requests in flight; the registry publishes v0001, then v0002 (the default weights
plus small Gaussian noise, so they are real, different checkpoints) through Redis (key + pub/sub).

    python bench/serve_hot_swap.py [--clients 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench._serve_common import RedisProcess, ServeProcess  # noqa: E402


def write_versions(registry, model_dir: str, versions: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for i, version in enumerate(versions):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
        registry.write_pretrained(version, model, tokenizer, parent="base")


async def load_and_swap(url: str, registry, versions: list[str], clients: int, settle_s: float) -> list[dict]:
    stop = asyncio.Event()
    first_token: dict[str, float] = {}
    first_response: dict[str, float] = {}
    counts = {"ok": 0, "failed": 0}

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            while not stop.is_set():
                body = {"inputs": f"Tell me something about number {k}.", "parameters": {"max_new_tokens": 32}}
                try:
                    async with http.stream("POST", f"{url}/generate_stream", json=body) as response:
                        if response.status_code != 200:
                            counts["failed"] += 1
                            continue
                        async for line in response.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            event = json.loads(line[5:])
                            if "error" in event:
                                counts["failed"] += 1
                                break
                            version = event["policy_version"]
                            first_token.setdefault(version, time.monotonic())
                            if event.get("generated_text") is not None:
                                first_response.setdefault(version, time.monotonic())
                                counts["ok"] += 1
                except httpx.HTTPError:
                    counts["failed"] += 1

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    results = []
    await asyncio.sleep(settle_s)
    for version in versions:
        before = dict(counts)
        published = time.monotonic()
        await asyncio.to_thread(registry.set_current, version)
        while version not in first_response:
            await asyncio.sleep(0.01)
        await asyncio.sleep(settle_s)
        metrics = httpx.get(f"{url}/metrics").text
        results.append({
            "version": version,
            "publish_to_first_token_s": first_token[version] - published,
            "publish_to_first_response_s": first_response[version] - published,
            "completed_during": counts["ok"] - before["ok"],
            "failed_during": counts["failed"] - before["failed"],
            "load_s_sum": float(re.search(r"^instructloop_serve_policy_swap_duration_sum (\S+)", metrics, re.M).group(1)),
        })
    stop.set()
    await asyncio.gather(*tasks)
    results.append({"total_ok": counts["ok"], "total_failed": counts["failed"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    import redis

    from instructloop.model import resolve_model
    from instructloop.registry import Registry

    model_dir = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="serve-hot-swap-"))
    redis_server = RedisProcess(work)
    server = None
    try:
        registry = Registry(work / "registry", redis=redis.Redis.from_url(redis_server.url))
        versions = ["v0001", "v0002"]
        write_versions(registry, model_dir, versions)
        server = ServeProcess("--model", model_dir, "--registry-dir", str(work / "registry"), "--redis-url",
                              redis_server.url, threads=args.threads, log_path=work / "server.log")
        server.wait_healthy()
        results = asyncio.run(load_and_swap(server.url, registry, versions, args.clients, settle_s=4.0))
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()
    print(f"{args.clients} streaming clients, {args.threads} torch threads, model {model_dir}, logs in {work}")
    print("| swap | publish → first token (s) | publish → first full response (s) | completed during | failed |")
    print("|---|---|---|---|---|")
    previous_load = 0.0
    for r in results[:-1]:
        print(f"| base/previous → {r['version']} | {r['publish_to_first_token_s']:.2f} | "
              f"{r['publish_to_first_response_s']:.2f} | {r['completed_during']} | {r['failed_during']} |")
        print(f"  load + validation inside serve: {r['load_s_sum'] - previous_load:.2f} s")
        previous_load = r["load_s_sum"]
    print(f"total completed {results[-1]['total_ok']}, total failed {results[-1]['total_failed']}")


if __name__ == "__main__":
    main()
