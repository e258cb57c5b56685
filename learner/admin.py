"""Admin decisions bind the learner: a pinned current version is never replaced, and after a rollback the
working policy restarts from the version rolled back to.

- ``pinned_version``: the current version when its manifest says ``pinned`` (``POST /v1/admin/policies/
  {version}/pin``). The learner still trains, gates and publishes candidates, but one that passes the gate
  is recorded as ``held_back`` (reason: the pin) instead of being made current.
- ``rollbacks_since``: the ``rolled_back`` events of the policies stream past the learner's cursor (an admin
  rolled back since the learner last looked). The learner then drops its working policy and continues from
  the version now current (``Learner.follow_rollback``), so the next candidate descends from what is
  served, not from the line the admin rejected.
"""

from __future__ import annotations

import logging

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from instructloop.wire import BASE_VERSION

log = logging.getLogger(__name__)


def pinned_version(registry: Registry) -> str | None:
    """The current version if an admin pinned it, else None."""
    current = registry.current()
    if not current or current == BASE_VERSION or not registry.exists(current):
        return None
    return current if registry.manifest(current).status == PolicyStatus.pinned else None


def rollbacks_since(redis, prefix: str, cursor: str) -> tuple[list[str], str]:
    """Versions rolled back by an admin (``rolled_back`` policy events) after stream id ``cursor``, oldest
    first, and the new cursor (the last policy event read)."""
    entries = redis.xrange(stream_key(Stream.policies, prefix), min=f"({cursor}" if cursor != "0-0" else "-")
    rolled_back = []
    for entry_id, fields in entries:
        cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            event = PolicyEvent.from_fields(fields)
        except ValueError:
            continue
        if event.status == PolicyStatus.rolled_back:
            rolled_back.append(event.version)
    return rolled_back, cursor


def follow_rollback(learner) -> str | None:
    """Read the policy events past the learner's cursor; after an admin rollback, save the version now
    current as the working policy (fresh PPO optimizer state) and return it. None: nothing to follow."""
    state = learner.state
    rolled_back, cursor = rollbacks_since(
        learner.redis, learner.settings.stream_prefix, state.policy_events_cursor
    )
    if cursor == state.policy_events_cursor:
        return None
    state.policy_events_cursor = cursor  # saved with the next checkpoint; re-reading is harmless
    if not rolled_back:
        return None
    target = learner.registry.current() or BASE_VERSION
    policy = learner.models.policy_from_version(learner.registry, target)
    if policy is None:
        return None
    log.info(
        "rolled back by an admin: the working policy restarts from the version rolled back to",
        extra={"rolled_back": rolled_back, "to": target, "dropped_candidate": state.pending_candidate},
    )
    state.record(
        {
            "kind": "rollback",
            "rolled_back": rolled_back,
            "to": target,
            "dropped_candidate": state.pending_candidate,
        }
    )
    state.incumbent = target
    state.pending_candidate = None  # trained on the line the admin rolled back
    learner.store.save(state, models={"policy": (policy, learner.tokenizer)}, optimizers={"ppo": {}})
    return target
