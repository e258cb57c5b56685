"""One loaded policy version and the decode step: ``generate_token(batch) -> (generations, next_batch)``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from instructloop.registry import AdapterWeights
from serve.adapters import SharedBase
from serve.batch import Batch, KVStore, use_serve_attention

log = logging.getLogger(__name__)


def decode_next(tokenizer, ids: list[int], prefix_offset: int, read_offset: int) -> tuple[str, int, int]:
    """The text the newest token adds, decoding only a short window instead of the whole sequence.

    ``ids[prefix_offset:read_offset]`` is already-emitted context decoded again so that a token's text is
    the same as in a full decode (leading spaces, merges); ``ids[read_offset:]`` are the tokens not yet
    emitted. An incomplete UTF-8 character decodes to U+FFFD: its text is held back (``""``, offsets kept)
    until a later token completes it. Returns (text, new prefix_offset, new read_offset).
    """
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=False)
    new_text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=False)
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        return new_text[len(prefix_text) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


class FinishReason(str, Enum):
    length = "length"
    eos_token = "eos_token"
    stop_sequence = "stop_sequence"


@dataclass
class TopToken:
    """One of the most likely tokens at a step (TGI's ``top_n_tokens``)."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Generation:
    """What one decode step produced for one request."""

    request_id: int
    token_id: int
    token_text: str
    logprob: float
    special: bool
    policy_version: str
    finish_reason: FinishReason | None = None
    """Set on the request's last token."""
    generated_text: str | None = None
    """The whole generated text (special tokens skipped), on the last token only."""
    generated_tokens: int = 0
    seed: int | None = None
    """The request's seed when it samples (TGI reports it), else None."""
    top_tokens: list[TopToken] = field(default_factory=list)
    """The request's ``top_n_tokens`` most likely tokens at this step, most likely first."""


PROMPT_LOGPROBS_ROWS = 256
"""Prompt positions whose float32 log-softmax ``prompt_logprobs`` holds at once (a vocabulary each)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class PolicyModel:
    """One policy version: a causal LM with its own weights (the base, a full-weight version), or an adapter
    version over the shared base (``shared`` + ``adapter``), plus the tokenizer all versions share."""

    def __init__(
        self,
        version: str,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        shared: SharedBase | None = None,
        adapter: AdapterWeights | None = None,
    ):
        self.version = version
        use_serve_attention(model)  # packed prefill attends per prompt (serve.batch)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.shared = shared
        """The base model adapters attach to (set for the base and for adapter versions, None for a
        full-weight version, which owns its module)."""
        self.adapter = adapter
        """This version's LoRA tensors (None for the base and full-weight versions)."""
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        self.special_ids = set(tokenizer.all_special_ids)
        self.fingerprint: tuple | None = None
        """What the registry files looked like when this policy was validated (None for the base model)."""

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
        ids = getattr(model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [int(i) for i in ids if i is not None]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.model.state_dict().items()}

    # ---- the decode step -----------------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[torch.Tensor, KVStore]:
        """Logits (B, V) in float32 for each row's next token, and the KV store now holding the batch."""
        inputs = batch.model_inputs()
        model = self.model if self.shared is None else self.shared.module_for(self.adapter)
        out = model(**inputs, use_cache=True)
        logits = out.logits[0] if batch.is_prefill else out.logits[:, -1]  # (B, V)
        return logits.float(), inputs["cache"].store

    def top_tokens(self, logprobs: torch.Tensor, n: int) -> list[TopToken]:
        """The ``n`` most likely tokens of a (V,) log-distribution, most likely first; tokens the
        distribution rules out (-inf after top-k / top-p) are left out, so there may be fewer."""
        values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
        pairs = [
            (int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if math.isfinite(v)
        ]
        texts = self.tokenizer.batch_decode(
            [[i] for i, _ in pairs], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return [
            TopToken(i, text, v, i in self.special_ids) for (i, v), text in zip(pairs, texts, strict=True)
        ]

    def prompt_logprobs(
        self, prompt_ids: list[int], top_n: int = 0
    ) -> tuple[list[float | None], list[list[TopToken]]]:
        """Each prompt token's logprob under this version given the tokens before it (the first: None, nothing
        precedes it), from the raw distribution (no sampling parameters), and per position the ``top_n`` most
        likely tokens (the first: none). TGI's ``decoder_input_details``. Model thread only
        (``Engine.call_on_model_thread``): an adapter version selects its slot on the shared base."""
        model = self.model if self.shared is None else self.shared.module_for(self.adapter)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (T-1, V), the model's dtype
        targets = ids[0, 1:]  # (T-1,)
        chosen: list[float] = []
        top: list[list[TopToken]] = []
        for start in range(0, logits.shape[0], PROMPT_LOGPROBS_ROWS):  # float32 a block at a time
            rows = slice(start, start + PROMPT_LOGPROBS_ROWS)
            logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # (rows, V)
            chosen += logprobs.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1).tolist()  # CPU/GPU sync
            top += [self.top_tokens(row, top_n) if top_n else [] for row in logprobs]
        return [None, *chosen], [[], *top]

    def generate_token(self, batch: Batch) -> tuple[list[Generation], Batch | None]:
        """One forward for the whole batch, one token per sequence; finished sequences leave the batch."""
        logits, store = self.forward(batch)  # (B, V)
        greedy_ids = torch.argmax(logits, dim=-1, keepdim=True)  # (B, 1) argmax of the raw logits, as HF's
        greedy_logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
        greedy_logprob = greedy_logprobs.gather(1, greedy_ids).squeeze(1).tolist()  # (B,) CPU/GPU sync point
        greedy = greedy_ids.squeeze(1).tolist()
        generations: list[Generation] = []
        next_ids: list[int] = []
        keep: list[int] = []
        for row, seq in enumerate(batch.sequences):
            chooser = seq.chooser
            if chooser.sampling or (chooser.params.repetition_penalty not in (None, 1.0)):
                row_logprobs = chooser.log_distribution(logits[row], seq.token_ids(logits.device))  # (V,)
                token = chooser.draw(row_logprobs)
                logprob = float(row_logprobs[token].item())
            else:
                row_logprobs, token, logprob = greedy_logprobs[row], greedy[row], greedy_logprob[row]
            previous_length = len(seq.text)
            seq.generated_ids.append(token)
            seq.logprobs.append(logprob)
            token_text, seq.prefix_offset, seq.read_offset = decode_next(
                self.tokenizer, seq.generated_ids, seq.prefix_offset, seq.read_offset
            )
            seq.text += token_text
            finish = None
            if token in self.eos_token_ids:
                finish = FinishReason.eos_token
            elif seq.stop.hit(seq.text, previous_length):
                finish = FinishReason.stop_sequence
            elif len(seq.generated_ids) >= seq.max_new_tokens:
                finish = FinishReason.length
            generation = Generation(
                request_id=seq.request_id,
                token_id=token,
                token_text=token_text,
                logprob=logprob,
                special=token in self.special_ids,
                policy_version=batch.policy_version,
                finish_reason=finish,
                generated_tokens=len(seq.generated_ids),
                seed=chooser.seed if chooser.sampling else None,
                top_tokens=self.top_tokens(row_logprobs, seq.top_n_tokens) if seq.top_n_tokens else [],
            )
            if finish is not None:
                generation.generated_text = self.tokenizer.decode(seq.generated_ids, skip_special_tokens=True)
            else:
                keep.append(seq.request_id)
            generations.append(generation)
            next_ids.append(token)
        if not keep:
            return generations, None
        return generations, batch.advance(next_ids, store).filter(keep)
