"""Objectives against float64 brute-force references, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from opd_ray.objectives import (
    ObjectiveInputs,
    aggregate,
    position_weights,
    reverse_kl_advantages,
    sampled_token_reverse_kl,
    sft_cross_entropy,
    topk_reverse_kl,
    vopd_baseline,
)

B, T, V, K = 3, 5, 7, 4


def make_inputs(seed: int, k: int = K) -> ObjectiveInputs:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher_logprobs_full = torch.log_softmax(teacher_logits, -1)
    topk = teacher_logprobs_full.topk(k, dim=-1)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    rollout = torch.log_softmax(logits.detach() + 0.1 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    return ObjectiveInputs(
        student_logits_BTV=logits,
        target_ids_BT=targets,
        mask_BT=mask,
        rollout_logprobs_BT=rollout.gather(-1, targets[..., None])[..., 0],
        teacher_logprobs_BT=teacher_logprobs_full.gather(-1, targets[..., None])[..., 0],
        teacher_topk_ids_BTK=topk.indices,
        teacher_topk_logprobs_BTK=topk.values,
    )


def brute_topk_kl(inputs: ObjectiveInputs) -> torch.Tensor:
    """Loops over positions with explicit sums: no shared code with the implementation."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if inputs.mask_BT[b, t] == 0:
                continue
            ids = inputs.teacher_topk_ids_BTK[b, t].tolist()
            p = [torch.exp(inputs.student_logits_BTV[b, t, i]) for i in ids]
            z_p = sum(p)
            q = [torch.exp(inputs.teacher_topk_logprobs_BTK[b, t, j]) for j in range(len(ids))]
            z_q = sum(q)
            for pi, qi in zip(p, q, strict=True):
                total = total + (pi / z_p) * (torch.log(pi / z_p) - torch.log(qi / z_q))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_reverse_kl_matches_brute_force(seed: int) -> None:
    inputs = make_inputs(seed)
    got = topk_reverse_kl(inputs).sum()
    (grad_got,) = torch.autograd.grad(got, inputs.student_logits_BTV)
    want = brute_topk_kl(inputs)
    (grad_want,) = torch.autograd.grad(want, inputs.student_logits_BTV)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(grad_got, grad_want, atol=1e-10)


def test_topk_with_full_support_is_exact_reverse_kl() -> None:
    inputs = make_inputs(3, k=V)
    p = torch.softmax(inputs.student_logits_BTV, -1)
    q = torch.softmax(inputs.teacher_topk_logprobs_BTK, -1)  # all V ids, in teacher order
    log_p_on_ids = torch.log_softmax(inputs.student_logits_BTV, -1).gather(-1, inputs.teacher_topk_ids_BTK)
    p_on_ids = p.gather(-1, inputs.teacher_topk_ids_BTK)
    exact = ((p_on_ids * (log_p_on_ids - torch.log(q))).sum(-1) * inputs.mask_BT).sum()
    assert torch.allclose(topk_reverse_kl(inputs).sum(), exact, atol=1e-10)


def test_topk_kl_is_zero_when_student_equals_teacher() -> None:
    inputs = make_inputs(4, k=V)
    teacher_logits = torch.zeros(B, T, V, dtype=torch.float64)
    teacher_logits.scatter_(-1, inputs.teacher_topk_ids_BTK, inputs.teacher_topk_logprobs_BTK)
    inputs.student_logits_BTV = teacher_logits.clone().requires_grad_(True)
    assert topk_reverse_kl(inputs).abs().max() < 1e-12


def brute_sampled_token(inputs: ObjectiveInputs, clip_eps: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if inputs.mask_BT[b, t] == 0:
                continue
            logits = inputs.student_logits_BTV[b, t]
            y = int(inputs.target_ids_BT[b, t])
            logp = logits[y] - torch.log(torch.exp(logits).sum())
            advantage = float(inputs.teacher_logprobs_BT[b, t] - inputs.rollout_logprobs_BT[b, t])
            ratio = torch.exp(logp - inputs.rollout_logprobs_BT[b, t])
            clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
            total = total - torch.minimum(ratio * advantage, clipped * advantage)
    return total


@pytest.mark.parametrize("clip_eps", [0.2, 0.05])
def test_sampled_token_matches_brute_force(clip_eps: float) -> None:
    inputs = make_inputs(5)
    got = sampled_token_reverse_kl(inputs, clip_eps).sum()
    (grad_got,) = torch.autograd.grad(got, inputs.student_logits_BTV)
    want = brute_sampled_token(inputs, clip_eps)
    (grad_want,) = torch.autograd.grad(want, inputs.student_logits_BTV)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(grad_got, grad_want, atol=1e-10)


def test_sft_cross_entropy_counts_only_masked_tokens() -> None:
    logits = torch.zeros(1, 3, 4, dtype=torch.float64)
    targets = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(
        sft_cross_entropy(logits, targets, mask).sum(), torch.tensor(2 * math.log(4), dtype=torch.float64)
    )


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


def test_sampled_token_without_clip_is_plain_importance_sampling() -> None:
    inputs = make_inputs(9)
    got = sampled_token_reverse_kl(inputs, clip_eps=None).sum()
    (grad_got,) = torch.autograd.grad(got, inputs.student_logits_BTV)
    want = brute_sampled_token(inputs, clip_eps=1e9)  # a clip that never binds
    (grad_want,) = torch.autograd.grad(want, inputs.student_logits_BTV)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(grad_got, grad_want, atol=1e-10)


def test_precomputed_advantages_are_used() -> None:
    inputs = make_inputs(10)
    inputs.advantage_BT = torch.ones(B, T, dtype=torch.float64)
    student_logprobs = torch.log_softmax(inputs.student_logits_BTV, -1).gather(-1, inputs.target_ids_BT[..., None])[
        ..., 0
    ]
    ratio = torch.exp(student_logprobs - inputs.rollout_logprobs_BT)
    want = -(torch.minimum(ratio, ratio.clamp(0.8, 1.2)) * inputs.mask_BT).sum()
    assert torch.allclose(sampled_token_reverse_kl(inputs, clip_eps=0.2).sum(), want, atol=1e-12)


@pytest.mark.parametrize("baseline", ["none", "vopd"])
def test_sampled_token_gradient_is_unbiased_reverse_kl_gradient(baseline: str) -> None:
    """On-policy (p_old = p_theta), E_y[grad of the surrogate] = grad KL(p || q): enumerate y exactly.

    With the vOPD baseline (exact here: the teacher's top-k covers the vocabulary) the
    gradient is unchanged and the expected advantage becomes 0.
    """
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    log_p = torch.log_softmax(logits, -1)
    (exact_grad,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), logits)
    p_old = log_p.detach()

    expected_grad = torch.zeros(V, dtype=torch.float64)
    expected_advantage = 0.0
    for y in range(V):
        inputs = ObjectiveInputs(
            student_logits_BTV=logits.view(1, 1, V),
            target_ids_BT=torch.tensor([[y]]),
            mask_BT=torch.ones(1, 1, dtype=torch.float64),
            rollout_logprobs_BT=p_old[y].view(1, 1),
            teacher_logprobs_BT=log_q[y].view(1, 1),
            teacher_topk_ids_BTK=torch.arange(V).view(1, 1, V),
            teacher_topk_logprobs_BTK=log_q.view(1, 1, V),
        )
        loss = sampled_token_reverse_kl(inputs, clip_eps=0.2, baseline=baseline).sum()
        (grad_y,) = torch.autograd.grad(loss, logits)
        expected_grad += p_old[y].exp() * grad_y
        expected_advantage += float(p_old[y].exp() * (log_q[y] - p_old[y] - vopd_baseline(inputs)[0, 0]))
    assert torch.allclose(expected_grad, exact_grad, atol=1e-10)
    if baseline == "vopd":
        assert expected_advantage == pytest.approx(0.0, abs=1e-12)


def test_position_weights_match_loops() -> None:
    advantage = torch.tensor([[0.0, -2.0, 1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    got = position_weights(advantage, mask, gamma=0.5)
    total = 2.0 + 1.0 + 1.0
    want = [0.0, 1 + 0.5 * (1 - 0 / total), 1 + 0.5 * (1 - 2 / total), 1 + 0.5 * (1 - 3 / total), 0.0]
    assert got[0].tolist() == pytest.approx(want)


def test_aggregation_shares_add_up_to_global_means() -> None:
    loss = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    tokens, sequences = int(mask.sum()), 3
    shards = [slice(0, None, 2), slice(1, None, 2)]  # how two learner ranks split the rows
    for mode, want in (("token_mean", 16.0 / 6), ("sequence_mean", (1.5 + 4.0 + 3.0) / 3)):
        shares = [float(aggregate(loss[s], mask[s], mode, tokens, sequences)) for s in shards]
        assert sum(shares) == pytest.approx(want)
