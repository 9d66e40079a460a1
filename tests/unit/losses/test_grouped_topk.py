"""A cross-tokenizer teacher's top-k read against groups of student tokens (its "3" against the student's
"3", "34", "35"..., named by ids V + r): opd-ray's top-k objective against the independent reference, loss
and gradient, on positions of groups only, of exact tokens only, and of both (a spanning token's top-k)."""

from __future__ import annotations

import pytest
import torch

from opd_ray.losses.objectives import ObjectiveInputs, TokenBatch, topk_divergence
from opd_ray.spec import AlgorithmSpec
from tests.reference.objectives import grouped_topk_reverse_kl

# ids 0-3 are one-character tokens, 4-11 two-character tokens starting with one of them, 12 a special token
GROUPS = [0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3, -1]
V = len(GROUPS)
# per position, the candidates its teacher top-k draws from: groups (V + r), exact tokens, or both
CANDIDATES = [
    [V + r for r in range(4)],
    [V + r for r in range(4)],
    list(range(V)),
    [4, 5, V + 1, V + 2, V + 3],  # a pair token's top-k: the pairs "0x", and the other first characters
    [V + 0, V + 3, 12],
]


def teacher_top_k(generator: torch.Generator, candidates: list[int], k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """k of the candidates with teacher log-probs that leave some mass for the rest."""
    logprobs = torch.log_softmax(torch.randn(len(candidates) + 1, generator=generator, dtype=torch.float64), -1)
    top = logprobs[:-1].topk(k)
    return torch.tensor(candidates)[top.indices], top.values


def token_batch(tops: list[tuple[torch.Tensor, torch.Tensor]], groups: list[int] | None) -> TokenBatch:
    n = len(tops)
    return TokenBatch(
        target_ids_N=torch.zeros(n, dtype=torch.long),
        rollout_logprobs_N=torch.zeros(n, dtype=torch.float64),
        token_weight_N=torch.ones(n, dtype=torch.float64),
        teacher_topk_ids_NK=torch.stack([ids for ids, _ in tops]),
        teacher_topk_logprobs_NK=torch.stack([values for _, values in tops]),
        student_groups_V=None if groups is None else torch.tensor(groups),
    )


@pytest.mark.parametrize("tail", [True, False])
def test_grouped_topk_reverse_kl_matches_the_reference(tail: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CANDIDATES), V, generator=generator, dtype=torch.float64, requires_grad=True)
    tops = [teacher_top_k(generator, candidates) for candidates in CANDIDATES]
    algorithm = AlgorithmSpec(objective="topk", topk_support="teacher", topk_tail=tail, top_k=3)
    ours = topk_divergence(ObjectiveInputs(logits, token_batch(tops, GROUPS)), algorithm)
    (ours_grad,) = torch.autograd.grad(ours.sum(), logits)

    reference = torch.stack(
        [
            grouped_topk_reverse_kl(
                torch.log_softmax(logits[n], -1), GROUPS, dict(zip(ids.tolist(), values.tolist(), strict=True)), tail
            )
            for n, (ids, values) in enumerate(tops)
        ]
    )
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    print(f"grouped top-k tail={tail}: max |grad difference| {float((ours_grad - reference_grad).abs().max()):.2e}")
    torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-9, atol=1e-10)


def test_a_group_holds_more_than_its_name_token() -> None:
    """The same top-k read as the group names' own tokens gives another loss wherever a group has members."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=generator, dtype=torch.float64)
    tops = [teacher_top_k(generator, [V + r for r in range(4)]) for _ in range(4)]
    algorithm = AlgorithmSpec(objective="topk", topk_support="teacher", topk_tail=True, top_k=3)
    grouped = topk_divergence(ObjectiveInputs(logits, token_batch(tops, GROUPS)), algorithm)
    as_tokens = [(ids - V, values) for ids, values in tops]
    exact = topk_divergence(ObjectiveInputs(logits, token_batch(as_tokens, None)), algorithm)
    assert ((grouped - exact).abs() > 1e-6).all()
