"""The learning loop as a service:
ingest → (SFT once) → RM update → PPO-ptx round → evaluate → gate → publish.

``Learner.round()`` is one pass (``instructloop learner once``); ``Learner.run()`` repeats it forever
(``instructloop learner run``), waiting on the streams when there is nothing to do. Every step that
changes training state ends with an atomic checkpoint (``learner/state.py``), and each step only starts
if no stop was requested, so SIGTERM finishes the current step and its checkpoint, then exits. SIGKILL
at any point loses nothing: the dataset holds every acknowledged event, and the newest checkpoint holds
the weights together with the counters and the dataset cursor they correspond to.

Rounds are bounded: at most ``max_rounds_per_rm_update`` PPO rounds run on one reward model, and a round
needs ``gate_min_prompts`` held-out prompts (else its candidate could never be judged). After a rejection
the working policy continues from the rejected candidate; after ``restart_after_rejections`` rejections in a
row that found it drifted (``GateResult.drifted``: worse, past the KL ceiling) it restarts from the
incumbent (fresh PPO optimizer). The gate (``learner/gate.py``) only decides what is
served, and admin pins and rollbacks bind it (``learner/admin.py``). Why the loop waits:
``learner/waiting.py``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
from dataclasses import replace
from typing import Any

from instructloop.registry import Registry
from learner.admin import follow_rollback
from learner.dataset import Dataset, TrafficPrompt
from learner.exclusion import excluded_labelers, without_excluded
from learner.gate import GateResult
from learner.gating import gate_and_publish
from learner.ingest import Ingestor, IngestStats
from learner.live_gate import awaiting_live_votes
from learner.metrics import LearnerMetrics
from learner.models import LearnerModels
from learner.report import RoundReport, numeric
from learner.settings import Settings, resolve_learner_config
from learner.state import CheckpointStore, LearnerState
from learner.waiting import Wait, report_waits, rm_readiness, waits

log = logging.getLogger(__name__)

HELDOUT_COMPARISONS_MAX = 64
"""Held-out rankings (the first ones) an RM update is judged on: 384 pairs at K = 4 bound its accuracy
within a few points, and each update scores them twice (previous and new RM)."""
NORMALISATION_PROMPTS = 16
NORMALISATION_SAMPLES_PER_PROMPT = 4


class Learner:
    def __init__(self, settings: Settings, *, metrics: LearnerMetrics | None = None, progress: bool = True):
        import redis

        self.settings = settings
        self.metrics = metrics or LearnerMetrics()
        self.progress = progress
        self.redis = redis.Redis.from_url(  # bytes: malformed entries must not crash decode
            settings.require_redis(),
            socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=min(10.0, settings.redis_socket_timeout_s),
            health_check_interval=30,
        )
        self.metrics.liveness_max_age_s = settings.liveness_max_age_s
        self.config = resolve_learner_config(settings)  # refuses bad values before anything starts
        self.dataset = Dataset(
            settings.state_dir / "dataset.sqlite3",
            heldout_fraction=settings.heldout_fraction,
            heldout_min_prompts=settings.heldout_min_prompts,
        )
        self.store = CheckpointStore(settings.state_dir, keep=settings.keep_checkpoints)
        self.state: LearnerState = self.store.load_state()
        self.registry = Registry(settings.registry_dir, redis=self.redis, prefix=settings.stream_prefix)
        self.ingestor = Ingestor(
            self.redis,
            self.dataset,
            prefix=settings.stream_prefix,
            group=settings.consumer_group,
            consumer=settings.consumer_name,
            read_count=settings.read_count,
            block_ms=settings.read_block_ms,
            claim_min_idle_ms=settings.claim_min_idle_ms,
            metrics=self.metrics,
        )
        self.gate_config = self.config.gate
        self.stop_requested = False
        self.models = LearnerModels(settings, self.store, lambda: self.state.reference_model)
        self._trainer = None
        self._started = False
        self._waiting: list[Wait] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Consumer groups, recovery of pending entries, seeds. Idempotent."""
        if self._started:
            return
        import torch

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        torch.manual_seed(self.settings.seed + self.state.step)
        random.seed(self.settings.seed + self.state.step)
        self.ingestor.ensure_groups()  # pending entries are recovered by every ingest()
        self.registry.clean_staging()  # the learner is the only writer of versions (leftovers are logged)
        self._started = True
        self.metrics.beat()
        log.info(
            "learner started",
            extra={
                "state": self.state.model_dump(exclude={"history"}),
                "dataset": self.dataset.counts(),
                "config": self.config.as_dict(),
                "settings": self.settings.model_dump(
                    mode="json", exclude={"redis_url"}
                ),  # may hold a password
            },
        )

    def request_stop(self, *_: Any) -> None:
        if not self.stop_requested:
            log.info("stop requested: finishing the current step")
        self.stop_requested = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def close(self) -> None:
        self.dataset.close()
        self.redis.close()

    # ---- models (learner/models.py) ---------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.models.tokenizer

    @property
    def reference(self):
        return self.models.reference

    @property
    def reward_model(self):
        return self.models.reward_model

    # ---- steps -----------------------------------------------------------------------------------
    def ingest(self) -> IngestStats:
        with self.metrics.step_seconds.labels("ingest").time():
            stats = self.ingestor.recover()  # entries of a peer that died since (cheap when there are none)
            stats.add(self.ingestor.drain())
            self.ingestor.update_lag()
            for table, rows in self.dataset.counts().items():
                self.metrics.dataset_rows.labels(table).set(rows)
        if stats.read:
            log.info(
                "ingested",
                extra={
                    "read": stats.read,
                    "inserted": stats.inserted,
                    "duplicates": stats.duplicates,
                    "dead_lettered": stats.dead_lettered,
                    "per_stream": stats.per_stream,
                },
            )
        return stats

    def maybe_run_sft(self) -> str | None:
        """SFT once, before the first PPO round, when enabled and enough demonstrations exist; the SFT model
        then is the reference (and the start of the policy)."""
        if (
            not self.settings.sft_on_start
            or self.state.sft_done
            or self.state.ppo_rounds
            or self.store.model_dir("policy")
        ):
            return None
        config = self.config.sft
        demonstrations = self.dataset.demonstrations(heldout=False)
        if len(demonstrations) < config.min_demonstrations:
            return None
        from learner.sft import run_sft

        output = self.settings.state_dir / "sft" / "model"
        staging = output.with_name(".staging-model")
        shutil.rmtree(staging, ignore_errors=True)
        log.info("sft started", extra={"demonstrations": len(demonstrations), "output": str(output)})
        with self.metrics.step_seconds.labels("sft").time():
            run_sft(self.models.base_path, demonstrations, staging, config, progress=self.progress)
        shutil.rmtree(output, ignore_errors=True)  # a previous SFT that finished but was never checkpointed
        os.rename(staging, output)
        self.state.sft_done = True
        self.state.reference_model = str(output)
        self.models.reset()
        self.state.record({"kind": "sft", "demonstrations": len(demonstrations), "path": str(output)})
        self.store.save(self.state)
        return str(output)

    def maybe_update_reward_model(self) -> dict[str, float] | None:
        """Train the RM on the training comparisons it has not seen, when there are enough of them."""
        new = self.dataset.count_new_comparisons(self.state.rm_cursor)
        if new < self.settings.min_new_comparisons:
            return None
        from learner.reward import (
            normalize_reward,
            ranking_metrics,
            restore_snapshot,
            train_reward_model,
            trainable_snapshot,
            update_is_worse,
            update_selection,
        )

        up_to = self.dataset.max_comparison_seq()
        excluded = excluded_labelers(self.redis, self.settings.stream_prefix)  # learner/exclusion.py
        comparisons = without_excluded(
            (s.comparison for s in self.dataset.comparisons(after_seq=self.state.rm_cursor, up_to_seq=up_to)),
            excluded,
        )
        if not any(c.pairs() for c in comparisons):  # only ties (or excluded labelers): move past them
            self.state.rm_cursor = up_to
            self.store.save(self.state)
            return None
        heldout = without_excluded(
            (s.comparison for s in self.dataset.comparisons(heldout=True, limit=HELDOUT_COMPARISONS_MAX)),
            excluded,
        )
        config = replace(self.config.reward, seed=self.config.reward.seed + self.state.rm_updates)
        new_count = len(comparisons)
        older = without_excluded(
            (s.comparison for s in self.dataset.comparisons(up_to_seq=self.state.rm_cursor)), excluded
        )
        trained, replayed = update_selection(comparisons, older, config, config.seed)
        comparisons = trained + replayed
        log.info(
            "reward model update started",
            extra={
                "comparisons": new_count,
                "trained_new": len(trained),
                "replayed": len(replayed),
                "heldout": len(heldout),
                "rm_update": self.state.rm_updates + 1,
                "excluded_labelers": len(excluded),
            },
        )
        with self.metrics.step_seconds.labels("reward_model").time():
            previous = self.reward_model
            model = previous or self.models.new_reward_model()
            # the previous RM's held-out loss on today's held-out set: an update that is worse is not used
            previous_loss = (
                ranking_metrics(model, self.tokenizer, heldout, config.score_batch_size, config.max_length)[1]
                if previous is not None and any(c.pairs() for c in heldout)
                else None
            )
            snapshot = trainable_snapshot(model) if previous_loss is not None else None
            stats = numeric(
                train_reward_model(
                    model, self.tokenizer, comparisons, config, heldout or None, progress=self.progress
                )
            )
            if update_is_worse(stats["heldout_loss"], previous_loss, config.refuse_tolerance):
                restore_snapshot(model, snapshot)
                model.eval().requires_grad_(False)
                return self._refuse_reward_update(up_to, new_count, previous_loss, stats)
            prompts, responses = self._normalisation_samples()
            stats["gain"], stats["bias"] = normalize_reward(
                model,
                self.tokenizer,
                prompts,
                responses,
                batch_size=config.score_batch_size,
                max_length=config.max_length,
            )
            model.eval().requires_grad_(False)
        self.state.rm_updates += 1
        self.state.rm_cursor = up_to
        self.state.rm_comparisons_trained += new_count
        self.state.rm_heldout_accuracy = stats.get("heldout_accuracy")
        self.state.rm_heldout_pairs = stats.get("heldout_pairs")
        self.state.record(
            {
                "kind": "reward",
                "rm_update": self.state.rm_updates,
                "cursor": up_to,
                "comparisons": new_count,
                **stats,
            }
        )
        self.store.save(self.state, models={"reward": (model, self.models.part_tokenizer)})
        self.metrics.rm_updates.inc()
        if "heldout_accuracy" in stats:
            self.metrics.rm_heldout_accuracy.set(stats["heldout_accuracy"])
        self.metrics.reward_normalisation.labels("gain").set(stats["gain"])
        self.metrics.reward_normalisation.labels("bias").set(stats["bias"])
        self.metrics.rm_ready.set(float(self.rm_ready()[0]))
        log.info("reward model updated", extra={"rm_update": self.state.rm_updates, "stats": stats})
        return stats

    def _refuse_reward_update(
        self, up_to: int, new_count: int, previous_loss: float, stats: dict[str, float]
    ) -> dict[str, float]:
        """The update made the held-out loss worse: the previous RM stays (its weights were put back); its new
        rankings stay in the replay pool of later updates."""
        self.state.rm_cursor = up_to
        self.state.rm_updates_refused += 1
        stats = {**stats, "refused": 1.0, "previous_heldout_loss": previous_loss}
        self.state.record({"kind": "reward_refused", "cursor": up_to, "comparisons": new_count, **stats})
        self.store.save(self.state)
        self.metrics.rm_updates_refused.inc()
        log.warning(
            "reward model update refused: held-out loss worse than the previous RM's",
            extra={"heldout_loss": stats["heldout_loss"], "previous_heldout_loss": previous_loss},
        )
        return stats

    def rm_ready(self) -> tuple[bool, str]:
        """Whether PPO may optimise against the current RM, and why (``learner.waiting.rm_readiness``)."""
        return rm_readiness(self.settings, self.state)

    def _normalisation_samples(self) -> tuple[list[str], list[str]]:
        """(prompt, response) pairs the RM is normalised on (mean 0, std 1): the reference policy's samples,
        ``NORMALISATION_SAMPLES_PER_PROMPT`` seeded samples on each of ``NORMALISATION_PROMPTS`` training
        prompts (held-out comparisons' prompts before any prompt is stored), at the evaluation decoding."""
        import dataclasses

        queries = self.dataset.sample_queries(NORMALISATION_PROMPTS, seed=self.settings.seed)
        if not queries:
            prompts = sorted({s.comparison.prompt for s in self.dataset.comparisons(limit=64)})
            queries = [TrafficPrompt(p) for p in prompts[:NORMALISATION_PROMPTS]]
        prompts, responses = [], []
        for sample in range(NORMALISATION_SAMPLES_PER_PROMPT):
            config = dataclasses.replace(
                self._eval_config(), do_sample=True, seed=self.settings.seed + sample
            )
            prompts += [q.text for q in queries]
            responses += self.models.reference_answers(queries, config)
        return prompts, responses

    def _eval_config(self):
        return self.config.evaluation

    def _ppo_trainer(self):
        if self._trainer is None:
            from learner.ppo import PPOPtxTrainer
            from learner.ptx import PtxSource

            policy, value, restored = self.models.policy_and_value()  # the value model starts from the RM
            config = self.config.ppo
            ptx = None
            if config.reads_ptx_corpus:
                ptx = PtxSource(
                    self.tokenizer,
                    self.settings.ptx_corpus,
                    seq_len=config.ptx_seq_len,
                    batch_size=config.ptx_batch_size,
                    seed=config.seed,
                )
            trainer = PPOPtxTrainer(
                policy,
                self.reference,
                value,
                self.reward_model,
                self.tokenizer,
                config,
                ptx,
                progress=self.progress,
            )
            saved = self.store.optimizer_state("ppo")
            if saved and restored:  # {}: the policy restarted from a version (after a rollback)
                trainer.load_state_dict(saved)
            self._trainer = trainer
        return self._trainer

    def ppo_round_due(self) -> bool:
        """An RM trained on at least ``min_rm_comparisons`` comparisons exists, at least ``min_prompts``
        training prompts and ``gate_min_prompts`` held-out prompts (to judge the candidate on) exist, the RM
        is ready (``rm_ready``: held-out accuracy confidently above chance), and since the last round the RM
        was updated, or ``min_prompts`` prompts never served before arrived and fewer than
        ``max_rounds_per_rm_update`` rounds ran on this RM. A prompt asked again is not new data, and rounds
        on an unchanged RM optimise its errors: without new data the loop waits."""
        if self.state.pending_candidate or self.store.model_dir("reward") is None:
            return False
        if self.dataset.count_prompts() < self.settings.min_prompts:
            return False
        if self.state.rm_comparisons_trained < self.settings.min_rm_comparisons:
            return False
        if self.dataset.count_split_prompts(heldout=True) < self.settings.gate_min_prompts:
            return False  # its candidate could never be judged
        if not self.rm_ready()[0]:  # held-out accuracy not confidently above chance (learner.reward.rm_ready)
            return False
        if self.state.rm_updates > self.state.ppo_rm_update:
            return True
        if self.state.ppo_rounds_on_rm >= self.settings.max_rounds_per_rm_update:
            return False
        return self.dataset.count_new_prompts(self.state.ppo_prompt_cursor) >= self.settings.min_prompts

    def maybe_run_ppo_round(self) -> dict[str, float] | None:
        """One PPO-ptx round on a seeded sample of training prompts, when ``ppo_round_due``."""
        if not self.ppo_round_due():
            return None
        prompt_cursor = self.dataset.max_prompt_seq()
        queries = self.dataset.sample_queries(
            self.settings.prompts_per_round, seed=self.settings.seed + self.state.ppo_rounds
        )
        prompts = [q.text for q in queries]
        log.info("ppo round started", extra={"ppo_round": self.state.ppo_rounds + 1, "prompts": len(prompts)})
        with self.metrics.step_seconds.labels("ppo").time():
            trainer = self._ppo_trainer()
            stats = numeric(trainer.round(prompts, [q.max_tokens for q in queries]))
        self.state.ppo_rounds += 1
        self.state.ppo_prompts += len(prompts)
        self.state.ppo_prompt_cursor = prompt_cursor
        fresh_rm = self.state.rm_updates > self.state.ppo_rm_update
        self.state.ppo_rounds_on_rm = 1 if fresh_rm else self.state.ppo_rounds_on_rm + 1
        self.state.ppo_rm_update = self.state.rm_updates
        self.state.pending_candidate = self.registry.next_version()
        self.state.record(
            {
                "kind": "ppo",
                "ppo_round": self.state.ppo_rounds,
                "prompts": len(prompts),
                "candidate": self.state.pending_candidate,
                **stats,
            }
        )
        self.store.save(
            self.state,
            models={
                "policy": (trainer.policy, self.models.part_tokenizer),
                "value": (trainer.value_model, self.models.part_tokenizer),
            },
            optimizers={"ppo": trainer.state_dict()},
        )
        self.metrics.ppo_rounds.inc()
        self.metrics.observe_ppo(stats)
        log.info("ppo round done", extra={"ppo_round": self.state.ppo_rounds, "stats": stats})
        return stats

    def gate_and_publish(self) -> GateResult | None:
        """Judge the pending candidate on held-out prompts
        and promote or reject it (``learner/gating.py``)."""
        return gate_and_publish(self)

    # ---- the loop --------------------------------------------------------------------------------
    def round(self) -> RoundReport:
        """One pass of the loop. Each step starts only if no stop was requested."""
        self.start()
        started = time.perf_counter()
        report = RoundReport()
        report.ingest = self.ingest()
        self.metrics.beat()
        if not self.stop_requested:
            self.follow_rollback()
        with self.models.autocast():  # mixed precision when Settings.dtype is bfloat16 (nothing at float32)
            # a pending candidate is gated unless it still collects live votes (learner/live_gate.py)
            if not self.stop_requested and self.state.pending_candidate and not awaiting_live_votes(self):
                report.version = self.state.pending_candidate
                report.gate = self.gate_and_publish()
            if not self.stop_requested:
                report.sft = self.maybe_run_sft()
                self.metrics.beat()
            if not self.stop_requested:
                report.reward = self.maybe_update_reward_model()
                self.metrics.beat()
            if not self.stop_requested:
                report.ppo = self.maybe_run_ppo_round()
                self.metrics.beat()
            if not self.stop_requested and self.state.pending_candidate and not awaiting_live_votes(self):
                report.version = self.state.pending_candidate
                report.gate = self.gate_and_publish()
        report.duration_s = time.perf_counter() - started
        if report.trained:
            self.metrics.step_seconds.labels("round").observe(report.duration_s)
        return report

    def run(self, max_rounds: int | None = None) -> int:
        """Rounds until a stop is requested (or ``max_rounds`` rounds trained); ``learner/service.py``."""
        from learner.service import run_forever

        return run_forever(self, max_rounds)

    # ---- admin decisions and waiting -------------------------------------------------------------
    def follow_rollback(self) -> str | None:
        """After an admin rollback, restart the working policy
        from the version now current (learner/admin.py)."""
        target = follow_rollback(self)
        if target is not None:
            self._trainer = None
            self.state.best_version = (
                None  # the line an admin rolled back is no floor for the next candidates
            )
        return target

    def waiting(self) -> list[Wait]:
        return waits(self.settings, self.dataset, self.state, self.store.model_dir("reward") is not None)

    def report_waiting(self) -> list[Wait]:
        """Log the waiting reasons when they change and set the ``learner_waiting`` gauge."""
        self._waiting = report_waits(self.metrics, self.waiting(), self._waiting)
        return self._waiting

    def reload_from_checkpoint(self) -> None:
        """Forget in-memory training state; models and counters come back from the newest checkpoint."""
        self.state = self.store.load_state()
        self._trainer = None
        self.models.reset()
