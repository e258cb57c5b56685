"""Helpers the learner's trainers share: the prompt contract's tokenization (``encode_query`` and
friends), left padding with position ids over real tokens, dropout off, and a progress bar.

Nothing here knows about rewards, policies or events; ``learner.reward``, ``learner.rollout``,
``learner.ppo``, ``learner.sft`` and ``learner.adapters`` build on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from instructloop.prompt import encode_prompt

# ---------------------------------------------------------------------------------------- text → ids


def encode_query(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of the model input ``prompt`` exactly as serve generated from it (``encode_prompt``: the
    prompt contract, no template rendered over it), keeping the last ``max_tokens``."""
    return encode_prompt(tokenizer, prompt)[-max_tokens:]


def encode_sequence(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids of query + response + EOS, at most ``max_length``: the response keeps up to
    ``max_length // 2`` tokens (cut from the right, EOS kept) and the query is cut from the left."""
    query_ids, response_ids = encode_pair(tokenizer, prompt, response, max_length)
    return query_ids + response_ids


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """``encode_sequence`` split into (query ids, response ids + EOS): the query tokenized alone, as serve
    tokenized it, and the response after it (never merged across the boundary)."""
    eos = tokenizer.eos_token_id
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    if not response_ids or response_ids[-1] != eos:
        response_ids = response_ids + [eos]
    response_budget = max(1, max_length // 2)
    if len(response_ids) > response_budget:
        response_ids = response_ids[: response_budget - 1] + [eos]
    return encode_query(tokenizer, prompt, max_length - len(response_ids)), response_ids


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), both (B, T) long."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. (B, T) → (B, T)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------ dropout


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (Huang et al.: dropout off in all four RLHF models)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name) and isinstance(getattr(model.config, name), float):
            setattr(model.config, name, 0.0)
    return model


# ------------------------------------------------------------------------------------------ progress


def progress_iter(iterable: Iterable, total: int | None, description: str, enabled: bool) -> Iterable:
    """``rich`` progress bar over ``iterable`` when ``enabled``; the plain iterable otherwise."""
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, total=total, description=description, transient=True)
