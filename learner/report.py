"""What one ``Learner.round`` did (``instructloop learner once`` prints it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from learner.gate import GateResult
from learner.ingest import IngestStats


@dataclass
class RoundReport:
    """What one ``Learner.round`` did."""

    ingest: IngestStats = field(default_factory=IngestStats)
    sft: str | None = None
    reward: dict[str, float] | None = None
    ppo: dict[str, float] | None = None
    gate: GateResult | None = None
    version: str | None = None
    duration_s: float = 0.0

    @property
    def trained(self) -> bool:
        return bool(self.sft or self.reward or self.ppo or self.gate)


def numeric(stats: dict[str, Any]) -> dict[str, float]:
    """The numbers of a stats dict, as floats (what state records, metrics and the gate take)."""
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}
