"""The repetition rule: a response in which one n-gram of tokens occurs too often is a degenerate loop.

One rule for two uses: the cold start drops such teacher answers before SFT, and the OPD doctor
counts the student's own (`health/repetitive_share`): a student that has collapsed into a loop
writes them at every step.
"""

from __future__ import annotations

from collections import Counter

from opd_ray.spec.trainer import MAX_NGRAM_REPEATS, REPEAT_NGRAM


def most_repeated_ngram(tokens: list[int], n: int) -> int:
    """How often the most frequent n-gram occurs: degenerate loops repeat one many times."""
    if len(tokens) < n:
        return 0
    return max(Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)).values())


def is_repetitive(tokens: list[int], n: int = REPEAT_NGRAM, max_repeats: int = MAX_NGRAM_REPEATS) -> bool:
    return most_repeated_ngram(tokens, n) > max_repeats
