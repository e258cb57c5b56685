"""The OpenAI request models of ``/v1/completions`` and what the chat route shares with it: every field is
honoured or refused by name (``_NEUTRAL``: accepted only at a neutral value), unknown fields are refused as
OpenAI refuses them, and an explicit null means the field's default (``OpenAIRequest``).

Request models own their conversions (``CompletionRequest.to_generate_params``); the chat request is in
``gateway/protocol_chat.py``, the responses in ``gateway/protocol.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from instructloop.wire import GREEDY_TEMPERATURE

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
"""Bounds on ``stop``: it is copied into every per-prompt completion event, so it must be small."""

Store = Annotated[
    bool | None,
    Field(
        description=(  # OpenAI's store field, on both completion routes
            "false: the answer is not kept (no feedback on it) and never reaches the learner's data; true: "
            "it is. Unset or null: the gateway's INSTRUCTLOOP_GATEWAY_STORE_DEFAULT (README: Data governance)"
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


UNSUPPORTED_PARAMETER = "unsupported_parameter"
"""The error ``code`` of an OpenAI field this gateway refuses (at a value other than its neutral one)."""

_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((None, 1), "only 1: one sample per choice"),
    "frequency_penalty": ((None, 0, 0.0), "only 0: serve's sampling has no frequency penalty"),
    "presence_penalty": ((None, 0, 0.0), "only 0: serve's sampling has no presence penalty"),
    "logit_bias": ((None, {}), "only null or {}: serve's sampling has no logit bias"),
    "suffix": ((None, ""), "only null: no insertion (fill-in-the-middle) mode"),
    "metadata": ((None, {}), "only null or {}: completions are stored without caller metadata"),
    "tools": ((None, []), "no tool calling: the model answers in text only"),
    "tool_choice": ((None, "none"), "only null or 'none': there is no tool calling"),
    "functions": ((None, []), "no function calling: the model answers in text only"),
    "function_call": ((None, "none"), "only null or 'none': there is no function calling"),
    "response_format": (
        (None, {"type": "text"}),
        "only {'type': 'text'}: serve has no constrained decoding (json_object / json_schema)",
    ),
    "modalities": ((None, ["text"]), "only ['text']: the model reads and writes text"),
}
"""OpenAI fields accepted only at their neutral value: anything else is a 400 naming the field and why
(never silently ignored). The value is (accepted values, what is supported)."""


def refuse_unless_neutral(value: Any, info: ValidationInfo) -> Any:
    """A field validator for the ``_NEUTRAL`` fields (an ``unsupported_parameter`` error otherwise)."""
    accepted, why = _NEUTRAL[info.field_name]
    if value not in accepted:
        shown = (
            value.get("type") if info.field_name == "response_format" and isinstance(value, dict) else None
        )
        raise PydanticCustomError(
            UNSUPPORTED_PARAMETER,
            "{field}{shown} is not supported by this gateway ({why}); leave it unset",
            {"field": info.field_name, "shown": f" {shown!r}" if shown else "", "why": why},
        )
    return value


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: with ``include_usage``, a last chunk (no choices) carries the usage."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


def _nullable_optional_fields(schema: dict[str, Any]) -> None:
    """The JSON schema says what ``_null_means_default`` accepts: every optional field may be null."""
    required = set(schema.get("required", []))
    for name, field_schema in schema.get("properties", {}).items():
        if name in required or field_schema.get("type") == "null":
            continue
        variants = field_schema.get("anyOf")
        if variants is not None and any(v.get("type") == "null" for v in variants):
            continue
        kept = {k: field_schema.pop(k) for k in ("title", "description", "default") if k in field_schema}
        schema["properties"][name] = {"anyOf": [field_schema, {"type": "null"}], **kept}


class OpenAIRequest(BaseModel):
    """What the two OpenAI routes share: unknown fields are refused (400 ``Unrecognized request argument
    supplied``, as OpenAI answers), and an explicit null means the field's default."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_nullable_optional_fields)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> OpenAIRequest:
        if getattr(self, "stream_options", None) is not None and not getattr(self, "stream", False):
            raise PydanticCustomError(
                "invalid_value",
                "stream_options is only allowed with stream: true",
                {"param": "stream_options"},
            )
        return self


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
"""A prompt given as token ids (the model's vocabulary), generated from exactly as given."""


class CompletionRequest(OpenAIRequest):
    """``POST /v1/completions`` (OpenAI legacy completions)."""

    model: str = Field(min_length=1, description="'instructloop' (the current version) or a version id")
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=16)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=16)]
    ) = Field(description="Text, a list of texts, token ids, or a list of token-id lists.")
    best_of: int | None = Field(default=None, ge=1, description="Not supported (only 1 / null).")
    echo: bool = Field(
        default=False,
        description="Prepend the prompt to each choice's text; with logprobs, the prompt tokens' logprobs "
        "too (the first one null). Not with stream.",
    )
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
    max_tokens: int = Field(default=16, ge=0, description="0 only with echo (score the prompt).")
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopSequences = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(default=None, description="Not supported (only null).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)
    store: Store = None

    _decoded: list[str] | None = PrivateAttr(default=None)
    _adapter_id: str | None = PrivateAttr(default=None)

    _refuse_unsupported = field_validator(
        "best_of", "frequency_penalty", "logit_bias", "presence_penalty", "suffix"
    )(refuse_unless_neutral)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: StopSequences) -> list[str]:
        return normalize_stop(value)

    @model_validator(mode="after")
    def _echo_rules(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER, "echo is not available with stream=true", {"param": "echo"}
            )
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError(
                "invalid_value",
                "max_tokens 0 is only allowed with echo: true (to score the prompt)",
                {"param": "max_tokens"},
            )
        return self

    @property
    def token_prompts(self) -> list[list[int]] | None:
        """The prompts when given as token ids (one list per prompt), else None."""
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt, list) and isinstance(prompt[0], list):
            return [list(ids) for ids in prompt]
        return None

    def decode_token_prompts(self, decode: Callable[[list[int]], str]) -> None:
        """Give token-id prompts their text (``prompts``): what is shown, echoed and recorded."""
        ids = self.token_prompts
        if ids is not None:
            self._decoded = [decode(i) for i in ids]

    @property
    def prompts(self) -> list[str]:
        """The prompts' text (token-id prompts: after ``decode_token_prompts``)."""
        if self.token_prompts is not None:
            if self._decoded is None:
                raise RuntimeError(
                    "decode_token_prompts must run before the text of token-id prompts is read"
                )
            return list(self._decoded)
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def select_version(self, adapter_id: str | None) -> None:
        """The policy version that must answer (serve's ``adapter_id``); None: the current one."""
        self._adapter_id = adapter_id

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_generate_params(self, choice_index: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``text_generation.AsyncClient.generate`` for choice ``choice_index``.

        temperature 0 (or below ``GREEDY_TEMPERATURE``, where dividing the logits by it would overflow) is
        greedy (TGI refuses temperature 0); top_p 1 means no nucleus filtering (TGI
        refuses top_p 1); a seed gives choice i the seed ``seed + i`` so the n choices differ but are
        reproducible. max_tokens 0 (echo only) asks for one token, which the answer leaves out. echo with
        logprobs asks for the prompt tokens' logprobs (TGI's ``decoder_input_details``).
        """
        greedy = self.temperature < GREEDY_TEMPERATURE
        params: dict[str, Any] = {
            "do_sample": not greedy,
            "max_new_tokens": max(self.max_tokens, 1),
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
        if self.echo and self.logprobs is not None:
            params["decoder_input_details"] = True
        if self._adapter_id is not None:
            params["adapter_id"] = self._adapter_id
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
