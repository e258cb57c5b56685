"""Self-contained events of the streams (see docs/architecture.md, "Streams"), and how a ranking becomes
pairs.

Every event carries a unique ``event_id`` (the learner drops duplicates by it), a ``schema_version`` and
its creation time. ``to_fields`` / ``from_fields`` convert to and from one Redis stream entry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from instructloop.prompt import CHAT_ROUTE, COMPLETIONS_ROUTE, Route
from instructloop.streams import EVENT_FIELD

SCHEMA_VERSION = 1

FeedbackSource = Literal["ranking", "pairwise", "ab"]
"""The kinds of feedback a comparison comes from (the gateway's feedback ``type``)."""
FEEDBACK_SOURCES: tuple[str, ...] = get_args(FeedbackSource)


def new_event_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=128)
    schema_version: int = SCHEMA_VERSION
    created_at: float = Field(default_factory=time.time, description="Unix time (seconds)")

    def to_fields(self) -> dict[str, str]:
        """The stream entry for this event."""
        return {EVENT_FIELD: self.model_dump_json()}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]):
        """Parse a stream entry (bytes or str keys/values). Raises ``ValueError`` when malformed."""
        raw = fields.get(EVENT_FIELD, fields.get(EVENT_FIELD.encode()))
        if raw is None:
            raise ValueError(f"stream entry has no '{EVENT_FIELD}' field")
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        return cls.model_validate_json(raw)


class Choice(BaseModel):
    """One returned completion choice."""

    index: int = Field(ge=0)
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


Message = dict[str, str]
"""One chat message as the chat template takes it: ``{"role": ..., "content": ...}``."""


def _route_of(data: Any) -> Any:
    """Fill ``route`` from ``chat`` (events written before the route existed) and check the two agree."""
    if isinstance(data, dict):
        chat = bool(data.get("chat", False))
        route = data.setdefault("route", CHAT_ROUTE if chat else COMPLETIONS_ROUTE)
        if (route == CHAT_ROUTE) != chat:
            raise ValueError(f"route {route!r} disagrees with chat={chat}")
        if data.get("messages") and not chat:
            raise ValueError("messages belong to chat events (chat=true) only")
    return data


class CompletionEvent(Event):
    """A served completion: everything needed later to validate feedback and to sample prompts.

    ``prompt`` is exactly the model input serve generated from (instructloop/prompt.py, "the prompt
    contract"): the caller's text for ``/v1/completions``, the rendered chat template for
    ``/v1/chat/completions`` (then ``messages`` holds what it was rendered from). The learner uses it
    verbatim."""

    kind: Literal["completion"] = "completion"
    completion_id: str
    prompt: str
    choices: list[Choice] = Field(min_length=1)
    policy_version: str
    sampling: dict[str, Any] = Field(
        default_factory=dict, description="temperature, top_p, max_tokens, seed…"
    )
    caller: str = Field(description="hashed API key id of the caller")
    chat: bool = False
    route: Route = Field(COMPLETIONS_ROUTE, description="the OpenAI route that produced it (follows chat)")
    messages: list[Message] | None = Field(
        None, description="chat only: the messages the prompt was rendered from"
    )

    _route = model_validator(mode="before")(_route_of)


Ranking = list[Annotated[list[int], Field(min_length=1)]]

OutputFlag = Literal["fails_instruction", "harmful", "made_up_facts"]
"""InstructGPT's per-output labels: fails to follow the instruction, harmful, makes up facts."""
OUTPUT_FLAGS: tuple[str, ...] = ("fails_instruction", "harmful", "made_up_facts")


class ComparisonEvent(Event):
    """A preference over K responses to one prompt: ``ranking`` is best-first groups of indices into
    ``responses``; indices in one group are tied. Responses not in the ranking carry no preference.
    A single group (e.g. an A/B tie, ``[[0, 1]]``) is a valid, recorded judgement that implies no pair:
    the reward model skips it, live win-rates can count it as half a win each."""

    kind: Literal["comparison"] = "comparison"
    prompt: str
    responses: list[str] = Field(min_length=2)
    ranking: Ranking
    labeler_id: str
    rationale: str | None = None
    source: FeedbackSource = "ranking"
    completion_ids: list[str] = Field(default_factory=list)
    policy_versions: list[str] = Field(default_factory=list, description="policy version per response")
    flags: list[list[OutputFlag]] = Field(
        default_factory=list,
        description="per-output flags, one list per response (empty = none given); added in schema 1 "
        "without a version bump: events without it read as no flags",
    )

    @model_validator(mode="after")
    def _check_ranking(self) -> ComparisonEvent:
        validate_ranking(self.ranking, len(self.responses))
        if self.flags and len(self.flags) != len(self.responses):
            raise ValueError(f"flags has {len(self.flags)} entries for {len(self.responses)} responses")
        return self

    def pairs(self) -> list[tuple[int, int]]:
        """All (winner, loser) index pairs the ranking implies; none between tied responses."""
        return ranking_pairs(self.ranking)


class DemonstrationEvent(Event):
    """A labeler's answer to a prompt. ``prompt`` follows the prompt contract like a completion's: the model
    input itself (raw text, or the rendered chat template when ``chat``; ``messages`` then holds the turns),
    and SFT learns ``response`` (+ EOS) as its continuation, never rendering the prompt again."""

    kind: Literal["demonstration"] = "demonstration"
    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)
    labeler_id: str
    chat: bool = False
    route: Route = Field(
        COMPLETIONS_ROUTE, description="completions (raw text) or chat.completions (rendered)"
    )
    messages: list[Message] | None = None

    _route = model_validator(mode="before")(_route_of)


class PolicyStatus(str, Enum):
    candidate = "candidate"
    promoted = "promoted"
    rejected = "rejected"
    rolled_back = "rolled_back"
    pinned = "pinned"
    held_back = "held_back"
    """Passed the gate, but the current version is pinned by an admin: recorded, not served."""


class PolicyEvent(Event):
    kind: Literal["policy"] = "policy"
    version: str
    parent: str | None = None
    path: str | None = None
    sha256: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    status: PolicyStatus
    reason: str | None = None

    @field_validator("version")
    @classmethod
    def _version_name(cls, value: str) -> str:
        validate_version_name(value)
        return value


def validate_version_name(version: str) -> None:
    if (
        not version
        or len(version) > 64
        or not all(c.isalnum() or c in "-_." for c in version)
        or version[0] == "."
    ):
        raise ValueError(f"invalid policy version {version!r}: use 1-64 letters, digits, '-', '_' or '.'")


def validate_ranking(ranking: list[list[int]], n_responses: int) -> None:
    """Raise ``ValueError`` naming the problem: out-of-range or repeated indices, or fewer than two responses
    ranked. An all-tied ranking passes: it is a recorded judgement that implies no pair
    (``ranking_pairs``)."""
    seen: set[int] = set()
    for group in ranking:
        for index in group:
            if not 0 <= index < n_responses:
                raise ValueError(f"ranking index {index} is out of range for {n_responses} responses")
            if index in seen:
                raise ValueError(f"ranking index {index} appears more than once")
            seen.add(index)
    if len(seen) < 2:
        raise ValueError("a ranking needs at least two responses")


def ranking_pairs(ranking: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The (winner, loser) pairs a best-first ranking implies: every response of a group over every response
    of each later group; none between tied responses (one group). The one ranking -> pairs rule: the event's
    ``pairs()`` and the reward model's loss (``learner.losses.ranking_pairs_flat``) both use it."""
    pairs = []
    for g, better in enumerate(ranking):
        for worse in ranking[g + 1 :]:
            pairs.extend((w, lo) for w in better for lo in worse)
    return pairs
