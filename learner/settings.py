"""The learner's one ``Settings`` object (env prefix ``INSTRUCTLOOP_LEARNER_``) and the one function that
resolves the algorithms' configs from it (``resolve_learner_config``, logged in full on "learner started").

Service knobs (Redis, folders, thresholds, gate, metrics) are flat fields; the gate's defaults are
``GateConfig``'s. The headline hyperparameters (``kl_coef`` = β, ``ptx_coef`` = γ, ``ptx_corpus``) are flat
too and only flat (the PPO JSON may not set them); every other hyperparameter of the algorithm dataclasses
(``RewardConfig``, ``SFTConfig``, ``PPOConfig``, ``EvalConfig`` in ``learner/config.py``; ``AdapterConfig``
as ``adapters``) can be overridden with a JSON object, e.g. ``INSTRUCTLOOP_LEARNER_PPO='{"ppo_epochs": 2}'``.
In lora mode the learning rates default to ``AdapterConfig``'s ``ppo_lr`` / ``reward_lr``; an ``lr`` in the
PPO or REWARD JSON wins (the resolved config says which rate is in use).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from instructloop.settings import DEFAULT_MODEL, home_dir, settings_config
from instructloop.streams import DEFAULT_PREFIX
from learner.config import AdapterConfig, EvalConfig, PPOConfig, RewardConfig, SFTConfig
from learner.gate import GateConfig

FLAT_ONLY = {"ppo": ("kl_coef", "ptx_coef")}
"""JSON override fields refused because a flat knob sets them (one place per value)."""


class Settings(BaseSettings):
    model_config = settings_config("INSTRUCTLOOP_LEARNER_")

    # ---- shared by name with the other deployables ------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL, description="Base (SFT) model: 'default' or an HF causal-LM folder / hub id."
    )
    redis_url: str | None = Field(None, description="Redis holding the streams. The learner needs it.")
    stream_prefix: str = DEFAULT_PREFIX
    registry_dir: Path = Field(default_factory=lambda: home_dir() / "registry")

    # ---- the learner's own folders ---------------------------------------------------------------
    state_dir: Path = Field(
        default_factory=lambda: home_dir() / "learner",
        description="Dataset (SQLite) and checkpoints (policy / value / RM weights, optimizer, counters).",
    )

    # ---- ingestion -------------------------------------------------------------------------------
    consumer_group: str = "learner"
    consumer_name: str = Field(
        default_factory=socket.gethostname,
        description="Stable per replica (a StatefulSet pod name): "
        "a restarted learner re-reads its own pending entries.",
    )
    claim_min_idle_ms: int = Field(
        60_000,
        ge=0,
        description="Pending entries of another consumer idle this long are reclaimed (XAUTOCLAIM).",
    )
    read_count: int = Field(256, ge=1, description="Entries per XREADGROUP call (per stream).")
    read_block_ms: int = Field(1000, ge=0, description="How long one read waits for new entries.")
    trim_interval_s: float = Field(
        60.0,
        gt=0,
        description="How often the streams are trimmed below what every consumer group acknowledged.",
    )
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of distinct prompts (by a hash of the prompt) kept out of training, for the gate "
        "and the RM's held-out accuracy: a prompt lives in one split only.",
    )
    heldout_min_prompts: int = Field(
        4,
        ge=0,
        description="Held-out prompts the split guarantees however the hash falls: the lowest-hash prompts "
        "up to this many, but at most one in 4 distinct prompts (2 of 8, 4 of 16). 0 = the hash share only.",
    )

    # ---- the loop --------------------------------------------------------------------------------
    min_new_comparisons: int = Field(
        64, ge=1, description="New (training) comparisons needed for an RM update."
    )
    min_prompts: int = Field(64, ge=1, description="Training prompts needed for a PPO-ptx round.")
    min_rm_comparisons: int = Field(
        32,
        ge=0,
        description="Comparisons the RM must have been trained on, in total, before PPO-ptx rounds start "
        "(binds when min_new_comparisons is lower): PPO on an RM from a handful of rankings optimises its "
        "noise. 0 = no minimum.",
    )
    prompts_per_round: int = Field(64, ge=1, description="Prompts sampled (at most) for one PPO-ptx round.")
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts used by the gate (at most).")
    max_rounds_per_rm_update: int = Field(
        2,
        ge=1,
        description="PPO-ptx rounds on one reward model; then PPO waits for the next RM update: rounds on an "
        "unchanged RM optimise its errors (new prompts alone do not lift this bound).",
    )
    restart_after_rejections: int = Field(
        3,
        ge=1,
        description="After this many rejections in a row that found the candidate drifted (worse than the "
        "incumbent, the base or the best version, past the KL ceiling, or losing live) the working policy "
        "restarts from the incumbent (fresh PPO optimizer); a rejection for not yet beating the incumbent "
        "breaks the row (a few rounds' progress is not measurable in one gate).",
    )
    poll_interval_s: float = Field(
        5.0, gt=0, description="Pause between rounds when there was nothing to do."
    )
    max_rounds: int | None = Field(
        None, ge=1, description="`learner run` stops after this many rounds (None = forever)."
    )

    # ---- gate (defaults: GateConfig, learner/gate.py) ------------------------------------------------
    gate_min_prompts: int = Field(
        2,
        ge=1,
        description="Held-out prompts the gate needs: until the split holds this many, PPO rounds wait (a "
        "candidate could never be judged). At most heldout_min_prompts (unless that is 0).",
    )
    gate_samples: int = Field(
        GateConfig.samples,
        ge=2,
        description="(prompt, sample) pairs the gate samples every compared version on, at least.",
    )
    gate_max_samples: int = Field(
        GateConfig.max_samples,
        ge=2,
        description="Pairs the gate extends to (other seeds) when the first gate_samples leave a candidate "
        "with a positive mean gain neither promoted nor shown worse; = gate_samples: never extend.",
    )
    gate_confidence: float = Field(
        GateConfig.confidence,
        ge=0.5,
        lt=1,
        description="One-sided confidence of the lower bound on the candidate's mean gain.",
    )
    gate_margin: float = Field(
        GateConfig.margin,
        ge=0,
        description="δ in normalised RM units: the gain's lower bound over the incumbent, the base and the "
        "best version so far must clear -δ.",
    )
    gate_min_reward_gain: float = Field(
        GateConfig.min_reward_gain,
        description="The candidate's mean gain over the incumbent must exceed this (RM units).",
    )
    gate_sure_gain_suffices: bool = Field(
        GateConfig.sure_gain_suffices,
        description="A gain under gate_min_reward_gain still beats the incumbent when its lower bound is "
        "above 0 (measured surely); false: the minimum gain always binds.",
    )
    gate_kl_ceiling: float = Field(
        GateConfig.kl_ceiling,
        gt=0,
        description="Candidate KL to the reference (nats per response, summed over tokens) must stay below.",
    )
    gate_min_live_comparisons: int = Field(
        GateConfig.min_live_comparisons,
        ge=1,
        description="Live comparisons between the two versions needed before their win-rate counts.",
    )
    gate_min_win_rate: float = Field(
        GateConfig.min_win_rate,
        ge=0,
        le=1,
        description="Candidate live win-rate against the incumbent must reach this.",
    )
    gate_live_wait_s: float = Field(
        0.0,
        ge=0,
        description="Seconds a new candidate waits in the registry (status candidate, servable by name, "
        "shown by the labeling page's compare mode) for gate_min_live_comparisons live A/B "
        "pairs against the incumbent before the gate decides; 0 = decide at once.",
    )

    # ---- hyperparameters -------------------------------------------------------------------------
    kl_coef: float = Field(
        PPOConfig.kl_coef, ge=0, description="β: per-token KL penalty to the reference policy."
    )
    ptx_coef: float = Field(
        PPOConfig.ptx_coef,
        ge=0,
        description="γ: weight of the pretraining log-likelihood "
        "(0 = plain PPO; not the paper's 27.8: see PPOConfig).",
    )
    ptx_corpus: str | None = Field(
        None, description="Text corpus for ptx (file, folder, HF dataset path); None = the shipped default."
    )
    reward: dict[str, Any] = Field(default_factory=dict, description="Overrides for RewardConfig (JSON).")
    sft: dict[str, Any] = Field(default_factory=dict, description="Overrides for SFTConfig (JSON).")
    ppo: dict[str, Any] = Field(default_factory=dict, description="Overrides for PPOConfig (JSON).")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="Overrides for EvalConfig (JSON).")
    training: Literal["lora", "full"] = Field(
        "lora",
        description="How policy, value model and RM are trained: 'lora' = LoRA adapters over one frozen copy "
        "of the base model (the reference is that base with adapters off; versions are PEFT adapter "
        "folders), 'full' = every weight, one model per role (full-weight versions; for GPUs).",
    )
    adapters: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides for AdapterConfig (JSON), e.g. '{\"r\": 8}'; training=lora only.",
    )
    sft_on_start: bool = Field(
        False,
        description="Run SFT once, before the first PPO round, when SFTConfig.min_demonstrations training "
        "demonstrations exist; the SFT model then is the reference and the policy's start.",
    )

    # ---- runtime ---------------------------------------------------------------------------------
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'…")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype ('auto': bfloat16 on CUDA, float32 on CPU). bfloat16 = mixed precision: "
        "frozen weights (the LoRA base, full mode's reference) are held in bfloat16 and every forward pass "
        "runs under torch.autocast; trained weights (adapters, score heads, full mode's policy, value model "
        "and RM) and their optimizer state stay float32.",
    )
    seed: int = 0
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads (None = torch's default). 1 avoids spin-wait thrashing on "
        "a CPU shared with other processes.",
    )
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Prometheus /metrics and /healthz port (0 = off)."
    )
    liveness_max_age_s: float = Field(
        900.0,
        gt=0,
        description="/healthz on the metrics port fails (503) when the main loop's heartbeat is older "
        "than this; it must exceed the longest single step (see learner_step_duration_seconds).",
    )
    redis_socket_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Socket timeout of the learner's Redis client (a hung Redis raises instead of "
        "blocking forever); must exceed read_block_ms.",
    )
    redis_connect_timeout_s: float = Field(
        60.0,
        ge=0,
        description="At start, how long the learner waits for Redis to answer before it exits (2) with "
        "an error: components of one deployment start together, and Redis may come up after the learner. "
        "0 = exit at once.",
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept in state_dir (older ones are deleted)."
    )
    log_level: str = "INFO"
    json_logs: bool = True

    @field_validator("stream_prefix", "consumer_group", "consumer_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_place_per_value(self) -> Settings:
        for section, names in FLAT_ONLY.items():
            for name in names:
                if name in getattr(self, section):
                    raise ValueError(
                        f"{name} is set in INSTRUCTLOOP_LEARNER_{section.upper()}: set it with "
                        f"INSTRUCTLOOP_LEARNER_{name.upper()} instead (one place per value)"
                    )
        if self.heldout_min_prompts and self.gate_min_prompts > self.heldout_min_prompts:
            raise ValueError(
                f"gate_min_prompts ({self.gate_min_prompts}) exceeds heldout_min_prompts "
                f"({self.heldout_min_prompts}): the split would not guarantee it; lower "
                "INSTRUCTLOOP_LEARNER_GATE_MIN_PROMPTS or raise ..._HELDOUT_MIN_PROMPTS"
            )
        if self.gate_max_samples < self.gate_samples:
            raise ValueError(
                f"gate_max_samples ({self.gate_max_samples}) is under gate_samples ({self.gate_samples}): "
                "raise INSTRUCTLOOP_LEARNER_GATE_MAX_SAMPLES (set it equal to never extend a gate)"
            )
        return self

    @model_validator(mode="after")
    def _timeout_exceeds_block(self) -> Settings:
        if self.redis_socket_timeout_s * 1000 <= self.read_block_ms + 1000:
            raise ValueError(
                f"redis_socket_timeout_s ({self.redis_socket_timeout_s}) must exceed read_block_ms "
                f"({self.read_block_ms} ms) by at least 1 s: "
                "raise INSTRUCTLOOP_LEARNER_REDIS_SOCKET_TIMEOUT_S"
            )
        return self

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ValueError(
                "the learner needs Redis: set INSTRUCTLOOP_LEARNER_REDIS_URL (e.g. redis://localhost:6379/0)"
            )
        return self.redis_url

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"


@dataclass(frozen=True)
class LearnerConfig:
    """The algorithms' configs as the learner runs them (``resolve_learner_config``)."""

    reward: RewardConfig
    """Seeded ``Settings.seed``; each RM update adds its number to the seed."""
    sft: SFTConfig
    ppo: PPOConfig
    evaluation: EvalConfig
    gate: GateConfig
    adapters: AdapterConfig | None
    """None in full mode."""

    def as_dict(self) -> dict[str, Any]:
        return {
            name: asdict(value) if value is not None else None
            for name, value in (
                ("reward", self.reward),
                ("sft", self.sft),
                ("ppo", self.ppo),
                ("evaluation", self.evaluation),
                ("gate", self.gate),
                ("adapters", self.adapters),
            )
        }


def lora_rates(settings: Settings, role: str) -> dict[str, float]:
    """The ``lr`` default of ``role``'s config ("reward" or "ppo") in lora mode (``AdapterConfig``'s
    ``reward_lr`` / ``ppo_lr``); nothing in full mode (the config's own full fine-tuning rate)."""
    if settings.training != "lora":
        return {}
    return {"lr": getattr(AdapterConfig(**settings.adapters), f"{role}_lr")}


def resolve_learner_config(settings: Settings) -> LearnerConfig:
    """Every algorithm config from ``settings``: the dataclass defaults, then the mode's learning rates, then
    the flat knobs and ``seed``, then the JSON overrides (which may not repeat a flat knob: ``FLAT_ONLY``).
    Raises ``ValueError`` naming the field when a value is refused."""
    seed = {"seed": settings.seed}
    return LearnerConfig(
        reward=RewardConfig(**{**seed, **lora_rates(settings, "reward"), **settings.reward}),
        sft=SFTConfig(**{**seed, **settings.sft}),
        ppo=PPOConfig(
            **{
                **seed,
                **lora_rates(settings, "ppo"),
                "kl_coef": settings.kl_coef,
                "ptx_coef": settings.ptx_coef,
                **settings.ppo,
            }
        ),
        evaluation=EvalConfig(**{**seed, **settings.evaluation}),
        gate=GateConfig(
            samples=settings.gate_samples,
            max_samples=settings.gate_max_samples,
            confidence=settings.gate_confidence,
            margin=settings.gate_margin,
            min_reward_gain=settings.gate_min_reward_gain,
            sure_gain_suffices=settings.gate_sure_gain_suffices,
            kl_ceiling=settings.gate_kl_ceiling,
            min_live_comparisons=settings.gate_min_live_comparisons,
            min_win_rate=settings.gate_min_win_rate,
        ),
        adapters=AdapterConfig(**settings.adapters) if settings.training == "lora" else None,
    )
