"""The one module that talks to inference servers (serve replicas or real TGI).

``PolicyAwareClient`` subclasses ``text_generation.AsyncClient``: same request and response types, but
it keeps one aiohttp session per replica (no TCP handshake per call), posts to the TGI routes
``/generate`` and ``/generate_stream``, and reads the policy version each response carries (the
``X-Policy-Version`` header, else the body's ``policy_version``). Real TGI reports none: its version is
``unknown``.

``Backend`` balances over replicas by least outstanding requests (ties rotate), health-checks them in
the background (``GET /health``), retries a connect failure on another replica, and raises
``NoHealthyBackend`` when none is left. Its replicas are a fixed list of URLs, or (``discovery``) the
addresses a DNS name resolves to, re-resolved periodically (``gateway/discovery.py``: one replica per
pod of a headless Service); a replica that leaves the name is retired once its in-flight calls end.

Stale keep-alive connections: a pooled connection the replica closes at the moment it is reused fails with
"Server disconnected" / "Connection reset" before any answer. serve keeps idle connections longer than the
gateway does (``SERVE_KEEP_ALIVE_S`` > ``BACKEND_KEEP_ALIVE_S``), and a call that fails that way before its
first byte is retried once on a fresh connection (generation has no side effects).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from text_generation import AsyncClient
from text_generation.errors import parse_error
from text_generation.types import Parameters, Request, Response, StreamResponse, Token

from gateway.discovery import DnsDiscovery
from gateway.metrics import GatewayMetrics
from instructloop.wire import BACKEND_KEEP_ALIVE_S, POLICY_VERSION_HEADER, UNKNOWN_VERSION

log = logging.getLogger(__name__)


class BackendError(Exception):
    """A backend call failed; ``status`` is what the gateway answers."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class NoHealthyBackend(BackendError):
    def __init__(self, message: str = "no healthy inference backend; retry shortly"):
        super().__init__(503, message, "backend_unavailable")


@dataclass
class Generation:
    """One generated choice as the backend returned it."""

    text: str
    finish_reason: str  # TGI's: length | eos_token | stop_sequence
    generated_tokens: int
    tokens: list[Any] = field(default_factory=list)  # text_generation.types.Token
    top_tokens: list[list[Any]] | None = None
    policy_version: str = UNKNOWN_VERSION
    backend: str = ""
    prefill: list[Any] = field(default_factory=list)  # text_generation.types.InputToken (echo)
    prefill_top_tokens: list[list[Any]] | None = None  # serve's extension: alternatives per prompt token


@dataclass(frozen=True)
class ContextLimits:
    """What one request may hold on a replica (TGI's ``/info``): prompt tokens, and prompt + generated."""

    max_input_tokens: int
    max_total_tokens: int


@dataclass
class StreamEvent:
    """One streamed token (``final`` on the last one, with the finish reason)."""

    response: StreamResponse
    policy_version: str
    backend: str


def _version(headers: Any, payload: Any) -> str:
    version = headers.get(POLICY_VERSION_HEADER)
    if not version and isinstance(payload, dict):
        version = payload.get("policy_version")
    return str(version) if version else UNKNOWN_VERSION


def _parse_generate(payload: Any) -> tuple[Response, list[list[Token]] | None]:
    """The TGI response, and serve's ``prefill_top_tokens`` (per prompt token; None if absent)."""
    if isinstance(payload, list):  # TGI's POST / answers a list
        payload = payload[0]
    details = payload.get("details") or {}
    details.setdefault("prefill", [])
    details.setdefault("tokens", [])
    payload["details"] = details
    prefill_top = details.get("prefill_top_tokens") or None
    response = Response(**{k: v for k, v in payload.items() if k in ("generated_text", "details")})
    return response, [[Token(**t) for t in position] for position in prefill_top] if prefill_top else None


class PolicyAwareClient(AsyncClient):
    """``AsyncClient`` with a persistent session that also returns the policy version of each response."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 2.0,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(base_url, headers=headers)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                cookies=self.cookies,
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=BACKEND_KEEP_ALIVE_S),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _request(prompt: str, stream: bool, **params: Any) -> dict[str, Any]:
        """The TGI request body. ``adapter_id`` (TGI's field naming the adapter, here a policy version)
        is added to the parameters by hand: text-generation 0.7's ``Parameters`` has no such field.
        ``input_ids`` (a token-id prompt) replaces ``inputs`` by the ids: serve's extension of TGI's
        protocol, generated from exactly those ids (TGI itself takes text only)."""
        stop = params.pop("stop_sequences", None) or []
        adapter_id = params.pop("adapter_id", None)
        input_ids = params.pop("input_ids", None)
        parameters = Parameters(details=True, stop=stop, **params)
        inputs = prompt if input_ids is None else "(token ids)"  # the client's model refuses empty text
        body = Request(inputs=inputs, stream=stream, parameters=parameters).model_dump(exclude_none=True)
        if adapter_id is not None:
            body["parameters"]["adapter_id"] = adapter_id
        if input_ids is not None:
            body["inputs"] = list(input_ids)
        return body

    async def generate_versioned(self, prompt: str, **params: Any) -> tuple[Response, str]:
        response, version, _ = await self.generate_detailed(prompt, **params)
        return response, version

    async def generate_detailed(
        self, prompt: str, **params: Any
    ) -> tuple[Response, str, list[list[Token]] | None]:
        """The response, the version that answered, and the prompt tokens' alternatives (see above)."""
        body = self._request(prompt, False, **params)
        async with self.session().post(f"{self.base_url}/generate", json=body) as resp:
            payload = await resp.json(content_type=None)
            if resp.status != 200:
                raise parse_error(
                    resp.status,
                    payload if isinstance(payload, dict) and "error" in payload else {"error": str(payload)},
                )
            response, prefill_top = _parse_generate(payload)
            return response, _version(resp.headers, payload), prefill_top

    async def generate_stream_versioned(
        self, prompt: str, **params: Any
    ) -> AsyncIterator[tuple[StreamResponse, str]]:
        body = self._request(prompt, True, **params)
        async with self.session().post(f"{self.base_url}/generate_stream", json=body) as resp:
            header_version = resp.headers.get(POLICY_VERSION_HEADER)
            if resp.status != 200:
                payload = await resp.json(content_type=None)
                raise parse_error(
                    resp.status,
                    payload if isinstance(payload, dict) and "error" in payload else {"error": str(payload)},
                )
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                payload = json.loads(line[5:].strip() or b"null")
                if not isinstance(payload, dict):
                    continue
                if "error" in payload and "token" not in payload:
                    raise parse_error(resp.status, payload)
                version = payload.get("policy_version") or header_version or UNKNOWN_VERSION
                yield (
                    StreamResponse(**{k: v for k, v in payload.items() if k in StreamResponse.model_fields}),
                    str(version),
                )

    async def context_limits(self, timeout_s: float = 2.0) -> ContextLimits | None:
        """``max_input_tokens`` and ``max_total_tokens`` from TGI's ``GET /info``; None when it does not
        say."""
        try:
            async with self.session().get(
                f"{self.base_url}/info", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                info = await resp.json(content_type=None) if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None
        values = [
            info.get(k) if isinstance(info, dict) else None for k in ("max_input_tokens", "max_total_tokens")
        ]
        if not all(isinstance(v, int) and v > 0 for v in values):
            return None
        return ContextLimits(*values)

    async def health(self, timeout_s: float = 2.0) -> tuple[bool, str | None]:
        try:
            async with self.session().get(
                f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                await resp.read()
                return resp.status == 200, resp.headers.get(POLICY_VERSION_HEADER)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False, None


@dataclass
class Replica:
    url: str
    client: PolicyAwareClient
    outstanding: int = 0
    healthy: bool = False
    checked: bool = False
    policy_version: str | None = None
    last_error: str | None = None
    retired: bool = False  # left the discovered set: no new calls; its client closes when idle
    context: ContextLimits | None = None
    """Its token limits (``GET /info``), read once it is healthy."""


STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
"""What a reused keep-alive connection the replica had just closed raises (before any answer)."""


def _is_stale_connection(exc: Exception) -> bool:
    return isinstance(exc, STALE_CONNECTION_ERRORS) and not isinstance(exc, aiohttp.ClientConnectorError)


def _translate(exc: Exception) -> BackendError:
    """Map a text_generation / aiohttp error to what the gateway answers."""
    from text_generation import errors

    message = str(exc) or exc.__class__.__name__
    if isinstance(exc, (errors.ValidationError, errors.BadRequestError)):
        return BackendError(
            400, f"the inference backend refused the request: {message}", "invalid_generation_params"
        )
    if isinstance(exc, (errors.OverloadedError, errors.RateLimitExceededError)):
        return BackendError(503, f"the inference backend is overloaded: {message}", "backend_overloaded")
    if isinstance(exc, (asyncio.TimeoutError, errors.ShardTimeoutError)):
        return BackendError(504, "the inference backend timed out", "backend_timeout")
    return BackendError(502, f"the inference backend failed: {message}", "backend_error")


class Backend:
    """Least-outstanding-requests balancing over health-checked replicas.

    The replicas are ``urls``, or with ``discovery`` whatever its name resolves to (refreshed every
    ``discovery.refresh_s``; ``urls`` is then ignored)."""

    def __init__(
        self,
        urls: list[str],
        metrics: GatewayMetrics,
        *,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 2.0,
        health_interval_s: float = 2.0,
        token: str | None = None,
        discovery: DnsDiscovery | None = None,
    ):
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        self._timeouts = (timeout_s, connect_timeout_s)
        self.metrics = metrics
        self.discovery = discovery
        self.replicas: list[Replica] = []
        self._closing: set[asyncio.Task] = set()
        if discovery is None:
            self.set_replicas(urls)
        self.health_interval_s = health_interval_s
        self._rotation = itertools.count()
        self._health_task: asyncio.Task | None = None
        self._discovery_task: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.discovery is not None:
            await self.discovery.refresh(self)
            self._discovery_task = asyncio.create_task(self.discovery.follow(self), name="backend-discovery")
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def close(self) -> None:
        for task in (self._discovery_task, self._health_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for replica in self.replicas:
            await replica.client.close()
        await asyncio.gather(*self._closing)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:  # a bug here must not stop health checking
                log.exception("health check failed")

    # ---- discovery ----------------------------------------------------------------------------------
    def set_replicas(self, urls: list[str]) -> tuple[list[str], list[str]]:
        """Make ``urls`` the replicas: new ones join unchecked (not picked until a health check passes),
        ones not listed are retired (no new calls; closed once their in-flight calls end) and their
        metric series removed. Returns (added, removed)."""
        wanted = list(dict.fromkeys(urls))
        current = {r.url: r for r in self.replicas}
        added = [url for url in wanted if url not in current]
        removed = [url for url in current if url not in wanted]
        timeout_s, connect_timeout_s = self._timeouts
        for url in added:
            client = PolicyAwareClient(url, timeout_s, connect_timeout_s, headers=self._headers)
            current[url] = Replica(url, client)
        for url in removed:
            replica = current.pop(url)
            replica.retired, replica.healthy = True, False
            for gauge in (self.metrics.backend_healthy, self.metrics.backend_outstanding):
                with contextlib.suppress(KeyError):  # never checked / never called
                    gauge.remove(url)
            if replica.outstanding == 0:
                self._close_later(replica)
        self.replicas = [current[url] for url in wanted]
        self.metrics.backend_replicas.set(len(self.replicas))
        if added or removed:
            log.info("backend replicas changed", extra={"added": added, "removed": removed})
        return added, removed

    def _close_later(self, replica: Replica) -> None:
        """Close a retired replica's client in the background (``close()`` waits for it)."""
        task = asyncio.get_running_loop().create_task(replica.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def check_health(self, replicas: list[Replica] | None = None) -> None:
        replicas = list(self.replicas if replicas is None else replicas)
        results = await asyncio.gather(*(r.client.health() for r in replicas))
        for replica, (ok, version) in zip(replicas, results, strict=True):
            if replica.retired:  # left the discovered set while we were asking
                continue
            if ok != replica.healthy or not replica.checked:
                log.info("backend health", extra={"backend": replica.url, "healthy": ok})
            replica.healthy, replica.checked = ok, True
            if version:
                replica.policy_version = version
            if ok and replica.context is None:
                replica.context = await replica.client.context_limits()
            self.metrics.backend_healthy.labels(replica.url).set(1 if ok else 0)

    # ---- balancing ----------------------------------------------------------------------------------
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def context_limits(self) -> ContextLimits | None:
        """The smallest limits the healthy replicas report (what any of them can hold); None when none
        reports any (real TGI without /info, or no healthy replica yet)."""
        known = [r.context for r in self.healthy() if r.context is not None]
        if not known:
            return None
        return ContextLimits(min(c.max_input_tokens for c in known), min(c.max_total_tokens for c in known))

    def pick(self, exclude: set[str] = frozenset(), prefer: set[str] | None = None) -> Replica:
        candidates = [r for r in self.replicas if r.healthy and r.url not in exclude]
        if prefer:
            preferred = [r for r in candidates if r.url in prefer]
            candidates = preferred or candidates
        if not candidates:
            raise NoHealthyBackend()
        fewest = min(r.outstanding for r in candidates)
        tied = [r for r in candidates if r.outstanding == fewest]
        return tied[next(self._rotation) % len(tied)]

    def _count_outstanding(self, replica: Replica, delta: int) -> None:
        """Requests in flight on ``replica`` (what least-outstanding balancing picks by), and its gauge."""
        replica.outstanding += delta
        if replica.retired:
            if replica.outstanding == 0:
                self._close_later(replica)
            return
        self.metrics.backend_outstanding.labels(replica.url).set(replica.outstanding)

    def _mark_down(self, replica: Replica, exc: Exception) -> None:
        replica.healthy = False
        replica.last_error = str(exc)
        if not replica.retired:
            self.metrics.backend_healthy.labels(replica.url).set(0)
        self.metrics.backend_requests.labels(replica.url, "connect_error").inc()
        log.warning(
            "backend connect failed; trying another replica",
            extra={"backend": replica.url, "error": str(exc)},
        )

    # ---- calls --------------------------------------------------------------------------------------
    def _stale(self, replica: Replica, exc: Exception) -> None:
        self.metrics.backend_requests.labels(replica.url, "stale_connection_retry").inc()
        log.warning(
            "backend connection closed under a reused keep-alive connection; retrying once on a fresh one",
            extra={"backend": replica.url, "error": repr(exc)},
        )

    async def generate(
        self, prompt: str, params: dict[str, Any], prefer: set[str] | None = None
    ) -> Generation:
        tried: set[str] = set()
        stale_retried = False
        while True:
            replica = self.pick(tried, prefer)
            tried.add(replica.url)
            self._count_outstanding(replica, +1)
            started = time.perf_counter()
            try:
                response, version, prefill_top = await replica.client.generate_detailed(
                    prompt, **dict(params)
                )
            except aiohttp.ClientConnectorError as exc:
                self._mark_down(replica, exc)
                continue
            except Exception as exc:
                if _is_stale_connection(exc) and not stale_retried:
                    stale_retried = True
                    tried.discard(replica.url)
                    self._stale(replica, exc)
                    continue
                self.metrics.backend_requests.labels(replica.url, "error").inc()
                raise _translate(exc) from exc
            finally:
                self._count_outstanding(replica, -1)
            self.metrics.backend_requests.labels(replica.url, "ok").inc()
            self.metrics.backend_latency.labels(replica.url).observe(time.perf_counter() - started)
            replica.policy_version = version
            details = response.details
            return Generation(
                text=response.generated_text,
                finish_reason=details.finish_reason.value if details.finish_reason is not None else "length",
                generated_tokens=details.generated_tokens,
                tokens=list(details.tokens or []),
                top_tokens=details.top_tokens,
                policy_version=version,
                backend=replica.url,
                prefill=list(details.prefill or []),
                prefill_top_tokens=prefill_top,
            )

    async def stream(
        self, prompt: str, params: dict[str, Any], prefer: set[str] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Tokens of one choice; a connect failure before the first token moves to another replica."""
        tried: set[str] = set()
        stale_retried = False
        while True:
            replica = self.pick(tried, prefer)
            tried.add(replica.url)
            self._count_outstanding(replica, +1)
            started = False
            try:
                async for response, version in replica.client.generate_stream_versioned(
                    prompt, **dict(params)
                ):
                    started = True
                    replica.policy_version = version
                    yield StreamEvent(response, version, replica.url)
                self.metrics.backend_requests.labels(replica.url, "ok").inc()
                return
            except aiohttp.ClientConnectorError as exc:
                if started:
                    raise _translate(exc) from exc
                self._mark_down(replica, exc)
                continue
            except (BackendError, GeneratorExit, asyncio.CancelledError):
                raise
            except Exception as exc:
                if _is_stale_connection(exc) and not started and not stale_retried:
                    stale_retried = True
                    tried.discard(replica.url)
                    self._stale(replica, exc)
                    continue
                self.metrics.backend_requests.labels(replica.url, "error").inc()
                raise _translate(exc) from exc
            finally:
                self._count_outstanding(replica, -1)
