"""Everything the gateway keeps in Redis.

- served completions: ``<prefix>:gateway:completion:<id>`` (JSON, TTL) plus a ``CompletionEvent`` on the
  completions stream, written in one MULTI so both or neither land. A failure here never fails a
  completion: it is logged and counted.
- feedback / demonstrations: one Lua script does "idempotency check, XADD, remember the key", so a retry
  with the same ``Idempotency-Key`` returns the same event id and never writes a second event, and a
  failure leaves nothing half-written.
- per-key rate limit: a fixed one-minute window (INCR, EXPIRE on the first hit; one Lua call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gateway.metrics import GatewayMetrics
from instructloop.events import CompletionEvent, Event
from instructloop.streams import Stream, stream_key

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """Redis is not configured or not reachable; the caller should answer 503 + Retry-After."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


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


# KEYS[1] stream, KEYS[2] idempotency key ("" = none); ARGV[1] event JSON, ARGV[2] event id,
# ARGV[3] request fingerprint, ARGV[4] TTL seconds. Returns {written (0/1), event id, fingerprint}.
_APPEND_ONCE = """
if KEYS[2] ~= '' then
  local previous = redis.call('GET', KEYS[2])
  if previous then
    local sep = string.find(previous, '|', 1, true)
    return {0, string.sub(previous, 1, sep - 1), string.sub(previous, sep + 1)}
  end
end
redis.call('XADD', KEYS[1], '*', 'event', ARGV[1])
if KEYS[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2] .. '|' .. ARGV[3], 'EX', tonumber(ARGV[4]))
end
return {1, ARGV[2], ARGV[3]}
"""


# KEYS[1] the window's counter; ARGV[1] window length in seconds. One round trip: count, set the expiry once.
_COUNT_IN_WINDOW = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
return count
"""


def fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Store:
    def __init__(self, url: str | None, prefix: str, metrics: GatewayMetrics, *, completion_ttl_s: int,
                 idempotency_ttl_s: int, timeout_s: float = 1.0):
        self.url = url
        self.prefix = prefix
        self.metrics = metrics
        self.completion_ttl_s = completion_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.redis: aioredis.Redis | None = None
        if url:
            self.redis = aioredis.Redis.from_url(
                url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
            )
            self._append_once = self.redis.register_script(_APPEND_ONCE)
            self._count_in_window = self.redis.register_script(_COUNT_IN_WINDOW)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, "gateway", *parts))

    def _client(self) -> aioredis.Redis:
        if self.redis is None:
            raise StoreUnavailable("no Redis configured (set INSTRUCTLOOP_GATEWAY_REDIS_URL)")
        return self.redis

    async def ping(self) -> bool:
        if self.redis is None:
            return False
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    # ---- completions --------------------------------------------------------------------------------
    async def save_completion(self, completion: StoredCompletion, events: list[CompletionEvent]) -> bool:
        """Keep the completion for feedback and log it to the completions stream. Never raises."""
        if self.redis is None:
            self.metrics.redis_failures.labels("save_completion").inc()
            return False
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key("completion", completion.id), completion.to_json(), ex=self.completion_ttl_s)
                for event in events:
                    pipe.xadd(stream_key(Stream.completions, self.prefix), event.to_fields())
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.labels("save_completion").inc()
            log.warning("completion not logged: redis unavailable",
                        extra={"completion_id": completion.id, "error": str(exc)})
            return False
        self.metrics.completions_logged.inc(len(events))
        return True

    async def get_completion(self, completion_id: str) -> StoredCompletion | None:
        try:
            raw = await self._client().get(self._key("completion", completion_id))
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.labels("get_completion").inc()
            raise StoreUnavailable(str(exc)) from exc
        return StoredCompletion.from_json(raw) if raw is not None else None

    # ---- feedback, demonstrations -------------------------------------------------------------------
    async def append_event(self, stream: Stream, event: Event, *, idempotency_key: str | None = None,
                           caller: str = "", request_fingerprint: str = "") -> tuple[str, bool]:
        """XADD ``event`` once. Returns (event id, duplicate). Raises StoreUnavailable, IdempotencyConflict."""
        client = self._client()
        idem = self._key("idempotency", caller, stream.value, idempotency_key) if idempotency_key else ""
        try:
            written, event_id, previous_fp = await self._append_once(
                keys=[stream_key(stream, self.prefix), idem],
                args=[event.model_dump_json(), event.event_id, request_fingerprint, self.idempotency_ttl_s],
                client=client,
            )
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.labels(f"append_{stream.value}").inc()
            raise StoreUnavailable(str(exc)) from exc
        event_id = event_id.decode() if isinstance(event_id, bytes) else str(event_id)
        previous_fp = previous_fp.decode() if isinstance(previous_fp, bytes) else str(previous_fp)
        if not written and previous_fp != request_fingerprint:
            raise IdempotencyConflict(event_id)
        return event_id, not written

    # ---- rate limit ---------------------------------------------------------------------------------
    async def hit_rate_limit(self, key_id: str, limit_per_minute: int) -> int | None:
        """Count one request; return seconds to wait when over the limit, else None. Redis down: allow."""
        if self.redis is None:
            return None
        window = int(time.time() // 60)
        key = self._key("ratelimit", key_id, str(window))
        try:
            count = int(await self._count_in_window(keys=[key], args=[61], client=self.redis))
        except (RedisError, OSError):
            self.metrics.redis_failures.labels("rate_limit").inc()
            return None
        if count > limit_per_minute:
            return max(1, 60 - int(time.time()) % 60)
        return None
