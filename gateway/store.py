"""Everything the gateway keeps in Redis.

- served completions: ``<prefix>:gateway:completion:<id>`` (JSON, TTL) plus a ``CompletionEvent`` on the
  completions stream, written in one MULTI so both or neither land. A failure here never fails a
  completion: it is logged and counted.
- feedback / demonstrations: one Lua script does "idempotency check, one-per-subject check, XADD,
  remember both", so a retry with the same ``Idempotency-Key`` returns the same event id and never writes
  a second event, a caller's second feedback on the same completion (prompt) is refused (the first one
  wins: ``FeedbackExists``), and a failure leaves nothing half-written (the XADD is the script's first
  write: under ``maxmemory`` Redis refuses it before anything is written).
- per-key rate limits: fixed one-minute windows, several budgets charged at once (requests; generations
  and tokens of completions; feedback), all-or-nothing in one Lua call. When Redis fails the limit does
  **not** fail open: an in-process limiter with the same budgets takes over (``LocalLimiter``; per
  gateway process, so W workers allow up to W × the budget during an outage) and
  ``gateway_rate_limit_fallback_total`` counts it.
- Redis full (``maxmemory`` reached, OOM answers): counted in ``gateway_redis_oom_total`` and shown by the
  ``gateway_redis_full`` gauge (1 until the next write succeeds): the alert to page on.
- Redis refusing a command (NOPERM: the gateway's Redis user lacks it in its ACL, a deployment defect and
  not an outage): ``StorePermissionDenied``, logged as an error naming the command and the user, answered
  500 (the app's handler), never "redis unavailable".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, OutOfMemoryError, RedisError
from redis.retry import Retry

from gateway.metrics import GatewayMetrics
from instructloop.events import CompletionEvent, Event
from instructloop.labeling import excluded_labelers_key
from instructloop.streams import Stream, stream_key

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """Redis is not configured or not reachable; the caller should answer 503 + Retry-After."""


class StorePermissionDenied(Exception):
    """Redis refused a command with NOPERM: the gateway's Redis user is not allowed it (its ACL rules,
    ``launcher/credentials.py`` ``acl_rules`` and ``k8s/base/config/users.acl.template``). Not an outage and
    not the client's fault: the app answers 500 naming the command and the user."""

    def __init__(self, operation: str, command: str, user: str, detail: str):
        self.operation = operation
        self.command = command
        self.user = user
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return (
            f"Redis refused {self.command} to the gateway's Redis user {self.user!r} "
            f"(NOPERM: {self.detail}); "
            "the user's ACL rules lack it, a deployment defect: see launcher/credentials.py acl_rules"
        )


_NOPERM_COMMAND = re.compile(r"run the '([^']+)' command")


def denied_command(exc: BaseException) -> str | None:
    """What Redis refused when ``exc`` is a NOPERM answer (the command, 'a key', 'a channel' or a command of
    a Lua script); None when ``exc`` is something else."""
    text = str(exc)
    if not isinstance(exc, RedisError):
        return None
    if isinstance(exc, NoPermissionError) or text.startswith("NOPERM") or "no permissions" in text:
        found = _NOPERM_COMMAND.search(text)
        if found:
            return found.group(1).upper()
        if "keys" in text or "key " in text:
            return "access to a key"
        if "channel" in text:
            return "access to a channel"
        return "a command"
    if "user executing the script can't run" in text:
        return "a command inside a Lua script"
    return None


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class FeedbackExists(Exception):
    """This caller already gave feedback on this subject (completion + prompt); ``event_id`` is the first."""

    def __init__(self, event_id: str):
        super().__init__(event_id)
        self.event_id = event_id


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write because ``maxmemory`` is reached (``noeviction``)."""
    return isinstance(exc, OutOfMemoryError) or (isinstance(exc, RedisError) and "maxmemory" in str(exc))


@dataclass
class StoredChoice:
    index: int
    text: str
    finish_reason: str | None
    prompt_index: int
    completion_tokens: int


@dataclass
class StoredCompletion:
    """What feedback is validated against."""

    id: str
    caller: str
    prompts: list[str]
    choices: list[StoredChoice]
    policy_version: str
    chat: bool
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredCompletion:
        data = json.loads(raw)
        data["choices"] = [StoredChoice(**c) for c in data["choices"]]
        return cls(**data)


# KEYS[1] stream, KEYS[2] idempotency key ("" = none), KEYS[3] one-per-subject key ("" = none);
# ARGV[1] event JSON, ARGV[2] event id, ARGV[3] request fingerprint, ARGV[4] idempotency TTL s,
# ARGV[5] subject TTL s. Returns {1 written | 0 idempotent replay | 2 subject already rated, event id,
# fingerprint}.
_APPEND_ONCE = """
if KEYS[2] ~= '' then
  local previous = redis.call('GET', KEYS[2])
  if previous then
    local sep = string.find(previous, '|', 1, true)
    return {0, string.sub(previous, 1, sep - 1), string.sub(previous, sep + 1)}
  end
end
if KEYS[3] ~= '' then
  local first = redis.call('GET', KEYS[3])
  if first then return {2, first, ''} end
end
redis.call('XADD', KEYS[1], '*', 'event', ARGV[1])
if KEYS[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2] .. '|' .. ARGV[3], 'EX', tonumber(ARGV[4]))
end
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[2], 'EX', tonumber(ARGV[5]))
end
return {1, ARGV[2], ARGV[3]}
"""


# KEYS: one counter per budget (this window); ARGV[1] window length in seconds, then (amount, limit) per key.
# All-or-nothing: returns 0 when every budget had room (all charged), else the 1-based index of the first
# budget that had none (nothing charged).
_CHARGE_BUDGETS = """
for i, key in ipairs(KEYS) do
  local amount, limit = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if tonumber(redis.call('GET', key) or '0') + amount > limit then return i end
end
for i, key in ipairs(KEYS) do
  local amount = tonumber(ARGV[2 * i])
  if redis.call('INCRBY', key, amount) == amount then redis.call('EXPIRE', key, tonumber(ARGV[1])) end
end
return 0
"""

WINDOW_S = 60


class LocalLimiter:
    """The same fixed-window budgets in this process's memory: the rate limit while Redis fails."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}

    def charge(self, key_id: str, budgets: dict[str, tuple[int, int]], window: int) -> str | None:
        """Charge all budgets or none; the name of the first budget without room, else None."""
        if len(self.counts) > 100_000:  # drop past windows
            self.counts = {k: v for k, v in self.counts.items() if k[2] >= window}
        for name, (amount, limit) in budgets.items():
            if self.counts.get((key_id, name, window), 0) + amount > limit:
                return name
        for name, (amount, _) in budgets.items():
            self.counts[(key_id, name, window)] = self.counts.get((key_id, name, window), 0) + amount
        return None


def fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Store:
    def __init__(
        self,
        url: str | None,
        prefix: str,
        metrics: GatewayMetrics,
        *,
        completion_ttl_s: int,
        idempotency_ttl_s: int,
        timeout_s: float = 1.0,
    ):
        self.url = url
        self.prefix = prefix
        self.metrics = metrics
        self.completion_ttl_s = completion_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.redis: aioredis.Redis | None = None
        self.user = unquote(urlsplit(url).username or "default") if url else "default"
        if url:
            self.redis = aioredis.Redis.from_url(
                url,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            self._append_once = self.redis.register_script(_APPEND_ONCE)
            self._charge_budgets = self.redis.register_script(_CHARGE_BUDGETS)
        self.local_limiter = LocalLimiter()

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, "gateway", *parts))

    def _client(self) -> aioredis.Redis:
        if self.redis is None:
            raise StoreUnavailable("no Redis configured (set INSTRUCTLOOP_GATEWAY_REDIS_URL)")
        return self.redis

    def _failed(self, operation: str, exc: BaseException) -> str:
        """Count a failed Redis operation; returns the reason to tell the client."""
        self.metrics.redis_failures.labels(operation).inc()
        if is_out_of_memory(exc):
            self.metrics.redis_oom.labels(operation).inc()
            self.metrics.redis_full.set(1)
            return "redis is full (maxmemory reached)"
        return "redis unavailable"

    def error(self, operation: str, exc: BaseException) -> StoreUnavailable | StorePermissionDenied:
        """The exception to raise for a failed Redis call: ``StorePermissionDenied`` for NOPERM (logged
        here, as an error naming the command and the user), else ``StoreUnavailable`` with the reason."""
        command = denied_command(exc)
        if command is None:
            return StoreUnavailable(self._failed(operation, exc))
        self.metrics.redis_failures.labels(operation).inc()
        denied = StorePermissionDenied(operation, command, self.user, str(exc))
        log.error(
            "redis refused a command (NOPERM): the gateway's Redis user lacks it in its ACL",
            extra={"operation": operation, "command": command, "redis_user": self.user, "error": str(exc)},
        )
        return denied

    def _wrote(self) -> None:
        self.metrics.redis_full.set(0)

    async def ping(self) -> bool:
        if self.redis is None:
            return False
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    # ---- completions --------------------------------------------------------------------------------
    async def save_completion(
        self, completion: StoredCompletion, events: list[CompletionEvent], *, required: bool = False
    ) -> bool:
        """Keep the completion for feedback and log it to the completions stream. Never raises, unless
        ``required`` (the labeling queue, whose task needs it): then a failure raises ``StoreUnavailable`` or
        ``StorePermissionDenied`` like every other call."""
        if self.redis is None:
            self.metrics.redis_failures.labels("save_completion").inc()
            if required:
                raise StoreUnavailable("no Redis configured (set INSTRUCTLOOP_GATEWAY_REDIS_URL)")
            return False
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(
                    self._key("completion", completion.id), completion.to_json(), ex=self.completion_ttl_s
                )
                for event in events:
                    pipe.xadd(stream_key(Stream.completions, self.prefix), event.to_fields())
                await pipe.execute()
        except (RedisError, OSError) as exc:
            error = self.error("save_completion", exc)
            if required:
                raise error from exc
            log.warning(
                "completion served but not logged (nothing of it written): %s",
                error,
                extra={"completion_id": completion.id, "error": str(exc)},
            )
            return False
        self._wrote()
        self.metrics.completions_logged.inc(len(events))
        return True

    async def get_completion(self, completion_id: str) -> StoredCompletion | None:
        try:
            raw = await self._client().get(self._key("completion", completion_id))
        except (RedisError, OSError) as exc:
            raise self.error("get_completion", exc) from exc
        return StoredCompletion.from_json(raw) if raw is not None else None

    # ---- feedback, demonstrations -------------------------------------------------------------------
    async def append_event(
        self,
        stream: Stream,
        event: Event,
        *,
        idempotency_key: str | None = None,
        caller: str = "",
        request_fingerprint: str = "",
        subject: str | None = None,
    ) -> tuple[str, bool]:
        """XADD ``event`` once. Returns (event id, duplicate). ``subject``: at most one event per (caller,
        subject) is ever written (kept as long as a completion can be rated). Raises StoreUnavailable,
        IdempotencyConflict, FeedbackExists."""
        client = self._client()
        idem = self._key("idempotency", caller, stream.value, idempotency_key) if idempotency_key else ""
        once = self._key("rated", caller, subject) if subject else ""
        try:
            written, event_id, previous_fp = await self._append_once(
                keys=[stream_key(stream, self.prefix), idem, once],
                args=[
                    event.model_dump_json(),
                    event.event_id,
                    request_fingerprint,
                    self.idempotency_ttl_s,
                    self.completion_ttl_s,
                ],
                client=client,
            )
        except (RedisError, OSError) as exc:
            raise self.error(f"append_{stream.value}", exc) from exc
        event_id = event_id.decode() if isinstance(event_id, bytes) else str(event_id)
        previous_fp = previous_fp.decode() if isinstance(previous_fp, bytes) else str(previous_fp)
        if int(written) == 2:
            raise FeedbackExists(event_id)
        if not written and previous_fp != request_fingerprint:
            raise IdempotencyConflict(event_id)
        if written:
            self._wrote()
        return event_id, not written

    async def labeler_excluded(self, key_id: str) -> bool:
        """Whether an admin excluded this key's feedback (``instructloop/labeling.py``). Raises like
        ``append_event``."""
        try:
            return bool(await self._client().hexists(excluded_labelers_key(self.prefix), key_id))
        except (RedisError, OSError) as exc:
            raise self.error("labeler_excluded", exc) from exc

    # ---- rate limits --------------------------------------------------------------------------------
    async def charge(self, key_id: str, budgets: dict[str, tuple[int, int]]) -> tuple[str, int] | None:
        """Charge ``budgets`` ({name: (amount, per-minute limit)}) to ``key_id`` for this minute, all or none.

        Returns None when all had room, else (the budget without room, seconds until the next window).
        Redis failing (down, full, slow) switches to the in-process ``LocalLimiter``: never fails open."""
        now = time.time()
        window = int(now // WINDOW_S)
        wait = max(1, WINDOW_S - int(now) % WINDOW_S)
        names = list(budgets)
        if self.redis is not None:
            try:
                over = int(
                    await self._charge_budgets(
                        keys=[self._key("ratelimit", key_id, name, str(window)) for name in names],
                        args=[WINDOW_S + 1, *[v for name in names for v in budgets[name]]],
                        client=self.redis,
                    )
                )
                return (names[over - 1], wait) if over else None
            except (RedisError, OSError) as exc:
                self.error("rate_limit", exc)  # counted (and a NOPERM logged as an error); never fails open
                self.metrics.rate_limit_fallback.inc()
        refused = self.local_limiter.charge(key_id, budgets, window)
        return (refused, wait) if refused else None

    async def hit_rate_limit(self, key_id: str, limit_per_minute: int) -> int | None:
        """Count one request; return seconds to wait when over the limit, else None."""
        refused = await self.charge(key_id, {"requests": (1, limit_per_minute)})
        return refused[1] if refused else None
