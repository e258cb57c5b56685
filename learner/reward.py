"""The reward model: a causal LM with a scalar head, trained on K-wise rankings (paper section 3.5, eq. 1).

The RM is ``AutoModelForSequenceClassification(num_labels=1)`` built from the SFT/base causal-LM folder,
so policy, value model and RM share one tokenizer. It scores ``query + response + EOS`` at the last real
token (the EOS), where ``query`` is the stored model input — the exact text serve generated from, raw or
chat-rendered (instructloop/prompt.py) — tokenized as serve does (``learner.utils.encode_query``): the RM, PPO, the bias
and the gate all see the sequences serving saw, and nothing renders a template again.

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

import torch
from torch import nn

from learner.config import RewardConfig
from learner.losses import first_true_indices, kwise_ranking_loss, ranking_pairs_flat
from learner.utils import disable_dropout, encode_sequence, left_pad, position_ids_from_mask, progress_iter

log = logging.getLogger(__name__)

REWARD_BIAS_KEY = "instructloop_reward_bias"
"""config attribute holding the score head's bias (saved in config.json; re-installed on load)."""


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


def _install_bias(model: nn.Module, bias: float) -> None:
    head = score_head(model)
    if head.bias is None:
        new_head = nn.Linear(
            head.in_features, head.out_features, bias=True, dtype=head.weight.dtype, device=head.weight.device
        )
        with torch.no_grad():
            new_head.weight.copy_(head.weight)
        model.score = new_head
        head = new_head
    with torch.no_grad():
        head.bias.fill_(bias)
    head.bias.requires_grad_(False)  # a normalisation constant, not a learned parameter: config stays in sync
    setattr(model.config, REWARD_BIAS_KEY, float(bias))


def build_reward_model(model_path: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The RM (or the value model): ``AutoModelForSequenceClassification(num_labels=1)`` from a causal-LM
    folder (a fresh head, initialised from ``seed`` so a build is reproducible) or from a saved RM folder
    (head and bias restored); pad token id set from the tokenizer, dropout off."""
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
    bias = getattr(model.config, REWARD_BIAS_KEY, None)
    if bias is not None:
        # from_pretrained built a bias-free head and dropped the saved bias: put it back
        _install_bias(model, float(bias))
    return disable_dropout(model)


def token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head applied at every position. input_ids, attention_mask: (B, T). Returns (B, T).

    Used as per-token values by the value model and, gathered at the last real token, as RM scores.
    """
    hidden = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    head = score_head(model)  # float32 over a bfloat16 backbone in mixed precision (Settings.dtype)
    return head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row. (B, T) → (B,)."""
    flipped = attention_mask.bool().flip(1)  # (B, T)
    return attention_mask.size(1) - 1 - first_true_indices(flipped)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y): the score at the last real token of each (left- or right-padded) row. Returns (B,)."""
    scores = token_scores(model, input_ids, attention_mask)  # (B, T)
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
    scores = sequence_scores(model, input_ids.to(device), attention_mask.to(device))  # (N,)
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
    training), heldout_accuracy / heldout_loss (when ``heldout`` is given), steps, rankings, pairs,
    sequences, duration_s and sequences_per_s.
    """
    comparisons = [c for c in comparisons if c.pairs()]  # a tie ([[0, 1]]) implies no pair
    heldout = [c for c in heldout if c.pairs()] if heldout else heldout
    if not comparisons:
        raise ValueError(
            "train_reward_model needs at least one comparison that implies a (winner, loser) pair"
        )
    disable_dropout(model)
    model.train()
    # Train every weight but the normalisation bias, whatever froze the model before (the PPO trainer
    # freezes the RM it scores with; it is the same object the learner updates next).
    model.requires_grad_(True)
    if score_head(model).bias is not None:
        score_head(model).bias.requires_grad_(False)
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
) -> torch.Tensor:
    """r(x, y) of each (prompt, response) pair (EOS appended as in training). Returns (len(prompts),) float32."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    sequences = [
        encode_sequence(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)
    ]
    return _score_sequences(model, tokenizer, sequences, batch_size)


@torch.no_grad()
def _score_sequences(model, tokenizer, sequences: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """Sequence scores of already encoded sequences, ``batch_size`` per forward pass, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        input_ids, attention_mask = left_pad(sequences[start : start + batch_size], tokenizer.pad_token_id)
        out.append(sequence_scores(model, input_ids.to(device), attention_mask.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def ranking_metrics(
    model, tokenizer, comparisons: list, batch_size: int = 16, max_length: int = 512
) -> tuple[float, float]:
    """(pair accuracy, K-wise loss) of ``comparisons`` under the RM, from one scoring pass: each ranked
    response is scored once (``batch_size`` per forward), then ``kwise_ranking_loss`` over all rankings
    gives the loss (mean over rankings, as in training) and the share of implied (winner, loser) pairs
    ordered correctly (a tie in score counts as wrong)."""
    encoded = [_ranked_sequences(tokenizer, comparison, max_length) for comparison in comparisons]
    scores = _score_sequences(
        model, tokenizer, [s for sequences, _ in encoded for s in sequences], batch_size
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


def normalize_reward_bias(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
) -> float:
    """Shift the score head's bias so these (prompt, response) pairs score mean 0 (paper: the RM is
    normalised so labeler demonstrations score 0; use reference-policy samples when there are none).

    The bias lives in the head (installed if the architecture has none) and in ``config`` under
    ``REWARD_BIAS_KEY`` so ``build_reward_model`` restores it from a saved folder. Returns the new bias.
    """
    if not prompts:
        raise ValueError("normalize_reward_bias needs at least one (prompt, response) pair")
    mean = reward_scores(model, tokenizer, prompts, responses, batch_size, max_length).mean().item()
    head = score_head(model)
    current = head.bias.item() if head.bias is not None else 0.0
    _install_bias(model, current - mean)
    return current - mean
