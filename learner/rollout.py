"""Rollouts: sampled responses of the policy to stored model inputs, cut where serve would have cut them.

The queries are the stored prompts verbatim (instructloop/prompt.py, the prompt contract); each row has
its own length cap (its traffic's ``max_tokens``); ``scoring_inputs`` gives the reward model the form it
was trained on (query + response + EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.losses import first_true_indices, response_mask_from_lengths, truncate_response
from learner.utils import encode_query, left_pad


@dataclass
class Rollouts:
    """Sampled responses of a batch of queries, truncated at the first EOS."""

    query_responses: torch.Tensor
    """(B, Tq + Tr) left-padded queries followed by responses (PAD after the EOS)."""
    attention_mask: torch.Tensor
    """(B, Tq + Tr) 1 on real query tokens and on response tokens up to and including the EOS."""
    context_length: int
    """Tq: width of the left-padded query block."""
    response_mask: torch.Tensor
    """(B, Tr) bool, True on real response tokens (EOS included)."""
    last_index: torch.Tensor
    """(B,) index in the response of the last real token (the EOS, or Tr-1 without one)."""
    has_eos: torch.Tensor
    """(B,) bool, whether the response ended with EOS."""
    limits: torch.Tensor
    """(B,) the response length cap of each row (its traffic's ``max_tokens`` where known)."""

    @property
    def responses(self) -> torch.Tensor:
        """(B, Tr) response token ids."""
        return self.query_responses[:, self.context_length :]


def response_limits(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One response length cap per prompt: ``max_new_tokens`` repeated, or the given per-prompt caps."""
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n
    limits = [int(m) for m in max_new_tokens]
    if len(limits) != n or min(limits) < 1:
        raise ValueError(f"need one max_new_tokens >= 1 per prompt ({n}), got {limits}")
    return limits


@torch.no_grad()
def generate_rollouts(
    policy,
    tokenizer,
    prompts: list[str],
    max_prompt_tokens: int,
    max_new_tokens: int | Sequence[int],
    do_sample: bool,
    temperature: float,
) -> Rollouts:
    """Left-padded queries → ``policy.generate`` → truncate at EOS (pad ≠ EOS is required).

    ``prompts`` are model inputs used verbatim (the prompt contract); ``max_new_tokens`` is one cap or one
    per prompt (the traffic's own ``max_tokens``): the batch generates up to the largest and each row is
    cut at its own cap, exactly where serve would have stopped it."""
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    limits = torch.tensor(response_limits(max_new_tokens, len(prompts)))  # (B,)
    queries = [encode_query(tokenizer, prompt, max_prompt_tokens) for prompt in prompts]
    query_ids, query_mask = left_pad(queries, pad)  # (B, Tq)
    device = next(policy.parameters()).device
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if do_sample
        else {"do_sample": False}
    )
    generation_config = GenerationConfig(
        max_new_tokens=int(limits.max()),
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )
    was_training = policy.training
    policy.eval()
    output = policy.generate(
        input_ids=query_ids.to(device),
        attention_mask=query_mask.to(device),
        generation_config=generation_config,
    ).cpu()  # (B, Tq + Tr); CPU/GPU sync
    policy.train(was_training)
    context_length = query_ids.size(1)
    responses = output[:, context_length:]  # (B, Tr)
    if responses.size(1) == 0:
        raise RuntimeError("the policy generated no token")
    limits = limits.clamp(max=responses.size(1))
    beyond_limit = torch.arange(responses.size(1)).unsqueeze(0) >= limits.unsqueeze(1)  # (B, Tr)
    # the end is found from EOS, never from PAD: a sampled PAD token mid-response is still a token
    eos_index = first_true_indices((responses == eos) & ~beyond_limit)  # (B,), Tr where there is no EOS
    has_eos = eos_index < responses.size(1)
    last_index = torch.minimum(eos_index, limits - 1)  # (B,)
    response_mask = response_mask_from_lengths(last_index, responses.size(1))  # (B, Tr)
    responses = truncate_response(responses, eos, pad).masked_fill(~response_mask, pad)
    return Rollouts(
        query_responses=torch.cat([query_ids, responses], dim=1),
        attention_mask=torch.cat([query_mask, response_mask.long()], dim=1),
        context_length=context_length,
        response_mask=response_mask,
        last_index=last_index,
        has_eos=has_eos,
        limits=limits,
    )


def scoring_inputs(rollouts: Rollouts, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the RM scores: query + response + EOS, the form it was trained on (``encode_sequence``). A
    response that stopped at its length cap gets the EOS appended, as the RM saw every served answer.
    Returns (input_ids, attention_mask), (B, Tq + Tr + 1)."""
    width = rollouts.query_responses.size(1)
    input_ids = torch.nn.functional.pad(rollouts.query_responses, (0, 1), value=eos_token_id)  # (B, T + 1)
    attention_mask = torch.nn.functional.pad(rollouts.attention_mask, (0, 1), value=0)
    rows = (~rollouts.has_eos).nonzero().squeeze(1)
    end = rollouts.context_length + rollouts.last_index[rows] + 1  # first position after the response
    input_ids[rows, end] = eos_token_id
    attention_mask[rows, end] = 1
    assert input_ids.size(1) == width + 1
    return input_ids, attention_mask
