"""The gateway's wire protocol: pydantic models for every route, OpenAI field order.

The OpenAI request models are in ``gateway/protocol_completions.py`` and ``gateway/protocol_chat.py``, the
stream chunks in ``gateway/protocol_stream.py``. Request models own their conversions
(``CompletionRequest.to_generate_params``). Serving logic lives in ``gateway/serving_*.py``; routers only
translate HTTP.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from gateway.protocol_chat import ChatMessage

# re-exported: gateway.labeling imports the request model from here
from gateway.protocol_completions import CompletionRequest as CompletionRequest
from instructloop.events import FEEDBACK_SOURCES, OutputFlag
from instructloop.wire import SERVED_MODEL_NAME

# ---- errors (OpenAI's shape, for every error the gateway answers) ----------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error value a serving class returns (or raises from deep inside); rendered as ``ErrorResponse``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_response_model(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def new_completion_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- completions (the request: gateway/protocol_completions.py) ---------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    policy_version: str


# ---- chat (the request: gateway/protocol_chat.py) ---------------------------------------------------


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    policy_version: str


# ---- models -------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = SERVED_MODEL_NAME
    policy_version: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- feedback -----------------------------------------------------------------------------------------

Rationale = Annotated[str, Field(max_length=4000)]


class RankingFeedback(BaseModel):
    """A ranking of the choices of one completion, best first; indices in one group are tied."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["ranking"]
    completion_id: str = Field(min_length=1, max_length=128)
    ranking: Annotated[
        list[Annotated[list[int], Field(min_length=1, max_length=64)]], Field(min_length=1, max_length=64)
    ]
    rationale: Rationale | None = None
    flags: dict[int, Annotated[list[OutputFlag], Field(max_length=3)]] | None = Field(
        default=None,
        description="InstructGPT's per-output flags by choice index (fails_instruction, harmful, "
        "made_up_facts); they travel in the comparison event",
    )


class PairwiseFeedback(BaseModel):
    """One choice of a completion preferred over another choice of the same completion."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["pairwise"]
    completion_id: str = Field(min_length=1, max_length=128)
    chosen: int
    rejected: int
    rationale: Rationale | None = None


class ABChoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=128)
    index: int = 0


class ABFeedback(BaseModel):
    """A vote between two completions of the same prompt (e.g. from two policy versions)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["ab"]
    a: ABChoiceRef
    b: ABChoiceRef
    preferred: Literal["a", "b", "tie"]
    rationale: Rationale | None = None


def _feedback_type(value: Any) -> str | None:
    """The feedback kind named by ``type``; None (missing or unknown) makes the error below."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in FEEDBACK_SOURCES else None


FeedbackRequest = Annotated[
    Annotated[RankingFeedback, Tag("ranking")]
    | Annotated[PairwiseFeedback, Tag("pairwise")]
    | Annotated[ABFeedback, Tag("ab")],
    Discriminator(
        _feedback_type,
        custom_error_type="invalid_feedback_type",
        custom_error_message="is missing or unknown; it must be one of " + ", ".join(FEEDBACK_SOURCES),
        custom_error_context={"param": "type"},
    ),
]
"""A feedback body; ``type`` picks the kind (an error naming ``type`` and listing the kinds otherwise)."""


class FeedbackAccepted(BaseModel):
    id: str = Field(description="event_id of the ComparisonEvent written to the comparisons stream")
    object: Literal["feedback"] = "feedback"
    status: Literal["accepted"] = "accepted"
    duplicate: bool = Field(
        default=False, description="True when an Idempotency-Key replay returned an earlier id"
    )


# ---- demonstrations -----------------------------------------------------------------------------------


class DemonstrationRequest(BaseModel):
    """A labeler's answer. ``prompt`` is raw model input, as on ``/v1/completions`` (the response continues
    it);
    ``messages`` is a chat, as on ``/v1/chat/completions`` (the gateway renders it with the chat template, and
    the response is the assistant's turn). Exactly one of the two."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1)
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)] | None = None
    response: str = Field(min_length=1)

    @model_validator(mode="after")
    def _not_blank(self) -> DemonstrationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt (raw text) or messages (a chat)")
        text = self.prompt if self.prompt is not None else "".join(m.text for m in self.messages)
        if not text.strip() or not self.response.strip():
            raise ValueError("prompt (or messages) and response must contain non-whitespace text")
        return self

    def template_messages(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [m.template_message() for m in self.messages]


class DemonstrationAccepted(BaseModel):
    id: str
    object: Literal["demonstration"] = "demonstration"
    status: Literal["accepted"] = "accepted"
    duplicate: bool = False


# ---- admin --------------------------------------------------------------------------------------------


class PolicyInfo(BaseModel):
    version: str
    status: str
    current: bool
    parent: str | None = None
    created_at: float
    sha256: str
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None


class PolicyList(BaseModel):
    object: Literal["list"] = "list"
    current: str | None
    data: list[PolicyInfo]


class PolicyAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str | None = Field(
        default=None, description="Version to roll back to; default: the previous promoted one."
    )
    reason: str | None = Field(default=None, max_length=1000)
