"""Cleaning and mixing the training prompts before anything is sampled from them.

The seed paper trains on prompts from the teacher's own distribution, removes prompts that
duplicate evaluation data (exact match, then near-duplicates), and mixes in prompts from
outside that distribution, which it found keeps the student's entropy from collapsing. Near
duplicates are found with MinHash over character n-grams (datasketch's LSH index), which
scales to large pools without comparing every pair; the paper's embedding cosine would need
an embedding model, which a CPU-only, offline machine does not have.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What counts as the same prompt for exact matching: case and runs of whitespace do not."""
    return _SPACE.sub(" ", text.strip().lower())


def minhash(text: str, ngram: int, num_perm: int) -> MinHash:
    signature = MinHash(num_perm=num_perm, seed=1)
    normal = normalise(text)
    grams = {normal[i : i + ngram] for i in range(max(1, len(normal) - ngram + 1))}
    signature.update_batch([gram.encode() for gram in grams])
    return signature


@dataclass
class Selection:
    """Rows kept, in order, and why the others went."""

    kept: list[int]
    dropped: Counter = field(default_factory=Counter)


def deduplicate(
    prompts: list[str], reference: list[str], near_threshold: float | None, ngram: int = 5, num_perm: int = 128
) -> Selection:
    """Drops prompts equal to (after `normalise`) or, with `near_threshold`, estimated Jaccard-similar to a
    reference prompt or to an earlier kept prompt. Reasons: exact_reference, near_reference,
    exact_repeat, near_repeat."""
    seen_reference = {normalise(text) for text in reference}
    seen_kept: set[str] = set()
    reference_index = kept_index = None
    if near_threshold is not None:
        reference_index = MinHashLSH(threshold=near_threshold, num_perm=num_perm)
        kept_index = MinHashLSH(threshold=near_threshold, num_perm=num_perm)
        for i, text in enumerate(reference):
            reference_index.insert(f"r{i}", minhash(text, ngram, num_perm))
    selection = Selection(kept=[])
    for i, text in enumerate(prompts):
        key = normalise(text)
        signature = minhash(text, ngram, num_perm) if near_threshold is not None else None
        if key in seen_reference:
            selection.dropped["exact_reference"] += 1
        elif key in seen_kept:
            selection.dropped["exact_repeat"] += 1
        elif reference_index is not None and reference_index.query(signature):
            selection.dropped["near_reference"] += 1
        elif kept_index is not None and kept_index.query(signature):
            selection.dropped["near_repeat"] += 1
        else:
            selection.kept.append(i)
            seen_kept.add(key)
            if kept_index is not None:
                kept_index.insert(f"k{i}", signature)
    return selection


def outside_count(aligned: int, outside_fraction: float, available: int) -> int:
    """How many outside prompts make them `outside_fraction` of the mixed set (capped by what exists)."""
    if outside_fraction <= 0:
        return 0
    wanted = round(aligned * outside_fraction / (1 - outside_fraction)) if outside_fraction < 1 else available
    return min(wanted, available)


def mix_order(aligned: int, outside: int, seed: int) -> list[tuple[str, int]]:
    """A seeded interleaving of ("aligned", i) and ("outside", j), so every part of training sees both."""
    order = [("aligned", i) for i in range(aligned)] + [("outside", j) for j in range(outside)]
    random.Random(seed).shuffle(order)
    return order
