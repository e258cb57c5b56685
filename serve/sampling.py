"""Per-request token choice: repetition penalty, temperature, top-k, top-p, seeded sampling, stop sequences.

Every sequence in a batch owns its ``NextTokenChooser`` (its own parameters and its own
``torch.Generator``), so requests with different sampling settings share one forward pass and a seeded
request gives the same tokens whatever else is in the batch. Greedy choice (no sampling, no warper) is
the plain argmax of the raw logits, which is what makes greedy parity with HF ``generate`` exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from instructloop.wire import GREEDY_TEMPERATURE


@dataclass(frozen=True)
class SamplingParams:
    """The sampling part of a request, already validated by the protocol layer."""

    do_sample: bool = False
    """Sample from the distribution; also implied by any warper below (TGI's rule)."""
    temperature: float | None = None
    """Logits are divided by this before sampling (None = 1.0)."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None = all)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability mass reaches top_p (None = all)."""
    repetition_penalty: float | None = None
    """CTRL repetition penalty over prompt and generated tokens (None = 1.0 = off)."""
    seed: int | None = None
    """Seed of this request's generator (None = a random seed, reported back in the details)."""

    @property
    def sampling(self) -> bool:
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )


class NextTokenChooser:
    """Chooses one sequence's next token from its row of logits."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.sampling = params.sampling
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**63 - 1, (1,)).item())
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def process(self, logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits after penalty and warpers. ``logits``: (V,) float32; ``token_ids``: (L,) prompt +
        generated."""
        params = self.params
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            # Same rule as HF RepetitionPenaltyLogitsProcessor: divide positive logits, multiply negative
            # ones.
            seen = torch.gather(logits, 0, token_ids)  # (L,)
            seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
            logits = logits.scatter(0, token_ids, seen)
        if not self.sampling:
            return logits
        if params.temperature is not None and params.temperature != 1.0:
            # A positive but tiny temperature (say 5e-273) would overflow the logits to ±inf and the
            # softmax to NaN; below GREEDY_TEMPERATURE the distribution is numerically greedy anyway.
            logits = logits / max(params.temperature, GREEDY_TEMPERATURE)
        if params.top_k is not None and params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p is not None and params.top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(logits, descending=False)  # (V,)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative <= (1 - params.top_p)
            remove_sorted[-1] = False  # always keep the most likely token
            remove = remove_sorted.scatter(0, sorted_indices, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
        return logits

    def log_distribution(self, logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(V,) log-softmax of the processed logits: the distribution this request's next token is drawn
        from, and what its logprobs (and top-n tokens) report, as TGI's do. Tokens top-k / top-p removed
        are -inf."""
        return torch.log_softmax(self.process(logits, token_ids), dim=-1)

    def draw(self, logprobs: torch.Tensor) -> int:
        """A token from ``log_distribution``'s output: sampled with this request's generator, or argmax."""
        if self.sampling:
            return int(torch.multinomial(logprobs.exp(), 1, generator=self.generator).item())
        return int(torch.argmax(logprobs).item())

    def choose(self, logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[int, float]:
        """(next token id, its logprob under the processed distribution)."""
        logprobs = self.log_distribution(logits, token_ids)  # (V,)
        token = self.draw(logprobs)
        return token, float(logprobs[token].item())


class StopSequences:
    """Finds the first stop string in the generated text (the text keeps it, as TGI's does)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def hit(self, text: str, previous_length: int) -> bool:
        """True when a stop string ends in the part of ``text`` added after ``previous_length`` chars."""
        if not self.stops:
            return False
        window = text[max(0, previous_length - self.longest) :]
        return any(stop in window for stop in self.stops)
