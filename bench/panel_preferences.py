"""Content preferences for the preference panel (bench/learning_panel.py), as ``module:function`` specs.

    --preference bench.panel_preferences:quantity_density

A preference function scores one answer text, higher is better (``labeler.preferences``). The built-in
ones are a word at the start (``start:WORD``) or anywhere (``with:WORD``), which one token can satisfy; the
panel also needs a preference about the content of the whole answer that does not simply favour longer (or
shorter) answers, so that a rising win-rate shows the preference was learned and not length.
"""

from __future__ import annotations

import re

_LIST_MARKER = re.compile(r"^(?:\d{1,2}[.)]|[-*\u2022])\s+")
_LETTER = re.compile(r"[^\W\d_]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_QUANTITY = re.compile(
    r"\d|\b(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty|"
    r"sixty|seventy|eighty|ninety|hundreds?|thousands?|millions?|billions?|dozens?|half|percent)\b",
    re.IGNORECASE,
)


def sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by whitespace, and at line
    breaks; a list item's marker (``1.``, ``2)``, ``-``, ``*``, ``•``) at the start of a sentence is dropped,
    and fragments without a letter (a ``1.`` of an inline list) are not sentences. An unfinished last
    sentence (an answer cut at max_tokens) counts as one."""
    parts = (_LIST_MARKER.sub("", part.strip()) for part in _SENTENCE_END.split(text))
    return [part for part in parts if _LETTER.search(part)]


def quantity_density(text: str) -> float:
    """Share of the answer's sentences that state a quantity: a digit, or a number word from "two" up
    ("dozen", "half", "hundred", "percent" and the like), in [0, 1]; 0 for an answer without a sentence.

    Prefers concrete answers ("Soak it for 10 minutes." over "Soak it for a while."), with the concreteness
    spread through the answer: every sentence counts, not one number anywhere. Length-neutral: it is a
    density per sentence, not a count, so an answer repeated twice scores the same, padding an answer with
    sentences that state nothing lowers its score, and a longer answer gains only if its added sentences
    are as concrete as the rest. Not rewarded: list numbering ("1." or "2)" starting a sentence) and
    ordinals ("first", "second"). "one" is left out because it is mostly a pronoun ("no one", "one of").
    """
    parts = sentences(text)
    if not parts:
        return 0.0
    return sum(bool(_QUANTITY.search(part)) for part in parts) / len(parts)
