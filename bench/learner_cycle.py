"""One whole learner cycle on the default model, phase by phase: ingest, RM update, rollout, scoring,
update, ptx, gate evaluation, publish.

    PYTHONPATH=. nice -n 5 .venv/bin/python bench/learner_cycle.py [--training lora] [--comparisons 32]
        [--rollouts 4] [--eval-prompts 16] [--max-new-tokens 32] [--threads 1]

The real ``learner.loop.Learner`` (real redis-server on a free port, real registry), fed through Redis the
way the gateway feeds it: ``--comparisons`` rankings of K = 4 answers and completions whose prompts PPO and
the gate use. Every step is the learner's own method, timed around its call; the PPO round's phases come
from its statistics. The sizes are the learner's scaled down (``PPOConfig.rollout_batch_size`` and
``eval_prompts``, 64 new tokens each, become ``--rollouts``, ``--eval-prompts`` and ``--max-new-tokens``).
A second cycle (new prompts → PPO round → gate) shows the steady state, where the incumbent's held-out
samples are kept from the previous gate and only the candidate is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench._serve_common import RedisProcess  # noqa: E402

TOPICS = [
    "the sea",
    "a grey cat",
    "autumn",
    "bread",
    "the moon",
    "trains",
    "tea",
    "a library",
    "rain",
    "bees",
    "mountains",
    "a violin",
    "snow",
    "gardens",
    "clocks",
    "owls",
    "rivers",
    "maps",
    "coffee",
    "lanterns",
]
ANSWERS = [
    "It is lovely.",
    "I think it is calm and old.",
    "Short answer: yes.",
    "Many people like it a lot.",
    "It can be quiet, bright or strange.",
    "No idea, sorry.",
    "A classic subject for poems.",
    "Hmm.",
]


def feed(client, prefix: str, comparisons: int, prompts: int, seed: int = 0, first: int = 0) -> None:
    from instructloop.events import Choice, ComparisonEvent, CompletionEvent
    from instructloop.streams import Stream, stream_key

    rng = random.Random(seed)
    for i in range(comparisons):
        responses = rng.sample(ANSWERS, 4)
        order = sorted(range(4), key=lambda j: -len(responses[j]))  # any consistent preference will do
        event = ComparisonEvent(
            event_id=f"cmp-{i}",
            prompt=f"Tell me about {TOPICS[i % len(TOPICS)]} ({i}).",
            responses=responses,
            ranking=[[j] for j in order],
            labeler_id="bench",
        )
        client.xadd(stream_key(Stream.comparisons, prefix), event.to_fields())
    for i in range(first, first + prompts):
        event = CompletionEvent(
            event_id=f"cpl-{i}",
            completion_id=f"c-{i}",
            prompt=f"Write two sentences about {TOPICS[i % len(TOPICS)]}, take {i}.",
            choices=[Choice(index=0, text="Fine.", finish_reason="stop")],
            policy_version="base",
            caller="bench",
        )
        client.xadd(stream_key(Stream.completions, prefix), event.to_fields())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training", choices=["lora", "full"], default="lora")
    parser.add_argument("--comparisons", type=int, default=32)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model", default="default", help="`default` or a causal-LM folder (a tiny one: smoke run)"
    )
    args = parser.parse_args()

    import redis

    from learner.loop import Learner
    from learner.metrics import LearnerMetrics
    from learner.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="learner-cycle-"))
    server = RedisProcess(work)
    try:
        prefix = "bench"
        client = redis.Redis.from_url(server.url)
        # held-out share 0.2: enough held-out prompts for --eval-prompts, and held-out comparisons for
        # accuracy
        n_prompts = max(args.rollouts * 4, args.eval_prompts * 6)
        feed(client, prefix, args.comparisons, n_prompts)
        settings = Settings(
            model=args.model,
            redis_url=server.url,
            stream_prefix=prefix,
            registry_dir=work / "registry",
            state_dir=work / "state",
            training=args.training,
            heldout_fraction=0.2,
            min_new_comparisons=1,
            min_rm_comparisons=1,
            min_prompts=args.rollouts,
            prompts_per_round=args.rollouts * 4,
            eval_prompts=args.eval_prompts,
            gate_kl_ceiling=1000,
            metrics_port=0,
            device="cpu",
            torch_threads=args.threads,
            json_logs=False,
            ppo={
                "rollout_batch_size": args.rollouts,
                "mini_batch_size": max(1, args.rollouts // 2),
                "max_new_tokens": args.max_new_tokens,
            },
            evaluation={"max_new_tokens": args.max_new_tokens},
            reward={"ready_confidence": 0.0},  # a cycle's cost is measured, not whether its RM is ready
        )
        learner = Learner(settings, metrics=LearnerMetrics(), progress=False)
        learner.start()
        phases: dict[str, float] = {}

        def timed(name, call):
            started = time.perf_counter()
            out = call()
            phases[name] = round(time.perf_counter() - started, 2)
            return out

        ingest = timed("ingest", learner.ingest)
        timed("load_models", lambda: (learner.tokenizer, learner.reference))
        reward = timed("rm_update", learner.maybe_update_reward_model)
        ppo = timed("ppo_round_with_checkpoint", learner.maybe_run_ppo_round)
        evaluate_before = learner.metrics.step_seconds.labels("evaluate")._sum.get()
        publish_before = learner.metrics.step_seconds.labels("publish")._sum.get()
        gate = timed("gate_and_publish", learner.gate_and_publish)
        evaluate_s = learner.metrics.step_seconds.labels("evaluate")._sum.get() - evaluate_before
        publish_s = learner.metrics.step_seconds.labels("publish")._sum.get() - publish_before
        eval_prompts = len(learner.dataset.heldout_queries(learner.settings.eval_prompts))
        # cycle 2, the steady state: new prompts make a PPO round due; its gate finds the incumbent's samples
        # already made (a promoted candidate's, or the base's from cycle 1) and generates for the candidate
        # only
        feed(client, prefix, 0, args.rollouts * 2, seed=1, first=n_prompts)
        timed("ingest_2", learner.ingest)
        ppo_2 = timed("ppo_round_2", learner.maybe_run_ppo_round)
        evaluate_before = learner.metrics.step_seconds.labels("evaluate")._sum.get()
        timed("gate_2", learner.gate_and_publish)
        evaluate_2_s = learner.metrics.step_seconds.labels("evaluate")._sum.get() - evaluate_before
        learner.close()
    finally:
        server.stop()
    result = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)" if args.model == "default" else args.model,
        "training": args.training,
        "threads": args.threads,
        "load_average": round(os.getloadavg()[0], 1),
        "sizes": {
            "comparisons": args.comparisons,
            "rm_sequences": int(reward["sequences"]) if reward else 0,
            "rollouts": args.rollouts,
            "eval_prompts": eval_prompts,
            "max_new_tokens": args.max_new_tokens,
        },
        "events_ingested": ingest.inserted,
        "phases_s": {
            "ingest": phases["ingest"],
            "load_models": phases["load_models"],
            "rm_update (train + heldout accuracy + bias normalisation + checkpoint)": phases["rm_update"],
            "rollout": round(ppo["rollout_s"], 2),
            "scoring": round(ppo["scoring_s"], 2),
            "update": round(ppo["update_s"], 2),
            "ptx": round(ppo["ptx_s"], 2),
            "ppo_round (the four above)": round(ppo["round_s"], 2),
            "ppo checkpoint + bookkeeping": round(phases["ppo_round_with_checkpoint"] - ppo["round_s"], 2),
            "gate evaluation (candidate + incumbent)": round(evaluate_s, 2),
            "publish": round(publish_s, 2),
        },
        "gate_over_ppo_round": round(evaluate_s / ppo["round_s"], 2),
        "cycle_2_s": {
            "ppo_round": round(ppo_2["round_s"], 2) if ppo_2 else None,
            "gate evaluation (incumbent's samples kept)": round(evaluate_2_s, 2),
        },
        "gate_over_ppo_round_cycle_2": round(evaluate_2_s / ppo_2["round_s"], 2) if ppo_2 else None,
        "promoted": gate.promote if gate else None,
        "rm_heldout_accuracy": reward.get("heldout_accuracy") if reward else None,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
