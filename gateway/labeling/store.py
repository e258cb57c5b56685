"""What the labeling page keeps in Redis (under ``<prefix>:gateway:labeling:``, read by the gateway only).

| key | type | holds |
|---|---|---|
| ``config`` | string (JSON) | the admin's run-time settings (``LabelingConfig``) |
| ``prompts`` / ``prompt-hashes`` | list / set | the uploaded prompt set, deduplicated by sha256 |
| ``seen:<mode>:<labeler>`` | set | sha256 of every prompt that labeler saw in that mode (never shown twice) |
| ``task:<id>`` | string (JSON, TTL = completion TTL) | mode, labeler, prompt, slot → (completion, choice) |
| ``overlap`` | list | ranking tasks waiting for a second labeler (agreement) |
| ``answer:<completion id>`` | hash | labeler → ranking (choice indices) of a ranked completion (TTL) |
| ``labeler:<key id>`` | hash | per-labeler counters (rankings, comparisons, ..., agree/pairs) |
| ``labelers`` | set | key ids that ever labeled |

Two keys live outside that space because they are spelled in ``instructloop/labeling.py`` (the learner
reads the second): ``<prefix>:labeling:guidelines`` (string, the admin's guidelines text) and
``<prefix>:labeling:excluded`` (hash, labeler key id -> JSON ``{name, by, at, reason}``).

Prompts from live traffic are read from the completions stream (``XREVRANGE``, the newest ``live_window``
entries), never copied: turning live prompts off stops using them at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.labeling.protocol import LabelingConfig
from gateway.store import Store
from instructloop.events import CompletionEvent, Event, Message
from instructloop.labeling import excluded_labelers_key, guidelines_key
from instructloop.streams import Stream, stream_key

log = logging.getLogger(__name__)

LABELING_SOURCE = "labeling"
"""``sampling["source"]`` of the completions the labeling queue generates (not live traffic)."""


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


class LabelingStore:
    def __init__(
        self, store: Store, default_config: LabelingConfig, task_ttl_s: int, live_window: int = 2000
    ):
        self.store = store
        self.prefix = store.prefix
        self.default_config = default_config
        self.task_ttl_s = task_ttl_s
        self.live_window = live_window

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, "gateway", "labeling", *parts))

    def _redis(self) -> aioredis.Redis:
        return self.store._client()

    async def _call(self, operation: str, coro) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise self.store.error(f"labeling_{operation}", exc) from exc

    # ---- config -------------------------------------------------------------------------------------
    async def config(self) -> LabelingConfig:
        raw = await self._call("config", self._redis().get(self._key("config")))
        return LabelingConfig.model_validate_json(raw) if raw else self.default_config

    async def set_config(self, config: LabelingConfig) -> None:
        await self._call("config", self._redis().set(self._key("config"), config.model_dump_json()))

    # ---- prompts ------------------------------------------------------------------------------------
    async def add_prompts(self, prompts: list[str]) -> tuple[int, int]:
        """Append the prompts not uploaded before. Returns (added, total)."""
        redis = self._redis()
        added = 0

        async def work() -> int:
            nonlocal added
            for prompt in prompts:
                if await redis.sadd(self._key("prompt-hashes"), prompt_hash(prompt)):
                    await redis.rpush(self._key("prompts"), prompt)
                    added += 1
            return await redis.llen(self._key("prompts"))

        total = await self._call("prompts", work())
        return added, total

    async def uploaded_count(self) -> int:
        return int(await self._call("prompts", self._redis().llen(self._key("prompts"))))

    async def uploaded_prompts(self, limit: int = 10_000) -> list[str]:
        raw = await self._call("prompts", self._redis().lrange(self._key("prompts"), 0, limit - 1))
        return [p.decode() if isinstance(p, bytes) else p for p in raw]

    async def live_prompts(self) -> dict[str, list[Message] | None]:
        """Distinct prompts of recent live traffic (newest first), without the labeling queue's own: prompt
        (the model input) -> the chat messages it was rendered from (None for ``/v1/completions``)."""
        entries = await self._call(
            "live",
            self._redis().xrevrange(stream_key(Stream.completions, self.prefix), count=self.live_window),
        )
        prompts: dict[str, list[Message] | None] = {}
        for _, fields in entries:
            try:
                event = CompletionEvent.from_fields(fields)
            except ValueError:
                continue
            if event.sampling.get("source") != LABELING_SOURCE:
                prompts.setdefault(event.prompt, event.messages if event.chat else None)
        return prompts

    async def unseen(self, mode: str, labeler: str, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        seen = await self._call(
            "seen",
            self._redis().smismember(self._key("seen", mode, labeler), [prompt_hash(p) for p in prompts]),
        )
        return [p for p, was_seen in zip(prompts, seen, strict=True) if not was_seen]

    async def mark_seen(self, mode: str, labeler: str, prompt: str) -> None:
        await self._call("seen", self._redis().sadd(self._key("seen", mode, labeler), prompt_hash(prompt)))

    # ---- tasks --------------------------------------------------------------------------------------
    async def save_task(self, task: dict[str, Any]) -> None:
        await self._call(
            "task",
            self._redis().set(self._key("task", task["task_id"]), json.dumps(task), ex=self.task_ttl_s),
        )

    async def task(self, task_id: str) -> dict[str, Any] | None:
        raw = await self._call("task", self._redis().get(self._key("task", task_id)))
        return json.loads(raw) if raw else None

    async def delete_task(self, task_id: str) -> None:
        await self._call("task", self._redis().delete(self._key("task", task_id)))

    # ---- overlap and agreement ----------------------------------------------------------------------
    async def offer_overlap(self, item: dict[str, Any]) -> None:
        await self._call("overlap", self._redis().rpush(self._key("overlap"), json.dumps(item)))

    async def take_overlap(self, labeler: str, mode: str = "rank", scan: int = 50) -> dict[str, Any] | None:
        """The oldest waiting overlap item that another labeler ranked and this one has not seen."""
        redis = self._redis()
        raw_items = await self._call("overlap", redis.lrange(self._key("overlap"), 0, scan - 1))
        for raw in raw_items:
            item = json.loads(raw)
            if item["labeler"] == labeler or not await self.unseen(mode, labeler, [item["prompt"]]):
                continue
            if await self._call("overlap", redis.lrem(self._key("overlap"), 1, raw)):
                return item  # removed by us, so no third labeler gets it
        return None

    async def record_answer(
        self, completion_id: str, labeler: str, ranking: list[list[int]]
    ) -> dict[str, list[list[int]]]:
        """Remember this labeler's ranking of a completion; return every ranking of it (labeler → ranking)."""
        redis = self._redis()
        key = self._key("answer", completion_id)

        async def work():
            await redis.hset(key, labeler, json.dumps(ranking))
            await redis.expire(key, self.task_ttl_s)
            return await redis.hgetall(key)

        raw = await self._call("answer", work())
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    # ---- guidelines and excluded labelers (keys of instructloop/labeling.py) -------------------------
    async def guidelines(self) -> str:
        raw = await self._call("guidelines", self._redis().get(guidelines_key(self.prefix)))
        return raw.decode() if isinstance(raw, bytes) else (raw or "")

    async def set_guidelines(self, text: str) -> None:
        await self._call("guidelines", self._redis().set(guidelines_key(self.prefix), text))

    async def excluded(self) -> dict[str, dict[str, Any]]:
        """Excluded labelers: key id -> ``{name, by, at, reason}``."""
        raw = await self._call("excluded", self._redis().hgetall(excluded_labelers_key(self.prefix)))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    async def is_excluded(self, labeler: str) -> bool:
        key = excluded_labelers_key(self.prefix)
        return bool(await self._call("excluded", self._redis().hexists(key, labeler)))

    async def exclude(self, labeler: str, record: dict[str, Any]) -> None:
        key = excluded_labelers_key(self.prefix)
        await self._call("excluded", self._redis().hset(key, labeler, json.dumps(record)))

    async def include(self, labeler: str) -> bool:
        """Take a labeler off the excluded list; False when they were not on it."""
        key = excluded_labelers_key(self.prefix)
        return bool(await self._call("excluded", self._redis().hdel(key, labeler)))

    # ---- per-labeler counters -----------------------------------------------------------------------
    async def count(self, labeler: str, name: str, **increments: int) -> None:
        redis = self._redis()

        async def work():
            async with redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self._key("labelers"), labeler)
                pipe.hset(self._key("labeler", labeler), "name", name)
                for field, amount in increments.items():
                    if amount:
                        pipe.hincrby(self._key("labeler", labeler), field, amount)
                await pipe.execute()

        await self._call("counts", work())

    async def labeler(self, labeler: str) -> dict[str, str]:
        """One labeler's counters (rankings, comparisons, demonstrations, ...; empty when they never
        labeled)."""
        raw = await self._call("counts", self._redis().hgetall(self._key("labeler", labeler)))
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }

    async def labelers(self) -> dict[str, dict[str, str]]:
        redis = self._redis()

        async def work():
            ids = sorted(
                x.decode() if isinstance(x, bytes) else x for x in await redis.smembers(self._key("labelers"))
            )
            rows = {}
            for key_id in ids:
                raw = await redis.hgetall(self._key("labeler", key_id))
                rows[key_id] = {
                    (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in raw.items()
                }
            return rows

        return await self._call("counts", work())

    # ---- streams, read back for the dashboard -------------------------------------------------------
    async def read_stream(
        self, stream: Stream, event_type: type[Event], count: int
    ) -> list[tuple[float, Event]]:
        """The newest ``count`` entries of a stream, oldest first, as (entry time in s, event)."""
        entries = await self._call(
            "dashboard", self._redis().xrevrange(stream_key(stream, self.prefix), count=count)
        )
        events = []
        for entry_id, fields in reversed(entries):
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                events.append((int(entry_id.split("-")[0]) / 1000.0, event_type.from_fields(fields)))
            except ValueError:
                continue
        return events
