"""Events for the learner tests, written straight into Redis with XADD (as the gateway would)."""

from __future__ import annotations

from instructloop.events import Choice, ComparisonEvent, CompletionEvent, DemonstrationEvent
from instructloop.streams import Stream, stream_key

PREFIX = "t"


def comparison(i: int, **overrides) -> ComparisonEvent:
    fields = dict(
        event_id=f"cmp-{i}",
        prompt=f"Question {i}: what is {i} plus one?",
        responses=[f"The answer is {i + 1}.", f"maybe {i * 7} banana"],
        ranking=[[0], [1]],
        labeler_id="labeler-a",
    )
    fields.update(overrides)
    return ComparisonEvent(**fields)


def completion(i: int, **overrides) -> CompletionEvent:
    fields = dict(
        event_id=f"cpl-{i}",
        completion_id=f"cmpl-{i}",
        prompt=f"Tell me about number {i}.",
        choices=[Choice(index=0, text=f"{i} is a number.", finish_reason="stop")],
        policy_version="base",
        caller="caller-hash",
    )
    fields.update(overrides)
    return CompletionEvent(**fields)


def demonstration(i: int, **overrides) -> DemonstrationEvent:
    fields = dict(
        event_id=f"dem-{i}",
        prompt=f"Say hello {i} times.",
        response="hello " * (i % 3 + 1),
        labeler_id="labeler-b",
    )
    fields.update(overrides)
    return DemonstrationEvent(**fields)


def xadd(client, stream: Stream, event, prefix: str = PREFIX) -> str:
    entry_id = client.xadd(stream_key(stream, prefix), event.to_fields())
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def pending(client, stream: Stream, group: str = "learner", prefix: str = PREFIX) -> int:
    return int(client.xpending(stream_key(stream, prefix), group)["pending"])


PTX_TEXT = "\n\n".join(
    f"Paragraph {i}. The river runs past the old mill, and the miller counts the sacks of grain each evening "
    f"before the lamps are lit. Number {i} follows number {i - 1} as night follows day."
    for i in range(1, 40)
)

# Hyperparameters small enough for a tiny model on 2 CPU cores (a round takes seconds).
TINY_PPO = {
    "rollout_batch_size": 4,
    "mini_batch_size": 2,
    "ppo_epochs": 1,
    "max_new_tokens": 8,
    "ptx_batch_size": 2,
    "ptx_seq_len": 32,
    "forward_batch_size": 8,
    "max_prompt_tokens": 64,
    "lr": 1e-4,
    "samples_per_prompt": 2,
}
# ready_confidence 0: PPO starts after the first RM update (tests of the readiness check set it back)
TINY_REWARD = {"rankings_per_batch": 4, "max_length": 64, "lr": 1e-3, "ready_confidence": 0.0}
TINY_EVAL = {"max_new_tokens": 8, "batch_size": 8, "max_prompt_tokens": 64}


def learner_env(
    redis_url: str, model_dir, state_dir, registry_dir, ptx_corpus, **overrides
) -> dict[str, str]:
    """INSTRUCTLOOP_LEARNER_* for a tiny learner (values as the env holds them)."""
    import json

    env = {
        "MODEL": str(model_dir),
        "REDIS_URL": redis_url,
        "STREAM_PREFIX": PREFIX,
        "REGISTRY_DIR": str(registry_dir),
        "STATE_DIR": str(state_dir),
        "CONSUMER_NAME": "learner-test",
        "CLAIM_MIN_IDLE_MS": "0",
        "READ_BLOCK_MS": "100",
        "HELDOUT_FRACTION": "0.25",
        "MIN_NEW_COMPARISONS": "8",
        "MIN_PROMPTS": "8",
        "MIN_RM_COMPARISONS": "8",  # = MIN_NEW_COMPARISONS: PPO may start after the first RM update
        "PROMPTS_PER_ROUND": "8",
        "EVAL_PROMPTS": "8",
        "POLL_INTERVAL_S": "0.2",
        "GATE_KL_CEILING": "1000",
        "PTX_COEF": "1.0",
        "PTX_CORPUS": str(ptx_corpus),
        "PPO": json.dumps(TINY_PPO),
        "REWARD": json.dumps(TINY_REWARD),
        "EVALUATION": json.dumps(TINY_EVAL),
        "METRICS_PORT": "0",
        "DEVICE": "cpu",
        "TORCH_THREADS": "1",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return {f"INSTRUCTLOOP_LEARNER_{k}": v for k, v in env.items()}
