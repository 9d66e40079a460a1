"""Per-token quantities assembled over whole batches and sequences, against loops and hand cases."""

from __future__ import annotations

import pytest
import torch

from opd_ray.losses.advantages import (
    centred_task_rewards,
    entropy_gate_keep,
    flatten_tokens,
    position_weights,
    reverse_kl_advantages,
)
from opd_ray.losses.batch import RolloutBatch
from opd_ray.losses.objectives import aggregation_weights
from opd_ray.spec import EntropyGateSpec


def test_discounted_returns_match_loops() -> None:
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(2, 6, generator=g, dtype=torch.float64)
    rollout = torch.randn(2, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float64)
    for discount in (0.0, 0.5, 1.0):
        got = reverse_kl_advantages(teacher, rollout, mask, discount=discount)
        for b in range(2):
            for t in range(6):
                want = sum(
                    discount ** (s - t) * float(teacher[b, s] - rollout[b, s]) * float(mask[b, s])
                    for s in range(t, 6)
                    if discount > 0 or s == t
                )
                assert float(got[b, t]) == pytest.approx(want * float(mask[b, t]), abs=1e-12)


def test_standardized_advantages_have_unit_scale_on_response_tokens() -> None:
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4 - 2
    rollout = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 5, generator=g) > 0.4).double()
    got = reverse_kl_advantages(teacher, rollout, mask, standardize=True)
    values = got[mask.bool()]
    assert float(values.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(values.pow(2).mean()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(got[~mask.bool()] == 0)


def test_position_weights_match_loops() -> None:
    advantage = torch.tensor([[0.0, -2.0, 1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    got = position_weights(advantage, mask, gamma=0.5)
    total = 2.0 + 1.0 + 1.0
    want = [0.0, 1 + 0.5 * (1 - 0 / total), 1 + 0.5 * (1 - 2 / total), 1 + 0.5 * (1 - 3 / total), 0.0]
    assert got[0].tolist() == pytest.approx(want)


def test_task_rewards_are_centred_per_prompt_group_or_batch() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert centred_task_rewards(rewards, torch.tensor([7, 7, 9, 9])).tolist() == [0.5, -0.5, 0.0, 0.0]
    assert centred_task_rewards(rewards, torch.tensor([1, 2, 3, 4])).tolist() == [0.25, -0.75, 0.25, 0.25]


def test_entropy_gate_skips_mastered_and_teacher_uncertain_tokens() -> None:
    student = torch.tensor([0.1, 0.2, 1.0, 2.0, 0.1, 3.0])
    teacher = torch.tensor([0.1, 0.1, 0.5, 0.4, 2.0, 5.0])
    mastered = entropy_gate_keep(student, teacher, EntropyGateSpec(mastered_percentile=40))
    # 40th percentiles: student 0.2..., teacher 0.1..0.4; tokens 0 and 1 are low on both; token 4 only on the student's
    assert mastered.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    uncertain = entropy_gate_keep(student, teacher, EntropyGateSpec(teacher_uncertain_percentile=80))
    assert uncertain.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert entropy_gate_keep(student, teacher, EntropyGateSpec()).tolist() == [1.0] * 6


def test_aggregation_shares_add_up_to_global_means() -> None:
    loss = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    tokens, sequences = int(mask.sum()), 3
    shards = [slice(0, None, 2), slice(1, None, 2)]  # how two learner ranks split the rows
    for mode, want in (("token_mean", 16.0 / 6), ("sequence_mean", (1.5 + 4.0 + 3.0) / 3)):
        shares = [float((loss[s] * aggregation_weights(mask[s], mode, tokens, sequences)).sum()) for s in shards]
        assert sum(shares) == pytest.approx(want)


def test_flatten_tokens_keeps_response_targets_in_order() -> None:
    """Position i-1 predicts token i: the flat axis holds each response token once, sequence by sequence."""
    batch = RolloutBatch(
        input_ids_BL=torch.tensor([[5, 6, 7, 8], [5, 9, 0, 0]]),
        attention_mask_BL=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        response_mask_BL=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]),
        rollout_logprobs_BL=torch.tensor([[0.0, 0.0, -0.1, -0.2], [0.0, -0.3, 0.0, 0.0]]),
        prompt_index_B=torch.tensor([0, 1]),
        finished_B=torch.tensor([True, True]),
        weight_version=0,
        task_advantages_B=torch.tensor([0.5, -0.5]),
    )
    mask_BT = batch.response_mask_BL[:, 1:]
    tokens = flatten_tokens(batch, aggregation_weights(mask_BT, "token_mean", 3, 2), "cpu")
    assert tokens.target_ids_N.tolist() == [7, 8, 9]
    assert tokens.rollout_logprobs_N.tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert tokens.task_advantage_N.tolist() == [0.5, 0.5, -0.5]
    assert tokens.token_weight_N.tolist() == pytest.approx([1 / 3] * 3)
    assert tokens.bucket_N.tolist() == [0, 1, 0]  # a 2-token response: first third, then middle
