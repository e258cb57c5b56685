"""Why the learner is not training: each step that waits, what it waits for, and the knob that changes it.

``waits`` is computed from the dataset and the learner state (no model is loaded). The loop logs the
reasons whenever they change, ``instructloop learner status`` prints them, and the ``learner_waiting``
gauge holds how many more items each step needs (0 when it does not wait).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

ENV_PREFIX = "INSTRUCTLOOP_LEARNER_"

STEPS = ("reward_model", "ppo", "gate")
"""The steps that can wait (the ``step`` label of ``learner_waiting``)."""


@dataclass(frozen=True)
class Wait:
    """One step that waits: it has ``have`` of the ``need``
    items; ``knob`` is the setting that moves ``need``."""

    step: str
    have: int
    need: int
    knob: str
    message: str

    @property
    def missing(self) -> int:
        return max(0, self.need - self.have)

    def as_dict(self) -> dict:
        return asdict(self)


def rm_readiness(settings, state) -> tuple[bool, str]:
    """``learner.reward.rm_ready`` on the current RM's held-out accuracy (``state``) at the configured
    ``RewardConfig.ready_confidence``: whether PPO may start on it, and why."""
    from learner.reward import rm_ready
    from learner.settings import resolve_learner_config

    metrics = {"heldout_accuracy": state.rm_heldout_accuracy, "heldout_pairs": state.rm_heldout_pairs}
    return rm_ready(metrics, resolve_learner_config(settings).reward.ready_confidence)


def waits(settings, dataset, state, has_reward_model: bool) -> list[Wait]:
    """The steps that cannot run now, with what they need (an empty list: nothing waits on data)."""
    out: list[Wait] = []
    new_comparisons = dataset.count_new_comparisons(state.rm_cursor)
    if new_comparisons < settings.min_new_comparisons:
        knob = ENV_PREFIX + "MIN_NEW_COMPARISONS"
        out.append(
            Wait(
                "reward_model",
                new_comparisons,
                settings.min_new_comparisons,
                knob,
                f"reward model update waits for {settings.min_new_comparisons} new training comparisons "
                f"(has {new_comparisons}; rank more completions or lower {knob})",
            )
        )
    prompts = dataset.count_prompts()
    if prompts < settings.min_prompts:
        knob = ENV_PREFIX + "MIN_PROMPTS"
        out.append(
            Wait(
                "ppo",
                prompts,
                settings.min_prompts,
                knob,
                f"PPO round waits for {settings.min_prompts} distinct training prompts (has {prompts}; send "
                f"completions on more prompts or lower {knob})",
            )
        )
    elif not has_reward_model and not state.pending_candidate:
        knob = ENV_PREFIX + "MIN_NEW_COMPARISONS"
        out.append(Wait("ppo", 0, 1, knob, f"PPO round waits for the first reward model update (see {knob})"))
    elif state.rm_comparisons_trained < settings.min_rm_comparisons and not state.pending_candidate:
        knob = ENV_PREFIX + "MIN_RM_COMPARISONS"
        out.append(
            Wait(
                "ppo",
                state.rm_comparisons_trained,
                settings.min_rm_comparisons,
                knob,
                f"PPO round waits for a reward model trained on {settings.min_rm_comparisons} comparisons "
                f"(it has seen {state.rm_comparisons_trained}; rank more completions or lower {knob})",
            )
        )
    elif not state.pending_candidate and not (readiness := rm_readiness(settings, state))[0]:
        knob = ENV_PREFIX + "REWARD"
        out.append(
            Wait(
                "ppo",
                0,
                1,
                knob,
                f"PPO round waits for a reward model confidently better than chance: {readiness[1]} (rank "
                f"more completions, or set ready_confidence in {knob})",
            )
        )
    elif state.rm_updates <= state.ppo_rm_update and not state.pending_candidate:
        fresh = dataset.count_new_prompts(state.ppo_prompt_cursor)
        if state.ppo_rounds_on_rm >= settings.max_rounds_per_rm_update:
            knob = ENV_PREFIX + "MAX_ROUNDS_PER_RM_UPDATE"
            out.append(
                Wait(
                    "ppo",
                    state.ppo_rounds_on_rm,
                    settings.max_rounds_per_rm_update,
                    knob,
                    f"PPO round waits for the next reward model update: {state.ppo_rounds_on_rm} rounds ran "
                    f"on this one, the most {knob} allows (rank more completions)",
                )
            )
        elif fresh < settings.min_prompts:
            knob = ENV_PREFIX + "MIN_PROMPTS"
            out.append(
                Wait(
                    "ppo",
                    fresh,
                    settings.min_prompts,
                    knob,
                    f"PPO round waits for new data since round {state.ppo_rounds}: a reward model update or "
                    f"{settings.min_prompts} prompts never served before (has {fresh}; lower {knob})",
                )
            )
    heldout = dataset.count_split_prompts(heldout=True)
    if heldout < settings.gate_min_prompts:
        knob = ENV_PREFIX + "GATE_MIN_PROMPTS"
        out.append(
            Wait(
                "gate",
                heldout,
                settings.gate_min_prompts,
                knob,
                f"PPO rounds wait: the gate needs {settings.gate_min_prompts} held-out prompts to judge a "
                f"candidate on and has {heldout} (the split holds out up to {settings.heldout_min_prompts}, "
                f"one in 4 distinct prompts: 8 prompts give 2; send more prompts or lower {knob})",
            )
        )
    return out


def report_waits(metrics, now: list[Wait], before: list[Wait]) -> list[Wait]:
    """Log ``now`` when the reasons changed since ``before``; set the ``learner_waiting`` gauge (0 for the
    steps that stopped waiting). Returns ``now``."""
    if [w.message for w in now] != [w.message for w in before]:
        for wait in now:
            log.info(
                "learner waiting",
                extra={
                    "step": wait.step,
                    "have": wait.have,
                    "need": wait.need,
                    "knob": wait.knob,
                    "reason": wait.message,
                },
            )
    for wait in before:
        metrics.waiting.labels(wait.step, wait.knob).set(0)
    for wait in now:
        metrics.waiting.labels(wait.step, wait.knob).set(wait.missing)
    return now
