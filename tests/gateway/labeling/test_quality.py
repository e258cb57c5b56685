"""Labeler agreement, pair by pair (hand-computed cases)."""

from __future__ import annotations

from gateway.labeling.quality import pair_agreement


def test_identical_rankings_agree_on_every_pair():
    assert pair_agreement([[0], [1, 2], [3]], [[0], [2, 1], [3]]) == (6, 6)


def test_a_swapped_pair_and_a_broken_tie_disagree():
    # pairs: (0,1) agree, (0,2) agree, (1,2): first says 1>2, second ties them -> disagree
    assert pair_agreement([[0], [1], [2]], [[0], [1, 2]]) == (2, 3)
    assert pair_agreement([[0], [1], [2]], [[2], [1], [0]]) == (0, 3)


def test_only_pairs_both_labelers_ranked_count():
    assert pair_agreement([[0], [1], [2]], [[1], [0]]) == (0, 1)
    assert pair_agreement([[0]], [[1]]) == (0, 0)
