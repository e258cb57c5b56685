"""Labeler agreement: how often two labelers order a pair of responses the same way.

InstructGPT reports inter-labeler agreement of about 73 % on held-out items (Ouyang et al., 2022, §5.1).
Here two rankings of the same responses are compared pair by pair: for every pair of responses that both
labelers ranked, each says "i better", "j better" or "tied"; they agree when they say the same.
"""

from __future__ import annotations

from itertools import combinations


def _positions(ranking: list[list[int]]) -> dict[int, int]:
    return {index: group for group, members in enumerate(ranking) for index in members}


def pair_agreement(first: list[list[int]], second: list[list[int]]) -> tuple[int, int]:
    """(agreeing pairs, pairs both ranked) between two best-first rankings with tied groups."""
    a, b = _positions(first), _positions(second)
    both = sorted(set(a) & set(b))
    agree = total = 0
    for i, j in combinations(both, 2):
        total += 1
        order_a = (a[i] > a[j]) - (a[i] < a[j])
        order_b = (b[i] > b[j]) - (b[i] < b[j])
        agree += order_a == order_b
    return agree, total
