"""Which model ids a caller can name (``GET /v1/models``, the ``model`` field of both completion routes).

- ``served_model_name`` (``instructloop``): the current version, whatever it is when the request arrives
  (no ``adapter_id`` is sent; serve answers with its active version).
- a version name from the registry (``v0007``): that version, through serve's ``adapter_id`` (serve loads it
  next to the base if it does not hold it). Only versions that were served as current are listed and
  accepted: ``promoted`` or ``pinned`` ones, and the current one. Candidates, rejected, rolled-back and
  held-back versions are not (404 ``model_not_found``, as for any unknown model).
- ``base``: the base model the learner started from (serve always holds it).

A version name is what ``X-Policy-Version`` and ``policy_version`` report, so a caller can pin the version
that answered by sending it back as ``model``. The registry is read in a worker thread (file I/O) per listing
and per request that names a version.
"""

from __future__ import annotations

import asyncio

from gateway.backend import Backend
from gateway.protocol import APIError, ModelCard, ModelList
from gateway.settings import Settings
from instructloop.events import PolicyStatus, validate_version_name
from instructloop.registry import InvalidCheckpoint, Manifest, Registry
from instructloop.wire import BASE_VERSION

SELECTABLE_STATUSES = frozenset({PolicyStatus.promoted, PolicyStatus.pinned})
"""Registry statuses whose versions a caller can name (besides the current version)."""


class ModelCatalog:
    def __init__(self, settings: Settings, backend: Backend, started: int):
        self.settings = settings
        self.backend = backend
        self.started = started
        self.registry = Registry(settings.registry_dir)

    def _selectable(self, manifest: Manifest, current: str | None) -> bool:
        return manifest.status in SELECTABLE_STATUSES or manifest.version == current

    def _current_card(self) -> ModelCard:
        versions = {r.policy_version for r in self.backend.healthy() if r.policy_version}
        return ModelCard(
            id=self.settings.served_model_name,
            created=self.started,
            policy_version=versions.pop() if len(versions) == 1 else None,
        )

    def _version_card(self, manifest: Manifest) -> ModelCard:
        return ModelCard(
            id=manifest.version, created=int(manifest.created_at), policy_version=manifest.version
        )

    async def list_models(self) -> ModelList:
        """The current-version alias first, then ``base``, then the selectable versions, oldest first."""

        def work() -> list[ModelCard]:
            current = self.registry.current()
            return [
                self._version_card(m) for m in self.registry.list_versions() if self._selectable(m, current)
            ]

        base = ModelCard(id=BASE_VERSION, created=self.started, policy_version=BASE_VERSION)
        return ModelList(data=[self._current_card(), base, *await asyncio.to_thread(work)])

    async def card(self, model: str) -> ModelCard | APIError:
        version = await self.resolve(model)
        if isinstance(version, APIError):
            return version
        if version is None:
            return self._current_card()
        if version == BASE_VERSION:
            return ModelCard(id=BASE_VERSION, created=self.started, policy_version=BASE_VERSION)
        return self._version_card(await asyncio.to_thread(self.registry.manifest, version))

    async def resolve(self, model: str) -> str | None | APIError:
        """The ``adapter_id`` that answers for ``model``: None for the current version, a version name, or a
        404 ``model_not_found`` that lists what can be named."""
        if model == self.settings.served_model_name:
            return None
        if model == BASE_VERSION:
            return BASE_VERSION

        def selectable() -> bool:
            validate_version_name(model)
            try:
                return self._selectable(self.registry.manifest(model), self.registry.current())
            except InvalidCheckpoint:
                return False

        try:
            if await asyncio.to_thread(selectable):
                return model
        except ValueError:
            pass
        return APIError(
            404,
            f"The model '{model}' does not exist; name '{self.settings.served_model_name}' (the current "
            f"version), '{BASE_VERSION}', or a promoted version (GET /v1/models lists them).",
            param="model",
            code="model_not_found",
        )
