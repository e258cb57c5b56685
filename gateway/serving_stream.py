"""Streamed answers (``stream=true``) for completions and chat, as OpenAI SSE chunks.

All choices' backend streams are opened and their first tokens read before anything is sent, so the
``X-Policy-Version`` header and every chunk carry one version (``ChoiceGenerator.open_streams``). Then
the tokens of all choices are forwarded as they come, interleaved; text that might be the start of a
stop sequence is held back until it cannot be (OpenAI leaves stop sequences out of the text). A choice
whose backend fails mid-stream gets an error chunk; the others go on. A stream that ends with every
choice finished is recorded like a plain answer; one the client left is not. With
``stream_options.include_usage`` a last chunk before ``[DONE]`` carries the usage (``choices: []``), as
OpenAI sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from gateway.auth import Principal
from gateway.backend import BackendError, Generation, StreamEvent
from gateway.metrics import GatewayMetrics
from gateway.protocol import APIError, ErrorDetail, Usage, new_completion_id
from gateway.protocol_completions import CompletionRequest
from gateway.protocol_stream import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    StreamError,
)
from gateway.serving_choices import ChoiceGenerator, GeneratedChoices, Job, Stream, jobs_for

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"

Recorder = Callable[
    [GeneratedChoices, CompletionRequest, Principal, bool, "list[dict[str, str]] | None"], Awaitable[None]
]
"""How a finished answer is recorded (``CompletionServing._record``)."""


def openai_finish_reason(tgi_reason: str | None) -> str | None:
    if tgi_reason is None:
        return None
    return "length" if tgi_reason == "length" else "stop"


def trim_stop(text: str, stop: list[str]) -> str:
    """TGI keeps the stop sequence in the text; OpenAI leaves it out."""
    for sequence in stop:
        if sequence and text.endswith(sequence):
            return text[: -len(sequence)]
    return text


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


@dataclass
class CompletionStream:
    """An SSE body plus the policy version for the ``X-Policy-Version`` header."""

    policy_version: str
    body: AsyncIterator[str]
    completion_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)


# ---- chunk formats -------------------------------------------------------------------------------------


@dataclass
class CompletionChunks:
    """``/v1/completions`` chunks: text pieces."""

    model: str
    chat = False
    id_prefix = "cmpl"

    def opening(self, cid: str, created: int, version: str, index: int) -> BaseModel | None:
        return None

    def piece(
        self, cid: str, created: int, version: str, index: int, text: str, finish_reason: str | None
    ) -> BaseModel:
        return CompletionChunk(
            id=cid,
            created=created,
            model=self.model,
            policy_version=version,
            choices=[CompletionChunkChoice(text=text, index=index, finish_reason=finish_reason)],
        )

    def usage(self, cid: str, created: int, version: str, usage: Usage) -> BaseModel:
        return CompletionChunk(
            id=cid, created=created, model=self.model, policy_version=version, choices=[], usage=usage
        )


@dataclass
class ChatChunks:
    """``/v1/chat/completions`` chunks: a role delta to open each choice, then content deltas."""

    model: str
    chat = True
    id_prefix = "chatcmpl"

    def _chunk(
        self,
        cid: str,
        created: int,
        version: str,
        index: int,
        delta: ChatDelta,
        finish_reason: str | None = None,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=cid,
            created=created,
            model=self.model,
            policy_version=version,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
        )

    def opening(self, cid: str, created: int, version: str, index: int) -> BaseModel | None:
        return self._chunk(cid, created, version, index, ChatDelta(role="assistant", content=""))

    def piece(
        self, cid: str, created: int, version: str, index: int, text: str, finish_reason: str | None
    ) -> BaseModel:
        return self._chunk(cid, created, version, index, ChatDelta(content=text or None), finish_reason)

    def usage(self, cid: str, created: int, version: str, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=cid, created=created, model=self.model, policy_version=version, choices=[], usage=usage
        )


ChunkFormat = CompletionChunks | ChatChunks


# ---- one choice's progress -----------------------------------------------------------------------------


@dataclass
class ChoiceProgress:
    """What one choice has generated and what of it has been sent."""

    job: Job
    holdback: int
    text: str = ""
    sent: int = 0
    tokens: int = 0
    reason: str | None = None  # TGI's finish reason; "error" when its backend failed

    def advance(self, event: StreamEvent) -> tuple[str, str | None] | None:
        """Take one token; return (text to send now, OpenAI finish reason) or None when nothing is due."""
        response = event.response
        if not response.token.special:
            self.text += response.token.text
        self.tokens += 1
        if response.details is not None:  # the last token of this choice
            self.reason = response.details.finish_reason.value
            self.tokens = response.details.generated_tokens
            if self.reason == "stop_sequence":
                self.text = trim_stop(self.text, self.job.params["stop_sequences"])
            delta, self.sent = self.text[self.sent :], len(self.text)
            return delta, openai_finish_reason(self.reason)
        if len(self.text) - self.holdback > self.sent:
            delta = self.text[self.sent : len(self.text) - self.holdback]
            self.sent += len(delta)
            return delta, None
        return None


# ---- the stream ----------------------------------------------------------------------------------------


class StreamServing:
    def __init__(self, choices: ChoiceGenerator, record: Recorder, metrics: GatewayMetrics):
        self.choices = choices
        self.record = record
        self.metrics = metrics

    async def open(
        self,
        request: CompletionRequest,
        principal: Principal,
        prompt_tokens: int,
        chunks: ChunkFormat,
        messages: list[dict[str, str]] | None = None,
    ) -> CompletionStream | APIError:
        """Open every choice's backend stream (one version); the body sends and then records them."""
        jobs = jobs_for(request)
        opened = await self.choices.open_streams(jobs)
        if isinstance(opened, APIError):
            return opened
        streams, version = opened
        completion_id = new_completion_id(chunks.id_prefix)
        body = self._body(
            request, principal, prompt_tokens, chunks, jobs, streams, version, completion_id, messages
        )
        return CompletionStream(policy_version=version, body=body, completion_id=completion_id)

    async def _body(
        self,
        request: CompletionRequest,
        principal: Principal,
        prompt_tokens: int,
        chunks: ChunkFormat,
        jobs: list[Job],
        streams: list[Stream],
        version: str,
        cid: str,
        messages: list[dict[str, str]] | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        holdback = max((len(s) for s in request.stop or []), default=0)
        progress = [ChoiceProgress(job, holdback) for job in jobs]
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.ensure_future(self._pump(i, first, rest, queue))
            for i, (first, rest) in enumerate(streams)
        ]
        completed = False
        try:
            for job in jobs:
                opening = chunks.opening(cid, created, version, job.index)
                if opening is not None:
                    yield sse(opening)
            open_choices = len(jobs)
            while open_choices:
                i, item = await queue.get()
                if item is None:
                    open_choices -= 1
                elif isinstance(item, BackendError):
                    progress[i].reason = progress[i].reason or "error"
                    yield sse(
                        StreamError(
                            error=ErrorDetail(message=item.message, type="server_error", code=item.code)
                        )
                    )
                else:
                    if item.policy_version != version:
                        log.warning("policy version changed mid-stream", extra={"completion_id": cid})
                    due = progress[i].advance(item)
                    if due is not None:
                        yield sse(chunks.piece(cid, created, version, jobs[i].index, *due))
            if request.include_usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices
                generated = sum(p.tokens for p in progress)
                usage = Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=generated,
                    total_tokens=prompt_tokens + generated,
                )
                yield sse(chunks.usage(cid, created, version, usage))
            yield SSE_DONE
            completed = True
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.stream_write_failures.inc()
            log.info("client went away mid-stream", extra={"completion_id": cid})
            raise
        finally:
            for task in tasks:
                task.cancel()
            for _, rest in streams:
                with contextlib.suppress(Exception):
                    await rest.aclose()
        if completed and all(p.reason not in (None, "error") for p in progress):
            generations = [
                Generation(p.text, p.reason or "length", p.tokens, policy_version=version) for p in progress
            ]
            result = GeneratedChoices(
                cid, created, request.prompts, prompt_tokens, jobs, generations, version
            )
            await self.record(result, request, principal, chunks.chat, messages)

    @staticmethod
    async def _pump(
        i: int, first: StreamEvent, rest: AsyncIterator[StreamEvent], queue: asyncio.Queue
    ) -> None:
        """Forward choice ``i``'s events to the queue: its tokens, a ``BackendError``, then None (done)."""
        try:
            await queue.put((i, first))
            async for event in rest:
                await queue.put((i, event))
        except BackendError as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))
