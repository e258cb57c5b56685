"""The running batch of continuous (iteration-level) batching.

A ``Batch`` is a set of sequences that go through the model together: one forward per decode step for all
of them. Requests join by being prefilled as a new ``Batch`` and ``concatenate``-d to the running one, and
leave through ``filter`` (finished, stopped or cancelled) at every step.

Layout: sequences are *left*-padded to a common length. The attention mask has a 0 for every padding
column and the position ids count only real tokens, so a sequence's logits do not depend on what else is
in the batch (greedy output equals HF ``generate`` for that prompt alone). The KV cache is a transformers
``DynamicCache`` whose per-layer keys/values are (B, H_kv, T_past, D) with the same left padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from serve.sampling import NextTokenChooser, StopSequences


@dataclass
class SequenceState:
    """Everything the decode loop keeps about one request while it is in a batch."""

    request_id: int
    """Engine-wide id of the request (unique while the engine runs)."""
    prompt_ids: list[int]
    """Prompt token ids after truncation."""
    max_new_tokens: int
    """Stop with finish_reason ``length`` after this many generated tokens."""
    chooser: NextTokenChooser
    """Sampling parameters and this request's own torch.Generator."""
    stop: StopSequences
    """Stop strings; the sequence ends once one appears in the generated text."""
    generated_ids: list[int] = field(default_factory=list)
    """Tokens generated so far."""
    logprobs: list[float] = field(default_factory=list)
    """Logprob of each generated token under the processed distribution."""
    top_n_tokens: int = 0
    """How many of the most likely tokens to report at each step (TGI's ``top_n_tokens``)."""
    text: str = ""
    """Decoded generated text so far (special tokens kept; used for stop strings and token texts)."""
    prefix_offset: int = 0
    """Start of the token window decoded for the next token's text (see ``serve.model.decode_next``)."""
    read_offset: int = 0
    """End of the tokens whose text is already in ``text``."""
    cancelled: bool = False
    """Set from the HTTP side when the client went away; the sequence is filtered out at the next step."""
    sink: Any = None
    """Where generations for this request are delivered (the engine's handle)."""

    def token_ids(self, device: torch.device) -> torch.Tensor:
        """Prompt + generated ids, (L,), for the repetition penalty."""
        return torch.tensor(self.prompt_ids + self.generated_ids, dtype=torch.long, device=device)


@dataclass
class Batch:
    """Sequences decoded together, left-padded, with their KV cache (see module docstring)."""

    policy_version: str
    """The weights this batch runs on; a batch never changes version (in-flight requests finish on it)."""
    sequences: list[SequenceState]
    """Per-row request state, in row order."""
    input_ids: torch.Tensor
    """(B, T_in) tokens to feed at the next forward: the padded prompts at prefill, the last token after."""
    attention_mask: torch.Tensor
    """(B, T_past + T_in) 1 for real tokens, 0 for left padding; covers the cache and ``input_ids``."""
    position_ids: torch.Tensor
    """(B, T_in) positions of ``input_ids`` counted over real tokens only (0 = first prompt token)."""
    past_key_values: DynamicCache | None
    """KV cache over the first T_past columns, per layer (B, H_kv, T_past, D); None before prefill."""

    @property
    def request_ids(self) -> list[int]:
        return [seq.request_id for seq in self.sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def past_length(self) -> int:
        return 0 if self.past_key_values is None else self.past_key_values.get_seq_length()

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def prefill(
        cls,
        policy_version: str,
        sequences: list[SequenceState],
        pad_token_id: int,
        device: torch.device | str,
    ) -> Batch:
        """A batch of new sequences whose prompts still have to go through the model."""
        longest = max(len(seq.prompt_ids) for seq in sequences)
        input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(sequences):
            n = len(seq.prompt_ids)
            input_ids[row, longest - n :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            attention_mask[row, longest - n :] = 1
        # Same rule as HF generate: positions count real tokens; padding gets a harmless 1.
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # (B, T)
        return cls(
            policy_version=policy_version,
            sequences=list(sequences),
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            past_key_values=None,
        )

    # ---- leaving -------------------------------------------------------------------------------
    def filter(self, request_ids: list[int] | set[int]) -> Batch | None:
        """Keep only ``request_ids`` (in the current row order); None when nothing is left.

        Padding columns that no remaining row needs any more are cut from the left of the mask and cache.
        """
        keep_set = set(request_ids)
        rows = [i for i, seq in enumerate(self.sequences) if seq.request_id in keep_set]
        if not rows:
            return None
        if len(rows) == len(self.sequences):
            return self
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        attention_mask = self.attention_mask.index_select(0, index)  # (B', T_past + T_in)
        # Leading columns that are padding for every remaining row (never inside the pending input).
        real_columns = attention_mask.any(dim=0)  # (T_past + T_in,)
        first_real = int(torch.nonzero(real_columns)[0].item())  # CPU/GPU sync point
        cut = min(first_real, self.past_length)
        cache = None
        if self.past_key_values is not None:
            cache = DynamicCache(
                ddp_cache_data=[
                    (
                        layer.keys.index_select(0, index)[:, :, cut:],
                        layer.values.index_select(0, index)[:, :, cut:],
                    )
                    for layer in self.past_key_values.layers
                ]
            )
        return Batch(
            policy_version=self.policy_version,
            sequences=[self.sequences[i] for i in rows],
            input_ids=self.input_ids.index_select(0, index),
            attention_mask=attention_mask[:, cut:],
            position_ids=self.position_ids.index_select(0, index),
            past_key_values=cache,
        )

    # ---- joining -------------------------------------------------------------------------------
    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch from several decode-state batches of the same version (rows in order).

        Shorter caches are left-padded with zero keys/values under a 0 mask, so no row's attention changes.
        """
        if not batches:
            raise ValueError("concatenate needs at least one batch")
        if len(batches) == 1:
            return batches[0]
        versions = {b.policy_version for b in batches}
        if len(versions) != 1:
            raise ValueError(f"cannot concatenate batches of different policy versions: {sorted(versions)}")
        if any(b.past_key_values is None or b.input_ids.shape[1] != 1 for b in batches):
            raise ValueError(
                "only batches in decode state (after prefill, one pending token) can be concatenated"
            )
        past = max(b.past_length for b in batches)
        masks, layers_per_batch = [], []
        for b in batches:
            pad = past - b.past_length
            masks.append(torch.nn.functional.pad(b.attention_mask, (pad, 0), value=0))  # (B_i, past + 1)
            # keys/values (B_i, H, T_i, D) -> (B_i, H, past, D): pad dimension -2 on the left.
            layers_per_batch.append(
                [
                    (
                        torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)),
                        torch.nn.functional.pad(layer.values, (0, 0, pad, 0)),
                    )
                    for layer in b.past_key_values.layers
                ]
            )
        n_layers = len(layers_per_batch[0])
        cache = DynamicCache(
            ddp_cache_data=[
                (
                    torch.cat([layers[i][0] for layers in layers_per_batch], dim=0),
                    torch.cat([layers[i][1] for layers in layers_per_batch], dim=0),
                )
                for i in range(n_layers)
            ]
        )
        return cls(
            policy_version=batches[0].policy_version,
            sequences=[seq for b in batches for seq in b.sequences],
            input_ids=torch.cat([b.input_ids for b in batches], dim=0),  # (B, 1)
            attention_mask=torch.cat(masks, dim=0),  # (B, past + 1)
            position_ids=torch.cat([b.position_ids for b in batches], dim=0),  # (B, 1)
            past_key_values=cache,
        )
