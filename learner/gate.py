"""The promotion gate: a pure decision over the held-out evaluations of a candidate and the incumbent.

A candidate is promoted only if, on held-out prompts scored by the current reward model,

1. its mean RM score beats the incumbent's by more than ``min_reward_gain``, less ``reward_tolerance_se``
   standard errors of the per-prompt difference (a step too small for the held-out prompts to tell apart
   from noise is not rejected; one they show to be worse is);
2. its KL to the reference policy stays under ``kl_ceiling``;
3. where live comparisons ranked responses of both versions (at least ``min_live_comparisons`` pairs),
   its live win-rate against the incumbent is at least ``min_win_rate``.

Non-finite metrics fail the gate. Every check adds a reason, passed or not, so a decision explains itself.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class GateConfig:
    min_reward_gain: float = 0.0
    """The candidate's mean RM score must exceed the incumbent's by more than this."""
    reward_tolerance_se: float = 1.0
    """Standard errors of the paired per-prompt score difference (``paired_standard_error``) by which the
    gain may fall short of ``min_reward_gain`` and still pass. The gate's few held-out prompts judge one PPO
    round's small step noisily: on the default model at margin 0 without it, two of three candidates of a
    run were rejected by less than their noise (one by 0.10 RM units of a 15-unit score gap) and the served
    version stood still for the rest of the run (docs/benchmarks.md). 0: the gain itself must clear the
    margin."""
    kl_ceiling: float = 5.0
    """The candidate's KL to the reference (nats per response, as ``evaluate_policy`` reports) must stay below."""
    min_live_comparisons: int = 20
    """Live (winner, loser) pairs between the two versions needed before the win-rate check applies."""
    min_win_rate: float = 0.5
    """Live win-rate of the candidate against the incumbent that it must reach, when the check applies."""

    def __post_init__(self) -> None:
        if self.kl_ceiling <= 0:
            raise ValueError("kl_ceiling must be positive")
        if not 0.0 <= self.min_win_rate <= 1.0:
            raise ValueError("min_win_rate must be within [0, 1]")
        if not self.reward_tolerance_se >= 0:
            raise ValueError(f"reward_tolerance_se must be >= 0, got {self.reward_tolerance_se}")
        if self.min_live_comparisons < 1:
            raise ValueError("min_live_comparisons must be at least 1")


@dataclass(frozen=True)
class GateResult:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    held_back_by: str | None = None
    """The pinned current version that kept a candidate which passed the gate from being promoted."""

    def hold_back(self, pinned: str) -> GateResult:
        """This result for a candidate that passed the gate while ``pinned`` is pinned: held back, not promoted."""
        return replace(
            self,
            promote=False,
            held_back_by=pinned,
            reasons=[*self.reasons, f"held back: {pinned} is pinned by an admin"],
        )

    def summary(self) -> str:
        head = "held back: " if self.held_back_by else "promoted: " if self.promote else "rejected: "
        return head + "; ".join(self.reasons)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def paired_standard_error(candidate: Sequence[float], incumbent: Sequence[float]) -> float:
    """Standard error of the mean of ``candidate[i] - incumbent[i]`` (both policies' scores on the same
    prompts, in order): sample standard deviation / sqrt(n); 0 for fewer than two prompts."""
    if len(candidate) != len(incumbent):
        raise ValueError(f"{len(candidate)} candidate scores but {len(incumbent)} incumbent scores")
    if len(candidate) < 2:
        return 0.0
    return statistics.stdev(c - i for c, i in zip(candidate, incumbent, strict=True)) / math.sqrt(
        len(candidate)
    )


def gate_decision(
    candidate: Mapping[str, float],
    incumbent: Mapping[str, float],
    config: GateConfig,
    live_win_rate: tuple[float, int] | None = None,
    reward_gain_se: float = 0.0,
) -> GateResult:
    """Decide whether ``candidate`` replaces ``incumbent``.

    ``candidate`` / ``incumbent``: held-out evaluations (``evaluate_policy`` output) with at least
    ``reward_mean`` and ``kl``. ``live_win_rate``: (candidate's win-rate over the incumbent, pairs) from
    live comparisons, or None when unknown. ``reward_gain_se``: ``paired_standard_error`` of the two
    policies' per-prompt scores (0: the gain is taken as exact).
    """
    reward_c = candidate.get("reward_mean")
    reward_i = incumbent.get("reward_mean")
    kl_c = candidate.get("kl")
    metrics: dict[str, float] = {}
    for prefix, evaluation in (("candidate", candidate), ("incumbent", incumbent)):
        for name, value in evaluation.items():
            if isinstance(value, int | float):
                metrics[f"{prefix}_{name}"] = float(value)
    reasons: list[str] = []
    promote = True

    if not (_finite(reward_c) and _finite(reward_i)):
        promote = False
        reasons.append(f"reward is not finite (candidate {reward_c}, incumbent {reward_i})")
    else:
        gain = reward_c - reward_i
        needed = config.min_reward_gain - config.reward_tolerance_se * reward_gain_se
        metrics["reward_gain"], metrics["reward_gain_se"], metrics["reward_gain_needed"] = (
            gain,
            reward_gain_se,
            needed,
        )
        bar = (
            f"{needed:.4f} (margin {config.min_reward_gain} less {config.reward_tolerance_se} × standard error "
            f"{reward_gain_se:.4f})"
            if needed != config.min_reward_gain
            else f"{config.min_reward_gain}"
        )
        if gain > needed:
            reasons.append(f"reward {reward_c:.4f} against incumbent {reward_i:.4f}: gain {gain:.4f} > {bar}")
        else:
            promote = False
            reasons.append(
                f"reward {reward_c:.4f} does not beat incumbent {reward_i:.4f}: gain {gain:.4f} <= {bar}"
            )

    if not _finite(kl_c):
        promote = False
        reasons.append(f"KL to the reference is not finite ({kl_c})")
    elif kl_c < config.kl_ceiling:
        reasons.append(f"KL {kl_c:.4f} under ceiling {config.kl_ceiling}")
    else:
        promote = False
        reasons.append(f"KL {kl_c:.4f} is not under ceiling {config.kl_ceiling}")

    if live_win_rate is not None:
        rate, pairs = live_win_rate
        metrics["live_win_rate"], metrics["live_pairs"] = float(rate), float(pairs)
        if pairs < config.min_live_comparisons:
            reasons.append(f"live win-rate not checked ({pairs} < {config.min_live_comparisons} pairs)")
        elif rate >= config.min_win_rate:
            reasons.append(f"live win-rate {rate:.3f} >= {config.min_win_rate} over {pairs} pairs")
        else:
            promote = False
            reasons.append(f"live win-rate {rate:.3f} < {config.min_win_rate} over {pairs} pairs")

    return GateResult(promote=promote, reasons=reasons, metrics=metrics)
