"""The serving layer between the HTTP routes and the engine.

Turns a ``GenerateRequest`` into an engine request (tokenize, truncate, check the token limits), waits for
the engine's generations, builds TGI responses and stream events, cancels the request when the client goes
away, and raises ``TGIError`` (status + TGI ``error_type``) for everything that is not a success.

``until_disconnected`` is serve's one client-disconnect helper (the gateway has its own, with the same
contract: cancel the work, wait until it has stopped, raise ``ClientGone``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from instructloop.prompt import encode_prompt
from serve.engine import Engine, GenerationFailed, GenerationRequest, Overloaded, RequestHandle
from serve.metrics import ServeMetrics
from serve.model import Generation, PolicyModel
from serve.protocol import (
    Details,
    ErrorType,
    FinishReason,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from serve.settings import Settings
from serve.versions import PolicyVersions, RefusedVersion, UnknownVersion

log = logging.getLogger(__name__)

T = TypeVar("T")


class TGIError(Exception):
    """An error answer in TGI's format: ``{"error": message, "error_type": ...}`` with an HTTP status."""

    def __init__(self, status_code: int, error_type: ErrorType, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type.value}


def validation_error(field: str, message: str) -> TGIError:
    return TGIError(422, ErrorType.validation, f"Input validation error: `{field}`: {message}")


class ClientGone(Exception):
    """The client disconnected while we waited for the engine; the wait was cancelled."""


async def until_disconnected(request: Request | None, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel ``work``, wait until it has stopped, and
    raise ``ClientGone``. ``request=None`` (no HTTP client) just awaits ``work``."""
    if request is None:
        return await work
    waiting = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiting not in done:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        raise ClientGone()
    return waiting.result()


async def _client_left(request: Request) -> None:
    """Return once the ASGI server reports that the client went away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class GenerateServing:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        settings: Settings,
        metrics: ServeMetrics,
        versions: PolicyVersions | None = None,
    ):
        self.engine = engine
        self.versions = versions
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics

    # ---- request -> engine request -------------------------------------------------------------
    def to_engine_request(self, request: GenerateRequest) -> tuple[GenerationRequest, list[int]]:
        params = request.parameters
        settings = self.settings
        if len(params.stop) > settings.max_stop_sequences:
            raise validation_error(
                "stop",
                f"at most {settings.max_stop_sequences} stop sequences are allowed, got {len(params.stop)}",
            )
        if params.top_n_tokens is not None and params.top_n_tokens > settings.max_top_n_tokens:
            raise validation_error("top_n_tokens", f"must be <= {settings.max_top_n_tokens}")
        if params.truncate is not None and params.truncate > settings.max_input_tokens:
            raise validation_error("truncate", f"must be <= max_input_tokens = {settings.max_input_tokens}")
        if isinstance(request.inputs, list):  # token ids (our extension): generated from exactly these
            prompt_ids = list(request.inputs)
            vocabulary = len(self.tokenizer)
            if max(prompt_ids) >= vocabulary:
                raise validation_error(
                    "inputs", f"token id {max(prompt_ids)} is not in the vocabulary (0..{vocabulary - 1})"
                )
        else:
            prompt_ids = encode_prompt(
                self.tokenizer, request.inputs
            )  # the prompt contract, shared with the learner
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate :]
        if not prompt_ids:
            raise validation_error("inputs", "tokenizes to no tokens")
        if len(prompt_ids) > settings.max_input_tokens:
            raise validation_error(
                "inputs",
                f"must have at most {settings.max_input_tokens} tokens, got "
                f"{len(prompt_ids)} (set `truncate` to keep the last tokens)",
            )
        room = settings.max_total_tokens - len(prompt_ids)
        if params.max_new_tokens is None:
            max_new_tokens = min(settings.default_max_new_tokens, room)
        elif params.max_new_tokens > room:
            raise validation_error(
                "max_new_tokens",
                f"inputs tokens + max_new_tokens must be <= "
                f"{settings.max_total_tokens}; given {len(prompt_ids)} input "
                f"tokens and {params.max_new_tokens} max_new_tokens",
            )
        else:
            max_new_tokens = params.max_new_tokens
        engine_request = GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=params.to_sampling_params(),
            stop=list(params.stop),
            top_n_tokens=params.top_n_tokens or 0,
        )
        return engine_request, prompt_ids

    def inputs_text(self, request: GenerateRequest) -> str:
        """The prompt as text (token-id inputs decoded): what ``return_full_text`` prepends."""
        if isinstance(request.inputs, list):
            return self.tokenizer.decode(request.inputs, skip_special_tokens=False)
        return request.inputs

    async def submit(self, request: GenerateRequest) -> tuple[RequestHandle, list[int]]:
        self.metrics.request_count.inc()
        try:
            engine_request, prompt_ids = self.to_engine_request(request)
            engine_request.policy = await self._policy(request.parameters.adapter_id)
            if request.parameters.decoder_input_details and engine_request.policy is None:
                # pinned, so that the prompt logprobs come from the version that answers
                engine_request.policy = self.engine.active_policy
            return self.engine.submit(engine_request), prompt_ids
        except TGIError:
            self.metrics.request_failure.labels(err="validation").inc()
            raise
        except Overloaded as exc:
            self.metrics.request_failure.labels(err="overloaded").inc()
            raise TGIError(429, ErrorType.overloaded, str(exc)) from exc

    async def _policy(self, adapter_id: str | None) -> PolicyModel | None:
        """The version named by ``adapter_id`` (None: the active one at admission)."""
        if self.versions is None:
            if adapter_id is None:
                return None
            raise validation_error("adapter_id", "this server cannot answer for a named policy version")
        try:
            return await self.versions.resolve(adapter_id)
        except UnknownVersion as exc:
            raise TGIError(404, ErrorType.validation, f"Input validation error: `adapter_id`: {exc}") from exc
        except RefusedVersion as exc:
            raise validation_error("adapter_id", str(exc)) from exc

    # ---- non-streaming -------------------------------------------------------------------------
    async def generate(
        self, request: GenerateRequest, raw_request: Request | None = None
    ) -> GenerateResponse:
        """Raises ``ClientGone`` (the request cancelled) when the client disconnects before the answer."""
        started = time.monotonic()
        handle, prompt_ids = await self.submit(request)
        params = request.parameters
        generations: list[Generation] = []
        prefill: tuple[list[PrefillToken], list[list[Token]]] = ([], [])
        try:
            await until_disconnected(raw_request, self._collect(handle, generations))
            if params.details and params.decoder_input_details:
                prefill = await until_disconnected(
                    raw_request, self._prefill(handle.requested, prompt_ids, params.top_n_tokens or 0)
                )
        except GenerationFailed as exc:
            raise TGIError(424, ErrorType.generation, str(exc)) from exc
        finally:
            handle.cancel()  # no-op when finished
        last = generations[-1]
        self._observe_success(started)
        text = last.generated_text or ""
        if params.return_full_text:
            text = self.inputs_text(request) + text
        details = None
        if params.details:
            details = Details(
                finish_reason=FinishReason(last.finish_reason.value),
                generated_tokens=last.generated_tokens,
                seed=last.seed,
                prefill=prefill[0],
                tokens=[_token(g) for g in generations],
                top_tokens=[_top_tokens(g) for g in generations] if params.top_n_tokens else [],
                prefill_top_tokens=prefill[1],
            )
        return GenerateResponse(generated_text=text, details=details, policy_version=last.policy_version)

    async def _prefill(
        self, policy: PolicyModel, prompt_ids: list[int], top_n: int
    ) -> tuple[list[PrefillToken], list[list[Token]]]:
        """The prompt tokens with their logprobs under ``policy`` (the version that answered: ``submit`` pins
        it), and their ``top_n`` alternatives; one extra forward of the prompt on the model thread."""
        try:
            logprobs, top = await asyncio.wrap_future(
                self.engine.call_on_model_thread(lambda: policy.prompt_logprobs(prompt_ids, top_n))
            )
        except Exception as exc:
            log.exception("prompt logprobs failed", extra={"policy_version": policy.version})
            raise GenerationFailed(f"prompt logprobs failed: {exc}") from exc
        texts = self.tokenizer.batch_decode(
            [[i] for i in prompt_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        tokens = [
            PrefillToken(id=i, text=text, logprob=lp)
            for i, text, lp in zip(prompt_ids, texts, logprobs, strict=True)
        ]
        alternatives = (
            [[Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in row] for row in top]
            if top_n
            else []
        )
        return tokens, alternatives

    async def _collect(self, handle: RequestHandle, generations: list[Generation]) -> None:
        async for generation in handle.events():
            generations.append(generation)

    # ---- streaming -----------------------------------------------------------------------------
    async def generate_stream(
        self, request: GenerateRequest, raw_request: Request | None = None
    ) -> tuple[str, AsyncIterator[str]]:
        """Wait for the first token (so errors before it are plain HTTP errors and the version header is
        known), then return (policy_version, SSE lines)."""
        started = time.monotonic()
        handle, prompt_ids = await self.submit(request)
        events = handle.events()
        try:
            first = await until_disconnected(raw_request, events.__anext__())
        except ClientGone:
            handle.cancel()
            raise
        except GenerationFailed as exc:
            raise TGIError(424, ErrorType.generation, str(exc)) from exc
        return first.policy_version, self._sse(request, handle, events, first, len(prompt_ids), started)

    async def _sse(
        self,
        request: GenerateRequest,
        handle: RequestHandle,
        events: AsyncIterator[Generation],
        first: Generation,
        input_length: int,
        started: float,
    ) -> AsyncIterator[str]:
        params = request.parameters
        index = 0
        generation: Generation | None = first
        try:
            while generation is not None:
                index += 1
                event = StreamResponse(
                    index=index,
                    token=_token(generation),
                    top_tokens=_top_tokens(generation),
                    policy_version=generation.policy_version,
                )
                if generation.finish_reason is not None:
                    text = generation.generated_text or ""
                    event.generated_text = (
                        self.inputs_text(request) + text if params.return_full_text else text
                    )
                    if params.details:
                        event.details = StreamDetails(
                            finish_reason=FinishReason(generation.finish_reason.value),
                            generated_tokens=generation.generated_tokens,
                            seed=generation.seed,
                            input_length=input_length,
                        )
                    self._observe_success(started)
                yield f"data:{event.model_dump_json()}\n\n"
                if generation.finish_reason is not None:
                    return
                try:
                    generation = await events.__anext__()
                except StopAsyncIteration:
                    generation = None
        except GenerationFailed as exc:
            body = TGIError(424, ErrorType.generation, str(exc)).body()
            yield f"data:{_json(body)}\n\n"
        finally:
            handle.cancel()  # the client went away mid-stream (or we are done: no-op)

    def _observe_success(self, started: float) -> None:
        self.metrics.request_success.inc()
        self.metrics.request_duration.observe(time.monotonic() - started)


def _token(generation: Generation) -> Token:
    return Token(
        id=generation.token_id,
        text=generation.token_text,
        logprob=generation.logprob,
        special=generation.special,
    )


def _top_tokens(generation: Generation) -> list[Token]:
    return [Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in generation.top_tokens]


def _json(body: dict[str, str]) -> str:
    import json

    return json.dumps(body)
