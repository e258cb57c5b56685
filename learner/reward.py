"""The reward model: a causal LM with a scalar head, trained on K-wise rankings (paper section 3.5, eq. 1).

The RM is ``AutoModelForSequenceClassification(num_labels=1)`` built from the SFT/base causal-LM folder,
so policy, value model and RM share one tokenizer. It scores ``query + response + EOS`` at the last real
token (the EOS), where ``query`` is the stored model input — the exact text serve generated from, raw or
chat-rendered (instructloop/prompt.py) — tokenized as serve does (``learner.utils.encode_query``): the RM,
PPO, the bias and the gate all see the sequences serving saw, and nothing renders a template again.

We run the backbone and the score head ourselves (``token_scores``) instead of calling ``model(...)``:
position ids come from the attention mask, so a left-padded sequence scores exactly like the same
sequence unpadded (tested), and the same function gives the value model its per-token values.

The training step puts **all K responses of a ranking in one forward pass** and gathers the C(K,2) pairs
from those K scores: K forwards per ranking instead of the K·(K-1) a pairwise trainer needs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from statistics import NormalDist

import torch
from torch import nn

from learner.config import RewardConfig
from learner.losses import (
    first_true_indices,
    kwise_ranking_loss,
    normalisation_constants,
    ranking_pairs_flat,
)
from learner.utils import disable_dropout, encode_sequence, left_pad, position_ids_from_mask, progress_iter

log = logging.getLogger(__name__)

REWARD_GAIN_KEY = "instructloop_reward_gain"
"""config attribute holding the normalisation gain g (saved in config.json; 1.0 when absent)."""
REWARD_BIAS_KEY = "instructloop_reward_bias"
"""config attribute holding the normalisation bias b (saved in config.json; 0.0 when absent)."""
NORMALISATION_MIN_STD = 1e-3
"""A spread of raw scores below this is treated as this (an untrained RM scoring everything alike would
otherwise get an unbounded gain)."""


# ------------------------------------------------------------------------------------------- models


def score_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence-classification model (``score`` in Llama/Qwen/Mistral/GPT-2)."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__} has no linear `score` head; use a causal LM whose "
            "AutoModelForSequenceClassification names its head `score` (Llama, Qwen2, Mistral, GPT-2…)"
        )
    return head


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a head (``model.model`` for Llama)."""
    return getattr(model, model.base_model_prefix)


def reward_normalisation(model: nn.Module) -> tuple[float, float]:
    """(gain g, bias b) of ``model``: a score is ``g · head(h) + b`` (1, 0 before any normalisation)."""
    return (
        float(getattr(model.config, REWARD_GAIN_KEY, 1.0)),
        float(getattr(model.config, REWARD_BIAS_KEY, 0.0)),
    )


def set_reward_normalisation(model: nn.Module, gain: float, bias: float) -> None:
    """Store (g, b) in ``model.config``: saved with the model, applied by every normalised score."""
    setattr(model.config, REWARD_GAIN_KEY, float(gain))
    setattr(model.config, REWARD_BIAS_KEY, float(bias))


def build_reward_model(model_path: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The RM (or the value model): ``AutoModelForSequenceClassification(num_labels=1)`` from a causal-LM
    folder (a fresh head, initialised from ``seed`` so a build is reproducible) or from a saved RM folder
    (head restored, its normalisation read from config.json); pad token id set from the tokenizer, dropout
    off."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"{model_path}: the tokenizer needs a pad token distinct from EOS (set tokenizer.pad_token, "
            "e.g. instructloop.model.fix_tokenizer for SmolLM2)"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model)


def token_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalised: bool = True
) -> torch.Tensor:
    """The score head applied at every position. input_ids, attention_mask: (B, T). Returns (B, T).

    Used as per-token values by the value model and, gathered at the last real token, as RM scores.
    ``normalised``: ``g · head + b`` (``reward_normalisation``), the units PPO, the value model and the gate
    work in; False gives the raw head, the units the RM trains in (the K-wise loss is not scale-free, so
    training through g would change the RM's effective learning rate after every normalisation).
    """
    hidden = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    head = score_head(model)  # float32 over a bfloat16 backbone in mixed precision (Settings.dtype)
    scores = head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, T)
    if not normalised:
        return scores
    gain, bias = reward_normalisation(model)
    return scores * gain + bias


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row. (B, T) → (B,)."""
    flipped = attention_mask.bool().flip(1)  # (B, T)
    return attention_mask.size(1) - 1 - first_true_indices(flipped)


def sequence_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalised: bool = True
) -> torch.Tensor:
    """r(x, y): the score at the last real token of each (left- or right-padded) row (normalised or raw, see
    ``token_scores``). Returns (B,)."""
    scores = token_scores(model, input_ids, attention_mask, normalised)  # (B, T)
    last = last_token_index(attention_mask)  # (B,)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


# ------------------------------------------------------------------------------------------ training


def _ranked_sequences(tokenizer, comparison, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Encode only the responses a ranking mentions; return (sequences, ranking over them)."""
    ranked = [i for group in comparison.ranking for i in group]
    compact = {original: position for position, original in enumerate(ranked)}
    sequences = [
        encode_sequence(tokenizer, comparison.prompt, comparison.responses[i], max_length) for i in ranked
    ]
    ranking = [[compact[i] for i in group] for group in comparison.ranking]
    return sequences, ranking


def update_selection(new: Sequence, older: Sequence, config: RewardConfig, seed: int) -> tuple[list, list]:
    """What one RM update trains on: (the newest ``config.max_new_per_update`` of ``new``, replayed rankings).
    New rankings past the cap join ``older``, from which ``replay_sample`` draws ``replay_ratio`` times as
    many as the new ones trained. Both lists keep their input order."""
    cut = max(0, len(new) - config.max_new_per_update)
    trained = list(new[cut:])
    return trained, replay_sample([*older, *new[:cut]], len(trained), config.replay_ratio, seed)


def replay_sample(older: Sequence, new_count: int, ratio: float, seed: int) -> list:
    """The older rankings an update trains on beside its ``new_count`` new ones:
    ``round(ratio · new_count)`` of ``older`` (all of them when there are fewer), drawn without replacement
    from ``seed``, in their order."""
    n = min(len(older), round(ratio * new_count))
    return [older[i] for i in sorted(random.Random(seed).sample(range(len(older)), n))]


def accuracy_lower_bound(accuracy: float, pairs: float, confidence: float) -> float:
    """One-sided Wilson lower confidence bound of a pair accuracy measured on ``pairs`` pairs (0 for none).
    Pairs of one ranking are not independent, so the bound is, if anything, optimistic."""
    if pairs <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    centre = accuracy + z * z / (2 * pairs)
    spread = z * math.sqrt(accuracy * (1 - accuracy) / pairs + z * z / (4 * pairs * pairs))
    return (centre - spread) / (1 + z * z / pairs)


def update_is_worse(heldout_loss: float, previous_loss: float | None, tolerance: float) -> bool:
    """Whether an RM update is refused: its held-out loss (nats per pair) exceeds the previous RM's on the
    same held-out pairs by more than ``tolerance`` (``RewardConfig.refuse_tolerance``). No previous loss (the
    first RM, or no held-out pairs): never."""
    return previous_loss is not None and heldout_loss > previous_loss + tolerance


def rm_ready(metrics: dict, confidence: float = 0.95) -> tuple[bool, str]:
    """Whether PPO may optimise against an RM with these update ``metrics`` (``heldout_accuracy``,
    ``heldout_pairs``, as ``train_reward_model`` returns them): the lower confidence bound of its held-out
    pair accuracy at ``confidence`` is above chance (0.5). ``confidence`` 0 skips the check. Returns
    (ready, the reason in words)."""
    if confidence <= 0:
        return True, "the readiness check is off (RewardConfig.ready_confidence 0)"
    accuracy, pairs = metrics.get("heldout_accuracy"), metrics.get("heldout_pairs") or 0.0
    if accuracy is None or not pairs:
        return False, "the reward model has no held-out comparisons to measure its accuracy on"
    bound = accuracy_lower_bound(float(accuracy), float(pairs), confidence)
    verdict = "above" if bound > 0.5 else "not above"
    reason = (
        f"held-out pair accuracy {accuracy:.3f} on {pairs:.0f} pairs: its {confidence:.0%} lower bound "
        f"{bound:.3f} is {verdict} chance (0.5)"
    )
    return bound > 0.5, reason


def trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every weight ``train_reward_model`` changes, for ``restore_snapshot``."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def restore_snapshot(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put back the weights of ``trainable_snapshot`` in place (objects holding the model see them too)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(snapshot[name])


def kwise_batch_loss(
    model,
    tokenizer,
    comparisons,
    max_length: int,
    encoded: list[tuple[list[list[int]], list[list[int]]]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One forward over every response of every ranking in ``comparisons``; the K-wise loss of the batch.

    ``encoded`` (optional) is ``_ranked_sequences`` of each comparison, already computed.
    Returns (loss, pair accuracy, number of sequences scored)."""
    flat: list[list[int]] = []
    rankings, sizes = [], []
    if encoded is None:
        encoded = [_ranked_sequences(tokenizer, comparison, max_length) for comparison in comparisons]
    for sequences, ranking in encoded:
        flat.extend(sequences)
        rankings.append(ranking)
        sizes.append(len(sequences))
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(flat, tokenizer.pad_token_id)  # (N, T)
    scores = sequence_scores(model, input_ids.to(device), attention_mask.to(device), normalised=False)  # (N,)
    pairs = ranking_pairs_flat(rankings, sizes)
    loss, accuracy = kwise_ranking_loss(scores, pairs)
    return loss, accuracy, len(flat)


def train_reward_model(
    model,
    tokenizer,
    comparisons: list,
    config: RewardConfig,
    heldout: list | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``model`` in place on ``comparisons`` (``ComparisonEvent``s) with the K-wise loss (eq. 1).

    Batches hold ``config.rankings_per_batch`` whole rankings; each batch is one forward pass over all
    their ranked responses. Returns loss (mean over steps), train_accuracy (pair accuracy during
    training), heldout_accuracy / heldout_loss / heldout_pairs (when ``heldout`` is given), steps, rankings,
    pairs, sequences, duration_s and sequences_per_s.
    """
    comparisons = [c for c in comparisons if c.pairs()]  # a tie ([[0, 1]]) implies no pair
    heldout = [c for c in heldout if c.pairs()] if heldout else heldout
    if not comparisons:
        raise ValueError(
            "train_reward_model needs at least one comparison that implies a (winner, loser) pair"
        )
    disable_dropout(model)
    model.train()
    # Train every weight, whatever froze the model before (the PPO trainer freezes the RM it scores with; it
    # is the same object the learner updates next). The normalisation (g, b) is not a weight: it stays.
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    started = time.perf_counter()
    encoded = [_ranked_sequences(tokenizer, comparison, config.max_length) for comparison in comparisons]
    order_rng = random.Random(config.seed)
    batches = []
    epochs = config.epochs if len(comparisons) <= config.single_pass_above else 1
    for _ in range(epochs):
        order = list(range(len(comparisons)))
        order_rng.shuffle(order)
        batches.extend(
            order[start : start + config.rankings_per_batch]
            for start in range(0, len(order), config.rankings_per_batch)
        )
    losses, accuracies, sequences = [], [], 0
    for batch in progress_iter(batches, len(batches), "reward model", progress):
        loss, accuracy, n = kwise_batch_loss(
            model,
            tokenizer,
            [comparisons[i] for i in batch],
            config.max_length,
            encoded=[encoded[i] for i in batch],
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())  # CPU/GPU sync
        accuracies.append(accuracy.item())
        sequences += n
    duration = time.perf_counter() - started
    model.eval()
    stats = {
        "loss": sum(losses) / len(losses),
        "train_accuracy": sum(accuracies) / len(accuracies),
        "steps": float(len(batches)),
        "rankings": float(len(comparisons) * epochs),
        "pairs": float(sum(len(c.pairs()) for c in comparisons) * epochs),
        "epochs": float(epochs),
        "sequences": float(sequences),
        "duration_s": duration,
        "sequences_per_s": sequences / duration if duration > 0 else math.inf,
    }
    if heldout:
        stats["heldout_accuracy"], stats["heldout_loss"] = ranking_metrics(
            model, tokenizer, heldout, config.score_batch_size, config.max_length
        )
        stats["heldout_pairs"] = float(sum(len(c.pairs()) for c in heldout))
    log.info("reward model trained", extra={"stats": stats})
    return stats


# ------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def reward_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    normalised: bool = True,
) -> torch.Tensor:
    """r(x, y) of each (prompt, response) pair (EOS appended as in training), normalised or raw (see
    ``token_scores``). Returns (len(prompts),) float32."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    sequences = [
        encode_sequence(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)
    ]
    return _score_sequences(model, tokenizer, sequences, batch_size, normalised)


@torch.no_grad()
def _score_sequences(
    model, tokenizer, sequences: Sequence[Sequence[int]], batch_size: int, normalised: bool = True
) -> torch.Tensor:
    """Sequence scores of already encoded sequences, ``batch_size`` per forward pass, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        input_ids, attention_mask = left_pad(sequences[start : start + batch_size], tokenizer.pad_token_id)
        scores = sequence_scores(model, input_ids.to(device), attention_mask.to(device), normalised)
        out.append(scores.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def ranking_metrics(
    model, tokenizer, comparisons: list, batch_size: int = 16, max_length: int = 512
) -> tuple[float, float]:
    """(pair accuracy, K-wise loss) of ``comparisons`` under the RM, from one scoring pass: each ranked
    response is scored once (``batch_size`` per forward), then ``kwise_ranking_loss`` over all rankings
    gives the loss (mean over rankings, as in training, on raw scores: comparable across updates whatever
    the normalisation) and the share of implied (winner, loser) pairs ordered correctly (a tie in score
    counts as wrong)."""
    encoded = [_ranked_sequences(tokenizer, comparison, max_length) for comparison in comparisons]
    scores = _score_sequences(
        model, tokenizer, [s for sequences, _ in encoded for s in sequences], batch_size, normalised=False
    )
    loss, accuracy = kwise_ranking_loss(
        scores, ranking_pairs_flat([r for _, r in encoded], [len(sequences) for sequences, _ in encoded])
    )
    return accuracy.item(), loss.item()


def pairwise_accuracy(
    model, tokenizer, comparisons: list, batch_size: int = 16, max_length: int = 512
) -> float:
    """Fraction of the (winner, loser) pairs implied by ``comparisons`` that the RM orders correctly
    (a tie in score counts as wrong); ``ranking_metrics``' first half."""
    return ranking_metrics(model, tokenizer, comparisons, batch_size, max_length)[0]


def normalize_reward(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
) -> tuple[float, float]:
    """Set the RM's gain and bias so these (prompt, response) pairs score mean 0, std 1: the reference
    policy's samples, as lm-human-preferences and OpenRLHF normalise, so β, the missing-EOS penalty and the
    value clip mean the same whatever scale an RM update ended at. Each pair is scored exactly as given (the
    stored model input, the prompt contract). Stored in ``config`` (``REWARD_GAIN_KEY``, ``REWARD_BIAS_KEY``),
    saved with the model. Returns (gain, bias)."""
    if not prompts:
        raise ValueError("normalize_reward needs at least one (prompt, response) pair")
    raw = reward_scores(model, tokenizer, prompts, responses, batch_size, max_length, normalised=False)
    gain, bias = normalisation_constants(raw, NORMALISATION_MIN_STD)
    set_reward_normalisation(model, gain, bias)
    return gain, bias
