"""The learner's training state and its atomic checkpoints.

A checkpoint is one folder ``<state_dir>/checkpoints/ckpt-<step>/``::

    state.json          counters, the dataset cursor, the incumbent, a pending candidate, recent rounds
    policy/             the working policy (safetensors + config + tokenizer), once PPO has run
    value/              the value model, once PPO has run
    reward/             the reward model, once it has been trained
    optimizers/*.pt     optimizer state dicts (tensors only; loaded with ``weights_only=True``)

It is written under ``.tmp-…``, every file and folder fsync'ed, then renamed into place (and the parent
fsync'ed): a reader, or a learner restarted after SIGKILL, sees either the whole checkpoint or none of
it. The newest ``ckpt-*`` is the state. A model that did not change since the previous checkpoint is
hard-linked from it rather than rewritten (files in a checkpoint are never modified in place, so the
link is as good as a copy).

Events are made exactly-once by the dataset (commit, then ack, dedup by ``event_id``); training is made
exactly-once by this state: ``rm_cursor`` says which comparisons the reward model has consumed, and it is
written in the same atomic step as the weights trained on them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

MODEL_PARTS = ("policy", "value", "reward")
STATE_FILE = "state.json"
HISTORY_KEPT = 100
_CKPT = re.compile(r"ckpt-(\d+)")


class LearnerState(BaseModel):
    """Everything but weights that a restarted learner needs to continue exactly where it stopped."""

    step: int = Field(0, description="Checkpoints written so far (the folder number of this one).")
    rm_updates: int = 0
    rm_cursor: int = Field(0, description="comparisons.seq up to which the reward model has trained.")
    rm_comparisons_trained: int = Field(
        0, description="Training comparisons consumed by RM updates, in total."
    )
    rm_heldout_accuracy: float | None = None
    rm_heldout_pairs: float | None = Field(
        None, description="Held-out (winner, loser) pairs rm_heldout_accuracy was measured on."
    )
    rm_updates_refused: int = Field(
        0, description="RM updates not used: their held-out loss was worse than the previous RM's."
    )
    sft_done: bool = False
    reference_model: str | None = Field(
        None, description="The reference (SFT) model folder; None = settings.model."
    )
    ppo_rounds: int = 0
    ppo_prompts: int = Field(0, description="Prompts used by PPO rounds, in total.")
    ppo_prompt_cursor: int = Field(
        0, description="prompts.seq of the newest prompt when the last PPO round ran."
    )
    ppo_rm_update: int = Field(0, description="rm_updates when the last PPO round ran.")
    ppo_rounds_on_rm: int = Field(
        0,
        description="PPO rounds run on the reward model of update ppo_rm_update (max_rounds_per_rm_update).",
    )
    consecutive_rejections: int = Field(
        0,
        description="Candidates rejected as drifted in a row since the last restart "
        "(restart_after_rejections); a promotion or a rejection for not yet beating the incumbent resets it.",
    )
    incumbent: str | None = Field(None, description="The current version when the gate last ran.")
    best_version: str | None = Field(
        None,
        description="The version (or base) that scored highest at the last gate among those compared: a "
        "candidate may not fall below it.",
    )
    pending_candidate: str | None = Field(
        None, description="Version reserved for the policy of the last PPO round, not gated yet."
    )
    candidate_listed_at: float | None = Field(
        None,
        description="When the pending candidate was written to the registry to collect live votes "
        "(gate_live_wait_s); None while it is not there.",
    )
    promotions: int = 0
    rejections: int = 0
    held_back: int = Field(
        0, description="Candidates that passed the gate while the current version was pinned."
    )
    policy_events_cursor: str = Field(
        "0-0", description="Last policies-stream entry read for admin rollbacks."
    )
    history: list[dict[str, Any]] = Field(default_factory=list, description="The latest round records.")
    saved_at: float = 0.0

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[:-HISTORY_KEPT]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


class CheckpointStore:
    def __init__(self, state_dir: str | Path, keep: int = 2):
        self.root = Path(state_dir) / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        for leftover in self.root.glob(".tmp-*"):  # a checkpoint interrupted by a crash: never complete
            shutil.rmtree(leftover, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _CKPT.fullmatch(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def load_state(self) -> LearnerState:
        latest = self.latest()
        if latest is None:
            return LearnerState()
        return LearnerState.model_validate_json((latest / STATE_FILE).read_text())

    def model_dir(self, part: str) -> Path | None:
        """The folder of ``part`` (policy / value / reward) in the latest checkpoint, if it has one."""
        latest = self.latest()
        if latest is None or not (latest / part / "config.json").exists():
            return None
        return latest / part

    def optimizer_state(self, name: str) -> dict[str, Any] | None:
        import torch

        latest = self.latest()
        path = latest / "optimizers" / f"{name}.pt" if latest else None
        if path is None or not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(
        self,
        state: LearnerState,
        models: dict[str, tuple[Any, Any]] | None = None,
        optimizers: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write a new checkpoint atomically and return its folder.

        ``models``: part -> (model, tokenizer or None) to save now; every other part (and optimizer) of
        the previous checkpoint is carried over by hard link. ``state.step`` is incremented.
        """
        import torch

        models = models or {}
        optimizers = optimizers or {}
        unknown = set(models) - set(MODEL_PARTS)
        if unknown:
            raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; expected {MODEL_PARTS}")
        previous = self.latest()
        state.step += 1
        state.saved_at = time.time()
        target = self.root / f"ckpt-{state.step:06d}"
        tmp = self.root / f".tmp-{state.step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for part in MODEL_PARTS:
                if part in models:
                    model, tokenizer = models[part]
                    model.save_pretrained(tmp / part, safe_serialization=True)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp / part)
                elif previous is not None and (previous / part).exists():
                    shutil.copytree(previous / part, tmp / part, copy_function=os.link)
            (tmp / "optimizers").mkdir()
            for name, optimizer_state in optimizers.items():
                torch.save(optimizer_state, tmp / "optimizers" / f"{name}.pt")
            if previous is not None and (previous / "optimizers").exists():
                for old in (previous / "optimizers").glob("*.pt"):
                    if old.stem not in optimizers:
                        os.link(old, tmp / "optimizers" / old.name)
            (tmp / STATE_FILE).write_text(state.model_dump_json(indent=2))
            _fsync_tree(tmp)
            os.rename(tmp, target)
            _fsync_dir(self.root)
        except BaseException:
            state.step -= 1
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info(
            "checkpoint written",
            extra={
                "checkpoint": target.name,
                "parts": sorted(models),
                "rm_updates": state.rm_updates,
                "ppo_rounds": state.ppo_rounds,
            },
        )
        return target
