"""The promotion gate: a pure decision over paired held-out scores of a candidate and the versions it must
not fall below.

The learner samples every policy on the same held-out (prompt, seed) pairs at the served temperature
(``EvalConfig``; at least ``GateConfig.samples`` pairs) and scores them with the current reward model,
whose scores are normalised to the reference policy's samples (mean 0, std 1). A candidate is promoted only if

1. it beats the incumbent: its mean gain exceeds ``min_reward_gain`` (a near-copy is not promoted on a coin
   flip), or the one-sided ``confidence`` lower bound of the gain is above 0 (a small gain measured surely:
   versions sampled with the same seeds pair closely, so a gain of a few hundredths can be certain);
2. against the incumbent, and against the base and the best version so far where those are other versions,
   the one-sided ``confidence`` lower bound of the mean paired gain clears ``-margin`` (it is not shown to be
   worse by more than ``margin``, so the served policy cannot drift down step by step);
3. its KL to the reference policy stays under ``kl_ceiling``;
4. where live comparisons ranked responses of both versions (at least ``min_live_comparisons`` pairs),
   its live win-rate against the incumbent is at least ``min_win_rate``.

Non-finite metrics fail the gate. Every check adds a reason, passed or not, so a decision explains itself.
A rejection is ``drifted`` when the candidate is surely worse than a compared version (the ``confidence``
upper bound of its gain is below 0), is past the KL ceiling, lost live, or is not finite: only those count
towards restarting the working policy (``learner/gating.py``); a candidate whose bounds are merely too loose
to clear ``-margin`` is not shown worse, and keeps training. ``worth_more_samples`` says when a decision is
open enough that the learner samples up to ``max_samples`` pairs and decides again on all of them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class GateConfig:
    samples: int = 32
    """(prompt, sample) pairs the gate judges on, at least: each held-out prompt is sampled
    ``ceil(samples / prompts)`` times, with the same seeds for every version (fewer give no usable bound)."""
    max_samples: int = 96
    """Pairs the gate extends to when the first ``samples`` leave a candidate with a positive mean gain
    undecided (``worth_more_samples``): where answers diverge early, paired seeds hardly pair and the
    standard error at 32 pairs hides a real gain; ``samples`` = never extend."""
    confidence: float = 0.95
    """One-sided confidence of the lower bound on the mean gain (normal quantile: 1.645 standard errors);
    with ``margin`` and 32 pairs, an equal candidate passes about one gate in ten."""
    margin: float = 0.1
    """δ, in normalised RM units (the reference's sample std): how far below a compared version the
    lower bound may reach and still pass; a tenth of the spread between answers is within what an
    RM update moves."""
    min_reward_gain: float = 0.05
    """The candidate's mean gain over the incumbent must exceed this (normalised RM units), unless the gain's
    lower bound is above 0: half of ``margin``, so a candidate that hardly differs from the incumbent does
    not replace it on a coin flip."""
    sure_gain_suffices: bool = True
    """A gain under ``min_reward_gain`` still beats the incumbent when its lower bound is above 0; False: the
    minimum always binds (a test that wants every promotion to be a step of a given size)."""
    kl_ceiling: float = 10.0
    """The candidate's KL to the reference (nats per response, as ``evaluate_policy`` reports) must stay
    below: a wall far past where PPO's β keeps a healthy policy, against a policy that left the RM's data."""
    min_live_comparisons: int = 20
    """Live (winner, loser) pairs between the two versions needed before the win-rate check applies."""
    min_win_rate: float = 0.5
    """Live win-rate of the candidate against the incumbent that it must reach, when the check applies."""

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"GateConfig.samples must be at least 2, got {self.samples}")
        if self.max_samples < self.samples:
            raise ValueError(
                f"GateConfig.max_samples ({self.max_samples}) must be at least samples ({self.samples})"
            )
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"GateConfig.confidence must be within [0.5, 1), got {self.confidence}")
        if not self.margin >= 0:
            raise ValueError(f"GateConfig.margin must be >= 0, got {self.margin}")
        if self.kl_ceiling <= 0:
            raise ValueError("GateConfig.kl_ceiling must be positive")
        if not 0.0 <= self.min_win_rate <= 1.0:
            raise ValueError("GateConfig.min_win_rate must be within [0, 1]")
        if self.min_live_comparisons < 1:
            raise ValueError("GateConfig.min_live_comparisons must be at least 1")

    @property
    def z(self) -> float:
        """Standard errors between the mean gain and its lower bound."""
        return statistics.NormalDist().inv_cdf(self.confidence)


@dataclass(frozen=True)
class GateResult:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    held_back_by: str | None = None
    """The pinned current version that kept a candidate which passed the gate from being promoted."""
    drifted: bool = False
    """The candidate is surely worse than a compared version (upper confidence bound of the gain below 0), is
    past the KL ceiling, lost the live comparisons or has non-finite metrics: evidence that the working policy
    moved away, not merely that its gain is not measured closely enough yet."""

    def hold_back(self, pinned: str) -> GateResult:
        """This result for a candidate that passed the gate
        while ``pinned`` is pinned: held back, not promoted."""
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
    """Standard error of the mean of ``candidate[i] - incumbent[i]`` (two policies' scores on the same
    (prompt, seed) pairs, in order): sample standard deviation / sqrt(n); 0 for fewer than two pairs."""
    if len(candidate) != len(incumbent):
        raise ValueError(f"{len(candidate)} candidate scores but {len(incumbent)} incumbent scores")
    if len(candidate) < 2:
        return 0.0
    return statistics.stdev(c - i for c, i in zip(candidate, incumbent, strict=True)) / math.sqrt(
        len(candidate)
    )


def gain_lower_bound(candidate: Sequence[float], other: Sequence[float], config: GateConfig) -> float:
    """One-sided ``config.confidence`` lower bound of the mean paired gain ``candidate - other``
    (mean - z · ``paired_standard_error``); -inf for fewer than two pairs (nothing bounds the noise)."""
    if len(candidate) < 2:
        return -math.inf
    gain = statistics.fmean(candidate) - statistics.fmean(other)
    return gain - config.z * paired_standard_error(candidate, other)


def gate_decision(
    candidate: Mapping[str, float | list[float]],
    incumbent: Mapping[str, float | list[float]],
    config: GateConfig,
    live_win_rate: tuple[float, int] | None = None,
    floors: Mapping[str, Sequence[float]] | None = None,
) -> GateResult:
    """Decide whether ``candidate`` replaces ``incumbent``.

    ``candidate`` / ``incumbent``: held-out evaluations (``evaluate_policy`` output) with ``reward_mean``,
    ``kl`` and ``scores`` (per (prompt, seed) pair, the same pairs in the same order). ``floors``: the same
    pairs' scores of other versions the candidate must not fall below (``base``, the best version so far) by
    name. ``live_win_rate``: (candidate's win-rate over the incumbent, pairs) from live comparisons, or None.
    """
    reward_c = candidate.get("reward_mean")
    reward_i = incumbent.get("reward_mean")
    scores_c = list(candidate.get("scores") or [])
    kl_c = candidate.get("kl")
    metrics: dict[str, float] = {}
    for prefix, evaluation in (("candidate", candidate), ("incumbent", incumbent)):
        for name, value in evaluation.items():
            if isinstance(value, int | float):
                metrics[f"{prefix}_{name}"] = float(value)
    reasons: list[str] = []
    promote = True
    drifted = False

    if not (_finite(reward_c) and _finite(reward_i)):
        promote, drifted = False, True
        reasons.append(f"reward is not finite (candidate {reward_c}, incumbent {reward_i})")
    else:
        gain = reward_c - reward_i
        metrics["reward_gain"] = gain
        paired = list(incumbent.get("scores") or [])
        sure = (
            config.sure_gain_suffices
            and len(paired) == len(scores_c)
            and gain_lower_bound(scores_c, paired, config) > 0
        )
        if gain > config.min_reward_gain:
            reasons.append(
                f"reward {reward_c:.4f} against incumbent {reward_i:.4f}: "
                f"gain {gain:.4f} > {config.min_reward_gain}"
            )
        elif sure:
            reasons.append(
                f"reward {reward_c:.4f} against incumbent {reward_i:.4f}: gain {gain:.4f}, "
                f"{config.confidence:.0%} surely above 0"
            )
        else:
            promote = False
            reasons.append(
                f"reward {reward_c:.4f} does not beat incumbent {reward_i:.4f}: gain {gain:.4f} <= "
                f"{config.min_reward_gain} and not surely above 0"
            )

    if len(scores_c) < config.samples:
        promote = False
        reasons.append(f"judged on {len(scores_c)} (prompt, sample) pairs, fewer than {config.samples}")
    compared = {"incumbent": list(incumbent.get("scores") or []), **(floors or {})}
    for name, scores in compared.items():
        if len(scores) != len(scores_c):
            promote = False
            reasons.append(f"{len(scores)} scores of {name} for {len(scores_c)} of the candidate")
            continue
        bound = gain_lower_bound(scores_c, scores, config)
        se = paired_standard_error(scores_c, scores)
        metrics[f"gain_lower_bound_{name}"] = bound
        if name == "incumbent":
            metrics["reward_gain_se"] = se
        head = f"{config.confidence:.0%} lower bound of the gain over {name} {bound:.4f}"
        if bound > -config.margin:
            reasons.append(f"{head} > -{config.margin}")
        else:
            promote = False
            reasons.append(f"{head} <= -{config.margin}: not shown within the margin of {name}")
        upper = bound + 2 * config.z * se  # the interval is symmetric about the mean gain
        if len(scores_c) >= 2 and upper < 0:
            drifted = True
            reasons.append(
                f"{config.confidence:.0%} upper bound of the gain over {name} {upper:.4f} < 0: worse"
            )

    if not _finite(kl_c):
        promote, drifted = False, True
        reasons.append(f"KL to the reference is not finite ({kl_c})")
    elif kl_c < config.kl_ceiling:
        reasons.append(f"KL {kl_c:.4f} under ceiling {config.kl_ceiling}")
    else:
        promote, drifted = False, True
        reasons.append(f"KL {kl_c:.4f} is not under ceiling {config.kl_ceiling}")

    if live_win_rate is not None:
        rate, pairs = live_win_rate
        metrics["live_win_rate"], metrics["live_pairs"] = float(rate), float(pairs)
        if pairs < config.min_live_comparisons:
            reasons.append(f"live win-rate not checked ({pairs} < {config.min_live_comparisons} pairs)")
        elif rate >= config.min_win_rate:
            reasons.append(f"live win-rate {rate:.3f} >= {config.min_win_rate} over {pairs} pairs")
        else:
            promote, drifted = False, True
            reasons.append(f"live win-rate {rate:.3f} < {config.min_win_rate} over {pairs} pairs")

    return GateResult(promote=promote, reasons=reasons, metrics=metrics, drifted=drifted)


def worth_more_samples(result: GateResult, config: GateConfig, pairs: int) -> bool:
    """Whether the gate should sample up to ``config.max_samples`` pairs and decide again: the candidate was
    judged on ``pairs`` < ``max_samples`` pairs, was neither promoted nor drifted, and gained on the
    incumbent on average (a candidate that lost on average is not worth the time)."""
    gain = result.metrics.get("reward_gain")
    return (
        pairs < config.max_samples
        and not result.promote
        and not result.drifted
        and gain is not None
        and math.isfinite(gain)
        and gain > 0
    )


def merge_evaluations(
    first: Mapping[str, float | list[float]], second: Mapping[str, float | list[float]]
) -> dict:
    """One evaluation (``score_samples``'s keys) of one policy from two on disjoint pairs: ``scores``
    concatenated (first's pairs first), ``reward_mean`` / ``reward_std`` of all of them, ``kl``,
    ``eos_rate`` and ``length_mean`` weighted by each part's ``n``, ``n`` and ``duration_s`` summed."""
    scores = [*first["scores"], *second["scores"]]
    n_first, n_second = float(first["n"]), float(second["n"])
    merged: dict = {
        "reward_mean": statistics.fmean(scores),
        "reward_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "n": n_first + n_second,
        "scores": scores,
        "duration_s": float(first.get("duration_s", 0.0)) + float(second.get("duration_s", 0.0)),
    }
    for name in ("kl", "eos_rate", "length_mean"):
        if name in first and name in second:
            merged[name] = (float(first[name]) * n_first + float(second[name]) * n_second) / (
                n_first + n_second
            )
    return merged
