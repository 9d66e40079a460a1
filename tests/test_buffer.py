"""The rollout buffer keeps order, enforces its bound and refuses stale batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opd_ray.driver.buffer import BufferEntry, BufferFull, RolloutBuffer, StaleBatch
from opd_ray.driver.loop import PromptSampler
from opd_ray.losses.batch import RolloutBatch


def entry(version: int, first_prompt: int) -> BufferEntry:
    return BufferEntry(refs=(), policy_version=version, prompt_indices=(first_prompt, first_prompt + 1))


def test_fifo_order_and_version_tags() -> None:
    buffer = RolloutBuffer(capacity=3, max_staleness=2)
    for v in range(3):
        buffer.put(entry(v, 10 * v))
    taken = [buffer.take(learner_version=2) for _ in range(3)]
    assert [e.policy_version for e in taken] == [0, 1, 2]
    assert [e.prompt_indices[0] for e in taken] == [0, 10, 20]
    assert len(buffer) == 0


def test_bound_is_enforced() -> None:
    buffer = RolloutBuffer(capacity=1)
    buffer.put(entry(0, 0))
    with pytest.raises(BufferFull):
        buffer.put(entry(0, 2))


def test_stale_batch_is_refused() -> None:
    buffer = RolloutBuffer(capacity=2, max_staleness=0)
    buffer.put(entry(0, 0))
    with pytest.raises(StaleBatch, match="1 versions behind"):
        buffer.take(learner_version=1)


def test_empty_take_raises() -> None:
    with pytest.raises(IndexError):
        RolloutBuffer(capacity=1).take(0)


def test_prompt_sampler_visits_every_prompt_once_per_epoch() -> None:
    sampler = PromptSampler(size=10, seed=3)
    first_epoch = sampler.next(4) + sampler.next(4) + sampler.next(2)
    assert sorted(first_epoch) == list(range(10))
    again = PromptSampler(size=10, seed=3)
    assert again.next(10) == first_epoch  # same seed, same order
    assert sorted(sampler.next(10)) == list(range(10))


def small_batch(rows: int, length: int, version: int) -> RolloutBatch:
    return RolloutBatch(
        input_ids_BL=torch.arange(rows * length).view(rows, length),
        attention_mask_BL=torch.ones(rows, length, dtype=torch.long),
        response_mask_BL=torch.ones(rows, length),
        rollout_logprobs_BL=torch.zeros(rows, length),
        prompt_index_B=torch.arange(rows),
        finished_B=torch.ones(rows, dtype=torch.bool),
        policy_version=version,
    )


def test_batch_concat_pads_and_select_shards() -> None:
    joined = RolloutBatch.concat([small_batch(2, 3, 1), small_batch(1, 5, 1)])
    assert joined.input_ids_BL.shape == (3, 5)
    assert joined.attention_mask_BL[0].tolist() == [1, 1, 1, 0, 0]
    assert joined.num_response_tokens == 2 * 3 + 5
    shard = joined.select(slice(1, None, 2))
    assert shard.prompt_index_B.tolist() == [1]
    # asynchronous mode: shards of one step from different weights carry the oldest version
    assert RolloutBatch.concat([small_batch(1, 2, 3), small_batch(1, 2, 2)]).policy_version == 2
    dataset = dataclasses.replace(small_batch(1, 2, 0), source="dataset")
    with pytest.raises(ValueError, match="different sources"):
        RolloutBatch.concat([small_batch(1, 2, 0), dataset])


def test_gap_recovery_and_split() -> None:
    from opd_ray.driver.loop import gap_recovery
    from opd_ray.driver.roles import split

    assert gap_recovery(before=0.2, after=0.6, teacher=1.0) == pytest.approx(0.5)
    assert gap_recovery(before=0.5, after=0.4, teacher=0.5) is None  # no gap to recover
    assert split(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    assert split([7], 3) == [[7]]  # idle workers get nothing rather than an empty request
