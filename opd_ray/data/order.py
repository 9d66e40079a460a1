"""The order prompts are trained in, and the seeds everything random derives from the run seed.

Both only depend on the run seed and counters (epoch, step, shard), never on which actor
does the work or how fast it is, so a resumed or re-dispatched run draws the same.
"""

from __future__ import annotations

import random

# One multiplier per position after the first: mix_seed(a, b) = a * 1_000_003 + b, and so on.
_MULTIPLIERS = (1_000_003, 10_007, 101, 13)


def mix_seed(*parts: int) -> int:
    """One seed from a run seed and counters (step, shard, ...): distinct for distinct counters."""
    if len(parts) - 1 > len(_MULTIPLIERS):
        raise ValueError(f"mix_seed takes at most {len(_MULTIPLIERS) + 1} parts")
    seed = parts[0]
    for multiplier, part in zip(_MULTIPLIERS, parts[1:], strict=False):
        seed = seed * multiplier + part
    return seed % 2**62


class PromptSampler:
    """Reshuffles the training prompts every epoch with a seeded RNG: a reproducible data order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def restore(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._order = self._shuffled()

    def next(self, count: int) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            take = min(count - len(chosen), self.size - self.position)
            chosen += self._order[self.position : self.position + take]
            self.position += take
        return chosen
