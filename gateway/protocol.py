"""The gateway's wire protocol: pydantic models for every route, OpenAI field order.

Request models own their conversions (``CompletionRequest.to_generate_params``). Serving logic lives in
``gateway/serving_*.py``; routers only translate HTTP.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from instructloop.events import FEEDBACK_SOURCES, OutputFlag
from instructloop.wire import GREEDY_TEMPERATURE, SERVED_MODEL_NAME

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


# ---- completions ------------------------------------------------------------------------------------

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
"""Bounds on ``stop``: it is copied into every per-prompt completion event, so it must be small."""

Store = Annotated[
    bool,
    Field(
        description=(  # OpenAI's store field, on both completion routes
            "false: the answer is not kept (no feedback on it) and never reaches the learner's data; for evaluation "
            "traffic that must stay out of training. Default true: instructloop learns from what it serves."
        )
    ),
]

StopSequences = (
    Annotated[str, Field(max_length=MAX_STOP_CHARS)]
    | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
        Field(max_length=MAX_STOP_SEQUENCES),
    ]
    | None
)


def normalize_stop(value: StopSequences) -> list[str]:
    """OpenAI's ``stop`` (a string, up to 4 strings, or null) as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        if not value:
            raise ValueError("stop must not be an empty string")
        return [value]
    return list(value)


_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (False,),
    "frequency_penalty": (0.0,),
    "logit_bias": (None, {}),
    "presence_penalty": (0.0,),
    "suffix": (None, ""),
}
"""OpenAI fields the gateway accepts only at their neutral value (anything else is refused, not ignored)."""


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` (OpenAI legacy completions)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]
    best_of: int | None = Field(default=None, ge=1, description="Not supported (only 1 / null).")
    echo: bool = Field(default=False, description="Not supported (only false).")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported (only null / {}).")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=5,
        description=(
            "The chosen tokens' logprobs plus this many most likely alternatives per position (0: none). The "
            "distribution they are taken from is the one the token was drawn from (docs/architecture.md)."
        ),
    )
    max_tokens: int = Field(default=16, ge=1)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopSequences = None
    stream: bool = False
    suffix: str | None = Field(default=None, description="Not supported (only null).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)
    store: Store = True

    @field_validator("best_of", "echo", "frequency_penalty", "logit_bias", "presence_penalty", "suffix")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in _NEUTRAL[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by this gateway; leave it unset")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: StopSequences) -> list[str]:
        return normalize_stop(value)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_generate_params(self, choice_index: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``text_generation.AsyncClient.generate`` for choice ``choice_index``.

        temperature 0 (or below ``GREEDY_TEMPERATURE``, where dividing the logits by it would overflow) is greedy
        (TGI refuses temperature 0); top_p 1 means no nucleus filtering (TGI
        refuses top_p 1); a seed gives choice i the seed ``seed + i`` so the n choices differ but are
        reproducible.
        """
        greedy = self.temperature < GREEDY_TEMPERATURE
        params: dict[str, Any] = {
            "do_sample": not greedy,
            "max_new_tokens": self.max_tokens,
            "stop_sequences": list(self.stop or []),
        }
        if not greedy:
            params["temperature"] = self.temperature
            if self.top_p < 1.0:
                params["top_p"] = self.top_p
            if self.seed is not None:
                params["seed"] = (self.seed + choice_index) % (2**63)
        if self.logprobs:
            params["top_n_tokens"] = self.logprobs
        return params

    def sampling(self) -> dict[str, Any]:
        """What the completions stream records about how the choices were sampled."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "n": self.n,
            "seed": self.seed,
            "stop": list(self.stop or []),
            "user": self.user,
        }


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
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


# ---- chat ---------------------------------------------------------------------------------------------

MAX_MESSAGE_CHARS = 32_000
"""One chat message's content (the rendered conversation is then held to ``max_prompt_chars``)."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    name: str | None = Field(default=None, max_length=64)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; the messages go through the model's chat template."""

    model_config = ConfigDict(extra="ignore")

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    model: str = Field(min_length=1)
    logprobs: bool = Field(default=False, description="Return the logprob of each content token.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=5,
        description=("With logprobs: this many most likely alternatives per position."),
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopSequences = None
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)
    store: Store = True

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: StopSequences) -> list[str]:
        return normalize_stop(value)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is a ``system`` turn)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in self.messages
        ]

    def to_completion_request(self, prompt: str, default_max_tokens: int) -> CompletionRequest:
        """The equivalent completion request once the chat template has rendered ``prompt``."""
        return CompletionRequest(
            model=self.model,
            prompt=prompt,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            n=self.n,
            seed=self.seed,
            stop=list(self.stop or []) or None,
            stream=self.stream,
            temperature=self.temperature,
            top_p=self.top_p,
            user=self.user,
            store=self.store,
        )


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
    """A labeler's answer. ``prompt`` is raw model input, as on ``/v1/completions`` (the response continues it);
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
        text = self.prompt if self.prompt is not None else "".join(m.content for m in self.messages)
        if not text.strip() or not self.response.strip():
            raise ValueError("prompt (or messages) and response must contain non-whitespace text")
        return self

    def template_messages(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in self.messages
        ]


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
