"""The admin dashboard's data, read from what is already recorded: the policies stream (every version's
status change with its gate metrics and reason), the comparisons and demonstrations streams (feedback
volume; A/B votes between two versions give the live win-rates) and the per-labeler counters."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from gateway.labeling.protocol import Dashboard, LabelerStats, LiveWinRate, PolicyPoint, VolumeBucket
from gateway.labeling.store import LabelingStore
from instructloop.events import ComparisonEvent, DemonstrationEvent, PolicyEvent
from instructloop.registry import Registry
from instructloop.streams import Stream
from instructloop.wire import BASE_VERSION

POLICY_EVENTS = 500
FEEDBACK_EVENTS = 5000
BUCKETS = 24


def volume_buckets(comparisons: list[float], demonstrations: list[float], now: float) -> list[VolumeBucket]:
    """Feedback counts in up to ``BUCKETS`` equal time buckets (whole minutes) ending now."""
    times = comparisons + demonstrations
    if not times:
        return []
    span = max(60.0, now - min(times))
    width = 60.0 * max(1, int(span / BUCKETS / 60.0 + 0.999))
    start = now - width * min(BUCKETS, int(span / width) + 1)
    buckets = [VolumeBucket(start=start + i * width) for i in range(int((now - start) / width + 0.5))]
    for field, values in (("comparisons", comparisons), ("demonstrations", demonstrations)):
        for t in values:
            index = min(len(buckets) - 1, max(0, int((t - start) / width)))
            setattr(buckets[index], field, getattr(buckets[index], field) + 1)
    return buckets


def orient(a: str, b: str) -> tuple[str, str]:
    """(version, against) for a pair: the base model is always ``against``, else the later name is
    ``version``."""
    if a == BASE_VERSION or (b != BASE_VERSION and b > a):
        return b, a
    return a, b


def live_win_rates(events: list[ComparisonEvent]) -> list[LiveWinRate]:
    """Per pair of versions, the A/B votes between a response of each (ties counted apart)."""
    tallies: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for event in events:
        if event.source != "ab" or len(event.policy_versions) != 2 or len(set(event.policy_versions)) != 2:
            continue
        version, against = orient(*event.policy_versions)
        tally = tallies[(version, against)]
        if len(event.ranking) == 1:
            tally[2] += 1
        else:
            winner = event.policy_versions[event.ranking[0][0]]
            tally[0 if winner == version else 1] += 1
    return [
        LiveWinRate(
            version=v, against=a, wins=w, losses=lo, ties=t, win_rate=(w / (w + lo)) if w + lo else None
        )
        for (v, a), (w, lo, t) in sorted(tallies.items())
    ]


async def build_dashboard(store: LabelingStore, registry: Registry, now: float) -> Dashboard:
    policies = await store.read_stream(Stream.policies, PolicyEvent, POLICY_EVENTS)
    comparisons = await store.read_stream(Stream.comparisons, ComparisonEvent, FEEDBACK_EVENTS)
    demonstrations = await store.read_stream(Stream.demonstrations, DemonstrationEvent, FEEDBACK_EVENTS)
    labelers = []
    excluded = await store.excluded()
    rows = await store.labelers()
    for key_id, record in excluded.items():  # excluded before they ever labeled: listed too
        rows.setdefault(key_id, {"name": record.get("name") or ""})
    for key_id, row in rows.items():
        counts = {k: int(v) for k, v in row.items() if k != "name" and v.lstrip("-").isdigit()}
        pairs = counts.pop("pairs", 0)
        agree = counts.pop("agree", 0)
        labelers.append(
            LabelerStats(
                key_id=key_id,
                name=row.get("name", ""),
                excluded=key_id in excluded,
                agreement=(agree / pairs) if pairs else None,
                agreement_pairs=pairs,
                **{k: v for k, v in counts.items() if k in LabelerStats.model_fields},
            )
        )
    return Dashboard(
        config=await store.config(),
        guidelines=await store.guidelines(),
        current=await asyncio.to_thread(registry.current),
        policies=[
            PolicyPoint(time=t, version=e.version, status=e.status.value, reason=e.reason, metrics=e.metrics)
            for t, e in policies
        ],
        labelers=labelers,
        volume=volume_buckets([t for t, _ in comparisons], [t for t, _ in demonstrations], now),
        live_win_rates=live_win_rates([e for _, e in comparisons]),
        uploaded_prompts=await store.uploaded_count(),
    )
