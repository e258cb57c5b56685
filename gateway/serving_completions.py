"""Serving for ``/v1/completions`` and ``/v1/chat/completions``.

Each call returns a response model, a ``CompletionStream`` (the router wraps it as SSE), or an
``APIError`` value. The n choices of one completion (times the prompts of a list prompt) go to the
backend as n independent TGI requests; they must all come from one policy version. Serve may swap
between them, and replicas may hold different versions during a rollout, so: after each round the
target version is the one of the most recently finished choice (the newest one the backends serve), the
choices from another version are regenerated on the replicas that reported the target, at most
``version_retry_rounds`` times; after that the call answers 503 ``policy_version_changed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gateway.auth import Principal
from gateway.backend import Backend, BackendError, Generation, StreamEvent
from gateway.limits import admit_completion, check_request_size
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_completion_id,
)
from gateway.request_context import until_disconnected
from gateway.settings import Settings
from gateway.store import Store, StoredChoice, StoredCompletion
from instructloop.events import Choice, CompletionEvent
from instructloop.prompt import encode_prompt, render_chat

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


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


@dataclass
class Job:
    """One choice to generate: which prompt, which choice index (global across prompts)."""

    index: int
    prompt_index: int
    prompt: str
    params: dict[str, Any]


@dataclass
class GeneratedChoices:
    completion_id: str
    created: int
    prompts: list[str]
    prompt_tokens: int
    jobs: list[Job]
    generations: list[Generation]
    policy_version: str


@dataclass
class CompletionStream:
    """An SSE body plus the policy version for the ``X-Policy-Version`` header."""

    policy_version: str
    body: AsyncIterator[str]
    completion_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class CompletionServing:
    def __init__(self, settings: Settings, backend: Backend, store: Store, tokenizer: Any, metrics: GatewayMetrics):
        self.settings = settings
        self.backend = backend
        self.store = store
        self.tokenizer = tokenizer
        self.metrics = metrics

    # ---- validation ---------------------------------------------------------------------------------
    def _check(self, request: CompletionRequest) -> APIError | int:
        """Validate against the limits; returns an error or the prompt token count."""
        s = self.settings
        if request.model != s.served_model_name:
            return APIError(404, f"The model '{request.model}' does not exist; GET /v1/models lists '{s.served_model_name}'.",
                            param="model", code="model_not_found")
        if request.n > s.max_n:
            return APIError(400, f"n must be at most {s.max_n}", param="n", code="invalid_value")
        if request.max_tokens > s.max_tokens_limit:
            return APIError(400, f"max_tokens must be at most {s.max_tokens_limit}", param="max_tokens", code="invalid_value")
        if request.stream and request.logprobs:
            return APIError(400, "logprobs are not available with stream=true", param="logprobs", code="invalid_value")
        if (too_big := check_request_size(request, s)) is not None:
            return too_big
        total_tokens = 0
        for prompt in request.prompts:
            if not prompt:
                return APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
            if len(prompt) > s.max_prompt_chars:
                return APIError(400, f"prompt is longer than {s.max_prompt_chars} characters", param="prompt",
                                code="prompt_too_long")
            tokens = self.count_tokens(prompt)
            if tokens > s.max_prompt_tokens:
                return APIError(400, f"prompt has {tokens} tokens; the limit is {s.max_prompt_tokens}", param="prompt",
                                code="prompt_too_long")
            total_tokens += tokens
        return total_tokens

    async def _check_and_admit(self, request: CompletionRequest, principal: Principal) -> APIError | int:
        """``_check``, then the key's generation and token budgets (429 when one has no room)."""
        checked = self._check(request)
        if isinstance(checked, APIError):
            return checked
        return await admit_completion(self.store, self.settings, self.metrics, request, checked, principal) or checked

    def count_tokens(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text))

    def _jobs(self, request: CompletionRequest) -> list[Job]:
        jobs = []
        for p, prompt in enumerate(request.prompts):
            for i in range(request.n):
                jobs.append(Job(len(jobs), p, prompt, request.to_generate_params(i)))
        return jobs

    # ---- non-streaming ------------------------------------------------------------------------------
    async def generate_consistent(self, jobs: list[Job]) -> list[Generation] | APIError:
        """All jobs generated from one policy version (see module docstring)."""
        results: list[Generation | None] = [None] * len(jobs)
        pending, prefer = list(range(len(jobs))), None
        for round_number in range(self.settings.version_retry_rounds + 1):
            finished: list[int] = []

            async def one(i: int, prefer=prefer) -> int:
                results[i] = await self.backend.generate(jobs[i].prompt, jobs[i].params, prefer)
                return i

            tasks = [asyncio.ensure_future(one(i)) for i in pending]
            try:
                for next_done in asyncio.as_completed(tasks):
                    finished.append(await next_done)
            except BackendError as exc:
                return APIError(exc.status, exc.message, "server_error" if exc.status >= 500 else "invalid_request_error",
                                code=exc.code, headers=self._retry_after(exc.status))
            finally:
                for task in tasks:
                    task.cancel()
            target = results[finished[-1]].policy_version
            pending = [i for i, g in enumerate(results) if g.policy_version != target]
            if not pending:
                return results  # type: ignore[return-value]
            prefer = {g.backend for g in results if g.policy_version == target}
            self.metrics.version_regenerations.inc(len(pending))
            log.info("choices from different policy versions; regenerating",
                     extra={"round": round_number, "target": target, "regenerate": len(pending),
                            "versions": sorted({g.policy_version for g in results})})
        return APIError(503, "the policy version changed while the choices were generated; retry the request",
                        "server_error", code="policy_version_changed", headers=self._retry_after(503))

    def _retry_after(self, status: int) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)} if status == 503 else {}

    async def _generate(self, request: CompletionRequest, prompt_tokens: int, prefix: str) -> GeneratedChoices | APIError:
        jobs = self._jobs(request)
        generations = await self.generate_consistent(jobs)
        if isinstance(generations, APIError):
            return generations
        for job, g in zip(jobs, generations, strict=True):
            if g.finish_reason == "stop_sequence":
                g.text = trim_stop(g.text, job.params["stop_sequences"])
        return GeneratedChoices(new_completion_id(prefix), int(time.time()), request.prompts, prompt_tokens, jobs,
                                generations, generations[0].policy_version)

    async def _record(self, result: GeneratedChoices, request: CompletionRequest, principal: Principal,
                      chat: bool, messages: list[dict[str, str]] | None = None) -> None:
        prompt_tokens = [self.count_tokens(p) for p in result.prompts] if len(result.prompts) > 1 else [result.prompt_tokens]
        stored = StoredCompletion(
            id=result.completion_id, caller=principal.key_id, prompts=result.prompts,
            choices=[StoredChoice(j.index, g.text, openai_finish_reason(g.finish_reason), j.prompt_index, g.generated_tokens)
                     for j, g in zip(result.jobs, result.generations, strict=True)],
            policy_version=result.policy_version, chat=chat,
        )
        events = []
        for p, prompt in enumerate(result.prompts):
            choices = [Choice(index=j.index, text=g.text, finish_reason=openai_finish_reason(g.finish_reason),
                              prompt_tokens=prompt_tokens[p], completion_tokens=g.generated_tokens)
                       for j, g in zip(result.jobs, result.generations, strict=True) if j.prompt_index == p]
            events.append(CompletionEvent(completion_id=result.completion_id, prompt=prompt, choices=choices,
                                          policy_version=result.policy_version, sampling=request.sampling(),
                                          caller=principal.key_id, chat=chat, messages=messages))
        completion_tokens = sum(g.generated_tokens for g in result.generations)
        self.metrics.tokens_in.inc(result.prompt_tokens)
        self.metrics.tokens_out.inc(completion_tokens)
        await self.store.save_completion(stored, events)
        log.info("completion served", extra={"completion_id": result.completion_id, "caller": principal.key_id,
                                             "policy_version": result.policy_version, "choices": len(result.jobs),
                                             "prompt_tokens": result.prompt_tokens,
                                             "completion_tokens": completion_tokens, "chat": chat})

    @staticmethod
    def _logprobs(prompt: str, g: Generation) -> CompletionLogprobs:
        tokens, logprobs, offsets = [], [], []
        offset = len(prompt)
        for token in g.tokens:
            tokens.append(token.text)
            logprobs.append(token.logprob)
            offsets.append(offset)
            offset += len(token.text) if not token.special else 0
        top = None
        if g.top_tokens:
            top = [{t.text: t.logprob for t in position if t.logprob is not None} for position in g.top_tokens]
        return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=top, text_offset=offsets)

    def _usage(self, result: GeneratedChoices) -> Usage:
        out = sum(g.generated_tokens for g in result.generations)
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=out, total_tokens=result.prompt_tokens + out)

    async def create_completion(self, request: CompletionRequest, principal: Principal,
                                raw_request: Request | None = None) -> CompletionResponse | CompletionStream | APIError | None:
        checked = await self._check_and_admit(request, principal)
        if isinstance(checked, APIError):
            return checked
        if request.stream:
            return await self._open_stream(request, principal, checked, chat=False)
        result = await until_disconnected(raw_request, self._generate(request, checked, "cmpl"))
        if result is None or isinstance(result, APIError):
            return result
        await self._record(result, request, principal, chat=False)
        choices = [
            CompletionChoice(text=g.text, index=j.index, finish_reason=openai_finish_reason(g.finish_reason),
                             logprobs=self._logprobs(j.prompt, g) if request.logprobs is not None else None)
            for j, g in zip(result.jobs, result.generations, strict=True)
        ]
        return CompletionResponse(id=result.completion_id, created=result.created, model=request.model, choices=choices,
                                  usage=self._usage(result), policy_version=result.policy_version)

    # ---- chat ---------------------------------------------------------------------------------------
    def render_chat(self, request: ChatCompletionRequest) -> str | APIError:
        try:
            return render_chat(self.tokenizer, request.template_messages())
        except Exception as exc:  # the template refuses some message orders
            return APIError(400, f"messages cannot be rendered with the model's chat template: {exc}", param="messages",
                            code="invalid_messages")

    async def create_chat_completion(self, request: ChatCompletionRequest, principal: Principal,
                                     raw_request: Request | None = None) -> ChatCompletionResponse | CompletionStream | APIError | None:
        if request.logprobs:
            return APIError(400, "logprobs are not available on chat completions; use /v1/completions with logprobs=0",
                            param="logprobs", code="invalid_value")
        prompt = self.render_chat(request)
        if isinstance(prompt, APIError):
            return prompt
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            return APIError(400, f"max_tokens must be at most {self.settings.max_tokens_limit}", param="max_tokens",
                            code="invalid_value")
        completion_request = request.to_completion_request(prompt, default_max_tokens=min(256, self.settings.max_tokens_limit))
        checked = await self._check_and_admit(completion_request, principal)
        if isinstance(checked, APIError):
            if checked.param == "prompt":
                checked.param = "messages"
            return checked
        if request.stream:
            return await self._open_stream(completion_request, principal, checked, True, request.template_messages())
        result = await until_disconnected(raw_request, self._generate(completion_request, checked, "chatcmpl"))
        if result is None or isinstance(result, APIError):
            return result
        await self._record(result, completion_request, principal, chat=True, messages=request.template_messages())
        choices = [ChatChoice(index=j.index, message=ChatResponseMessage(content=g.text),
                              finish_reason=openai_finish_reason(g.finish_reason))
                   for j, g in zip(result.jobs, result.generations, strict=True)]
        return ChatCompletionResponse(id=result.completion_id, created=result.created, model=request.model,
                                      choices=choices, usage=self._usage(result), policy_version=result.policy_version)

    # ---- streaming ----------------------------------------------------------------------------------
    async def _open_streams(self, jobs: list[Job]) -> tuple[list[tuple[StreamEvent, AsyncIterator[StreamEvent]]], str] | APIError:
        """Start one backend stream per job and read each first token, so all come from one version
        before anything is sent (then the header can carry it)."""
        prefer = None
        for round_number in range(self.settings.version_retry_rounds + 1):
            streams = [self.backend.stream(j.prompt, j.params, prefer) for j in jobs]
            firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
            error = next((f for f in firsts if isinstance(f, BaseException)), None)
            if error is None:
                versions = [f.policy_version for f in firsts]
                if len(set(versions)) == 1:
                    return list(zip(firsts, streams, strict=True)), versions[0]
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()
            if error is not None:
                if isinstance(error, BackendError):
                    return APIError(error.status, error.message, "server_error" if error.status >= 500 else "invalid_request_error",
                                    code=error.code, headers=self._retry_after(error.status))
                if isinstance(error, StopAsyncIteration):
                    return APIError(502, "the inference backend closed the stream without a token", "server_error",
                                    code="backend_error")
                raise error
            target = Counter(f.policy_version for f in firsts).most_common(1)[0][0]
            prefer = {f.backend for f in firsts if f.policy_version == target}
            self.metrics.version_regenerations.inc(sum(f.policy_version != target for f in firsts))
            log.info("stream choices from different policy versions; restarting", extra={"round": round_number})
        return APIError(503, "the policy version changed while the choices were generated; retry the request",
                        "server_error", code="policy_version_changed", headers=self._retry_after(503))

    async def _open_stream(self, request: CompletionRequest, principal: Principal, prompt_tokens: int,
                           chat: bool, messages: list[dict[str, str]] | None = None) -> CompletionStream | APIError:
        jobs = self._jobs(request)
        opened = await self._open_streams(jobs)
        if isinstance(opened, APIError):
            return opened
        streams, version = opened
        completion_id = new_completion_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        chunk = self._chat_chunk if chat else self._text_chunk

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        async def body() -> AsyncIterator[str]:
            queue: asyncio.Queue = asyncio.Queue()
            texts = [""] * len(jobs)
            sent = [0] * len(jobs)
            tokens = [0] * len(jobs)
            reasons: list[str | None] = [None] * len(jobs)
            holdback = max((len(s) for s in request.stop or []), default=0)

            async def pump(i: int, first: StreamEvent, rest: AsyncIterator[StreamEvent]) -> None:
                try:
                    await queue.put((i, first))
                    async for event in rest:
                        await queue.put((i, event))
                except BackendError as exc:
                    await queue.put((i, exc))
                finally:
                    await queue.put((i, None))

            tasks = [asyncio.ensure_future(pump(i, first, rest)) for i, (first, rest) in enumerate(streams)]
            completed = False
            try:
                if chat:
                    for j in jobs:
                        yield sse(chunk(completion_id, created, request.model, version, j.index, None, None, role=True))
                open_jobs = len(jobs)
                while open_jobs:
                    i, item = await queue.get()
                    if item is None:
                        open_jobs -= 1
                        continue
                    if isinstance(item, BackendError):
                        yield sse({"error": {"message": item.message, "type": "server_error", "param": None, "code": item.code}})
                        reasons[i] = reasons[i] or "error"
                        continue
                    response = item.response
                    if item.policy_version != version:
                        log.warning("policy version changed mid-stream", extra={"completion_id": completion_id})
                    if not response.token.special:
                        texts[i] += response.token.text
                    tokens[i] += 1
                    if response.details is not None:  # last token of this choice
                        reasons[i] = response.details.finish_reason.value
                        tokens[i] = response.details.generated_tokens
                        if reasons[i] == "stop_sequence":
                            texts[i] = trim_stop(texts[i], jobs[i].params["stop_sequences"])
                        delta = texts[i][sent[i]:]
                        sent[i] = len(texts[i])
                        yield sse(chunk(completion_id, created, request.model, version, jobs[i].index, delta,
                                        openai_finish_reason(reasons[i])))
                    elif len(texts[i]) - holdback > sent[i]:
                        delta = texts[i][sent[i]: len(texts[i]) - holdback]
                        sent[i] += len(delta)
                        yield sse(chunk(completion_id, created, request.model, version, jobs[i].index, delta, None))
                yield SSE_DONE
                completed = True
            except (asyncio.CancelledError, GeneratorExit):
                self.metrics.stream_write_failures.inc()
                log.info("client went away mid-stream", extra={"completion_id": completion_id})
                raise
            finally:
                for task in tasks:
                    task.cancel()
                for _, rest in streams:
                    with contextlib.suppress(Exception):
                        await rest.aclose()
            if completed and all(r not in (None, "error") for r in reasons):
                result = GeneratedChoices(
                    completion_id, created, request.prompts, prompt_tokens, jobs,
                    [Generation(texts[i], reasons[i] or "length", tokens[i], policy_version=version) for i in range(len(jobs))],
                    version)
                await self._record(result, request, principal, chat=chat, messages=messages)

        return CompletionStream(policy_version=version, body=body(), completion_id=completion_id)

    @staticmethod
    def _text_chunk(cid: str, created: int, model: str, version: str, index: int, text: str | None,
                    finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text or "", "index": index, "logprobs": None, "finish_reason": finish_reason}],
                "policy_version": version}

    @staticmethod
    def _chat_chunk(cid: str, created: int, model: str, version: str, index: int, text: str | None,
                    finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                "policy_version": version}

