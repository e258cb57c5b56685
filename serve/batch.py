"""The running batch of continuous (iteration-level) batching, and the KV layout it decodes over.

A ``Batch`` is a set of sequences that go through the model together. Requests join by being prefilled as a
new ``Batch`` and ``concatenate``-d to the running one, and leave through ``filter`` (finished, stopped or
cancelled) at every step.

Layout, no padding anywhere:

- **Prefill is packed**: the prompts of all admitted requests are one row of ``sum(T_i)`` tokens (positions
  restart at 0 for each prompt) and go through the model in one forward. Attention runs per prompt
  (``serve_attention``: causal SDPA on each prompt's slice), so a prompt never sees another's tokens and no
  compute is spent on cross-prompt blocks; the projections and MLPs run once over all tokens.
- **The KV cache is per row, preallocated** (``KVStore``): per layer, keys/values are
  (rows, H_kv, capacity, D); sequence ``i`` keeps its ``lengths[i]`` cached tokens in row ``i``, columns
  ``[0, lengths[i])``. A decode step writes each row's new key/value at column ``lengths[i]`` in place and
  attends over ``[0, max(lengths) + 1)`` with a mask that hides a row's columns past its own length. There
  is no ``torch.cat`` of the cache per step, and joining / leaving copies only the rows that move.

Position ids equal cache columns (a sequence's token at column ``j`` has position ``j``), so a sequence's
logits do not depend on what else is in the batch: greedy output equals HF ``generate`` for that prompt
alone (``tests/serve/test_parity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from serve.sampling import NextTokenChooser, StopSequences

SERVE_ATTENTION = "serve_sdpa"
"""The attention implementation serve's models run with: SDPA, plus per-prompt attention for a packed
prefill (``serve_attention``)."""

_CAPACITY_STEP = 64
"""Cache columns are allocated in multiples of this (fewer regrowths as sequences get longer)."""


def serve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    serve_prefill_lengths: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for a packed prefill (``serve_prefill_lengths`` given): then
    query/key/value are (1, H, sum(T_i), D) and each prompt's slice attends causally to itself only.

    Returns (1, sum(T_i), H, D) like ``sdpa_attention_forward``.
    """
    if serve_prefill_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (1, H, N, D)
    outputs, start = [], 0
    for length in serve_prefill_lengths:
        end = start + length
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=True,
                scale=kwargs.get("scaling"),
            )
        )  # (1, H, T_i, D)
        start = end
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, H, D)


AttentionInterface.register(SERVE_ATTENTION, serve_attention)
AttentionMaskInterface.register(SERVE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_serve_attention(model: torch.nn.Module) -> None:
    """Switch a loaded HF model to ``SERVE_ATTENTION`` (SDPA for everything but a packed prefill).

    Raises ValueError for a model serve's layout cannot run: sliding-window layers (the decode mask is full
    causal) or an architecture whose attention is not pluggable (transformers' AttentionInterface).
    """
    config = model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ValueError(
            f"{type(model).__name__} has sliding-window attention layers; serve's KV layout attends over the "
            "whole sequence: serve a model with full attention in every layer"
        )
    if getattr(config, "_attn_implementation", None) != SERVE_ATTENTION:
        model.set_attn_implementation(SERVE_ATTENTION)
    if config._attn_implementation != SERVE_ATTENTION:
        raise ValueError(
            f"{type(model).__name__} does not take a pluggable attention function (transformers' "
            "AttentionInterface), which serve's packed prefill needs"
        )


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


def _round_up(n: int) -> int:
    return -(-n // _CAPACITY_STEP) * _CAPACITY_STEP


class KVStore:
    """Per-layer keys and values, each (rows, H_kv, capacity, D); row ``i`` column ``j`` is the key/value of
    sequence ``i``'s token at position ``j``. Layers are allocated at their first write (their head count,
    head size and dtype come from the model); rows and columns grow by reallocation (``reserve``)."""

    def __init__(self, rows: int, capacity: int):
        self.rows = rows
        """Rows allocated (>= the batch's sequences)."""
        self.capacity = _round_up(capacity)
        """Columns allocated per row (>= the longest sequence's cache + its pending token)."""
        self.keys: list[torch.Tensor] = []
        """Per layer (rows, H_kv, capacity, D)."""
        self.values: list[torch.Tensor] = []
        """Per layer (rows, H_kv, capacity, D)."""

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s (keys, values), allocated (zeros) on first use with ``like``'s H_kv, D,
        dtype and device (``like``: (B, H_kv, T, D) new keys)."""
        while len(self.keys) <= layer_idx:
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        return self.keys[layer_idx], self.values[layer_idx]

    def reserve(self, rows: int, capacity: int, used_rows: int, used_columns: int) -> None:
        """Make room for ``rows`` rows of ``capacity`` columns, keeping the first ``used_rows`` rows'
        first ``used_columns`` columns. Grows by at least double, so regrowth is rare."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        new_rows = max(rows, self.rows if rows <= self.rows else 2 * self.rows)
        new_capacity = _round_up(
            max(capacity, self.capacity if capacity <= self.capacity else 2 * self.capacity)
        )
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                grown = old.new_zeros((new_rows, old.shape[1], new_capacity, old.shape[3]))
                grown[:used_rows, :, :used_columns] = old[:used_rows, :, :used_columns]
                tensors[i] = grown
        self.rows, self.capacity = new_rows, new_capacity


class StepCache:
    """What the model sees as its cache for one forward (transformers calls ``update`` once per layer).

    Prefill (``prefill_rows``/``prefill_columns`` set, one per packed token): the new keys/values
    (1, H_kv, N, D) are written to their rows and columns and returned as they are, for per-prompt attention.
    Decode (``rows``/``columns``, one per sequence): the new (B, H_kv, 1, D) are written at each row's column
    and the rows' caches (B, H_kv, ``visible``, D) are returned, a view (no copy).
    """

    def __init__(
        self,
        store: KVStore,
        *,
        rows: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
        visible: int = 0,
        prefill: bool = False,
    ):
        self.store = store
        self.rows = rows
        """(N,) or (B,) the row each new token's key/value goes to."""
        self.columns = columns
        """(N,) or (B,) the column each new token's key/value goes to."""
        self.visible = visible
        """Decode: columns attended over (the longest row's cache + 1)."""
        self.prefill = prefill

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.layer(layer_idx, key_states)
        if self.prefill:
            # (1, H_kv, N, D) -> (N, H_kv, D): one (row, column) per packed token
            keys[self.rows, :, self.columns] = key_states[0].transpose(0, 1)
            values[self.rows, :, self.columns] = value_states[0].transpose(0, 1)
            return key_states, value_states
        batch = key_states.shape[0]
        keys[self.rows, :, self.columns] = key_states[:, :, 0]  # (B, H_kv, D)
        values[self.rows, :, self.columns] = value_states[:, :, 0]
        return keys[:batch, :, : self.visible], values[:batch, :, : self.visible]  # (B, H_kv, visible, D)


@dataclass
class Batch:
    """Sequences decoded together over a ``KVStore`` (see module docstring)."""

    policy_version: str
    """The weights this batch runs on; a batch never changes version (in-flight requests finish on it)."""
    sequences: list[SequenceState]
    """Per-row request state, in row order (row ``i`` of the KV store is ``sequences[i]``)."""
    input_ids: torch.Tensor
    """Tokens to feed at the next forward: (1, sum(T_i)) the packed prompts before prefill, (B, 1) the
    last generated token of each row after."""
    lengths: list[int]
    """Per row, tokens already in the KV cache (0 before prefill); also the position of the row's next
    input token."""
    kv: KVStore | None
    """The cache (None before prefill: the prefill forward allocates it)."""

    @property
    def request_ids(self) -> list[int]:
        return [seq.request_id for seq in self.sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def is_prefill(self) -> bool:
        return self.kv is None

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def prefill(
        cls, policy_version: str, sequences: list[SequenceState], device: torch.device | str
    ) -> Batch:
        """A batch of new sequences whose prompts still have to go through the model: one packed row."""
        packed = [token for seq in sequences for token in seq.prompt_ids]
        return cls(
            policy_version=policy_version,
            sequences=list(sequences),
            input_ids=torch.tensor([packed], dtype=torch.long, device=device),  # (1, sum(T_i))
            lengths=[0] * len(sequences),
            kv=None,
        )

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the HF model's forward (with ``SERVE_ATTENTION``): logits come out for each
        row's last input token, (1, B, V) at prefill, (B, 1, V) at decode. At prefill ``cache`` holds a new
        ``KVStore`` (``cache.store``), which ``advance`` takes on."""
        device = self.input_ids.device
        if self.is_prefill:
            prompt_lengths = [len(seq.prompt_ids) for seq in self.sequences]
            if min(prompt_lengths) < 1:
                raise ValueError("every prompt needs at least one token")
            store = KVStore(len(self.sequences), max(prompt_lengths) + 1)
            counts = torch.tensor(prompt_lengths, device=device)  # (B,)
            rows = torch.repeat_interleave(torch.arange(len(prompt_lengths), device=device), counts)  # (N,)
            columns = torch.cat([torch.arange(n, device=device) for n in prompt_lengths])  # (N,)
            return {
                "input_ids": self.input_ids,
                "position_ids": columns.unsqueeze(0),  # (1, N)
                # a 4D mask is used as given: this empty one skips transformers' mask building, since
                # serve_attention masks a packed prefill itself (causal within each prompt)
                "attention_mask": torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device),
                "cache": StepCache(store, rows=rows, columns=columns, prefill=True),
                "logits_to_keep": counts.cumsum(0) - 1,  # (B,) each prompt's last packed index
                "serve_prefill_lengths": prompt_lengths,
            }
        longest = max(self.lengths)
        self.kv.reserve(len(self), longest + 1, len(self), longest)
        columns = torch.tensor(self.lengths, dtype=torch.long, device=device)  # (B,)
        visible = longest + 1
        hidden = torch.arange(visible, device=device).unsqueeze(0) > columns.unsqueeze(1)  # (B, visible)
        dtype = self.kv.keys[0].dtype
        # additive mask (B, 1, 1, visible): 0 where the row attends, the dtype's minimum past its own length
        mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(
            hidden, torch.finfo(dtype).min
        )
        return {
            "input_ids": self.input_ids,
            "position_ids": columns.unsqueeze(1),  # (B, 1)
            "attention_mask": mask[:, None, None, :],
            "cache": StepCache(
                self.kv, rows=torch.arange(len(self), device=device), columns=columns, visible=visible
            ),
            "logits_to_keep": 1,
        }

    def advance(self, next_ids: list[int], store: KVStore) -> Batch:
        """The batch after the forward of ``model_inputs()`` (whose cache was ``store``): ``next_ids``, one
        per row, are the pending input tokens."""
        fed = [len(seq.prompt_ids) for seq in self.sequences] if self.is_prefill else [1] * len(self)
        return Batch(
            policy_version=self.policy_version,
            sequences=self.sequences,
            input_ids=torch.tensor(next_ids, dtype=torch.long, device=self.input_ids.device).unsqueeze(1),
            lengths=[n + k for n, k in zip(self.lengths, fed, strict=True)],  # (B, 1)
            kv=store,
        )

    # ---- leaving -------------------------------------------------------------------------------
    def filter(self, request_ids: list[int] | set[int]) -> Batch | None:
        """Keep only ``request_ids``; None when nothing is left. Consumes this batch (the result shares
        its ``KVStore``).

        Rows stay in order except that the last kept rows move into the rows that leave: only those rows'
        caches are copied (no copy at all when the leaving rows are the last ones).
        """
        keep_set = set(request_ids)
        kept = [i for i, seq in enumerate(self.sequences) if seq.request_id in keep_set]
        if not kept:
            return None
        if len(kept) == len(self.sequences):
            return self
        if self.kv is None:
            raise ValueError("only batches in decode state (after prefill) can be filtered")
        size = len(kept)
        kept_rows = set(kept)
        holes = [i for i in range(size) if i not in kept_rows]
        movers = [i for i in kept if i >= size]  # as many as holes, in order
        order = list(range(len(self.sequences)))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        order = order[:size]  # new row r holds old row order[r]
        if holes:
            used = max(self.lengths[i] for i in movers)
            device = self.input_ids.device
            to = torch.tensor(holes, dtype=torch.long, device=device)
            source = torch.tensor(movers, dtype=torch.long, device=device)
            for tensors in (self.kv.keys, self.kv.values):
                for layer in tensors:
                    layer[to, :, :used] = layer[source, :, :used]  # (holes, H_kv, used, D)
        index = torch.tensor(order, dtype=torch.long, device=self.input_ids.device)
        return Batch(
            policy_version=self.policy_version,
            sequences=[self.sequences[i] for i in order],
            input_ids=self.input_ids.index_select(0, index),  # (B', 1)
            lengths=[self.lengths[i] for i in order],
            kv=self.kv,
        )

    # ---- joining -------------------------------------------------------------------------------
    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch from several decode-state batches of the same version (rows in order). Consumes them:
        the first batch's ``KVStore`` grows if needed and the other batches' rows are copied into it."""
        if not batches:
            raise ValueError("concatenate needs at least one batch")
        if len(batches) == 1:
            return batches[0]
        versions = {b.policy_version for b in batches}
        if len(versions) != 1:
            raise ValueError(f"cannot concatenate batches of different policy versions: {sorted(versions)}")
        if any(b.is_prefill for b in batches):
            raise ValueError(
                "only batches in decode state (after prefill, one pending token) can be concatenated"
            )
        first = batches[0]
        store = first.kv
        total = sum(len(b) for b in batches)
        longest = max(max(b.lengths) for b in batches)
        store.reserve(total, longest + 1, len(first), max(first.lengths))
        row = len(first)
        for b in batches[1:]:
            used = max(b.lengths)
            for mine, theirs in ((store.keys, b.kv.keys), (store.values, b.kv.values)):
                for layer, other in zip(mine, theirs, strict=True):
                    layer[row : row + len(b), :, :used] = other[: len(b), :, :used]
            row += len(b)
        return cls(
            policy_version=first.policy_version,
            sequences=[seq for b in batches for seq in b.sequences],
            input_ids=torch.cat([b.input_ids for b in batches], dim=0),  # (B, 1)
            lengths=[n for b in batches for n in b.lengths],
            kv=store,
        )
