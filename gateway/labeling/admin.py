"""Serving for the labeling admin routes: run-time settings, the guidelines text, excluding a labeler, the
uploaded prompt set (``gateway/routes/label.py``; the dashboard's data is ``dashboard.py``)."""

from __future__ import annotations

import logging
import time

from gateway.auth import Principal
from gateway.labeling.protocol import (
    Exclusion,
    ExclusionRequest,
    Guidelines,
    LabelingConfig,
    PromptsUploaded,
    PromptUpload,
)
from gateway.labeling.serving import storage_unavailable
from gateway.labeling.store import LabelingStore
from gateway.protocol import APIError
from gateway.settings import Settings
from gateway.store import StoreUnavailable

log = logging.getLogger(__name__)


class LabelingAdminServing:
    def __init__(self, settings: Settings, store: LabelingStore):
        self.settings = settings
        self.store = store

    def _unavailable(self, reason: StoreUnavailable | None = None) -> APIError:
        return storage_unavailable(self.settings, reason)

    async def config(self) -> LabelingConfig | APIError:
        try:
            return await self.store.config()
        except StoreUnavailable as exc:
            return self._unavailable(exc)

    async def set_config(self, config: LabelingConfig, principal: Principal) -> LabelingConfig | APIError:
        try:
            await self.store.set_config(config)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        log.info("labeling config changed", extra={"admin": principal.key_id, "config": config.model_dump()})
        return config

    async def guidelines(self) -> Guidelines | APIError:
        try:
            return Guidelines(text=await self.store.guidelines())
        except StoreUnavailable as exc:
            return self._unavailable(exc)

    async def set_guidelines(self, body: Guidelines, principal: Principal) -> Guidelines | APIError:
        text = body.text.strip()
        try:
            await self.store.set_guidelines(text)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        log.info("labeling guidelines changed", extra={"admin": principal.key_id, "chars": len(text)})
        return Guidelines(text=text)

    async def exclude(
        self, key_id: str, body: ExclusionRequest, principal: Principal
    ) -> Exclusion | APIError:
        """Exclude a labeler: the gateway refuses their feedback from now on and the learner leaves all their
        comparisons, past and future, out of its next reward-model updates (``instructloop/labeling.py``)."""
        if key_id == principal.key_id:
            return APIError(409, "an admin cannot exclude their own key", param="key_id", code="own_key")
        try:
            name = (await self.store.labeler(key_id)).get("name", "")
            record = {"name": name, "by": principal.key_id, "at": time.time(), "reason": body.reason}
            await self.store.exclude(key_id, record)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        log.warning(
            "labeler excluded: feedback refused, comparisons left out of reward-model training",
            extra={"labeler": key_id, "admin": principal.key_id, "reason": body.reason},
        )
        return Exclusion(key_id=key_id, excluded=True, **record)

    async def include(self, key_id: str, principal: Principal) -> Exclusion | APIError:
        try:
            was = await self.store.include(key_id)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        if not was:
            return APIError(
                404, f"labeler {key_id!r} is not excluded", param="key_id", code="labeler_not_excluded"
            )
        log.warning("labeler included again", extra={"labeler": key_id, "admin": principal.key_id})
        return Exclusion(key_id=key_id, excluded=False)

    async def upload_prompts(self, upload: PromptUpload, principal: Principal) -> PromptsUploaded | APIError:
        too_long = next((p for p in upload.prompts if len(p) > self.settings.max_prompt_chars), None)
        if too_long is not None:
            return APIError(
                400,
                f"a prompt is longer than {self.settings.max_prompt_chars} characters",
                param="prompts",
                code="prompt_too_long",
            )
        prompts = [p for p in (p.strip() for p in upload.prompts) if p]
        try:
            added, total = await self.store.add_prompts(prompts)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        log.info(
            "labeling prompts uploaded", extra={"admin": principal.key_id, "added": added, "total": total}
        )
        return PromptsUploaded(added=added, total=total)
