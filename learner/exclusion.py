"""Labelers an admin excluded (``instructloop/labeling.py``): their comparisons never train the reward model.

The gateway keeps the excluded labeler ids in a Redis hash and refuses their new feedback; the learner reads
the hash before each reward-model update and leaves every comparison whose ``labeler_id`` is in it out of
that update's training and held-out sets, so events they gave before the exclusion (already in the
dataset, or still in the stream) stop training the RM as well. What earlier updates learned from them stays
in the RM's weights until it is trained again from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from instructloop.events import ComparisonEvent
from instructloop.labeling import excluded_labelers_key


def excluded_labelers(redis: Any, prefix: str) -> frozenset[str]:
    """The excluded labeler ids (HKEYS of the hash; Redis errors propagate like any other read)."""
    return frozenset(
        k.decode() if isinstance(k, bytes) else str(k) for k in redis.hkeys(excluded_labelers_key(prefix))
    )


def without_excluded(
    comparisons: Iterable[ComparisonEvent], excluded: frozenset[str]
) -> list[ComparisonEvent]:
    """``comparisons`` less those given by an excluded labeler (order kept)."""
    return [c for c in comparisons if c.labeler_id not in excluded]
