"""A bounded, versioned FIFO of batch ObjectRefs between the scoring and learning stages.

The driver holds only refs and a few integers per batch; the tensors stay in Ray's object
store until a learner rank fetches them. The bound stops producers from running ahead of
the learner, and the version tag lets `take` refuse a batch older than the staleness limit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import ray


class BufferFull(RuntimeError):
    pass


class StaleBatch(RuntimeError):
    pass


@dataclass(frozen=True)
class BufferEntry:
    refs: tuple[ray.ObjectRef, ...]  # one per rollout shard; the learner joins them
    policy_version: int
    prompt_indices: tuple[int, ...]


class RolloutBuffer:
    def __init__(self, capacity: int, max_staleness: int = 0) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self._entries: deque[BufferEntry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def put(self, entry: BufferEntry) -> None:
        if self.full():
            raise BufferFull(f"rollout buffer holds {self.capacity} batches already")
        self._entries.append(entry)

    def take(self, learner_version: int) -> BufferEntry:
        """Oldest batch first; one sampled more than max_staleness versions ago is an error."""
        if not self._entries:
            raise IndexError("rollout buffer is empty")
        entry = self._entries.popleft()
        lag = learner_version - entry.policy_version
        if lag > self.max_staleness:
            raise StaleBatch(
                f"batch sampled with policy version {entry.policy_version} is {lag} versions behind "
                f"the learner (limit {self.max_staleness})"
            )
        return entry
