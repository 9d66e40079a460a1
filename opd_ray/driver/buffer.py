"""The rollout buffer: launched steps whose batches are being sampled and scored, oldest first.

The driver holds only ObjectRefs and a few integers per step; the tensors stay in Ray's
object store until a learner rank fetches them. The bound is the run-ahead: a step is
launched only while the buffer has room, so asynchronous mode (`trainer.max_staleness` = s)
keeps at most s + 1 steps in flight and a synchronous run exactly one. When a step's
batches are resolved, `check_fresh` refuses any sampled more than the staleness limit of
weight versions ago.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class BufferFull(RuntimeError):
    pass


class StaleBatch(RuntimeError):
    pass


class RolloutBuffer(Generic[Entry]):
    def __init__(self, capacity: int, max_staleness: int = 0) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def put(self, entry: Entry) -> None:
        if self.full():
            raise BufferFull(f"rollout buffer holds {self.capacity} steps already")
        self._entries.append(entry)

    def take(self) -> Entry:
        """The oldest launched step."""
        if not self._entries:
            raise IndexError("rollout buffer is empty")
        return self._entries.popleft()

    def check_fresh(self, sampled_version: int, learner_version: int) -> int:
        """How many versions behind the learner a batch sampled with `sampled_version` is; more than
        `max_staleness` is an error (the importance weights assume a bounded lag)."""
        lag = learner_version - sampled_version
        if lag > self.max_staleness:
            raise StaleBatch(
                f"batch sampled with weight version {sampled_version} is {lag} versions behind "
                f"the learner (limit {self.max_staleness})"
            )
        return lag
