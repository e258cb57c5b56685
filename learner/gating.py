"""The gate step of the loop: judge the pending candidate on held-out (prompt, seed) pairs against the
incumbent, the base and the best version so far (the decision itself: ``learner/gate.py``), publish it, and
restart the working policy from the incumbent after ``restart_after_rejections`` rejections in a row that
found it drifted (worse than a compared version, past the KL ceiling, losing live); a candidate rejected
only for not yet beating the incumbent breaks the row: PPO's progress of a few rounds is not measurable
in one gate, and restarting would throw it away.

Functions of the ``Learner`` (``learner/loop.py``), as ``learner/live_gate.py``'s: they read its dataset,
models, registry and state, and end with its checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from instructloop.events import PolicyStatus
from instructloop.wire import BASE_VERSION
from learner.admin import pinned_version
from learner.dataset import TrafficPrompt
from learner.gate import GateResult, gate_decision, merge_evaluations, worth_more_samples
from learner.publish import publish_candidate

if TYPE_CHECKING:
    from learner.loop import Learner

log = logging.getLogger(__name__)


def gate_queries(learner: Learner) -> list[TrafficPrompt]:
    """The gate's (prompt, sample) pairs: the first ``eval_prompts`` held-out prompts (fixed once that many
    exist, so the compared versions' samples are reused gate after gate), each repeated so that there are
    at least ``GateConfig.samples`` pairs; the seeds follow the position (``sample_policy``)."""
    queries = learner.dataset.heldout_queries(learner.settings.eval_prompts)
    if not queries:
        return []
    repeats = math.ceil(learner.gate_config.samples / len(queries))
    return [query for query in queries for _ in range(repeats)]


def decided_before_crash(learner: Learner, version: str) -> tuple[str, GateResult] | None:
    """A learner killed while publishing left the candidate with its final status in the registry:
    reuse that decision (re-evaluating could compare the candidate against itself once current)."""
    if not learner.registry.exists(version):
        return None
    manifest = learner.registry.manifest(version)
    if manifest.status not in (PolicyStatus.promoted, PolicyStatus.rejected):
        return None
    result = GateResult(
        promote=manifest.status == PolicyStatus.promoted,
        reasons=[manifest.reason or "decided before a restart"],
        metrics=dict(manifest.metrics),
    )
    return manifest.parent or BASE_VERSION, result


def gate_and_publish(learner: Learner) -> GateResult | None:
    """Evaluate the pending candidate against the incumbent on held-out prompts; promote or reject it."""
    version = learner.state.pending_candidate
    if version is None:
        return None
    trainer = learner._ppo_trainer()
    decided = decided_before_crash(learner, version)
    queries = [] if decided else gate_queries(learner)
    incumbent_version = decided[0] if decided else (learner.registry.current() or BASE_VERSION)
    log.info(
        "gate started",
        extra={"candidate": version, "incumbent": incumbent_version, "pairs": len(queries)},
    )
    with learner.metrics.step_seconds.labels("evaluate").time():
        if decided:
            result = decided[1]
        elif queries:
            result, incumbent_version = judge(learner, version, trainer.policy, queries)
        else:
            result = GateResult(promote=False, reasons=["no held-out prompts to evaluate on"])
    result.metrics.update(
        {"ppo_round": float(learner.state.ppo_rounds), "rm_update": float(learner.state.rm_updates)}
    )
    if (
        learner.state.rm_heldout_accuracy is not None
    ):  # the admin dashboard charts it from the policies stream
        result.metrics["rm_heldout_accuracy"] = float(learner.state.rm_heldout_accuracy)
    with learner.metrics.step_seconds.labels("publish").time():
        parent = None if incumbent_version == BASE_VERSION else incumbent_version
        publish_candidate(
            learner.registry,
            version,
            trainer.policy,
            learner.tokenizer,
            result,
            parent=parent,
            base_model=learner.settings.model,
            write=learner.models.write_candidate,
        )
    outcome = "promotions" if result.promote else "held_back" if result.held_back_by else "rejections"
    setattr(learner.state, outcome, getattr(learner.state, outcome) + 1)
    getattr(learner.metrics, outcome).inc()
    restart = None
    if outcome == "rejections" and result.drifted:
        learner.state.consecutive_rejections += 1
        if learner.state.consecutive_rejections >= learner.settings.restart_after_rejections:
            restart = learner.registry.current() or BASE_VERSION
    else:  # promoted, held back, or merely not yet shown better: the working policy is not drifting away
        learner.state.consecutive_rejections = 0
    for policy in ("candidate", "incumbent"):
        if f"{policy}_reward_mean" in result.metrics:
            learner.metrics.reward.labels(policy).set(result.metrics[f"{policy}_reward_mean"])
        if f"{policy}_kl" in result.metrics:
            learner.metrics.kl.labels(policy).set(result.metrics[f"{policy}_kl"])
    learner.state.incumbent = learner.registry.current()
    learner.state.pending_candidate = None
    learner.state.candidate_listed_at = None
    learner.state.record(
        {
            "kind": "gate",
            "version": version,
            "promote": result.promote,
            "held_back_by": result.held_back_by,
            "drifted": result.drifted,
            "reasons": result.reasons,
            **result.metrics,
        }
    )
    policy = learner.models.policy_from_version(learner.registry, restart) if restart else None
    if policy is not None:
        log.info(
            "the working policy restarts from the incumbent",
            extra={
                "incumbent": restart,
                "rejections": learner.state.consecutive_rejections,
                "knob": "INSTRUCTLOOP_LEARNER_RESTART_AFTER_REJECTIONS",
            },
        )
        learner.state.record(
            {"kind": "restart", "to": restart, "rejections": learner.state.consecutive_rejections}
        )
        learner.state.consecutive_rejections = 0
        learner.store.save(
            learner.state, models={"policy": (policy, learner.models.part_tokenizer)}, optimizers={"ppo": {}}
        )
        learner._trainer = None
    else:
        learner.store.save(learner.state)
    log.info(
        "gate done",
        extra={
            "version": version,
            "promote": result.promote,
            "drifted": result.drifted,
            "consecutive_rejections": learner.state.consecutive_rejections,
            "reasons": result.reasons,
        },
    )
    return result


EXTRA_SEED = 1_000_003
"""Seed offset of the pairs a gate adds (``worth_more_samples``): other draws than the first pairs'."""


def judge(learner: Learner, version: str, policy, queries: list[TrafficPrompt]) -> tuple[GateResult, str]:
    """Sample the candidate, the incumbent, the base and the best version so far on the same (prompt,
    seed) pairs, score them with the current RM, decide (``gate_decision``) and note the new best version.
    When the decision is open (``worth_more_samples``), sample every version on more pairs (other seeds) up
    to ``GateConfig.max_samples`` and decide again on all of them. Returns the result and the incumbent's
    version."""
    config = learner.config.evaluation
    stages = [(queries, config)]
    judged = judge_pairs(learner, policy, queries, config)
    result = decide(learner, version, judged)
    if worth_more_samples(result, learner.gate_config, len(queries)):
        extra = learner.gate_config.max_samples - len(queries)
        log.info(
            "gate undecided: sampling more pairs",
            extra={
                "candidate": version,
                "pairs": len(queries),
                "more_pairs": extra,
                "reward_gain": result.metrics.get("reward_gain"),
                "reward_gain_se": result.metrics.get("reward_gain_se"),
                "knob": "INSTRUCTLOOP_LEARNER_GATE_MAX_SAMPLES",
            },
        )
        more = [queries[i % len(queries)] for i in range(extra)]  # the first pairs' prompts again, in turn
        more_config = replace(config, seed=config.seed + EXTRA_SEED)
        stages.append((more, more_config))
        judged = merge_judged(judged, judge_pairs(learner, policy, more, more_config))
        result = decide(learner, version, judged)
        result.metrics["gate_extended"] = 1.0
    means = judged.means()
    if result.promote:  # the candidate is the next incumbent: its samples are already made
        means[version] = judged.candidate["reward_mean"]
        for (stage_queries, stage_config), samples in zip(stages, judged.candidate_samples, strict=True):
            learner.models.remember_samples(
                version,
                [q.text for q in stage_queries],
                stage_config,
                samples,
                [q.max_tokens for q in stage_queries],
            )
    learner.state.best_version = max(means, key=means.__getitem__)
    result.metrics["best_version_reward_mean"] = means[learner.state.best_version]
    result.metrics["gate_pairs"] = float(len(judged.candidate["scores"]))
    return result, judged.incumbent_version


@dataclass
class Judged:
    """Every compared version's evaluation (``score_samples``) on the same pairs, in the same order."""

    incumbent_version: str
    candidate: dict
    incumbent: dict
    floors: dict[str, dict] = field(default_factory=dict)
    """The base's and the best version's evaluations, by version (those that are not the incumbent)."""
    candidate_samples: list = field(default_factory=list)
    """The candidate's ``PolicySamples``, one per stage (kept as the next incumbent's when promoted)."""

    def means(self) -> dict[str, float]:
        """Mean score of every compared version but the candidate, by version."""
        means = {self.incumbent_version: self.incumbent["reward_mean"]}
        means.update({name: evaluation["reward_mean"] for name, evaluation in self.floors.items()})
        return means


def judge_pairs(learner: Learner, policy, queries: list[TrafficPrompt], config) -> Judged:
    """Sample and score the candidate (``policy``), the incumbent, the base and the best version so far on
    ``queries`` under ``config`` (versions' seeded samples come from the models' cache where kept)."""
    from learner.evaluate import sample_policy, score_samples

    texts, lengths = [q.text for q in queries], [q.max_tokens for q in queries]
    current = learner.registry.current() or BASE_VERSION
    incumbent_version, incumbent = learner.models.version_samples(
        learner.registry, current, texts, config, lengths
    )
    candidate = sample_policy(policy, learner.reference, learner.tokenizer, texts, config, lengths)
    judged = Judged(
        incumbent_version,
        score_samples(candidate, learner.reward_model, config),
        score_samples(incumbent, learner.reward_model, config),
        candidate_samples=[candidate],
    )
    best = learner.state.best_version
    for other in dict.fromkeys([BASE_VERSION, best]):
        if (
            other is None
            or other == incumbent_version
            or not (other == BASE_VERSION or learner.registry.exists(other))
        ):
            continue
        loaded, samples = learner.models.version_samples(learner.registry, other, texts, config, lengths)
        judged.floors[loaded] = score_samples(samples, learner.reward_model, config)
    return judged


def merge_judged(first: Judged, second: Judged) -> Judged:
    """``first`` and ``second``'s pairs as one judgement (the same versions, the pairs of both)."""
    floors = {
        name: merge_evaluations(first.floors[name], second.floors[name])
        for name in first.floors
        if name in second.floors
    }
    return Judged(
        first.incumbent_version,
        merge_evaluations(first.candidate, second.candidate),
        merge_evaluations(first.incumbent, second.incumbent),
        floors,
        candidate_samples=[*first.candidate_samples, *second.candidate_samples],
    )


def decide(learner: Learner, version: str, judged: Judged) -> GateResult:
    """``gate_decision`` on ``judged``, with the live win-rate and an admin pin."""
    result = gate_decision(
        judged.candidate,
        judged.incumbent,
        learner.gate_config,
        live_win_rate=learner.dataset.live_win_rate(version, judged.incumbent_version),
        floors={name: evaluation["scores"] for name, evaluation in judged.floors.items()},
    )
    pinned = pinned_version(learner.registry)
    if result.promote and pinned:
        result = result.hold_back(pinned)
    return result
