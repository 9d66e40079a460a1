"""The rollout buffer keeps launch order, bounds the run-ahead and refuses stale batches."""

from __future__ import annotations

import pytest

from opd_ray.driver.buffer import BufferFull, RolloutBuffer, StaleBatch


def test_launched_steps_come_out_oldest_first() -> None:
    buffer: RolloutBuffer[int] = RolloutBuffer(capacity=3)
    for step in (1, 2, 3):
        buffer.put(step)
    assert [buffer.take() for _ in range(3)] == [1, 2, 3]
    assert len(buffer) == 0


def test_the_bound_is_the_run_ahead() -> None:
    buffer: RolloutBuffer[int] = RolloutBuffer(capacity=2)
    buffer.put(1)
    assert not buffer.full()
    buffer.put(2)
    assert buffer.full()
    with pytest.raises(BufferFull):
        buffer.put(3)
    buffer.take()
    assert not buffer.full()


def test_staleness_is_measured_and_a_batch_past_the_limit_refused() -> None:
    buffer: RolloutBuffer[int] = RolloutBuffer(capacity=2, max_staleness=1)
    assert buffer.check_fresh(sampled_version=4, learner_version=5) == 1
    with pytest.raises(StaleBatch, match="2 versions behind"):
        buffer.check_fresh(sampled_version=3, learner_version=5)


def test_empty_take_raises() -> None:
    with pytest.raises(IndexError):
        RolloutBuffer(capacity=1).take()
