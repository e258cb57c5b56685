"""The learning loop as a service: ingest → (SFT once) → RM update → PPO-ptx round → evaluate → gate → publish.

``Learner.round()`` is one pass (``instructloop learner once``); ``Learner.run()`` repeats it forever
(``instructloop learner run``), waiting on the streams when there is nothing to do. Every step that
changes training state ends with an atomic checkpoint (``learner/state.py``), and each step only starts
if no stop was requested, so SIGTERM finishes the current step and its checkpoint, then exits. SIGKILL
at any point loses nothing: the dataset holds every acknowledged event, and the newest checkpoint holds
the weights together with the counters and the dataset cursor they correspond to.

Which policy keeps training after a rejection: the learner's working policy continues from the rejected
candidate (PPO progress is not thrown away; the next candidate is gated again against the incumbent).
The gate only decides what is served. Admin decisions bind (``learner/admin.py``): a candidate that passes
the gate while the current version is pinned is recorded as held back, and after a rollback the working
policy restarts from the version rolled back to. While a step waits for data, ``learner/waiting.py`` says
why (log, ``learner status``, the ``learner_waiting`` gauge) and names the knob.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructloop.events import validate_version_name
from instructloop.model import resolve_model
from instructloop.registry import InvalidCheckpoint, Registry
from instructloop.wire import BASE_VERSION
from learner.admin import pinned_version, rollbacks_since
from learner.dataset import Dataset, TrafficPrompt
from learner.gate import GateConfig, GateResult, gate_decision
from learner.ingest import Ingestor, IngestStats
from learner.metrics import LearnerMetrics
from learner.publish import publish_candidate
from learner.settings import Settings
from learner.state import CheckpointStore, LearnerState
from learner.waiting import Wait, waits

log = logging.getLogger(__name__)

"""What serve reports, and the gate compares against, while no version is current."""
HELDOUT_COMPARISONS_MAX = 512
BIAS_SAMPLES = 64


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


def _numeric(stats: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}


class Learner:
    def __init__(self, settings: Settings, *, metrics: LearnerMetrics | None = None, progress: bool = True):
        import redis

        self.settings = settings
        self.metrics = metrics or LearnerMetrics()
        self.progress = progress
        self.redis = redis.Redis.from_url(settings.require_redis())  # bytes: malformed entries must not crash decode
        self.dataset = Dataset(settings.state_dir / "dataset.sqlite3", heldout_fraction=settings.heldout_fraction)
        self.store = CheckpointStore(settings.state_dir, keep=settings.keep_checkpoints)
        self.state: LearnerState = self.store.load_state()
        self.registry = Registry(settings.registry_dir, redis=self.redis, prefix=settings.stream_prefix)
        self.ingestor = Ingestor(
            self.redis, self.dataset, prefix=settings.stream_prefix, group=settings.consumer_group,
            consumer=settings.consumer_name, read_count=settings.read_count, block_ms=settings.read_block_ms,
            claim_min_idle_ms=settings.claim_min_idle_ms, metrics=self.metrics,
        )
        self.gate_config = GateConfig(
            min_reward_gain=settings.gate_min_reward_gain, kl_ceiling=settings.gate_kl_ceiling,
            min_live_comparisons=settings.gate_min_live_comparisons, min_win_rate=settings.gate_min_win_rate,
        )
        self.stop_requested = False
        self._base_path: str | None = None
        self._device: str | None = None
        self._tokenizer = None
        self._reference = None
        self._reward = None
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
        self._started = True
        log.info("learner started", extra={"state": self.state.model_dump(exclude={"history"}),
                                            "dataset": self.dataset.counts()})

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

    # ---- models (loaded on first use) ------------------------------------------------------------
    @property
    def base_path(self) -> str:
        if self._base_path is None:
            self._base_path = resolve_model(self.settings.model)
        return self._base_path

    @property
    def reference_path(self) -> str:
        return self.state.reference_model or self.base_path

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = self.settings.resolved_device()
        return self._device

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.reference_path)
            if self._tokenizer.pad_token_id is None or self._tokenizer.pad_token_id == self._tokenizer.eos_token_id:
                raise ValueError(
                    f"model {self.settings.model}: the tokenizer needs a pad token distinct from EOS for PPO "
                    "(set one in the model folder's tokenizer_config.json)"
                )
        return self._tokenizer

    def _causal_lm(self, path: str | Path):
        import torch
        from transformers import AutoModelForCausalLM

        from learner.reward import disable_dropout

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        return disable_dropout(model).to(self.device)

    @property
    def reference(self):
        if self._reference is None:
            self._reference = self._causal_lm(self.reference_path).eval().requires_grad_(False)
        return self._reference

    @property
    def reward_model(self):
        """The RM from the latest checkpoint, or None before the first RM update."""
        if self._reward is None:
            path = self.store.model_dir("reward")
            if path is not None:
                from learner.reward import build_reward_model

                self._reward = build_reward_model(str(path)).to(self.device).eval()
        return self._reward

    # ---- steps -----------------------------------------------------------------------------------
    def ingest(self) -> IngestStats:
        with self.metrics.step_seconds.labels("ingest").time():
            stats = self.ingestor.recover()  # entries of a peer that died since (cheap when there are none)
            stats.add(self.ingestor.drain())
            self.ingestor.update_lag()
            for table, rows in self.dataset.counts().items():
                self.metrics.dataset_rows.labels(table).set(rows)
        if stats.read:
            log.info("ingested", extra={"read": stats.read, "inserted": stats.inserted, "duplicates": stats.duplicates,
                                         "dead_lettered": stats.dead_lettered, "per_stream": stats.per_stream})
        return stats

    def maybe_run_sft(self) -> str | None:
        """SFT once, before the first PPO round, when enabled and enough demonstrations exist; the SFT model
        then is the reference (and the start of the policy)."""
        if not self.settings.sft_on_start or self.state.sft_done or self.state.ppo_rounds or self.store.model_dir("policy"):
            return None
        from learner.config import SFTConfig

        config = SFTConfig(**{"seed": self.settings.seed, **self.settings.sft})
        demonstrations = self.dataset.demonstrations(heldout=False)
        if len(demonstrations) < config.min_demonstrations:
            return None
        from learner.sft import run_sft

        output = self.settings.state_dir / "sft" / "model"
        staging = output.with_name(".staging-model")
        shutil.rmtree(staging, ignore_errors=True)
        log.info("sft started", extra={"demonstrations": len(demonstrations), "output": str(output)})
        with self.metrics.step_seconds.labels("sft").time():
            run_sft(self.base_path, demonstrations, staging, config, progress=self.progress)
        shutil.rmtree(output, ignore_errors=True)  # a previous SFT that finished but was never checkpointed
        os.rename(staging, output)
        self.state.sft_done = True
        self.state.reference_model = str(output)
        self._reference = self._tokenizer = None
        self.state.record({"kind": "sft", "demonstrations": len(demonstrations), "path": str(output)})
        self.store.save(self.state)
        return str(output)

    def maybe_update_reward_model(self) -> dict[str, float] | None:
        """Train the RM on the training comparisons it has not seen, when there are enough of them."""
        new = self.dataset.count_new_comparisons(self.state.rm_cursor)
        if new < self.settings.min_new_comparisons:
            return None
        from learner.config import RewardConfig
        from learner.reward import build_reward_model, normalize_reward_bias, train_reward_model

        up_to = self.dataset.max_comparison_seq()
        comparisons = [s.comparison for s in self.dataset.comparisons(after_seq=self.state.rm_cursor, up_to_seq=up_to)]
        if not any(c.pairs() for c in comparisons):  # only ties: nothing to learn, move past them
            self.state.rm_cursor = up_to
            self.store.save(self.state)
            return None
        heldout = [s.comparison for s in self.dataset.comparisons(heldout=True, limit=HELDOUT_COMPARISONS_MAX)]
        log.info("reward model update started", extra={"comparisons": len(comparisons), "heldout": len(heldout),
                                                        "rm_update": self.state.rm_updates + 1})
        with self.metrics.step_seconds.labels("reward_model").time():
            model = self.reward_model
            if model is None:
                model = build_reward_model(self.reference_path).to(self.device)
            config = RewardConfig(**{"seed": self.settings.seed + self.state.rm_updates, **self.settings.reward})
            stats = _numeric(train_reward_model(model, self.tokenizer, comparisons, config, heldout or None,
                                                progress=self.progress))
            prompts, responses = self._bias_samples()
            stats["bias"] = normalize_reward_bias(model, self.tokenizer, prompts, responses,
                                                  batch_size=config.score_batch_size, max_length=config.max_length)
            model.eval().requires_grad_(False)
        self._reward = model
        self.state.rm_updates += 1
        self.state.rm_cursor = up_to
        self.state.rm_comparisons_trained += len(comparisons)
        self.state.rm_heldout_accuracy = stats.get("heldout_accuracy")
        self.state.record({"kind": "reward", "rm_update": self.state.rm_updates, "cursor": up_to,
                           "comparisons": len(comparisons), **stats})
        self.store.save(self.state, models={"reward": (model, self.tokenizer)})
        self.metrics.rm_updates.inc()
        if "heldout_accuracy" in stats:
            self.metrics.rm_heldout_accuracy.set(stats["heldout_accuracy"])
        log.info("reward model updated", extra={"rm_update": self.state.rm_updates, "stats": stats})
        return stats

    def _bias_samples(self) -> tuple[list[str], list[str]]:
        """(prompt, response) pairs whose mean RM score is set to 0: labeler demonstrations, or reference
        policy samples on training prompts when there are none (paper, section 3.5)."""
        demonstrations = self.dataset.demonstrations(heldout=False, limit=BIAS_SAMPLES)
        if demonstrations:
            return [d.prompt for d in demonstrations], [d.response for d in demonstrations]
        queries = self.dataset.sample_queries(BIAS_SAMPLES, seed=self.settings.seed)
        if not queries:
            queries = [TrafficPrompt(p) for p in
                       sorted({s.comparison.prompt for s in self.dataset.comparisons(limit=BIAS_SAMPLES)})]
        return [q.text for q in queries], self._reference_samples(queries)

    def _reference_samples(self, queries: list[TrafficPrompt]) -> list[str]:
        """Greedy responses of the reference policy (EOS and padding stripped), each cut at its traffic's
        ``max_tokens`` as serve would cut it."""
        from learner.ppo import generate_rollouts

        config = self._eval_config()
        limits = [min(q.max_tokens, config.max_new_tokens) if q.max_tokens else config.max_new_tokens for q in queries]
        responses: list[str] = []
        for start in range(0, len(queries), config.batch_size):
            rows = slice(start, start + config.batch_size)
            rollouts = generate_rollouts(self.reference, self.tokenizer, [q.text for q in queries[rows]],
                                         config.max_prompt_tokens, limits[rows], False, 1.0)
            for ids, mask in zip(rollouts.responses, rollouts.response_mask, strict=True):
                responses.append(self.tokenizer.decode(ids[mask], skip_special_tokens=True))
        return responses

    def _eval_config(self):
        from learner.config import EvalConfig

        return EvalConfig(**{"seed": self.settings.seed, **self.settings.evaluation})

    def _ppo_trainer(self):
        if self._trainer is None:
            from learner.config import PPOConfig
            from learner.ppo import PPOPtxTrainer
            from learner.ptx import PtxSource
            from learner.reward import build_reward_model

            policy_dir = self.store.model_dir("policy")
            value_dir = self.store.model_dir("value") or self.store.model_dir("reward")
            policy = self._causal_lm(policy_dir or self.reference_path)
            value = build_reward_model(str(value_dir)).to(self.device)  # value model starts from the RM
            config = PPOConfig(**{"kl_coef": self.settings.kl_coef, "ptx_coef": self.settings.ptx_coef,
                                  "seed": self.settings.seed, **self.settings.ppo})
            ptx = None
            if config.ptx_coef > 0:
                ptx = PtxSource(self.tokenizer, self.settings.ptx_corpus, seq_len=config.ptx_seq_len,
                                batch_size=config.ptx_batch_size, seed=config.seed)
            trainer = PPOPtxTrainer(policy, self.reference, value, self.reward_model, self.tokenizer, config, ptx,
                                    progress=self.progress)
            saved = self.store.optimizer_state("ppo")
            if saved and policy_dir is not None:  # {}: the policy restarted from a version (rollback)
                trainer.load_state_dict(saved)
            self._trainer = trainer
        return self._trainer

    def ppo_round_due(self) -> bool:
        """An RM exists, at least ``min_prompts`` training prompts exist, and since the last round the RM was
        updated or ``min_prompts`` new prompts arrived (without new data the loop waits instead of grinding
        the same prompts and re-gating the same candidate)."""
        if self.state.pending_candidate or self.store.model_dir("reward") is None:
            return False
        if self.dataset.count_prompts() < self.settings.min_prompts:
            return False
        new_prompts = self.dataset.count_prompts(after_seq=self.state.ppo_prompt_cursor)
        return self.state.rm_updates > self.state.ppo_rm_update or new_prompts >= self.settings.min_prompts

    def maybe_run_ppo_round(self) -> dict[str, float] | None:
        """One PPO-ptx round on a seeded sample of training prompts, when ``ppo_round_due``."""
        if not self.ppo_round_due():
            return None
        prompt_cursor = self.dataset.max_prompt_seq()
        queries = self.dataset.sample_queries(self.settings.prompts_per_round,
                                              seed=self.settings.seed + self.state.ppo_rounds)
        prompts = [q.text for q in queries]
        log.info("ppo round started", extra={"ppo_round": self.state.ppo_rounds + 1, "prompts": len(prompts)})
        with self.metrics.step_seconds.labels("ppo").time():
            trainer = self._ppo_trainer()
            stats = _numeric(trainer.round(prompts, [q.max_tokens for q in queries]))
        self.state.ppo_rounds += 1
        self.state.ppo_prompts += len(prompts)
        self.state.ppo_prompt_cursor = prompt_cursor
        self.state.ppo_rm_update = self.state.rm_updates
        self.state.pending_candidate = self.registry.next_version()
        self.state.record({"kind": "ppo", "ppo_round": self.state.ppo_rounds, "prompts": len(prompts),
                           "candidate": self.state.pending_candidate, **stats})
        self.store.save(
            self.state,
            models={"policy": (trainer.policy, self.tokenizer), "value": (trainer.value_model, self.tokenizer)},
            optimizers={"ppo": trainer.state_dict()},
        )
        self.metrics.ppo_rounds.inc()
        if "ptx_loss" in stats:
            self.metrics.ptx_loss.set(stats["ptx_loss"])
        if "ptx_heldout_nll" in stats:
            self.metrics.ptx_heldout_nll.labels("policy").set(stats["ptx_heldout_nll"])
            self.metrics.ptx_heldout_nll.labels("reference").set(stats["ptx_heldout_nll_reference"])
        log.info("ppo round done", extra={"ppo_round": self.state.ppo_rounds, "stats": stats})
        return stats

    def _incumbent(self) -> tuple[str, Any]:
        """The current version and its model (the reference when none is current or it cannot be loaded)."""
        version = self.registry.current()
        if version and version != BASE_VERSION:
            try:
                validate_version_name(version)
                self.registry.verify(version)
                return version, self._causal_lm(self.registry.version_dir(version)).eval()
            except (InvalidCheckpoint, OSError, ValueError) as exc:
                log.warning("incumbent not loadable, gating against the reference",
                            extra={"version": version, "error": str(exc)})
        return BASE_VERSION, self.reference

    def _heldout_prompts(self) -> list[TrafficPrompt]:
        queries = self.dataset.sample_queries(self.settings.eval_prompts, heldout=True, seed=self.settings.seed)
        if not queries:  # no held-out completion yet: the prompts of held-out comparisons
            prompts = sorted({s.comparison.prompt for s in self.dataset.comparisons(heldout=True)})
            queries = [TrafficPrompt(p) for p in prompts[: self.settings.eval_prompts]]
        return queries

    def _decided_before_crash(self, version: str) -> tuple[str, GateResult] | None:
        """A learner killed while publishing left the candidate with its final status in the registry:
        reuse that decision (re-evaluating could compare the candidate against itself once current)."""
        from instructloop.events import PolicyStatus

        if not self.registry.exists(version):
            return None
        manifest = self.registry.manifest(version)
        if manifest.status not in (PolicyStatus.promoted, PolicyStatus.rejected):
            return None
        result = GateResult(promote=manifest.status == PolicyStatus.promoted,
                            reasons=[manifest.reason or "decided before a restart"], metrics=dict(manifest.metrics))
        return manifest.parent or BASE_VERSION, result

    def gate_and_publish(self) -> GateResult | None:
        """Evaluate the pending candidate against the incumbent on held-out prompts; promote or reject it."""
        version = self.state.pending_candidate
        if version is None:
            return None
        from learner.evaluate import evaluate_policy

        trainer = self._ppo_trainer()
        decided = self._decided_before_crash(version)
        prompts = [] if decided else self._heldout_prompts()
        incumbent_version, incumbent = (decided[0], None) if decided else self._incumbent()
        log.info("gate started", extra={"candidate": version, "incumbent": incumbent_version, "prompts": len(prompts)})
        with self.metrics.step_seconds.labels("evaluate").time():
            if decided:
                result = decided[1]
            elif prompts:
                config = self._eval_config()
                texts, lengths = [q.text for q in prompts], [q.max_tokens for q in prompts]
                candidate_eval = evaluate_policy(trainer.policy, self.reference, self.reward_model, self.tokenizer,
                                                 texts, config, lengths)
                incumbent_eval = evaluate_policy(incumbent, self.reference, self.reward_model, self.tokenizer,
                                                 texts, config, lengths)
                result = gate_decision(_numeric(candidate_eval), _numeric(incumbent_eval), self.gate_config,
                                       live_win_rate=self.dataset.live_win_rate(version, incumbent_version))
                pinned = pinned_version(self.registry)
                if result.promote and pinned:
                    result = result.hold_back(pinned)
            else:
                result = GateResult(promote=False, reasons=["no held-out prompts to evaluate on"])
        result.metrics.update({"ppo_round": float(self.state.ppo_rounds), "rm_update": float(self.state.rm_updates)})
        with self.metrics.step_seconds.labels("publish").time():
            parent = None if incumbent_version == BASE_VERSION else incumbent_version
            publish_candidate(self.registry, version, trainer.policy, self.tokenizer, result, parent=parent,
                              base_model=self.settings.model)
        if result.promote:
            self.state.promotions += 1
            self.metrics.promotions.inc()
        elif result.held_back_by:
            self.state.held_back += 1
            self.metrics.held_back.inc()
        else:
            self.state.rejections += 1
            self.metrics.rejections.inc()
        for policy in ("candidate", "incumbent"):
            if f"{policy}_reward_mean" in result.metrics:
                self.metrics.reward.labels(policy).set(result.metrics[f"{policy}_reward_mean"])
            if f"{policy}_kl" in result.metrics:
                self.metrics.kl.labels(policy).set(result.metrics[f"{policy}_kl"])
        self.state.incumbent = self.registry.current()
        self.state.pending_candidate = None
        self.state.record({"kind": "gate", "version": version, "promote": result.promote,
                           "held_back_by": result.held_back_by, "reasons": result.reasons, **result.metrics})
        self.store.save(self.state)
        log.info("gate done", extra={"version": version, "promote": result.promote, "reasons": result.reasons})
        return result

    # ---- the loop --------------------------------------------------------------------------------
    def round(self) -> RoundReport:
        """One pass of the loop. Each step starts only if no stop was requested."""
        self.start()
        started = time.perf_counter()
        report = RoundReport()
        report.ingest = self.ingest()
        if not self.stop_requested:
            self.follow_rollback()
        if not self.stop_requested and self.state.pending_candidate:  # resumed with an un-gated candidate
            report.version = self.state.pending_candidate
            report.gate = self.gate_and_publish()
        if not self.stop_requested:
            report.sft = self.maybe_run_sft()
        if not self.stop_requested:
            report.reward = self.maybe_update_reward_model()
        if not self.stop_requested:
            report.ppo = self.maybe_run_ppo_round()
        if not self.stop_requested and self.state.pending_candidate:
            report.version = self.state.pending_candidate
            report.gate = self.gate_and_publish()
        report.duration_s = time.perf_counter() - started
        if report.trained:
            self.metrics.step_seconds.labels("round").observe(report.duration_s)
        return report

    def run(self, max_rounds: int | None = None) -> int:
        """Rounds until a stop is requested (or ``max_rounds`` rounds trained). Returns rounds trained.

        Redis being unreachable does not end the loop: the round's in-memory training state is dropped
        (the newest checkpoint is the truth), and the round is retried after ``poll_interval_s``.
        """
        import redis

        self.start()
        trained = 0
        idle = False
        while not self.stop_requested:
            try:
                report = self.round()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable, retrying from the last checkpoint", extra={"error": str(exc)})
                self.reload_from_checkpoint()
                self._sleep(self.settings.poll_interval_s)
                continue
            self.report_waiting()
            if report.trained:
                trained += 1
                idle = False
                if max_rounds is not None and trained >= max_rounds:
                    break
                continue
            if not idle:  # once per idle spell, not once per poll
                log.info("learner idle", extra={"dataset": self.dataset.counts(), "rm_updates": self.state.rm_updates,
                                                 "ppo_rounds": self.state.ppo_rounds})
                idle = True
            self._wait()
        log.info("learner stopped", extra={"rounds": trained, "state": self.state.model_dump(exclude={"history"})})
        return trained

    # ---- admin decisions and waiting -------------------------------------------------------------
    def follow_rollback(self) -> str | None:
        """After an admin rollback, restart the working policy from the version now current."""
        rolled_back, cursor = rollbacks_since(self.redis, self.settings.stream_prefix, self.state.policy_events_cursor)
        if cursor == self.state.policy_events_cursor:
            return None
        self.state.policy_events_cursor = cursor  # saved with the next checkpoint; re-reading is harmless
        if not rolled_back:
            return None
        target = self.registry.current() or BASE_VERSION
        source = self.reference_path
        if target != BASE_VERSION:
            self.registry.verify(target)
            source = str(self.registry.version_dir(target))
        policy = self._causal_lm(source)
        log.info("rolled back by an admin: the working policy restarts from the version rolled back to",
                 extra={"rolled_back": rolled_back, "to": target, "dropped_candidate": self.state.pending_candidate})
        self._trainer = None
        self.state.record({"kind": "rollback", "rolled_back": rolled_back, "to": target,
                           "dropped_candidate": self.state.pending_candidate})
        self.state.incumbent = target
        self.state.pending_candidate = None  # trained on the line the admin rolled back
        self.store.save(self.state, models={"policy": (policy, self.tokenizer)}, optimizers={"ppo": {}})
        return target

    def waiting(self) -> list[Wait]:
        """What each waiting step needs (``learner/waiting.py``)."""
        return waits(self.settings, self.dataset, self.state, self.store.model_dir("reward") is not None)

    def report_waiting(self) -> list[Wait]:
        """Log the waiting reasons when they change and set the ``learner_waiting`` gauge."""
        now = self.waiting()
        if [w.message for w in now] != [w.message for w in self._waiting]:
            for wait in now:
                log.info("learner waiting", extra={"step": wait.step, "have": wait.have, "need": wait.need,
                                                    "knob": wait.knob, "reason": wait.message})
        for wait in self._waiting:
            self.metrics.waiting.labels(wait.step, wait.knob).set(0)
        for wait in now:
            self.metrics.waiting.labels(wait.step, wait.knob).set(wait.missing)
        self._waiting = now
        return now

    def reload_from_checkpoint(self) -> None:
        """Forget in-memory training state; models and counters come back from the newest checkpoint."""
        self.state = self.store.load_state()
        self._reward = self._trainer = self._reference = self._tokenizer = None

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _wait(self) -> None:
        """Idle until the poll interval passes or a stop is requested, ingesting whatever arrives."""
        deadline = time.monotonic() + self.settings.poll_interval_s
        while not self.stop_requested and time.monotonic() < deadline:
            block = min(self.settings.read_block_ms, max(1, int((deadline - time.monotonic()) * 1000)))
            stats = self.ingestor.poll(block_ms=block)
            if stats.read:
                log.info("ingested", extra={"read": stats.read, "inserted": stats.inserted,
                                             "duplicates": stats.duplicates, "dead_lettered": stats.dead_lettered})
        self.ingestor.update_lag()
