"""Answering for a named policy version (TGI's ``parameters.adapter_id``).

``PolicyVersions`` resolves a requested version name to a loaded, validated ``PolicyModel``:

- no name: ``None`` (the engine uses the version that is active when the request is admitted);
- the active version's name: that policy, pinned (a swap between submit and admission does not change
  what answers);
- ``base``: the base model;
- any other name: from an LRU of the ``max_loaded_versions`` most recently used versions, else loaded from
  the registry in a worker thread (one load per version however many requests wait for it) with the same
  validation as a hot-swap. A version that is not in the registry is ``UnknownVersion`` (404), one that
  fails validation ``RefusedVersion`` (422); neither is ever served.

The LRU holds ``PolicyModel``s: for an adapter version a few MB of LoRA tensors, for a full-weight version
a whole model (size ``max_loaded_versions`` with that in mind). The engine keeps a version's module (or
its attached adapter) while it is active, has running sequences, or is in this LRU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict

from instructloop.events import validate_version_name
from instructloop.registry import InvalidCheckpoint
from instructloop.wire import BASE_VERSION
from serve.engine import Engine
from serve.model import PolicyModel

log = logging.getLogger(__name__)


class UnknownVersion(LookupError):
    """The requested version does not exist (or this server has no registry)."""


class RefusedVersion(ValueError):
    """The requested version exists but failed validation: it is never served."""


class LoadedVersions:
    """A thread-safe LRU of loaded policy versions (the engine asks which to keep)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._policies: OrderedDict[str, PolicyModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: str) -> PolicyModel | None:
        with self._lock:
            policy = self._policies.get(version)
            if policy is not None:
                self._policies.move_to_end(version)
            return policy

    def put(self, policy: PolicyModel) -> None:
        with self._lock:
            self._policies[policy.version] = policy
            self._policies.move_to_end(policy.version)
            while len(self._policies) > self.capacity:
                evicted, _ = self._policies.popitem(last=False)
                log.info(
                    "policy version evicted from the loaded-versions cache", extra={"policy_version": evicted}
                )

    def versions(self) -> set[str]:
        with self._lock:
            return set(self._policies)

    def policies(self) -> list[PolicyModel]:
        with self._lock:
            return list(self._policies.values())


class PolicyVersions:
    def __init__(self, engine: Engine, base: PolicyModel, loaded: LoadedVersions, loader=None):
        self.engine = engine
        self.base = base
        self.loaded = loaded
        self.loader = loader
        """``serve.swap.PolicyLoader``; None when the server has no registry (only ``base`` and the active
        version can be named then)."""
        self._loading: dict[str, asyncio.Future[PolicyModel]] = {}

    async def resolve(self, version: str | None) -> PolicyModel | None:
        if version is None:
            return None
        active = self.engine.active_policy
        if version == active.version:
            return active
        if version == BASE_VERSION:
            return self.base
        policy = self.loaded.get(version)
        if policy is not None:
            return policy
        try:
            validate_version_name(version)
        except ValueError as exc:
            raise UnknownVersion(f"{version!r} is not a policy version name: {exc}") from exc
        if self.loader is None:
            raise UnknownVersion(
                f"policy version {version} is unknown: this server has no registry "
                f"(it serves {active.version!r} and {BASE_VERSION!r})"
            )
        if not self.loader.registry.exists(version):
            raise UnknownVersion(f"policy version {version} is not in the registry")
        pending = self._loading.get(version)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._load, version))
            self._loading[version] = pending
            pending.add_done_callback(lambda _: self._loading.pop(version, None))
        return await asyncio.shield(pending)

    def _load(self, version: str) -> PolicyModel:
        log.info(
            "loading a requested policy version",
            extra={"policy_version": version, "serving": self.engine.active_version},
        )
        try:
            policy = self.loader.load(version)
        except (InvalidCheckpoint, OSError, ValueError) as exc:
            log.error(
                "requested policy version refused; it is never served",
                extra={"policy_version": version, "error": str(exc)},
            )
            raise RefusedVersion(f"policy version {version} is not servable: {exc}") from exc
        self.loaded.put(policy)
        return policy
