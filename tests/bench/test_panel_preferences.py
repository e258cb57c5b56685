"""The panel's content preference (bench/panel_preferences.py) and its second prompt set (bench/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.panel_preferences import quantity_density, sentences
from labeler.preferences import (
    DEFAULT_HELDOUT_PROMPTS,
    DEFAULT_PROMPTS,
    load_preference,
    rank_texts,
    read_prompts,
)

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"

CONCRETE = (
    "Soak the stain in cold water for 10 minutes. Rub in 2 drops of dish soap. Rinse and wash as usual."
)
VAGUE = "Soak the stain in cold water for a while. Rub in some dish soap. Rinse and wash as usual."
ONE_NUMBER = "Soak it for 10 minutes."
PADDED = ONE_NUMBER + " It really helps. Stains are annoying. Be patient. Good luck!"
WORDS = "Use a dozen lemons. Bake it for half an hour. Serve twenty guests."
LIST = "1. Soak it in water.\n2. Rub in soap.\n3. Rinse it."
ORDINALS = "First, soak it. Second, rub in soap. Then rinse."


def test_sentences_split_at_ends_and_lines_and_drop_list_markers():
    assert sentences(CONCRETE) == [
        "Soak the stain in cold water for 10 minutes.",
        "Rub in 2 drops of dish soap.",
        "Rinse and wash as usual.",
    ]
    assert sentences(LIST) == ["Soak it in water.", "Rub in soap.", "Rinse it."]
    assert sentences("It costs 3.5 dollars. Then it was cut") == ["It costs 3.5 dollars.", "Then it was cut"]
    assert sentences("") == [] and sentences("... !") == []


@pytest.mark.parametrize("text", [CONCRETE, VAGUE, ONE_NUMBER, PADDED, WORDS, LIST, ORDINALS])
def test_repeating_an_answer_does_not_raise_its_score(text):
    assert quantity_density(text + " " + text) == pytest.approx(quantity_density(text))
    assert quantity_density(text + "\n" + text) == pytest.approx(quantity_density(text))


def test_quantity_density_scores_as_documented():
    assert quantity_density(CONCRETE) == pytest.approx(2 / 3)
    assert quantity_density(VAGUE) == 0.0
    assert quantity_density(ONE_NUMBER) == 1.0
    assert quantity_density(PADDED) == pytest.approx(1 / 5)  # padding without quantities lowers it
    assert quantity_density(WORDS) == 1.0  # number words count
    assert quantity_density(LIST) == 0.0  # list numbering does not, on its own lines or inline
    assert quantity_density("1. Soak it. 2. Rub in soap. 3) Rinse it.") == 0.0
    assert quantity_density(ORDINALS) == 0.0  # nor ordinals
    assert quantity_density("No one knows. One of them left.") == 0.0  # "one" is mostly a pronoun
    assert quantity_density("") == 0.0


def test_quantity_density_ranks_concrete_over_vague_not_longer_over_shorter():
    preference = load_preference("bench.panel_preferences:quantity_density")  # as --preference names it
    assert preference is quantity_density
    texts = [VAGUE, PADDED, CONCRETE, ONE_NUMBER]
    assert rank_texts(texts, preference) == [[3], [2], [1], [0]]
    # the longest answer is not the best, and the shortest one is not best for being short
    assert rank_texts(["Rinse it.", CONCRETE], preference) == [[1], [0]]


def test_prompt_set_b_is_16_training_and_8_heldout_prompts_unlike_the_labelers():
    train_b, heldout_b = read_prompts(DATA / "prompts_b.txt"), read_prompts(DATA / "heldout_prompts_b.txt")
    train_a, heldout_a = read_prompts(DEFAULT_PROMPTS), read_prompts(DEFAULT_HELDOUT_PROMPTS)
    assert len(train_b) == len(set(train_b)) == 16
    assert len(heldout_b) == len(set(heldout_b)) == 8
    assert not set(train_b) & set(heldout_b)
    assert not (set(train_b) | set(heldout_b)) & (set(train_a) | set(heldout_a))
