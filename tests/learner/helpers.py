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
    fields = dict(event_id=f"dem-{i}", prompt=f"Say hello {i} times.", response="hello " * (i % 3 + 1),
                  labeler_id="labeler-b")
    fields.update(overrides)
    return DemonstrationEvent(**fields)


def xadd(client, stream: Stream, event, prefix: str = PREFIX) -> str:
    entry_id = client.xadd(stream_key(stream, prefix), event.to_fields())
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def pending(client, stream: Stream, group: str = "learner", prefix: str = PREFIX) -> int:
    return int(client.xpending(stream_key(stream, prefix), group)["pending"])
