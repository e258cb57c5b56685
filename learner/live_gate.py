"""Live votes before the gate: a candidate waits, servable by name, for A/B votes against the incumbent.

Without this the gate decides right after the PPO round, before anyone could see the candidate, so its
live win-rate check never applies. With ``gate_live_wait_s`` > 0 the pending candidate is first written to
the registry with status ``candidate``: serve answers requests that name it (TGI's ``adapter_id``), and the
labeling page's compare mode shows it beside the current version by default. The gate then waits until
``gate_min_live_comparisons`` live (winner, loser) pairs between the two versions exist, or the wait is
over; meanwhile the learner keeps ingesting and no PPO round runs. The learner's publish step finds the
version already in the registry and only records the decision (``publish_candidate``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from instructloop.events import PolicyStatus
from instructloop.wire import BASE_VERSION

log = logging.getLogger(__name__)


def awaiting_live_votes(learner: Any) -> bool:
    """True while the pending candidate should keep collecting live votes (the gate must not run yet)."""
    settings, state = learner.settings, learner.state
    version = state.pending_candidate
    if not settings.gate_live_wait_s or version is None:
        return False
    incumbent = learner.registry.current() or BASE_VERSION
    if not learner.registry.exists(version):
        trainer = learner._ppo_trainer()
        # the same writer publishing uses: an adapter version in lora mode, full weights otherwise
        learner.models.write_candidate(
            learner.registry,
            version,
            trainer.policy,
            status=PolicyStatus.candidate,
            parent=None if incumbent == BASE_VERSION else incumbent,
            base_model=settings.model,
        )
        state.candidate_listed_at = time.time()
        learner.store.save(state)
        log.info(
            "candidate listed for live votes; the gate waits",
            extra={
                "candidate": version,
                "incumbent": incumbent,
                "wait_s": settings.gate_live_wait_s,
                "pairs_needed": settings.gate_min_live_comparisons,
                "knobs": "INSTRUCTLOOP_LEARNER_GATE_LIVE_WAIT_S, ..._GATE_MIN_LIVE_COMPARISONS",
            },
        )
        return True
    _, pairs = learner.dataset.live_win_rate(version, incumbent)
    waited = time.time() - (state.candidate_listed_at or 0.0)
    if pairs < settings.gate_min_live_comparisons and waited < settings.gate_live_wait_s:
        return True
    log.info(
        "live votes collected; gating",
        extra={"candidate": version, "incumbent": incumbent, "pairs": pairs, "waited_s": round(waited, 1)},
    )
    return False
