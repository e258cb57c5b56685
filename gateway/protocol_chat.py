"""The OpenAI request model of ``/v1/chat/completions`` and its messages (the rules shared with completions
are in ``gateway/protocol_completions.py``). Content is text or text parts; tool calling and non-text parts
are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.protocol_completions import (
    UNSUPPORTED_PARAMETER,
    CompletionRequest,
    OpenAIRequest,
    StopSequences,
    Store,
    StreamOptions,
    normalize_stop,
    refuse_unless_neutral,
)

MAX_MESSAGE_CHARS = 32_000
"""One chat message's content (the rendered conversation is then held to ``max_prompt_chars``)."""

REFUSED_CONTENT_PARTS = {
    "image_url": "images",
    "input_audio": "audio",
    "file": "files",
    "refusal": "refusal parts",
}
"""Content-part types a message may not carry (the model reads text only), with what they are."""


class TextPart(BaseModel):
    """A text content part; a message's text parts are joined with newlines."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(BaseModel):
    """One message. ``content`` is text or a list of text parts. Tool and function messages, tool calls,
    parts other than text, and ``name`` are refused by name (this gateway has no tool calling, reads text
    only, and the chat template has no participant names)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: (
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
        | Annotated[list[TextPart], Field(min_length=1, max_length=256)]
        | None
    ) = None
    name: str | None = Field(default=None, max_length=64, description="Not supported (only null).")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported (only null / [])."
    )
    tool_call_id: str | None = Field(default=None, description="Not supported (tool messages are refused).")
    function_call: dict[str, Any] | None = Field(default=None, description="Not supported (only null).")

    @field_validator("role")
    @classmethod
    def _no_tool_roles(cls, value: str) -> str:
        if value in ("tool", "function"):
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "'{role}' messages are not supported: this gateway has no tool calling (tools are refused)",
                {"role": value},
            )
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in REFUSED_CONTENT_PARTS:
                    raise PydanticCustomError(
                        UNSUPPORTED_PARAMETER,
                        "{kind} content parts are not supported: the model reads text only ({what}); "
                        "send text parts",
                        {"kind": kind, "what": REFUSED_CONTENT_PARTS[kind]},
                    )
        return value

    @field_validator("name")
    @classmethod
    def _no_names(cls, value: str | None) -> str | None:
        if value:
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "name is not supported: the chat template has no participant names (put it in the content)",
            )
        return value

    @field_validator("tool_calls", "tool_call_id", "function_call")
    @classmethod
    def _no_tool_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "{field} is not supported: this gateway has no tool calling",
                {"field": info.field_name},
            )
        return value

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None:
            raise PydanticCustomError(
                "invalid_value",
                "a message needs content (text or text parts); null content only comes with tool_calls, "
                "which are not supported",
                {"param": "content"},
            )
        if len(self.text) > MAX_MESSAGE_CHARS:
            raise ValueError(f"content is longer than {MAX_MESSAGE_CHARS} characters")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined with newlines)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""

    def template_message(self) -> dict[str, str]:
        """The message as the chat template takes it (``developer`` is a ``system`` turn)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatCompletionRequest(OpenAIRequest):
    """``POST /v1/chat/completions``; the messages go through the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    model: str = Field(min_length=1, description="'instructloop' (the current version) or a version id")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    function_call: str | dict[str, Any] | None = Field(default=None, description="Not supported.")
    functions: list[dict[str, Any]] | None = Field(default=None, description="Not supported.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported (only null / {}).")
    logprobs: bool = Field(default=False, description="Return the logprob of each content token.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=5,
        description=("With logprobs: this many most likely alternatives per position."),
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = Field(default=None, description="Not supported (only null / {}).")
    modalities: list[str] | None = Field(default=None, description="Only ['text'].")
    n: int = Field(default=1, ge=1)
    parallel_tool_calls: bool | None = Field(
        default=None, description="Accepted; without tools (refused) there are no calls to parallelize."
    )
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    response_format: dict[str, Any] | None = Field(
        default=None, description="Only {'type': 'text'} (json_object / json_schema are refused)."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopSequences = None
    store: Store = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Only null / 'none'.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported (only null / []).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)

    _refuse_unsupported = field_validator(
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "metadata",
        "modalities",
        "presence_penalty",
        "response_format",
        "tool_choice",
        "tools",
    )(refuse_unless_neutral)

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
        return [m.template_message() for m in self.messages]

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
            stream_options=self.stream_options,
            temperature=self.temperature,
            top_p=self.top_p,
            user=self.user,
            store=self.store,
        )
