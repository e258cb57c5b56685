"""Publishing a gated candidate to the registry.

Every candidate that reached the gate gets a registry folder (weights, tokenizer, manifest with the gate
metrics and its parent), written as ``candidate``. Then:

- promoted: ``Registry.set_current`` verifies it, points ``CURRENT`` + the Redis key at it, publishes on the
  change channel (serve hot-swaps) and appends a ``promoted`` ``PolicyEvent`` to the policies stream;
- held back (it passed the gate, but an admin pinned the current version): ``held_back``, with the pin as
  the reason; never made current by the learner (an admin may promote it);
- rejected: ``Registry.set_status(rejected, reason=…)`` marks the manifest and appends a ``rejected``
  ``PolicyEvent`` with the metrics and the reasons. A rejected folder is kept for inspection (and to
  reserve its version number); the learner never makes it current.

``publish`` is idempotent per version, so a learner killed half-way through publishing and restarted
with the same pending version finishes the job instead of failing on an existing folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from instructloop.events import PolicyStatus
from instructloop.registry import Manifest, Registry
from learner.gate import GateResult

log = logging.getLogger(__name__)


def publish_candidate(
    registry: Registry,
    version: str,
    policy: Any,
    tokenizer: Any,
    result: GateResult,
    *,
    parent: str | None,
    base_model: str | None = None,
    write: Callable[..., Manifest] | None = None,
) -> Manifest:
    """Write ``policy`` as ``version`` and promote or reject it according to ``result``.

    ``write(registry, version, policy, **manifest_fields)`` writes the folder (default: full weights +
    tokenizer, ``Registry.write_pretrained``; the learner passes ``LearnerModels.write_candidate``, which
    writes an adapter version in lora mode)."""
    if registry.exists(version):
        manifest = registry.manifest(version)
        log.info("candidate already in the registry (resumed publish)", extra={"version": version})
    else:
        fields = {
            "parent": parent,
            "metrics": result.metrics,
            "status": PolicyStatus.candidate,
            "base_model": base_model,
        }
        if write is None:
            manifest = registry.write_pretrained(version, policy, tokenizer, **fields)
        else:
            manifest = write(registry, version, policy, **fields)
    reason = result.summary()
    if result.promote:
        if registry.current() != version or manifest.status != PolicyStatus.promoted:
            manifest = registry.set_current(version, status=PolicyStatus.promoted, reason=reason)
        log.info(
            "candidate promoted", extra={"version": version, "parent": parent, "metrics": result.metrics}
        )
    elif result.held_back_by:
        if manifest.status != PolicyStatus.held_back:
            manifest = registry.set_status(
                version, PolicyStatus.held_back, metrics=result.metrics, reason=reason
            )
        log.info(
            "candidate held back by a pin",
            extra={"version": version, "pinned": result.held_back_by, "metrics": result.metrics},
        )
    else:
        if manifest.status != PolicyStatus.rejected:
            manifest = registry.set_status(
                version, PolicyStatus.rejected, metrics=result.metrics, reason=reason
            )
        log.info(
            "candidate rejected", extra={"version": version, "parent": parent, "reasons": result.reasons}
        )
    return manifest
