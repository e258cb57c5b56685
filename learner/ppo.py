"""PPO-ptx (paper section 3.5, eq. 2), one round at a time.

objective(φ) = E_{(x,y)~π_φ}[ r_θ(x, y) - β·log(π_φ(y|x) / π_SFT(y|x)) ] + γ·E_{x~D_pretrain}[ log π_φ(x) ]

Four models, all with dropout off:

- ``policy``: a causal LM, trained (starts from the SFT model);
- ``reference``: the frozen SFT model (π_SFT), for the per-token KL;
- ``value_model``: a copy of the reward model (``AutoModelForSequenceClassification``) whose score head is
  applied at every position (``learner.reward.token_scores``): V(s_t) is the head on the hidden state of
  the last token before response token t. Initialising from the RM is the paper's choice (value init
  from RM); a separate model (not a head on the policy) keeps the two losses from fighting;
- ``reward_model``: frozen, scores query + response at the last real token (the EOS).

``PPOPtxTrainer.round(prompts)`` runs the numbered steps of ``round``; the pure math is in
``learner.losses``. The ptx gradient is added at every policy optimizer step (the same step as the
clipped policy loss, so each step follows the gradient of eq. 2's full objective), on its own
pretraining batch from ``PtxSource``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import torch

from learner.config import PPOConfig
from learner.losses import (
    AdaptiveKLController,
    FixedKLController,
    baselined_advantages,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    kl_from_logits,
    kl_penalized_rewards,
    leave_one_out_baseline,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ptx_loss,
)
from learner.ptx import PtxSource, alignment_tax_windows, mean_nll
from learner.reward import sequence_scores, token_scores
from learner.rollout import Rollouts, generate_rollouts, scoring_inputs
from learner.utils import disable_dropout, position_ids_from_mask, progress_iter

log = logging.getLogger(__name__)


def response_logits(
    model,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
) -> torch.Tensor:
    """Logits that predict each response token, divided by the sampling temperature. Returns (B, Tr, V)."""
    response_length = query_responses.size(1) - context_length
    logits = model(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_length + 1,  # the LM head only where a response token is predicted
    ).logits  # (B, Tr + 1, V)
    return logits[:, :-1] / temperature  # (B, Tr, V)


def response_logprobs(model, rollouts: Rollouts, temperature: float, batch_size: int) -> torch.Tensor:
    """log π(y_t | x, y_<t) of every response token, no grad, in chunks. Returns (B, Tr)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, rollouts.query_responses.size(0), batch_size):
            rows = slice(start, start + batch_size)
            query_responses = rollouts.query_responses[rows].to(device)
            logits = response_logits(
                model,
                query_responses,
                rollouts.attention_mask[rows].to(device),
                rollouts.context_length,
                temperature,
            )
            out.append(logprobs_from_logits(logits, query_responses[:, rollouts.context_length :]).cpu())
    return torch.cat(out)


def response_kl(policy, reference, rollouts: Rollouts, temperature: float, batch_size: int) -> torch.Tensor:
    """Exact per-token KL(π || π_ref) of the next-token distributions along each response, no grad.
    Returns (B, Tr), zero at masked positions."""
    device = next(policy.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, rollouts.query_responses.size(0), batch_size):
            rows = slice(start, start + batch_size)
            query_responses = rollouts.query_responses[rows].to(device)
            attention_mask = rollouts.attention_mask[rows].to(device)
            logits = response_logits(
                policy, query_responses, attention_mask, rollouts.context_length, temperature
            )
            ref_logits = response_logits(
                reference, query_responses, attention_mask, rollouts.context_length, temperature
            )
            out.append(kl_from_logits(logits, ref_logits).cpu())
    return torch.cat(out) * rollouts.response_mask


def response_values(value_model, rollouts: Rollouts, batch_size: int) -> torch.Tensor:
    """V of the state before each response token, no grad, in chunks. Returns (B, Tr)."""
    device = next(value_model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, rollouts.query_responses.size(0), batch_size):
            rows = slice(start, start + batch_size)
            values = token_scores(
                value_model,
                rollouts.query_responses[rows].to(device),
                rollouts.attention_mask[rows].to(device),
            )  # (b, Tq + Tr)
            out.append(values[:, rollouts.context_length - 1 : -1].float().cpu())
    return torch.cat(out)


def rollout_scores(reward_model, rollouts: Rollouts, batch_size: int, eos_token_id: int) -> torch.Tensor:
    """r(x, y) of each rollout, scored on ``scoring_inputs`` at the EOS, no grad. Returns (B,)."""
    device = next(reward_model.parameters()).device
    input_ids, attention_mask = scoring_inputs(rollouts, eos_token_id)
    out = []
    with torch.no_grad():
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            out.append(
                sequence_scores(reward_model, input_ids[rows].to(device), attention_mask[rows].to(device))
                .float()
                .cpu()
            )
    return torch.cat(out)


def round_prompt_indices(
    n_prompts: int, n: int, rng: random.Random, samples_per_prompt: int = 1
) -> list[int]:
    """Which prompt each of a round's ``n`` rollouts answers: ``n / samples_per_prompt`` draws without
    replacement, each answered ``samples_per_prompt`` times (adjacent); with fewer prompts than draws, every
    prompt drawn the same number of times (± 1), so no prompt dominates a round by chance."""
    draws = n // samples_per_prompt
    repeats, remainder = divmod(draws, n_prompts)
    picked = [i for i in range(n_prompts) for _ in range(repeats)] + rng.sample(range(n_prompts), remainder)
    rng.shuffle(picked)
    return [i for i in picked for _ in range(samples_per_prompt)]


class PPOPtxTrainer:
    """Runs PPO-ptx rounds on ``policy`` (and ``value_model``) in place; owns their optimizers."""

    def __init__(
        self,
        policy,
        reference,
        value_model,
        reward_model,
        tokenizer,
        config: PPOConfig,
        ptx_source: PtxSource | None = None,
        progress: bool = False,
    ):
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("PPO needs a pad token distinct from EOS (see instructloop.model.fix_tokenizer)")
        if config.ptx_coef > 0 and ptx_source is None:
            raise ValueError(
                "PPOConfig.ptx_coef > 0 needs a ptx_source (learner.ptx.PtxSource); "
                "set ptx_coef=0 for plain PPO"
            )
        self.policy, self.reference, self.value_model, self.reward_model = (
            policy,
            reference,
            value_model,
            reward_model,
        )
        self.tokenizer, self.config, self.ptx_source, self.progress = tokenizer, config, ptx_source, progress
        for model in (policy, reference, value_model, reward_model):
            disable_dropout(model)
        for frozen in (reference, reward_model):
            frozen.eval()
            frozen.requires_grad_(False)
        # the value model may be a copy of the (frozen) RM: it trains, in the RM's normalised units (its gain
        # and bias are config constants, not weights)
        value_model.requires_grad_(True)
        policy.requires_grad_(True)
        self.policy_optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=config.lr
        )
        self.value_optimizer = torch.optim.AdamW(
            [p for p in value_model.parameters() if p.requires_grad], lr=config.value_lr or config.lr
        )
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rounds_done = 0
        self._reference_nll: dict[str, float] | None = None
        self._ptx_batch = self._tax_batch = None

    # ---------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        """Optimizer, KL-controller and RNG state (the models' weights are saved by the caller)."""
        state = {
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "generator": self.generator.get_state(),
            "rounds_done": self.rounds_done,
        }
        if self.ptx_source is not None:
            state["ptx_source"] = self.ptx_source.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.generator.set_state(state["generator"])
        self.rounds_done = int(state["rounds_done"])
        if self.ptx_source is not None and "ptx_source" in state:
            self.ptx_source.load_state_dict(state["ptx_source"])

    # ------------------------------------------------------------------------------------------ round

    @torch.no_grad()
    def heldout_ptx_nll(self) -> dict[str, float]:
        """Per-token NLL of the policy against the reference's (computed once) on (a) ``ptx_eval_windows``
        held-out windows of the ptx corpus, never trained on (``ptx_heldout_nll*``: does ptx keep the policy
        on its corpus?) and (b) as many windows of text from another source, the alignment tax proper
        (``tax_nll*``, ``learner.ptx.alignment_tax_windows``: Python's stdlib docstrings)."""
        n = self.config.ptx_eval_windows
        if not n:
            return {}
        if self._reference_nll is None:
            self._tax_batch = alignment_tax_windows(self.tokenizer, n, self.config.ptx_seq_len)
            self._ptx_batch = self.ptx_source.heldout_batch(n) if self.ptx_source is not None else None
            self._reference_nll = {
                name: mean_nll(self.reference, batch)
                for name, batch in (("ptx_heldout_nll", self._ptx_batch), ("tax_nll", self._tax_batch))
                if batch is not None
            }
        out = {}
        for name, batch in (("ptx_heldout_nll", self._ptx_batch), ("tax_nll", self._tax_batch)):
            if batch is not None:
                policy_nll = mean_nll(self.policy, batch)
                out[name] = policy_nll
                out[f"{name}_reference"] = self._reference_nll[name]
                out[f"{name}_ratio"] = policy_nll / self._reference_nll[name]
        return out

    def round(self, prompts: list[str], max_tokens: Sequence[int | None] | None = None) -> dict[str, float]:
        """One PPO-ptx round on prompts drawn from ``prompts``. Returns the round's statistics.

        ``max_tokens`` (one per prompt, None where unknown) is the traffic's own ``max_tokens``: a rollout is
        cut there, as serve cut the answers labelers ranked, and is not penalised for it; only a rollout the
        learner's cap (``config.max_new_tokens``) cut shorter than its traffic allowed, or with no traffic
        length at all, takes ``missing_eos_penalty`` when it has no EOS."""
        if not prompts:
            raise ValueError("a PPO round needs at least one prompt")
        if max_tokens is not None and len(max_tokens) != len(prompts):
            raise ValueError(f"{len(max_tokens)} max_tokens for {len(prompts)} prompts")
        config = self.config
        round_seed = config.seed * 1_000_003 + self.rounds_done
        started = time.perf_counter()

        # 1. sample the round's prompts (without replacement; each equally often when there are fewer than n),
        # each answered samples_per_prompt times
        n = config.rollout_batch_size
        picked = round_prompt_indices(len(prompts), n, random.Random(round_seed), config.samples_per_prompt)
        batch_prompts = [prompts[i] for i in picked]
        traffic = [max_tokens[i] if max_tokens is not None else None for i in picked]
        limits = [min(t, config.max_new_tokens) if t else config.max_new_tokens for t in traffic]
        # a missing EOS is the learner's doing only where its cap cut shorter than the traffic would have
        penalisable = torch.tensor([t is None or t > config.max_new_tokens for t in traffic])  # (B,)

        # 2. rollouts from the current policy: left-padded queries, temperature sampling
        # 3. truncate at the first EOS (inside generate_rollouts)
        torch.manual_seed(round_seed)
        rollouts = generate_rollouts(
            self.policy,
            self.tokenizer,
            batch_prompts,
            config.max_prompt_tokens,
            limits,
            do_sample=True,
            temperature=config.temperature,
        )
        rollout_s = time.perf_counter() - started
        mask = rollouts.response_mask  # (B, Tr)

        # 4. logprobs (policy at sampling time, frozen reference), values, and RM scores at the EOS
        scoring_started = time.perf_counter()
        self.policy.eval()
        logprobs = response_logprobs(
            self.policy, rollouts, config.temperature, config.forward_batch_size
        )  # (B, Tr)
        ref_logprobs = response_logprobs(
            self.reference, rollouts, config.temperature, config.forward_batch_size
        )
        values = response_values(self.value_model, rollouts, config.forward_batch_size)  # (B, Tr)
        rm_scores = rollout_scores(
            self.reward_model, rollouts, config.forward_batch_size, self.tokenizer.eos_token_id
        )  # (B,)
        scores = rm_scores.clone()
        penalised = ~rollouts.has_eos & penalisable  # (B,)
        if config.missing_eos_penalty is not None:
            scores[penalised] -= config.missing_eos_penalty
        logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask
        scoring_s = time.perf_counter() - scoring_started

        # 5. rewards = score at the EOS − β·per-token KL to the reference (eq. 2)
        rewards, non_score_reward, kl = kl_penalized_rewards(
            logprobs, ref_logprobs, scores, rollouts.last_index, mask, self.kl_controller.value
        )
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask

        # 6. per-prompt baseline (RLOO): the mean score of the other samples of each prompt, (B,)
        baseline, has_baseline = leave_one_out_baseline(scores, torch.tensor(picked))

        # 7. GAE over the response tokens (γ=1, λ=1 by default) against that baseline, then whitened
        advantages, returns = baselined_advantages(
            rewards, values, mask, rollouts.last_index, baseline, has_baseline, config.gamma, config.lam
        )
        advantages = masked_whiten(advantages, mask) * mask

        # 8. epochs × minibatches: clipped policy loss (+ ptx gradient, eq. 2) and clipped value loss
        update_started = time.perf_counter()
        self.policy.train()
        self.value_model.train()
        device = next(self.policy.parameters()).device
        value_device = next(self.value_model.parameters()).device
        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "clip_fraction",
                "value_clip_fraction",
                "approx_kl",
                "entropy",
                "ptx_loss",
                "ptx_nll",
            )
        }
        ptx_s = 0.0
        ptx_tokens = 0
        # minibatch indices are drawn from one permutation per epoch
        minibatches = []
        for _epoch in range(config.ppo_epochs):
            permutation = torch.randperm(n, generator=self.generator)
            minibatches.extend(
                permutation[s : s + config.mini_batch_size] for s in range(0, n, config.mini_batch_size)
            )
        for rows in progress_iter(minibatches, len(minibatches), "ppo update", self.progress):
            mb_mask = mask[rows].to(device)  # (b, Tr)
            query_responses = rollouts.query_responses[rows].to(device)
            attention_mask = rollouts.attention_mask[rows].to(device)

            # 8a. policy: clipped ratio on whitened advantages
            logits = response_logits(
                self.policy, query_responses, attention_mask, rollouts.context_length, config.temperature
            )  # (b, Tr, V)
            new_logprobs = logprobs_from_logits(
                logits, query_responses[:, rollouts.context_length :]
            )  # (b, Tr)
            policy_loss, clip_fraction, approx_kl = clipped_policy_loss(
                new_logprobs,
                logprobs[rows].to(device),
                advantages[rows].to(device),
                mb_mask,
                config.cliprange,
            )
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), mb_mask)
            self.policy_optimizer.zero_grad(set_to_none=True)
            policy_loss.backward()
            del logits

            # 8b. ptx: −γ·log-likelihood of a pretraining batch, accumulated into the same step
            if config.ptx_coef > 0:
                ptx_started = time.perf_counter()
                ptx_ids, ptx_mask = self.ptx_source.next_batch()
                ptx_ids, ptx_mask = ptx_ids.to(device), ptx_mask.to(device)
                ptx_logits = self.policy(input_ids=ptx_ids, attention_mask=ptx_mask, use_cache=False).logits
                loss_ptx, nll = ptx_loss(ptx_logits, ptx_ids, ptx_mask, config.ptx_coef)
                loss_ptx.backward()
                del ptx_logits
                stats["ptx_loss"].append(loss_ptx.item())
                stats["ptx_nll"].append(nll.item())
                ptx_tokens += int(ptx_mask.sum())
                ptx_s += time.perf_counter() - ptx_started
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), config.max_grad_norm)
            self.policy_optimizer.step()

            # 8c. value model: clipped value loss toward the GAE returns
            new_values = token_scores(
                self.value_model, query_responses.to(value_device), attention_mask.to(value_device)
            )[:, rollouts.context_length - 1 : -1]
            value_loss, value_clip_fraction = clipped_value_loss(
                new_values.float(),
                values[rows].to(value_device),
                returns[rows].to(value_device),
                mb_mask.to(value_device),
                config.cliprange_value,
            )
            self.value_optimizer.zero_grad(set_to_none=True)
            value_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), config.max_grad_norm)
            self.value_optimizer.step()

            for key, value in (
                ("policy_loss", policy_loss),
                ("value_loss", value_loss),
                ("clip_fraction", clip_fraction),
                ("value_clip_fraction", value_clip_fraction),
                ("approx_kl", approx_kl),
                ("entropy", entropy),
            ):
                stats[key].append(value.item())  # CPU/GPU sync
        self.policy.eval()
        self.value_model.eval()
        update_s = time.perf_counter() - update_started - ptx_s

        # 9. the alignment tax: NLL on held-out ptx text and on text from another source, policy vs reference
        heldout = self.heldout_ptx_nll()

        # 10. adapt β (no-op when fixed) and report
        sequence_kl = kl.sum(1)  # (B,) per-sequence KL estimate (k1)
        mean_kl = sequence_kl.mean().item()
        self.kl_controller.update(mean_kl, 1)  # the horizon is in rounds (PPOConfig.kl_horizon)
        self.rounds_done += 1
        round_s = time.perf_counter() - started
        response_tokens = int(mask.sum())
        result = {
            "round": float(self.rounds_done),
            "reward_mean": (scores + non_score_reward.sum(1)).mean().item(),
            "score_mean": scores.mean().item(),
            "baseline_mean": baseline.mean().item(),
            "rm_score_mean": rm_scores.mean().item(),
            "rm_score_std": rm_scores.std().item() if n > 1 else 0.0,
            "kl": mean_kl,
            "non_score_reward": non_score_reward.sum(1).mean().item(),
            "kl_coef": self.kl_controller.value,
            "eos_rate": rollouts.has_eos.float().mean().item(),
            "penalised_rate": penalised.float().mean().item()
            if config.missing_eos_penalty is not None
            else 0.0,
            "length_cap_mean": rollouts.limits.float().mean().item(),
            "response_length_mean": mask.sum(1).float().mean().item(),
            "rollout_s": rollout_s,
            "scoring_s": scoring_s,
            "update_s": update_s,
            "ptx_s": ptx_s,
            "round_s": round_s,
            "response_tokens": float(response_tokens),
            "rollout_tokens_per_s": response_tokens / rollout_s if rollout_s > 0 else 0.0,
            "tokens_per_s": response_tokens / round_s if round_s > 0 else 0.0,
            "ptx_tokens": float(ptx_tokens),
        }
        for key, values_list in stats.items():
            result[key] = sum(values_list) / len(values_list) if values_list else 0.0
        result.update(heldout)
        log.info("ppo round", extra={"stats": result})
        return result
