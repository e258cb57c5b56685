"""The n choices of one answer, generated from one policy version.

The n choices of one completion (times the prompts of a list prompt) go to the backend as n independent
TGI requests, and an answer must come from one policy version: serve may swap between requests, and
replicas may hold different versions during a rollout.

The rule for which version a multi-choice answer reports (one rule, for plain and streamed answers):
**the version of the choice that arrived last** — the finished choice for a plain answer, the first
token for a stream. A swap or a rollout only moves replicas to the version the learner made current, so
the most recent arrival is the best guess of what the backends serve now. The choices of any other
version are regenerated on the replicas that reported the target, at most ``version_retry_rounds``
times; after that the call answers 503 ``policy_version_changed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.backend import Backend, BackendError, Generation, StreamEvent
from gateway.metrics import GatewayMetrics
from gateway.protocol import APIError
from gateway.protocol_completions import CompletionRequest
from gateway.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One choice to generate: which prompt, which choice index (global across prompts)."""

    index: int
    prompt_index: int
    prompt: str
    params: dict[str, Any]


def jobs_for(request: CompletionRequest) -> list[Job]:
    """One job per prompt and choice, in the answer's choice order. A token-id prompt travels as its ids
    (``input_ids``: serve generates from exactly them); ``prompt`` is then its decoded text."""
    jobs: list[Job] = []
    token_prompts = request.token_prompts
    for p, prompt in enumerate(request.prompts):
        for i in range(request.n):
            params = request.to_generate_params(i)
            if token_prompts is not None:
                params["input_ids"] = token_prompts[p]
            jobs.append(Job(len(jobs), p, prompt, params))
    return jobs


@dataclass
class GeneratedChoices:
    completion_id: str
    created: int
    prompts: list[str]
    prompt_tokens: int
    jobs: list[Job]
    generations: list[Generation]
    policy_version: str


Stream = tuple[StreamEvent, AsyncIterator[StreamEvent]]
"""An opened backend stream: its first token and the rest."""


class ChoiceGenerator:
    """Generates (or opens the streams of) a set of jobs so that all come from one policy version."""

    def __init__(self, settings: Settings, backend: Backend, metrics: GatewayMetrics):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics

    def backend_error(self, exc: BackendError) -> APIError:
        """A backend failure as the gateway answers it (503s say when to retry)."""
        return APIError(
            exc.status,
            exc.message,
            "server_error" if exc.status >= 500 else "invalid_request_error",
            code=exc.code,
            headers=self.retry_after(exc.status),
        )

    def retry_after(self, status: int) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)} if status == 503 else {}

    def _version_changed(self) -> APIError:
        return APIError(
            503,
            "the policy version changed while the choices were generated; retry the request",
            "server_error",
            code="policy_version_changed",
            headers=self.retry_after(503),
        )

    def _retarget(self, arrived: list[tuple[str, str]], round_number: int) -> tuple[str, set[str], int]:
        """The target version (the last arrival's: see the module docstring), the replicas that reported
        it, and how many choices must be regenerated. ``arrived``: (version, backend) in arrival order."""
        target = arrived[-1][0]
        stale = sum(version != target for version, _ in arrived)
        if stale:
            self.metrics.version_regenerations.inc(stale)
            log.info(
                "choices from different policy versions; regenerating",
                extra={
                    "round": round_number,
                    "target": target,
                    "regenerate": stale,
                    "versions": sorted({version for version, _ in arrived}),
                },
            )
        return target, {backend for version, backend in arrived if version == target}, stale

    async def generate(self, jobs: list[Job]) -> list[Generation] | APIError:
        """Every job generated, all from one policy version."""
        results: list[Generation | None] = [None] * len(jobs)
        pending, prefer = list(range(len(jobs))), None
        for round_number in range(self.settings.version_retry_rounds + 1):
            order = await self._generate_round(jobs, pending, prefer, results)
            if isinstance(order, APIError):
                return order
            arrived = [(results[i].policy_version, results[i].backend) for i in order]
            kept = [(g.policy_version, g.backend) for i, g in enumerate(results) if i not in pending]
            target, prefer, _ = self._retarget(kept + arrived, round_number)
            pending = [i for i, g in enumerate(results) if g.policy_version != target]
            if not pending:
                return results  # type: ignore[return-value]
        return self._version_changed()

    async def _generate_round(
        self, jobs: list[Job], pending: list[int], prefer: set[str] | None, results: list[Generation | None]
    ) -> list[int] | APIError:
        """Generate the ``pending`` jobs into ``results``; return their indices in arrival order."""

        async def one(i: int) -> int:
            results[i] = await self.backend.generate(jobs[i].prompt, jobs[i].params, prefer)
            return i

        tasks = [asyncio.ensure_future(one(i)) for i in pending]
        order: list[int] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                order.append(await next_done)
        except BackendError as exc:
            return self.backend_error(exc)
        finally:
            await _cancel(tasks)
        return order

    async def open_streams(self, jobs: list[Job]) -> tuple[list[Stream], str] | APIError:
        """One backend stream per job, each first token read, all from one version (so nothing is sent
        before the version header is known)."""
        prefer = None
        for round_number in range(self.settings.version_retry_rounds + 1):
            streams = [self.backend.stream(j.prompt, j.params, prefer) for j in jobs]
            arrivals = await self._first_tokens(streams)
            if not isinstance(arrivals, APIError):
                target, prefer, stale = self._retarget(
                    [(e.policy_version, e.backend) for _, e in arrivals], round_number
                )
                if not stale:
                    firsts = dict(arrivals)
                    return [(firsts[i], s) for i, s in enumerate(streams)], target
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()
            if isinstance(arrivals, APIError):
                return arrivals
        return self._version_changed()

    async def _first_tokens(
        self, streams: list[AsyncIterator[StreamEvent]]
    ) -> list[tuple[int, StreamEvent]] | APIError:
        """(stream index, first event) of every stream, in arrival order."""

        async def first(i: int) -> tuple[int, StreamEvent]:
            return i, await anext(streams[i])

        tasks = [asyncio.ensure_future(first(i)) for i in range(len(streams))]
        arrivals: list[tuple[int, StreamEvent]] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                arrivals.append(await next_done)
        except BackendError as exc:
            return self.backend_error(exc)
        except StopAsyncIteration:
            return APIError(
                502,
                "the inference backend closed the stream without a token",
                "server_error",
                code="backend_error",
            )
        finally:
            await _cancel(tasks)
        return arrivals


async def _cancel(tasks: list[asyncio.Future]) -> None:
    """Cancel what is still running and wait until it has stopped (its backend calls closed)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
