"""``Learner.run``: rounds forever, waiting on the streams when there is nothing to do.

Redis being unreachable does not end the loop: the round's in-memory training state is dropped (the
newest checkpoint is the truth), and the round is retried after ``poll_interval_s``. The main loop beats
the liveness heartbeat (``/healthz`` on the metrics port) at every pass and every poll.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from learner.loop import Learner

log = logging.getLogger("learner.loop")


def run_forever(learner: Learner, max_rounds: int | None = None) -> int:
    """Rounds until a stop is requested (or ``max_rounds`` rounds trained). Returns rounds trained."""
    import redis

    learner.start()
    trained = 0
    idle = False
    while not learner.stop_requested:
        learner.metrics.beat()
        try:
            learner.ingestor.trim_every(learner.settings.trim_interval_s)
            report = learner.round()
            learner.report_waiting()
            if not report.trained:
                if not idle:  # once per idle spell, not once per poll
                    log.info(
                        "learner idle",
                        extra={
                            "dataset": learner.dataset.counts(),
                            "rm_updates": learner.state.rm_updates,
                            "ppo_rounds": learner.state.ppo_rounds,
                        },
                    )
                    idle = True
                wait_for_events(learner)
                continue
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # e.g. Redis restarting: wait, never crash
            log.warning("redis unavailable, retrying from the last checkpoint", extra={"error": str(exc)})
            learner.reload_from_checkpoint()
            sleep_unless_stopped(learner, learner.settings.poll_interval_s)
            learner.metrics.beat()  # waiting for Redis is not a hang (the probe must not restart us for it)
            continue
        trained += 1
        idle = False
        if max_rounds is not None and trained >= max_rounds:
            break
    log.info(
        "learner stopped", extra={"rounds": trained, "state": learner.state.model_dump(exclude={"history"})}
    )
    return trained


def sleep_unless_stopped(learner: Learner, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not learner.stop_requested and time.monotonic() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def wait_for_events(learner: Learner) -> None:
    """Idle until the poll interval passes or a stop is requested, ingesting whatever arrives."""
    settings = learner.settings
    deadline = time.monotonic() + settings.poll_interval_s
    while not learner.stop_requested and time.monotonic() < deadline:
        block = min(settings.read_block_ms, max(1, int((deadline - time.monotonic()) * 1000)))
        stats = learner.ingestor.poll(block_ms=block)
        learner.metrics.beat()
        if stats.read:
            log.info(
                "ingested",
                extra={
                    "read": stats.read,
                    "inserted": stats.inserted,
                    "duplicates": stats.duplicates,
                    "dead_lettered": stats.dead_lettered,
                },
            )
    learner.ingestor.update_lag()
    learner.ingestor.trim_every(settings.trim_interval_s)
