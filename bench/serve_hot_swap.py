"""Hot-swap under load: time from publishing a new policy version to the first token and the first complete
response produced by it, and failed requests during the swap (default model, CPU).

8 streaming clients keep requests in flight (chat-formatted prompts, 32 new tokens). During the load the
registry writes v0001 and publishes it at once (serve must load + validate it after the publish), then
writes v0002 and publishes it once serve has prefetched it (what happens when the learner's gate runs
between writing a candidate and promoting it). Versions are the default weights plus small Gaussian noise:
real, different checkpoints, published through Redis (key + pub/sub).

    python bench/serve_hot_swap.py [--clients 8] [--threads 1] [--adapters] [--device cuda]

``--adapters``: the versions are LoRA adapter versions instead (what the learner publishes by default: r = 16
on every attention and MLP projection, B drawn from N(0, 1e-3)), a PEFT folder of a few MB applied by
serve over the one base it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench._serve_common import RedisProcess, ServeProcess  # noqa: E402


def write_adapter_version(registry, model_dir: str, version: str, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from instructloop.registry import base_weights_sha256
    from learner.config import AdapterConfig

    defaults = AdapterConfig()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(
            r=defaults.r,
            lora_alpha=defaults.alpha,
            lora_dropout=0.0,
            target_modules=list(defaults.target_modules),
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    registry.write_adapter(version, model, base_sha256=base_weights_sha256(model_dir), parent="base")


def write_version(registry, model_dir: str, version: str, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
    registry.write_pretrained(version, model, tokenizer, parent="base")


async def watch_switch(url: str, version: str, switched: dict[str, float]) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        while (await http.get(f"{url}/info")).json()["policy_version"] != version:
            await asyncio.sleep(0.01)
        switched[version] = time.monotonic()  # /info names it: loaded, validated, installed


async def probe(url: str, version: str) -> float:
    """A fresh client that asks right after the publish, again and again until the answer comes from
    ``version``: returns the time its first token from ``version`` arrived."""
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 1}}
    async with httpx.AsyncClient(timeout=600) as http:
        while True:
            async with http.stream("POST", f"{url}/generate_stream", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and json.loads(line[5:]).get("policy_version") == version:
                        return time.monotonic()


def prefetches(url: str) -> float:
    match = re.search(
        r"^instructloop_serve_policy_prefetches_total (\S+)", httpx.get(f"{url}/metrics").text, re.M
    )
    return float(match.group(1)) if match else 0.0


async def load_and_swap(
    url: str,
    registry,
    model_dir: str,
    scenarios: list[tuple[str, bool]],
    clients: int,
    settle_s: float,
    write=write_version,
) -> list[dict]:
    stop = asyncio.Event()
    first_token: dict[str, float] = {}
    first_response: dict[str, float] = {}
    switched: dict[str, float] = {}
    counts = {"ok": 0, "failed": 0}

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            while not stop.is_set():
                body = {"inputs": PROMPTS[k % len(PROMPTS)], "parameters": {"max_new_tokens": 32}}
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
    for seed, (version, wait_for_prefetch) in enumerate(scenarios):
        already = prefetches(url)
        await asyncio.to_thread(write, registry, model_dir, version, seed)
        while wait_for_prefetch and (
            prefetches(url) <= already  # the learner's gate would take this long
            or version not in httpx.get(f"{url}/info").json().get("policy_versions_loaded", [])
        ):
            await asyncio.sleep(0.1)
        before = dict(counts)
        calling = time.monotonic()
        # set_current verifies the sha256 of every file, then writes the pointer and publishes: the version
        # is published when it returns
        await asyncio.to_thread(registry.set_current, version)
        published = time.monotonic()
        switch_task = asyncio.create_task(watch_switch(url, version, switched))
        probe_first_token = await probe(url, version)
        await switch_task
        while version not in first_response:
            await asyncio.sleep(0.01)
        await asyncio.sleep(settle_s)
        metrics = httpx.get(f"{url}/metrics").text
        results.append(
            {
                "version": version,
                "prefetched": wait_for_prefetch,
                "set_current_s": published - calling,
                "probe_first_token_s": probe_first_token - published,
                "publish_to_first_token_s": first_token[version] - published,
                "switched_after_s": switched[version] - published if version in switched else float("nan"),
                "publish_to_first_response_s": first_response[version] - published,
                "completed_during": counts["ok"] - before["ok"],
                "failed_during": counts["failed"] - before["failed"],
                "load_s_sum": float(
                    re.search(r"^instructloop_serve_policy_swap_duration_sum (\S+)", metrics, re.M).group(1)
                ),
            }
        )
    stop.set()
    await asyncio.gather(*tasks)
    results.append({"total_ok": counts["ok"], "total_failed": counts["failed"]})
    return results


PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips for sleeping well.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a short poem about rain.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain what a neural network is.<|im_end|>\n<|im_start|>assistant\n",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="default")
    parser.add_argument("--adapters", action="store_true", help="publish LoRA adapter versions")
    parser.add_argument("--device", default="cpu", help="serve's device (cuda: bfloat16, serve's auto dtype)")
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
        server = ServeProcess(
            "--model",
            model_dir,
            "--registry-dir",
            str(work / "registry"),
            "--redis-url",
            redis_server.url,
            threads=args.threads,
            log_path=work / "server.log",
            device=args.device,
        )
        server.wait_healthy()
        # published right after writing / after the prefetch (adapters: a third one, whose slot is reused)
        scenarios = [("v0001", False), ("v0002", True)] + ([("v0003", True)] if args.adapters else [])
        write = write_adapter_version if args.adapters else write_version
        results = asyncio.run(
            load_and_swap(server.url, registry, model_dir, scenarios, args.clients, settle_s=4.0, write=write)
        )
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()
        shutil.rmtree(work / "registry", ignore_errors=True)  # two 540 MB versions; server.log stays
    kind = "LoRA adapter versions" if args.adapters else "full-weight versions"
    print(
        f"{args.clients} streaming clients, {args.threads} torch threads, device {args.device}, "
        f"model {model_dir}, {kind}, logs in {work}"
    )
    print(
        "| swap | publish → installed (s) | publish → first token, fresh request (s) "
        "| publish → first token, load clients (s) | publish → first full response, load clients (s) "
        "| completed during | failed |"
    )
    print("|---|---|---|---|---|---|---|")
    previous_load = 0.0
    for r in results[:-1]:
        how = "prefetched" if r["prefetched"] else "published right after writing"
        print(
            f"| → {r['version']} ({how}) | {r['switched_after_s']:.2f} | {r['probe_first_token_s']:.2f} | "
            f"{r['publish_to_first_token_s']:.2f} | {r['publish_to_first_response_s']:.2f} | "
            f"{r['completed_during']} | {r['failed_during']} |"
        )
        load_s = r["load_s_sum"] - previous_load
        print(f"  load + validation inside serve (before the publish when prefetched): {load_s:.2f} s")
        print(f"  registry.set_current (sha256 check + pointer + publish) took {r['set_current_s']:.2f} s")
        previous_load = r["load_s_sum"]
    print(f"total completed {results[-1]['total_ok']}, total failed {results[-1]['total_failed']}")


if __name__ == "__main__":
    main()
