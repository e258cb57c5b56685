"""Hyperparameters of the learner's algorithms: one dataclass per component, a docstring per field.

``__post_init__`` checks fields against each other and raises ``ValueError`` naming the field to fix.
The service side (learner/settings.py) builds these from its Settings; algorithms only read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from instructloop.wire import LEARNING_MAX_TOKENS, LEARNING_TEMPERATURE


def _positive(owner: str, **fields: float) -> None:
    for name, value in fields.items():
        if not value > 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


@dataclass
class RewardConfig:
    """Reward-model training on K-wise rankings (paper eq. 1)."""

    lr: float = 1e-5
    """AdamW learning rate (the paper used 9e-6 for its 6B RM; a 135M model tolerates about the same)."""
    epochs: int = 2
    """Passes over the new comparisons of one update. The paper trains one epoch over 33k comparisons; online,
    an update sees only the few new ones (``min_new_comparisons``, 8 with the documented knob for 16 prompts)
    and never sees them again: 2 passes (with one ranking per step, 2 steps per ranking)."""
    single_pass_above: int = 16
    """An update training on more rankings than this (new and replayed) makes one pass: a backlog that built
    up during a PPO round is not trained twice."""
    max_new_per_update: int = 16
    """New rankings one update trains on, at most: the newest ones; the rest join the replay pool of later
    updates (kept, not lost). Bounds an update's cost (about ``max_new_per_update · (1 + replay_ratio)``
    steps) whatever the feedback rate, so RM updates do not crowd out PPO rounds."""
    rankings_per_batch: int = 1
    """Rankings per optimizer step; all K responses of a ranking go into the same forward pass. One: a LoRA RM
    starts at zero and needs steps, and several rankings a step cut them (bench/preference_offline.py,
    ``start:The``, 48 rankings at LoRA lr 1e-3: held-out pair accuracy 1.0 at one a step, 0.52 at four)."""
    replay_ratio: float = 0.5
    """Older (already trained) rankings sampled into an update per new one, so an update does not forget what
    earlier ones learned; 0 = the new rankings only."""
    max_length: int = 512
    """Tokens per (prompt, response) sequence; the prompt is cut from the left to fit."""
    weight_decay: float = 0.01
    """AdamW weight decay (decoupled): keeps an RM trained
    on few rankings from growing weights to fit them."""
    refuse_tolerance: float = 0.05
    """An update is not used when its held-out loss (nats per pair) exceeds the previous RM's by more than
    this: an RM that fits its held-out pairs has a loss near 0, and a difference of 1e-15 there is noise."""
    ready_confidence: float = 0.95
    """PPO starts once the one-sided lower confidence bound (Wilson) of the RM's held-out pair accuracy at
    this level is above 0.5 (``learner.reward.rm_ready``): an RM no better than chance is not optimised
    against. 0 = no check."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    score_batch_size: int = 16
    """Sequences per forward pass when only scoring (held-out accuracy, bias normalisation)."""
    seed: int = 0
    """Seed of the shuffle."""

    def __post_init__(self) -> None:
        _positive(
            "RewardConfig",
            lr=self.lr,
            epochs=self.epochs,
            rankings_per_batch=self.rankings_per_batch,
            single_pass_above=self.single_pass_above,
            max_new_per_update=self.max_new_per_update,
            max_length=self.max_length,
            max_grad_norm=self.max_grad_norm,
            score_batch_size=self.score_batch_size,
        )
        if self.weight_decay < 0 or self.replay_ratio < 0:
            raise ValueError(
                f"RewardConfig.weight_decay and replay_ratio must be >= 0, got {self.weight_decay}, "
                f"{self.replay_ratio}"
            )
        if self.refuse_tolerance < 0:
            raise ValueError(f"RewardConfig.refuse_tolerance must be >= 0, got {self.refuse_tolerance}")
        if not 0 <= self.ready_confidence < 1:
            raise ValueError(f"RewardConfig.ready_confidence must be in [0, 1), got {self.ready_confidence}")
        if self.max_length < 8:
            raise ValueError(
                f"RewardConfig.max_length={self.max_length} leaves no room for a prompt and response"
            )


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations (TRL SFTTrainer, loss on the completion only)."""

    lr: float = 2e-5
    """Learning rate."""
    epochs: float = 1.0
    """Passes over the demonstrations (the paper trained 16 epochs on 13k demonstrations; online we see
    far fewer, so one pass per round avoids memorising them)."""
    batch_size: int = 4
    """Demonstrations per device step."""
    gradient_accumulation_steps: int = 1
    """Steps accumulated per optimizer step."""
    max_length: int = 512
    """Tokens per prompt+completion; longer ones are truncated."""
    min_demonstrations: int = 16
    """Below this many demonstrations the service should skip SFT and keep the already-instruct-tuned model
    (DESIGN: "SFT when there are enough of them"). ``run_sft`` refuses fewer than one."""
    warmup_ratio: float = 0.0
    """Fraction of steps of linear warm-up."""
    seed: int = 0
    """Seed of the trainer."""
    logging_steps: int = 10
    """Log every this many optimizer steps."""

    def __post_init__(self) -> None:
        _positive(
            "SFTConfig",
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_length=self.max_length,
            min_demonstrations=self.min_demonstrations,
            logging_steps=self.logging_steps,
        )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"SFTConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class PPOConfig:
    """One PPO-ptx round: the objective of paper eq. (2), optimised with clipped PPO."""

    rollout_batch_size: int = 32
    """Rollouts per round: ``rollout_batch_size / samples_per_prompt`` prompts, each answered
    ``samples_per_prompt`` times (with fewer training prompts, each equally often). 32 rollouts seen once
    learn more per second than 16 seen 4 times (``ppo_epochs``)."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt in a round; each one's score is baselined by the mean of the others'
    (RLOO), so a prompt's own offset in the RM (eq. 1 fixes only differences within a prompt) drops out of
    the advantages whatever the traffic's number of distinct prompts; 1 = no per-prompt baseline."""
    mini_batch_size: int = 4
    """Rollouts per PPO optimizer step; must divide ``rollout_batch_size``."""
    ppo_epochs: int = 2
    """Passes over the round's rollouts (each pass: shuffled minibatches). Two: 16 clipped steps a round
    for about 1.2× a one-pass round's time (rollout, scoring, RM update and gate are paid once)."""
    lr: float = 3e-6
    """AdamW learning rate of the policy (and of the value model) in full fine-tuning; lora mode uses
    ``AdapterConfig.ppo_lr`` unless ``lr`` is set explicitly (``resolve_learner_config``)."""
    value_lr: float | None = None
    """Learning rate of the value model; None = ``lr``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm, per model."""
    kl_coef: float = 0.05
    """β of eq. (2): per-token penalty on log(π/π_ref), in normalised reward units (the reference's
    samples score std 1, ``learner.reward.normalize_reward``): 5 nats of KL cost a quarter of the
    reference's spread."""
    adaptive_kl: bool = False
    """Adapt β toward ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target per-sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10
    """Horizon of the adaptive controller, in PPO rounds: β moves at most 20 % / ``kl_horizon`` per
    round, so about ``kl_horizon`` rounds pull the KL to its target (a horizon in rollouts depended
    on the round size)."""
    ptx_coef: float = 0.01
    """γ of eq. (2): weight of the pretraining log-likelihood (a per-token mean, as the PPO loss); 0 = plain
    PPO. Not the paper's 27.8 (other loss normalisation, 8× more pretraining samples): 0.01 keeps the held-out
    pretraining NLL near the reference's round after round on the default model (docs/benchmarks.md)."""
    ptx_batch_size: int = 2
    """Pretraining sequences per ptx step (2 × 128 tokens: about the RL tokens of a 4-rollout minibatch)."""
    ptx_seq_len: int = 128
    """Tokens per pretraining sequence."""
    ptx_eval_windows: int = 16
    """Windows of ``ptx_seq_len`` tokens whose NLL each round reports against the reference's: held-out
    windows of the ptx corpus (``ptx_heldout_nll_ratio``) and of text from another source, the alignment tax
    (``tax_nll_ratio``, ``learner.ptx.alignment_tax_windows``). 0 = not measured."""
    cliprange: float = 0.2
    """ε of the clipped ratio."""
    cliprange_value: float = 0.2
    """ε_v of the clipped value loss, in normalised reward units: a fifth of the reference's score spread per
    step (``value_clip_fraction`` reports how often it binds)."""
    gamma: float = 1.0
    """GAE discount (1: the episode is one response)."""
    lam: float = 1.0
    """GAE λ. 1: every token's advantage is the response's return minus V(s_t), so the RM's score at the end
    reaches the token that decided it undiminished (below 1 it decays by λ per token toward the start)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (keeping their mean) before GAE."""
    temperature: float = LEARNING_TEMPERATURE
    """Sampling temperature (the loop's one default, ``instructloop.wire``); logits are divided by it before
    every logprob (policy, reference, old and new)."""
    max_new_tokens: int = LEARNING_MAX_TOKENS
    """Response length cap (tokens; a prompt's traffic ``max_tokens`` cuts sooner); a response that reaches
    it without EOS is penalised."""
    max_prompt_tokens: int = 256
    """Query tokens (chat template included) kept, from the right."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the RM score of a response with no EOS (Huang et al.: penalise incomplete
    responses so the policy does not learn to ramble), in normalised units: one std of the reference's
    scores, as much as a clear preference. None disables it."""
    forward_batch_size: int = 8
    """Sequences per no-grad forward pass (reference logprobs, values, scores)."""
    seed: int = 0
    """Seed of prompt order, sampling and minibatch shuffles."""

    @property
    def reads_ptx_corpus(self) -> bool:
        """The trainer needs a ``PtxSource``: for the ptx term,
        or only to measure the alignment tax (plain PPO)."""
        return self.ptx_coef > 0 or self.ptx_eval_windows > 0

    def __post_init__(self) -> None:
        _positive(
            "PPOConfig",
            rollout_batch_size=self.rollout_batch_size,
            mini_batch_size=self.mini_batch_size,
            ppo_epochs=self.ppo_epochs,
            lr=self.lr,
            max_grad_norm=self.max_grad_norm,
            kl_target=self.kl_target,
            kl_horizon=self.kl_horizon,
            ptx_batch_size=self.ptx_batch_size,
            ptx_seq_len=self.ptx_seq_len,
            cliprange=self.cliprange,
            cliprange_value=self.cliprange_value,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            forward_batch_size=self.forward_batch_size,
        )
        if self.samples_per_prompt < 1 or self.rollout_batch_size % self.samples_per_prompt:
            raise ValueError(
                f"PPOConfig.samples_per_prompt={self.samples_per_prompt} must be >= 1 and divide "
                f"rollout_batch_size={self.rollout_batch_size}"
            )
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"PPOConfig.mini_batch_size={self.mini_batch_size} must divide "
                f"rollout_batch_size={self.rollout_batch_size}"
            )
        if self.mini_batch_size < 2:
            raise ValueError("PPOConfig.mini_batch_size must be >= 2 (advantages are whitened per round)")
        if self.kl_coef < 0 or self.ptx_coef < 0:
            raise ValueError("PPOConfig.kl_coef and PPOConfig.ptx_coef must be >= 0")
        if self.ptx_eval_windows < 0:
            raise ValueError("PPOConfig.ptx_eval_windows must be >= 0")
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(
                f"PPOConfig.gamma must be in (0, 1] and lam in [0, 1], got {self.gamma}, {self.lam}"
            )
        if self.value_lr is not None and not self.value_lr > 0:
            raise ValueError(f"PPOConfig.value_lr must be > 0 or None, got {self.value_lr}")
        if self.ptx_seq_len < 2:
            raise ValueError("PPOConfig.ptx_seq_len must be >= 2 (one token predicts the next)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    """Held-out evaluation of a policy, for the promotion gate."""

    max_new_tokens: int = LEARNING_MAX_TOKENS
    """Response length cap (tokens; a prompt's traffic ``max_tokens`` cuts sooner), as PPO's."""
    do_sample: bool = True
    """Seeded sampling at ``temperature`` (the gate judges answers as they are served); False: greedy."""
    temperature: float = LEARNING_TEMPERATURE
    """Sampling temperature (with ``do_sample``), PPO's and the labeling page's; the KL uses it too."""
    batch_size: int = 8
    """Prompts per generate/forward call."""
    max_prompt_tokens: int = 256
    """Query tokens kept, from the right."""
    seed: int = 0
    """Seed of sampling (with ``do_sample``): batch ``i`` samples from ``seed + i``, so two policies given
    the same prompts in the same order draw with the same seeds (their scores pair by prompt and seed)."""

    def __post_init__(self) -> None:
        _positive(
            "EvalConfig",
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
        )


@dataclass
class AdapterConfig:
    """LoRA adapters (``INSTRUCTLOOP_LEARNER_TRAINING=lora``): policy, value model and RM are adapters over
    one frozen base model."""

    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (the update is ``alpha / r · B A``)."""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Linear layers that get an adapter (Llama/Qwen/Mistral names): every projection of attention and MLP."""
    top_layers: int | None = None
    """Adapt only the top N transformer layers (peft's ``layers_to_transform``); None = every layer. Below the
    lowest adapted layer nothing needs a gradient, so backward (PPO update, ptx, RM) stops there."""
    reward_lr: float = 1e-3
    """The RM's learning rate in lora mode, where ``RewardConfig.lr`` (the full fine-tuning rate) does not
    apply; an ``lr`` set in ``INSTRUCTLOOP_LEARNER_REWARD`` wins over this one (both logged at start). 1e-3:
    lower rates left the RM at chance after an update on the default model (docs/benchmarks.md)."""
    ppo_lr: float = 4e-4
    """PPO's policy (and value model) learning rate in lora mode, where ``PPOConfig.lr`` (the full
    fine-tuning rate) is not used; an ``lr`` set in ``INSTRUCTLOOP_LEARNER_PPO`` wins over this one
    (both logged at start). A LoRA update starts at zero through a rank-r bottleneck, so its rate
    is ~100× full fine-tuning's."""

    def __post_init__(self) -> None:
        _positive("AdapterConfig", r=self.r, alpha=self.alpha, reward_lr=self.reward_lr, ppo_lr=self.ppo_lr)
        if not self.target_modules:
            raise ValueError("AdapterConfig.target_modules must name at least one linear layer")
        if self.top_layers is not None and self.top_layers < 1:
            raise ValueError(
                "AdapterConfig.top_layers must be at least 1 (or null for every layer), "
                f"got {self.top_layers}"
            )
        self.target_modules = tuple(self.target_modules)
