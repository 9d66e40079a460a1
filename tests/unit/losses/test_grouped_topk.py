"""A cross-tokenizer teacher's top-k read against groups of student tokens (its "3" against the student's
"3", "34", "35"...): opd-ray's top-k objective against the independent reference, loss and gradient."""

from __future__ import annotations

import pytest
import torch

from opd_ray.losses.objectives import ObjectiveInputs, TokenBatch, topk_divergence
from opd_ray.spec import AlgorithmSpec
from tests.reference.objectives import grouped_topk_reverse_kl, kl, on_support, teacher_logprobs_on

# ids 0-3 are one-character tokens, 4-11 two-character tokens starting with one of them, 12 a special token
GROUPS = [0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3, -1]
GROUPED = [1, 1, 0, 1, 0]  # positions 2 and 4: the teacher's ids are student tokens themselves


def teacher_top_k(generator: torch.Generator, grouped: bool, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-k: over the group names (0-3) where grouped, over student tokens elsewhere."""
    choices = 4 if grouped else len(GROUPS)
    logprobs = torch.log_softmax(torch.randn(choices, generator=generator, dtype=torch.float64), -1)
    top = logprobs.topk(k)
    return top.indices, top.values


@pytest.mark.parametrize("tail", [True, False])
def test_grouped_topk_reverse_kl_matches_the_reference(tail: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(GROUPED), len(GROUPS), generator=generator, dtype=torch.float64, requires_grad=True)
    tops = [teacher_top_k(generator, bool(g)) for g in GROUPED]
    tokens = TokenBatch(
        target_ids_N=torch.zeros(len(GROUPED), dtype=torch.long),
        rollout_logprobs_N=torch.zeros(len(GROUPED), dtype=torch.float64),
        token_weight_N=torch.ones(len(GROUPED), dtype=torch.float64),
        teacher_topk_ids_NK=torch.stack([ids for ids, _ in tops]),
        teacher_topk_logprobs_NK=torch.stack([values for _, values in tops]),
        grouped_N=torch.tensor(GROUPED, dtype=torch.float64),
        student_groups_V=torch.tensor(GROUPS),
    )
    algorithm = AlgorithmSpec(objective="topk", topk_support="teacher", topk_tail=tail, top_k=3)
    ours = topk_divergence(ObjectiveInputs(logits, tokens), algorithm)
    (ours_grad,) = torch.autograd.grad(ours.sum(), logits)

    reference = []
    for n, (grouped, (ids, values)) in enumerate(zip(GROUPED, tops, strict=True)):
        logp = torch.log_softmax(logits[n], -1)
        teacher = dict(zip(ids.tolist(), values.tolist(), strict=True))
        if grouped:
            reference.append(grouped_topk_reverse_kl(logp, GROUPS, teacher, tail))
        else:
            q = teacher_logprobs_on(teacher, len(GROUPS))
            reference.append(kl(on_support(logp, list(teacher), tail), on_support(q, list(teacher), tail)))
    reference = torch.stack(reference)
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    print(f"grouped top-k tail={tail}: max |grad difference| {float((ours_grad - reference_grad).abs().max()):.2e}")
    torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-9, atol=1e-10)


def test_grouping_changes_the_loss_only_where_a_position_is_grouped() -> None:
    """The same top-k read as exact student ids gives another loss at grouped positions (pairs hold mass)."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(len(GROUPED), len(GROUPS), generator=generator, dtype=torch.float64)
    tops = [teacher_top_k(generator, True) for _ in GROUPED]
    common = dict(
        target_ids_N=torch.zeros(len(GROUPED), dtype=torch.long),
        rollout_logprobs_N=torch.zeros(len(GROUPED), dtype=torch.float64),
        token_weight_N=torch.ones(len(GROUPED), dtype=torch.float64),
        teacher_topk_ids_NK=torch.stack([ids for ids, _ in tops]),
        teacher_topk_logprobs_NK=torch.stack([values for _, values in tops]),
    )
    algorithm = AlgorithmSpec(objective="topk", topk_support="teacher", topk_tail=True, top_k=3)
    grouped = topk_divergence(
        ObjectiveInputs(
            logits,
            TokenBatch(
                **common, grouped_N=torch.tensor(GROUPED, dtype=torch.float64), student_groups_V=torch.tensor(GROUPS)
            ),
        ),
        algorithm,
    )
    exact = topk_divergence(ObjectiveInputs(logits, TokenBatch(**common)), algorithm)
    differs = (grouped - exact).abs() > 1e-6
    assert differs.tolist() == [bool(g) for g in GROUPED]
