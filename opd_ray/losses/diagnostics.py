"""Token-level diagnostics of on-policy distillation at student-visited states.

The seed paper reads success off these: the student's and teacher's top-k sets converge
(overlap ratio rises), the shared set holds nearly all of both models' mass, the
overlap-token advantage moves to 0 and the entropy gap narrows; a failing run stays flat.
Pure tensor functions over the learner's logits and the teacher's top-k, so they are
testable by hand. Per-token values are returned; `masked_sums` reduces them over the
response tokens, overall and by position bucket (start / middle / end of each response),
as (sum, count) pairs that give exact means once added across learner ranks.
"""

from __future__ import annotations

import torch

BUCKETS = ("start", "middle", "end")


def token_diagnostics(
    student_logits_BTV: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logprobs_BTK: torch.Tensor,
    student_token_logprobs_BT: torch.Tensor,
    teacher_token_logprobs_BT: torch.Tensor,
    k: int,
    normalised: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token diagnostics; the teacher's top-k ids must be ordered by rank (as the teacher returns them).
    `normalised`: the first argument already holds log-probabilities (the caller's log-softmax is reused).

    The teacher's entropy is computed on its returned support (renormalised), exact when that
    support covers the vocabulary; the student's is exact. One log-softmax over the vocabulary
    serves all of them: at 151k tokens these passes, not the arithmetic on k ids, are the cost.
    """
    student_logprobs_BTV = student_logits_BTV.detach().float()
    if not normalised:
        student_logprobs_BTV = torch.log_softmax(student_logprobs_BTV, dim=-1)
    student_top_BTk = student_logprobs_BTV.topk(k, dim=-1)
    teacher_ids_BTk = teacher_topk_ids_BTK[..., :k]
    teacher_logprobs_BTk = teacher_topk_logprobs_BTK[..., :k].float()

    same_BTkk = student_top_BTk.indices.unsqueeze(-1) == teacher_ids_BTk.unsqueeze(-2)
    shared_in_student_BTk = same_BTkk.any(-1)
    shared_in_teacher_BTk = same_BTkk.any(-2)
    shared_count_BT = shared_in_student_BTk.sum(-1)

    student_mass_BT = (student_top_BTk.values.exp() * shared_in_student_BTk).sum(-1)
    teacher_mass_BT = (teacher_logprobs_BTk.exp() * shared_in_teacher_BTk).sum(-1)

    # Both renormalised on the shared set, indexed in the student's top-k order.
    neg_inf = torch.finfo(student_logprobs_BTV.dtype).min
    teacher_at_student_BTk = torch.where(same_BTkk, teacher_logprobs_BTk.unsqueeze(-2), 0.0).sum(-1)
    log_p_bar_BTk = _log_normalise(student_top_BTk.values, shared_in_student_BTk, neg_inf)
    log_q_bar_BTk = _log_normalise(teacher_at_student_BTk, shared_in_student_BTk, neg_inf)
    advantage_terms_BTk = log_p_bar_BTk.exp() * (log_q_bar_BTk - log_p_bar_BTk)
    advantage_BT = torch.where(shared_in_student_BTk, advantage_terms_BTk, 0.0).sum(-1)

    student_entropy_BT = entropy_of_logprobs(student_logprobs_BTV)
    teacher_entropy_BT = support_entropy(teacher_topk_logprobs_BTK)
    top1_agreement_BT = (student_top_BTk.indices[..., 0] == teacher_ids_BTk[..., 0]).float()
    return {
        "overlap_ratio": shared_count_BT.float() / k,
        "top1_agreement": top1_agreement_BT,
        "overlap_mass_student": student_mass_BT,
        "overlap_mass_teacher": teacher_mass_BT,
        "overlap_advantage": advantage_BT,
        "student_entropy": student_entropy_BT,
        "teacher_entropy": teacher_entropy_BT,
        "entropy_gap": (teacher_entropy_BT - student_entropy_BT).abs(),
        "teacher_minus_student_logprob": (teacher_token_logprobs_BT - student_token_logprobs_BT).float(),
    }


def student_entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    return entropy_of_logprobs(torch.log_softmax(logits_BTV.detach().float(), dim=-1))


def entropy_of_logprobs(logprobs_BTV: torch.Tensor) -> torch.Tensor:
    """-sum p log p, without a second N x |V| temporary for p log p."""
    return -torch.einsum("...v,...v->...", logprobs_BTV.exp(), logprobs_BTV)


def support_entropy(logprobs_BTK: torch.Tensor) -> torch.Tensor:
    """Entropy of a distribution known on k ids, renormalised there (exact when k covers the vocabulary)."""
    renormalised_BTK = torch.log_softmax(logprobs_BTK.float(), dim=-1)
    return -(renormalised_BTK.exp() * renormalised_BTK).sum(-1)


def _log_normalise(logprobs_BTk: torch.Tensor, keep_BTk: torch.Tensor, neg_inf: float) -> torch.Tensor:
    kept_BTk = torch.where(keep_BTk, logprobs_BTk, neg_inf)
    return kept_BTk - torch.logsumexp(kept_BTk, dim=-1, keepdim=True)


def position_buckets(mask_BT: torch.Tensor) -> torch.Tensor:
    """0/1/2 = first/middle/last third of each response, by the token's relative position."""
    index_BT = mask_BT.cumsum(-1) - 1
    length_B1 = mask_BT.sum(-1, keepdim=True).clamp(min=1)
    return (index_BT * len(BUCKETS) / length_B1).floor().clamp(0, len(BUCKETS) - 1).long()


def masked_sums(per_token_N: dict[str, torch.Tensor], bucket_N: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(sum, count) per diagnostic and per position bucket, over response tokens: summed across
    ranks, then divided, they give exact means."""
    sums: dict[str, tuple[float, float]] = {}
    for name, values_N in per_token_N.items():
        values_N = values_N.double()
        sums[f"diag/{name}"] = (float(values_N.sum()), float(values_N.numel()))
        for b, bucket in enumerate(BUCKETS):
            in_bucket_N = bucket_N == b
            sums[f"diag/{name}/{bucket}"] = (float(values_N[in_bucket_N].sum()), float(in_bucket_N.sum()))
    return sums
