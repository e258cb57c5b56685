"""Serving for the policy admin routes: list versions, promote, pin, roll back.

Writes go through ``instructloop.registry.Registry`` (the ``CURRENT`` file, the one pointer serve follows;
a best-effort notification and ``PolicyEvent`` through Redis). Registry calls are blocking (file I/O,
sha256 of the weights), so they run in a worker thread. A change works with Redis down (a manual rollback
during an outage): replicas see it at their next poll of ``CURRENT``, and nothing undoes it when Redis
returns.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.auth import Principal
from gateway.protocol import APIError, PolicyInfo, PolicyList
from gateway.settings import Settings
from instructloop.events import PolicyStatus, validate_version_name
from instructloop.registry import InvalidCheckpoint, Manifest, Registry

log = logging.getLogger(__name__)


class PolicyAdminServing:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = None
        if settings.redis_url:
            import redis

            self.redis = redis.Redis.from_url(
                settings.redis_url,
                socket_connect_timeout=settings.redis_timeout_s,
                socket_timeout=settings.redis_timeout_s,
            )
        self.registry = Registry(settings.registry_dir, redis=self.redis, prefix=settings.stream_prefix)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    def _info(self, manifest: Manifest, current: str | None) -> PolicyInfo:
        return PolicyInfo(
            version=manifest.version,
            status=manifest.status.value,
            current=manifest.version == current,
            parent=manifest.parent,
            created_at=manifest.created_at,
            sha256=manifest.sha256,
            metrics=manifest.metrics,
            reason=manifest.reason,
        )

    async def list_policies(self) -> PolicyList:
        def work() -> PolicyList:
            current = self.registry.current()
            return PolicyList(
                current=current, data=[self._info(m, current) for m in self.registry.list_versions()]
            )

        return await asyncio.to_thread(work)

    def _check_version(self, version: str) -> APIError | None:
        try:
            validate_version_name(version)
        except ValueError as exc:
            return APIError(400, str(exc), param="version", code="invalid_version")
        if not self.registry.exists(version):
            return APIError(
                404,
                f"policy version {version!r} does not exist in the registry",
                param="version",
                code="policy_not_found",
            )
        return None

    async def set_current(
        self, version: str, status: PolicyStatus, principal: Principal, reason: str | None
    ) -> PolicyInfo | APIError:
        def work() -> PolicyInfo | APIError:
            error = self._check_version(version)
            if error is not None:
                return error
            try:
                manifest = self.registry.set_current(
                    version, status=status, reason=reason or f"{status.value} by {principal.name}"
                )
            except InvalidCheckpoint as exc:
                return APIError(
                    409, f"policy version {version} cannot be served: {exc}", code="invalid_checkpoint"
                )
            log.info(
                "policy changed by admin",
                extra={"version": version, "status": status.value, "admin": principal.key_id},
            )
            return self._info(manifest, version)

        return await asyncio.to_thread(work)

    async def rollback(
        self, to: str | None, principal: Principal, reason: str | None
    ) -> PolicyInfo | APIError:
        def work() -> PolicyInfo | APIError:
            current = self.registry.current()
            target = to
            if target is None:
                earlier = [
                    m
                    for m in self.registry.list_versions()
                    if m.version != current and m.status in (PolicyStatus.promoted, PolicyStatus.pinned)
                ]
                if not earlier:
                    return APIError(
                        409,
                        "there is no earlier promoted version to roll back to; name one with 'to'",
                        param="to",
                        code="nothing_to_roll_back_to",
                    )
                target = earlier[-1].version
            error = self._check_version(target)
            if error is not None:
                return error
            if target == current:
                return APIError(
                    409, f"{target} is already the current version", param="to", code="already_current"
                )
            why = reason or f"rolled back from {current} by {principal.name}"
            try:
                manifest = self.registry.set_current(target, status=PolicyStatus.promoted, reason=why)
            except InvalidCheckpoint as exc:
                return APIError(
                    409, f"policy version {target} cannot be served: {exc}", code="invalid_checkpoint"
                )
            if current and self.registry.exists(current):
                self.registry.set_status(current, PolicyStatus.rolled_back, reason=why)
            log.info("policy rolled back", extra={"from": current, "to": target, "admin": principal.key_id})
            return self._info(manifest, target)

        return await asyncio.to_thread(work)
