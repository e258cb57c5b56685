"""Preference functions and win-rates: how the scripted labeler ranks texts (no HTTP here).

A preference function scores one response text, higher is better; equal scores are ties. ``rank`` turns
scores into a ranking; ``noisy_ranking`` is a labeler that gets each pair wrong with probability p.

==================  ========================================================================
``shorter``         fewer characters is better (score = -len(text))
``without:WORD``    fewer occurrences of WORD is better (score = -count; whole word, any case)
``with:WORD``       answers containing WORD are better (score = 1 if present else 0)
``start:WORD``      answers whose first word is WORD are better (score = 1 or 0; case and punctuation kept)
``module:function``  your own: an importable function ``text -> float`` (higher is better)
==================  ========================================================================
"""

from __future__ import annotations

import importlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import typer

PreferenceFunction = Callable[[str], float]
"""Scores one response text; higher is better. Equal scores are ties."""

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "prompts.txt"
DEFAULT_HELDOUT_PROMPTS = DATA_DIR / "heldout_prompts.txt"


class PreferenceError(ValueError):
    """A ``--preference`` that cannot be used; the message says which forms are accepted."""


# ---- preference functions -------------------------------------------------------------------------


def _word_pattern(word: str) -> re.Pattern[str]:
    word = word.strip()
    if not word:
        raise PreferenceError("the word in without:WORD / with:WORD must not be empty")
    # \b only makes sense next to word characters; punctuation "words" match as plain substrings.
    left = r"\b" if re.match(r"\w", word[0]) else ""
    right = r"\b" if re.match(r"\w", word[-1]) else ""
    return re.compile(left + re.escape(word) + right, re.IGNORECASE)


def shorter(text: str) -> float:
    """Fewer characters is better."""
    return -float(len(text))


def without_word(word: str) -> PreferenceFunction:
    """Fewer occurrences of ``word`` (whole word, case-insensitive) is better: score = -count."""
    pattern = _word_pattern(word)

    def score(text: str) -> float:
        return -float(len(pattern.findall(text)))

    score.__name__ = f"without:{word}"
    return score


def with_word(word: str) -> PreferenceFunction:
    """Answers that contain ``word`` (whole word, case-insensitive) are better: score = 1 or 0."""
    pattern = _word_pattern(word)

    def score(text: str) -> float:
        return 1.0 if pattern.search(text) else 0.0

    score.__name__ = f"with:{word}"
    return score


def start_word(word: str) -> PreferenceFunction:
    """Answers whose first whitespace-separated word is ``word`` (exactly) are better: score = 1 or 0."""
    word = word.strip()
    if not word or any(c.isspace() for c in word):
        raise PreferenceError("the word in start:WORD must be one word, e.g. start:The")

    def score(text: str) -> float:
        words = text.split(maxsplit=1)
        return 1.0 if words and words[0] == word else 0.0

    score.__name__ = f"start:{word}"
    return score


BUILTIN_PREFERENCES: dict[str, str] = {
    "shorter": "fewer characters is better",
    "without:WORD": "fewer occurrences of WORD is better",
    "with:WORD": "answers containing WORD are better",
    "start:WORD": "answers whose first word is WORD are better",
}
_ACCEPTED = (
    "use shorter, without:WORD, with:WORD, start:WORD, or module:function "
    "(an importable function text -> float)"
)


def load_preference(spec: str) -> PreferenceFunction:
    """Turn a ``--preference`` value into a function. Raises ``PreferenceError`` with the fix."""
    spec = spec.strip()
    if spec == "shorter":
        return shorter
    head, sep, tail = spec.partition(":")
    if sep and head == "without":
        return without_word(tail)
    if sep and head == "with":
        return with_word(tail)
    if sep and head == "start":
        return start_word(tail)
    if not sep or not head or not tail:
        raise PreferenceError(f"unknown preference {spec!r}: {_ACCEPTED}")
    try:
        module = importlib.import_module(head)
    except ImportError as exc:
        raise PreferenceError(
            f"cannot import module {head!r} for preference {spec!r} ({exc}); make it importable "
            f"(PYTHONPATH) or {_ACCEPTED}"
        ) from exc
    function = getattr(module, tail, None)
    if function is None:
        raise PreferenceError(f"module {head!r} has no attribute {tail!r} (preference {spec!r}); {_ACCEPTED}")
    if not callable(function):
        raise PreferenceError(f"{spec!r} is not callable: a preference must be a function text -> float")
    return function


def score_texts(texts: Sequence[str], preference: PreferenceFunction) -> list[float]:
    """Scores of ``texts``; refuses a score that is not a finite real number, naming the function."""
    scores = []
    for text in texts:
        value = preference(text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            name = getattr(preference, "__name__", repr(preference))
            raise PreferenceError(
                f"preference {name} returned {value!r} for {text[:40]!r}: it must return a finite float"
            )
        scores.append(float(value))
    return scores


def rank(scores: Sequence[float]) -> list[list[int]]:
    """Best-first ranking of indices into ``scores``; equal scores share a group (a tie).

    >>> rank([0.0, 2.0, 0.0, 1.0])
    [[1], [3], [0, 2]]
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and scores[groups[-1][0]] == scores[index]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def rank_texts(texts: Sequence[str], preference: PreferenceFunction) -> list[list[int]]:
    return rank(score_texts(texts, preference))


def _ordered_pairs(ranking: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The (winner, loser) pairs a ranking states, best group first; tied indices form no pair."""
    return [
        (winner, loser)
        for g, group in enumerate(ranking)
        for lower in ranking[g + 1 :]
        for winner in group
        for loser in lower
    ]


def noisy_ranking(scores: Sequence[float], p: float, rng: random.Random) -> list[list[int]]:
    """A noisy labeler's ranking of ``scores``, in ``rank``'s format (best first, ties grouped).

    Each (winner, loser) pair of ``rank(scores)`` is flipped independently with probability ``p`` (one
    ``rng.random()`` draw per pair, pairs in a fixed order, so a seeded ``rng`` repeats the ranking); the
    answers are then ranked by their number of wins in the (partly flipped) pairs (Copeland), equal wins
    tied. Answers the preference ties form no pair and stay tied with each other unless flips elsewhere
    separate them. ``p = 0`` gives ``rank(scores)``, ``p = 1`` its exact reverse. Flips can leave every
    answer with the same number of wins (a cycle), which ranks all of them tied.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    wins = [0.0] * len(scores)
    for winner, loser in _ordered_pairs(rank(scores)):
        wins[loser if rng.random() < p else winner] += 1.0
    return rank(wins)


def reversed_pairs(ranking: Sequence[Sequence[int]], scores: Sequence[float]) -> tuple[int, int]:
    """(posted pairs in the reverse order of ``scores``, posted pairs whose answers ``scores`` orders):
    how many of the (winner, loser) pairs ``ranking`` states disagree with the true preference. Pairs of
    answers the preference scores equal are in neither count (the truth has no order to disagree with), nor
    are pairs ``ranking`` ties."""
    pairs = [(w, lo) for w, lo in _ordered_pairs(ranking) if scores[w] != scores[lo]]
    return sum(scores[winner] < scores[loser] for winner, loser in pairs), len(pairs)


@dataclass
class WinRate:
    """Pairwise outcome of new responses against recorded ones (same prompt); a tie counts half."""

    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def pairs(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.pairs if self.pairs else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "win_rate": self.rate,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "pairs": self.pairs,
        }


def win_rate(
    new: dict[str, list[str]], baseline: dict[str, list[str]], preference: PreferenceFunction
) -> WinRate:
    """Every new response against every baseline response of the same prompt (prompts in both only)."""
    result = WinRate()
    for prompt, new_texts in new.items():
        old_texts = baseline.get(prompt)
        if not old_texts:
            continue
        new_scores = score_texts(new_texts, preference)
        old_scores = score_texts(old_texts, preference)
        for a in new_scores:
            for b in old_scores:
                if a > b:
                    result.wins += 1
                elif a == b:
                    result.ties += 1
                else:
                    result.losses += 1
    return result


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not path.exists():
        raise typer.BadParameter(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise typer.BadParameter(f"prompt file {path} holds no prompts (one per line)")
    return prompts
