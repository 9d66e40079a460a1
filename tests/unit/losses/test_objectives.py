"""Objectives against float64 brute-force references (explicit loops over ids), values and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from opd_ray.losses.objectives import (
    ObjectiveInputs,
    TokenBatch,
    chunked_loss,
    forward_to_reverse_weight,
    full_vocab_divergence,
    sampled_token_reverse_kl,
    sft_cross_entropy,
    token_loss,
    topk_divergence,
    vopd_baseline,
)
from opd_ray.spec import AlgorithmSpec

N, V, K = 6, 9, 4


def make_inputs(seed: int, k: int = K) -> ObjectiveInputs:
    """N tokens of random student/teacher distributions; the student's top-k come from a nearby p_old."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    log_q = torch.log_softmax(teacher_logits, -1)
    p_old = torch.log_softmax(logits.detach() + 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    targets = torch.randint(0, V, (N,), generator=g)
    teacher_top = log_q.topk(k, -1)
    student_top_ids = p_old.topk(k, -1).indices
    tokens = TokenBatch(
        target_ids_N=targets,
        rollout_logprobs_N=p_old.gather(-1, targets[:, None])[:, 0],
        token_weight_N=torch.ones(N, dtype=torch.float64),
        teacher_logprobs_N=log_q.gather(-1, targets[:, None])[:, 0],
        teacher_topk_ids_NK=teacher_top.indices,
        teacher_topk_logprobs_NK=teacher_top.values,
        student_topk_ids_NK=student_top_ids,
        teacher_logprobs_at_student_topk_NK=log_q.gather(-1, student_top_ids),
    )
    return ObjectiveInputs(logits, tokens, teacher_logits_NV=teacher_logits)


def algorithm(**kwargs) -> AlgorithmSpec:
    return AlgorithmSpec(**{"objective": "topk", **kwargs})


def brute_divergence(p: list, q: list, kind: str, beta: float = 0.5, reverse_weight: float = 1.0):
    """Divergence of two lists of probabilities (tensors), by explicit sums."""

    def kl(a, b):
        return sum(ai * (torch.log(ai) - torch.log(bi)) for ai, bi in zip(a, b, strict=True) if float(ai.detach()) > 0)

    if kind == "reverse_kl":
        return kl(p, q)
    if kind == "forward_kl":
        return kl(q, p)
    if kind == "jsd":
        m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q, strict=True)]
        return beta * kl(q, m) + (1 - beta) * kl(p, m)
    return reverse_weight * kl(p, q) + (1 - reverse_weight) * kl(q, p)


def brute_topk(inputs: ObjectiveInputs, support: str, tail: bool, kind: str, **kw) -> torch.Tensor:
    """The support as Python sets, probabilities as Python sums: no code shared with the implementation."""
    total = torch.zeros((), dtype=torch.float64)
    t = inputs.tokens
    for n in range(N):
        z_p = sum(torch.exp(inputs.student_logits_NV[n, v]) for v in range(V))
        p_full = {v: torch.exp(inputs.student_logits_NV[n, v]) / z_p for v in range(V)}
        q_full = {v: torch.exp(torch.log_softmax(inputs.teacher_logits_NV[n], -1)[v]) for v in range(V)}
        student_set = set(t.student_topk_ids_NK[n].tolist())
        teacher_set = set(t.teacher_topk_ids_NK[n].tolist())
        ids = {
            "student": student_set,
            "teacher": teacher_set,
            "intersection": student_set & teacher_set,
            "union": student_set | teacher_set,
        }[support]
        if not ids:
            continue
        ids = sorted(ids)
        p = [p_full[v] for v in ids]
        q = [q_full[v] for v in ids]
        if tail:
            p.append(1 - sum(p))
            q.append(1 - sum(q))
        else:
            p = [pi / sum(p) for pi in p]
            q = [qi / sum(q) for qi in q]
        total = total + brute_divergence(p, q, kind, **kw)
    return total


def value_and_grad(loss: torch.Tensor, inputs: ObjectiveInputs) -> tuple[torch.Tensor, torch.Tensor]:
    (grad,) = torch.autograd.grad(loss, inputs.student_logits_NV)
    return loss.detach(), grad


def replace_weight(inputs: ObjectiveInputs, reverse_weight: float) -> ObjectiveInputs:
    return ObjectiveInputs(inputs.student_logits_NV, inputs.tokens, inputs.teacher_logits_NV, reverse_weight)


def brute_sampled_token(inputs: ObjectiveInputs, clip_eps: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    t = inputs.tokens
    for n in range(N):
        logits = inputs.student_logits_NV[n]
        y = int(t.target_ids_N[n])
        logp = logits[y] - torch.log(torch.exp(logits).sum())
        advantage = float(t.advantage_N[n])
        ratio = torch.exp(logp - t.rollout_logprobs_N[n])
        clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        total = total - torch.minimum(ratio * advantage, clipped * advantage)
    return total


@pytest.mark.parametrize("support", ["student", "teacher", "intersection", "union"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_topk_matches_brute_force(support: str, tail: bool, kind: str) -> None:
    inputs = make_inputs(seed=len(support) + 10 * tail)
    spec = algorithm(topk_support=support, topk_tail=tail, divergence=kind, jsd_beta=0.3)
    got, grad_got = value_and_grad(topk_divergence(inputs, spec).sum(), inputs)
    want, grad_want = value_and_grad(brute_topk(inputs, support, tail, kind, beta=0.3), inputs)
    tolerance = 1e-5 if tail else 1e-10  # the tail bucket keeps 1e-6 of mass when the support is everything
    assert torch.allclose(got, want, atol=tolerance)
    assert torch.allclose(grad_got, grad_want, atol=tolerance)


def test_empty_intersection_gives_zero_loss_and_finite_gradient() -> None:
    inputs = make_inputs(3, k=2)
    inputs.tokens.student_topk_ids_NK = torch.tensor([[0, 1]] * N)
    inputs.tokens.teacher_topk_ids_NK = torch.tensor([[2, 3]] * N)
    loss = topk_divergence(inputs, algorithm(topk_support="intersection"))
    assert torch.all(loss == 0)
    (grad,) = torch.autograd.grad(loss.sum(), inputs.student_logits_NV)
    assert torch.all(torch.isfinite(grad))


@pytest.mark.parametrize("tail", [False, True])
def test_teacher_ids_the_student_lacks_fall_in_the_tail(tail: bool) -> None:
    """A cross-tokenizer teacher marks top-k tokens with no student counterpart -1: the divergence is the one
    over the matched ids alone (the rest of both distributions in the tail bucket), and a position with no
    matched id has none."""
    inputs = make_inputs(5)
    matched = inputs.tokens.teacher_topk_ids_NK.clone()
    inputs.tokens.teacher_topk_ids_NK[:, 1] = -1  # the teacher's second choice is not a student token
    inputs.tokens.teacher_topk_ids_NK[0, :] = -1  # nothing comparable at the first position
    spec = algorithm(topk_support="teacher", topk_tail=tail)
    got = topk_divergence(inputs, spec)
    kept = torch.tensor([0, 2, 3])
    reference = make_inputs(5, k=3)
    reference.tokens.teacher_topk_ids_NK = matched[:, kept]
    reference.tokens.teacher_topk_logprobs_NK = inputs.tokens.teacher_topk_logprobs_NK[:, kept]
    want = topk_divergence(reference, algorithm(topk_support="teacher", topk_tail=tail, top_k=3))
    assert got[0] == 0
    assert torch.allclose(got[1:], want[1:], atol=1e-10)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "forward_to_reverse"])
def test_full_vocab_matches_brute_force(kind: str) -> None:
    inputs = make_inputs(4)
    spec = AlgorithmSpec(objective="full_vocab", divergence=kind, jsd_beta=0.7, anneal_steps=10)
    got, grad_got = value_and_grad(full_vocab_divergence(replace_weight(inputs, 0.25), spec).sum(), inputs)
    want = torch.zeros((), dtype=torch.float64)
    for n in range(N):
        p = list(torch.softmax(inputs.student_logits_NV[n], -1))
        q = list(torch.softmax(inputs.teacher_logits_NV[n], -1))
        want = want + brute_divergence(p, q, kind, beta=0.7, reverse_weight=0.25)
    want, grad_want = value_and_grad(want, inputs)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(grad_got, grad_want, atol=1e-10)


def test_jsd_ends_are_forward_and_reverse_kl() -> None:
    inputs = make_inputs(5)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = full_vocab_divergence(inputs, AlgorithmSpec(objective="full_vocab", divergence="jsd", jsd_beta=beta))
        kl = full_vocab_divergence(inputs, AlgorithmSpec(objective="full_vocab", divergence=kind))
        assert torch.allclose(jsd, kl)


def test_topk_with_whole_vocabulary_is_the_full_vocab_divergence() -> None:
    inputs = make_inputs(6, k=V)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        topk = topk_divergence(inputs, algorithm(divergence=kind, topk_support="union"))
        full = full_vocab_divergence(inputs, AlgorithmSpec(objective="full_vocab", divergence=kind))
        assert torch.allclose(topk, full, atol=1e-10)


def test_divergences_vanish_when_student_equals_teacher() -> None:
    inputs = make_inputs(7, k=V)
    same = ObjectiveInputs(
        inputs.teacher_logits_NV.clone().requires_grad_(True), inputs.tokens, inputs.teacher_logits_NV
    )
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        assert full_vocab_divergence(same, AlgorithmSpec(objective="full_vocab", divergence=kind)).abs().max() < 1e-12
        assert topk_divergence(same, algorithm(divergence=kind)).abs().max() < 1e-12


def test_forward_to_reverse_weight_ramps_from_forward_to_reverse() -> None:
    weights = [forward_to_reverse_weight(step, 5) for step in range(1, 8)]
    assert weights[0] == 0.0 and weights[4] == pytest.approx(1.0) and weights[6] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(weights))
    assert weights[2] == pytest.approx(0.5)


@pytest.mark.parametrize("clip_eps", [0.2, 0.05, None])
def test_sampled_token_matches_brute_force(clip_eps: float | None) -> None:
    inputs = make_inputs(8)
    inputs.tokens.advantage_N = inputs.tokens.teacher_logprobs_N - inputs.tokens.rollout_logprobs_N
    spec = AlgorithmSpec(objective="sampled_token", clip_eps=clip_eps)
    got, grad_got = value_and_grad(sampled_token_reverse_kl(inputs, spec).sum(), inputs)
    want, grad_want = value_and_grad(brute_sampled_token(inputs, clip_eps or 1e9), inputs)  # 1e9: never binds
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(grad_got, grad_want, atol=1e-10)


@pytest.mark.parametrize("baseline", ["none", "vopd"])
def test_sampled_token_gradient_is_unbiased_reverse_kl_gradient(baseline: str) -> None:
    """On-policy (p_old = p_theta), E_y[grad of the surrogate] = grad KL(p || q), enumerating y exactly
    (tolerance 1e-10). With the vOPD baseline (exact here: the teacher's top-k covers the
    vocabulary) the gradient is unchanged and the expected advantage becomes 0."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, V, generator=g, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    log_p = torch.log_softmax(logits[0], -1)
    (exact_grad,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), logits)
    p_old = log_p.detach()
    spec = AlgorithmSpec(objective="sampled_token", clip_eps=0.2)

    expected_grad = torch.zeros(1, V, dtype=torch.float64)
    expected_advantage = 0.0
    for y in range(V):
        tokens = TokenBatch(
            target_ids_N=torch.tensor([y]),
            rollout_logprobs_N=p_old[y].view(1),
            token_weight_N=torch.ones(1, dtype=torch.float64),
            teacher_logprobs_N=log_q[y].view(1),
            teacher_topk_ids_NK=torch.arange(V).view(1, V),
            teacher_topk_logprobs_NK=log_q.view(1, V),
        )
        inputs = ObjectiveInputs(logits, tokens)
        advantage = tokens.teacher_logprobs_N - tokens.rollout_logprobs_N
        if baseline == "vopd":
            advantage = advantage - vopd_baseline(inputs)
        tokens.advantage_N = advantage
        (grad_y,) = torch.autograd.grad(sampled_token_reverse_kl(inputs, spec).sum(), logits)
        expected_grad += p_old[y].exp() * grad_y
        expected_advantage += float(p_old[y].exp() * advantage[0])
    assert torch.allclose(expected_grad, exact_grad, atol=1e-10)
    if baseline == "vopd":
        assert expected_advantage == pytest.approx(0.0, abs=1e-12)


def test_sft_cross_entropy_is_negative_log_likelihood() -> None:
    tokens = TokenBatch(torch.tensor([1, 2]), torch.zeros(2), torch.ones(2))
    loss = sft_cross_entropy(ObjectiveInputs(torch.zeros(2, 4, dtype=torch.float64), tokens), AlgorithmSpec())
    assert loss.tolist() == pytest.approx([math.log(4), math.log(4)])


def test_task_reward_adds_a_policy_gradient_term_to_analytic_objectives() -> None:
    inputs = make_inputs(9)
    inputs.tokens.task_advantage_N = torch.linspace(-1, 1, N, dtype=torch.float64)
    plain = algorithm(divergence="reverse_kl")
    mixed = algorithm(divergence="reverse_kl", task_reward_coef=0.5)
    inputs.tokens.task_advantage_N, saved = None, inputs.tokens.task_advantage_N
    base = token_loss(inputs, plain)
    inputs.tokens.task_advantage_N = saved
    log_p = torch.log_softmax(inputs.student_logits_NV, -1).gather(-1, inputs.tokens.target_ids_N[:, None])[:, 0]
    ratio = torch.exp(log_p - inputs.tokens.rollout_logprobs_N)
    want = base - ratio * 0.5 * saved
    assert torch.allclose(token_loss(inputs, mixed), want, atol=1e-12)


def test_gate_zeroes_the_loss_of_gated_tokens() -> None:
    inputs = make_inputs(10)
    inputs.tokens.keep_N = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    loss = token_loss(inputs, algorithm())
    assert torch.all(loss[inputs.tokens.keep_N == 0] == 0) and torch.all(loss[inputs.tokens.keep_N == 1] > 0)


@pytest.mark.parametrize("objective", ["topk", "full_vocab", "sampled_token"])
@pytest.mark.parametrize("chunk", [1, 4, N])
def test_chunked_loss_equals_unchunked_values_and_gradients(objective: str, chunk: int) -> None:
    """Chunks under activation checkpointing change memory, not numbers: hidden -> head -> loss."""
    g = torch.Generator().manual_seed(11)
    inputs = make_inputs(11)
    hidden = torch.randn(N, 5, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(5, V, bias=False).double()
    teacher_hidden = torch.randn(N, 5, generator=g, dtype=torch.float64)
    teacher_head = torch.nn.Linear(5, V, bias=False).double()
    tokens = inputs.tokens
    tokens.token_weight_N = torch.rand(N, generator=g, dtype=torch.float64)
    tokens.advantage_N = torch.randn(N, generator=g, dtype=torch.float64)
    divergence = {} if objective == "sampled_token" else {"divergence": "forward_to_reverse", "anneal_steps": 4}
    spec = AlgorithmSpec(objective=objective, **divergence)

    whole = ObjectiveInputs(head(hidden), tokens, teacher_head(teacher_hidden).detach(), reverse_weight=0.4)
    want = (token_loss(whole, spec) * tokens.token_weight_N).sum()
    want_grads = torch.autograd.grad(want, [hidden, head.weight])
    got = chunked_loss(hidden, head, tokens, spec, chunk, teacher_hidden, teacher_head, reverse_weight=0.4)
    got_grads = torch.autograd.grad(got, [hidden, head.weight])
    assert torch.allclose(got, want, atol=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("objective", ["topk", "full_vocab"])
def test_importance_cap_weights_analytic_losses_by_truncated_ratio(objective: str) -> None:
    """Each token's loss times min(p_theta(y_t) / p_rollout(y_t), cap), with the weight detached:
    values and gradients against an explicit loop."""
    inputs = make_inputs(12)
    cap = 1.2
    plain, capped = algorithm(objective=objective), algorithm(objective=objective, importance_cap=cap)
    got, grad_got = value_and_grad(token_loss(inputs, capped).sum(), inputs)

    base = token_loss(inputs, plain)
    want = torch.zeros((), dtype=torch.float64)
    weights = []
    for n in range(N):
        y = int(inputs.tokens.target_ids_N[n])
        logp = float(torch.log_softmax(inputs.student_logits_NV[n].detach(), -1)[y])
        weights.append(min(math.exp(logp - float(inputs.tokens.rollout_logprobs_N[n])), cap))
        want = want + weights[n] * base[n]
    want, grad_want = value_and_grad(want, inputs)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(grad_got, grad_want, atol=1e-12)
    assert min(weights) < 1 < max(weights), weights  # the case exercises both sides of 1
    assert cap in weights  # and the cap binds at least once


def test_importance_cap_scales_the_sampled_token_gradient_to_the_capped_ratio() -> None:
    """Without PPO clipping the surrogate's gradient is ratio * A * grad log p; with the cap it
    becomes min(ratio, cap) * A * grad log p, and the cap is a no-op on-policy."""
    inputs = make_inputs(13)
    tokens = inputs.tokens
    tokens.advantage_N = tokens.teacher_logprobs_N - tokens.rollout_logprobs_N
    cap = 1.2
    spec = AlgorithmSpec(objective="sampled_token", clip_eps=None, importance_cap=cap)
    _, grad_got = value_and_grad(sampled_token_reverse_kl(inputs, spec).sum(), inputs)
    log_p_N = torch.log_softmax(inputs.student_logits_NV, -1).gather(-1, tokens.target_ids_N[:, None])[:, 0]
    ratio_N = torch.exp(log_p_N - tokens.rollout_logprobs_N).detach()
    _, grad_want = value_and_grad(-(ratio_N.clamp(max=cap) * tokens.advantage_N * log_p_N).sum(), inputs)
    assert torch.allclose(grad_got, grad_want, atol=1e-12)
    assert bool((ratio_N > cap).any()) and bool((ratio_N < cap).any())

    on_policy = make_inputs(13)
    on_policy.tokens.rollout_logprobs_N = torch.log_softmax(on_policy.student_logits_NV.detach(), -1).gather(
        -1, tokens.target_ids_N[:, None]
    )[:, 0]
    on_policy.tokens.advantage_N = on_policy.tokens.teacher_logprobs_N - on_policy.tokens.rollout_logprobs_N
    uncapped = AlgorithmSpec(objective="sampled_token", clip_eps=None)
    _, a = value_and_grad(sampled_token_reverse_kl(on_policy, spec).sum(), on_policy)
    _, b = value_and_grad(sampled_token_reverse_kl(on_policy, uncapped).sum(), on_policy)
    assert torch.allclose(a, b, atol=1e-12)
