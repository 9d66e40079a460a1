"""Token diagnostics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from opd_ray.losses.diagnostics import masked_sums, position_buckets, token_diagnostics
from opd_ray.losses.step import combine_rank_metrics


def teacher_topk(probs_V: list[float], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.log(torch.tensor(probs_V, dtype=torch.float64))
    top = logprobs.topk(k)
    return top.indices.view(1, 1, k), top.values.view(1, 1, k)


def diagnose(student_V: list[float], teacher_V: list[float], k: int, teacher_k: int | None = None) -> dict:
    logits = torch.log(torch.tensor(student_V, dtype=torch.float64)).view(1, 1, -1)
    ids, logprobs = teacher_topk(teacher_V, teacher_k or len(teacher_V))
    student_token = torch.log_softmax(logits, -1)[..., 0]
    teacher_token = torch.log(torch.tensor([[teacher_V[0]]], dtype=torch.float64))
    out = token_diagnostics(logits, ids, logprobs, student_token, teacher_token, k)
    return {name: float(v[0, 0]) for name, v in out.items()}


def test_identical_distributions() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    d = diagnose(probs, probs, k=2)
    assert d["overlap_ratio"] == pytest.approx(1.0)
    assert d["top1_agreement"] == 1.0
    assert d["overlap_mass_student"] == pytest.approx(0.7)
    assert d["overlap_mass_teacher"] == pytest.approx(0.7)
    assert d["overlap_advantage"] == pytest.approx(0.0, abs=1e-12)
    assert d["entropy_gap"] == pytest.approx(0.0, abs=1e-12)
    assert d["student_entropy"] == pytest.approx(-sum(p * math.log(p) for p in probs))
    assert d["teacher_minus_student_logprob"] == pytest.approx(0.0, abs=1e-12)


def test_partial_overlap_by_hand() -> None:
    # student top-2 = {0, 1}, teacher top-2 = {0, 2}: shared {0}
    d = diagnose([0.5, 0.3, 0.1, 0.1], [0.6, 0.05, 0.3, 0.05], k=2)
    assert d["overlap_ratio"] == pytest.approx(0.5)
    assert d["overlap_mass_student"] == pytest.approx(0.5)
    assert d["overlap_mass_teacher"] == pytest.approx(0.6)
    assert d["overlap_advantage"] == pytest.approx(0.0, abs=1e-12)  # one shared token: both renormalise to 1
    assert d["teacher_minus_student_logprob"] == pytest.approx(math.log(0.6) - math.log(0.5))


def test_overlap_advantage_by_hand() -> None:
    # shared {0, 1}; renormalised there p_bar = (0.6, 0.4), q_bar = (0.8, 0.2)
    d = diagnose([0.45, 0.3, 0.15, 0.05, 0.05], [0.56, 0.14, 0.1, 0.1, 0.1], k=2)
    p_bar, q_bar = (0.6, 0.4), (0.8, 0.2)
    want = sum(p * (math.log(q) - math.log(p)) for p, q in zip(p_bar, q_bar, strict=True))
    assert d["overlap_ratio"] == pytest.approx(1.0)
    assert d["top1_agreement"] == 1.0
    assert d["overlap_advantage"] == pytest.approx(want, rel=1e-5)
    assert d["overlap_advantage"] < 0
    assert diagnose([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], k=4)["overlap_ratio"] == 1.0  # k = |V|


def test_disjoint_top_k() -> None:
    d = diagnose([0.45, 0.45, 0.05, 0.05], [0.05, 0.05, 0.45, 0.45], k=2)
    assert d["overlap_ratio"] == 0.0
    assert d["top1_agreement"] == 0.0
    assert d["overlap_mass_student"] == 0.0 and d["overlap_mass_teacher"] == 0.0
    assert d["overlap_advantage"] == 0.0


def test_teacher_entropy_on_its_support_and_gap() -> None:
    d = diagnose([0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0 + 1e-12, 1e-12], k=2)
    assert d["student_entropy"] == pytest.approx(math.log(4))
    assert d["teacher_entropy"] == pytest.approx(math.log(2), abs=1e-6)  # computed in float32
    assert d["entropy_gap"] == pytest.approx(math.log(4) - math.log(2), abs=1e-6)


def test_position_buckets_split_each_response_in_thirds() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    buckets = position_buckets(mask)
    assert buckets[0, 2:].tolist() == [0, 0, 1, 1, 2, 2]
    assert buckets[1, 1:4].tolist() == [0, 1, 2]


def test_masked_sums_combine_to_exact_means_across_ranks() -> None:
    # rank 0 holds one 3-token response (buckets start/middle/end), rank 1 a 1-token response
    rank0 = masked_sums({"x": torch.tensor([1.0, 2.0, 3.0])}, torch.tensor([0, 1, 2]))
    rank1 = masked_sums({"x": torch.tensor([5.0])}, torch.tensor([0]))
    combined = combine_rank_metrics([{**rank0, "lr": 0.1}, {**rank1, "lr": 0.1}])
    assert combined["diag/x"] == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert combined["diag/x/start"] == pytest.approx((1 + 5) / 2)
    assert combined["lr"] == 0.1
