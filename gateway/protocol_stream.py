"""The gateway's stream wire models: the SSE chunks of ``stream=true`` answers, OpenAI field order.

Each ``data:`` line of a stream is one of these, serialized with ``model_dump_json``; the stream ends
with ``data: [DONE]``. ``policy_version`` (ours) is on every chunk, like on plain answers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gateway.protocol import ErrorDetail, Usage

FinishReason = Literal["stop", "length"]


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(BaseModel):
    """One piece of a ``/v1/completions`` stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda value: value is None)
    """Only on the last chunk of a stream with ``stream_options.include_usage`` (``choices`` then empty)."""
    policy_version: str


class ChatDelta(BaseModel):
    """What a chat chunk adds to its choice's message; unset fields are left out (``{}`` at the end)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda value: value is None)
    content: str | None = Field(default=None, exclude_if=lambda value: value is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One piece of a ``/v1/chat/completions`` stream; each choice opens with ``role: assistant``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda value: value is None)
    """Only on the last chunk of a stream with ``stream_options.include_usage`` (``choices`` then empty)."""
    policy_version: str


class StreamError(BaseModel):
    """Sent in place of a chunk when a choice's backend fails mid-stream (the stream then goes on)."""

    error: ErrorDetail
