"""The batch that travels between roles: joining shards, selecting a rank's rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opd_ray.losses.batch import RolloutBatch


def small_batch(rows: int, length: int, version: int) -> RolloutBatch:
    return RolloutBatch(
        input_ids_BL=torch.arange(rows * length).view(rows, length),
        attention_mask_BL=torch.ones(rows, length, dtype=torch.long),
        response_mask_BL=torch.ones(rows, length),
        rollout_logprobs_BL=torch.zeros(rows, length),
        prompt_index_B=torch.arange(rows),
        finished_B=torch.ones(rows, dtype=torch.bool),
        weight_version=version,
    )


def test_batch_concat_pads_and_select_shards() -> None:
    joined = RolloutBatch.concat([small_batch(2, 3, 1), small_batch(1, 5, 1)])
    assert joined.input_ids_BL.shape == (3, 5)
    assert joined.attention_mask_BL[0].tolist() == [1, 1, 1, 0, 0]
    assert joined.num_response_tokens == 2 * 3 + 5
    shard = joined.select(slice(1, None, 2))
    assert shard.prompt_index_B.tolist() == [1]
    # asynchronous mode: shards of one step from different weights carry the oldest version
    assert RolloutBatch.concat([small_batch(1, 2, 3), small_batch(1, 2, 2)]).weight_version == 2
    dataset = dataclasses.replace(small_batch(1, 2, 0), source="dataset")
    with pytest.raises(ValueError, match="different sources"):
        RolloutBatch.concat([small_batch(1, 2, 0), dataset])


def test_sampled_and_supervised_rows_share_one_layout() -> None:
    from opd_ray.losses.batch import ResponseRow, batch_from_rows, supervised_batch

    sampled = batch_from_rows(
        [ResponseRow([5, 6], [7, 1], prompt_index=3, logprobs=[-0.5, -0.25], topk_ids=[[7, 8], [1, 2]])],
        weight_version=4,
        top_k_ids=2,
    )
    supervised = supervised_batch([([5, 6], [7, 1])], [3])
    for name in ("input_ids_BL", "attention_mask_BL", "response_mask_BL", "prompt_index_B", "finished_B"):
        assert torch.equal(getattr(sampled, name), getattr(supervised, name)), name
    assert sampled.rollout_logprobs_BL.tolist() == [[0.0, 0.0, -0.5, -0.25]]
    assert supervised.rollout_logprobs_BL.abs().sum() == 0  # reference answers were not sampled
    assert sampled.student_topk_ids_BLK[0, 2:].tolist() == [[7, 8], [1, 2]]
    assert (sampled.source, supervised.source, sampled.weight_version) == ("student", "dataset", 4)
