"""An independent reference for one learner step of every objective family.

Written from the formulas in the project's background notes (shared docs, opd-background.md), in plain
PyTorch over the padded batch, with loops where they make a formula easier to check by eye. It imports
nothing from opd_ray: its agreement with the learner (tests/unit/losses/test_reference.py, and
tests/integration/test_reference_learner.py through DeepSpeed) is evidence that the learner applies the
update the formula asks for, not that two copies of one piece of code agree.

Conventions: a batch holds right-padded rows of prompt + response; `response[b, i] = 1` marks the
sampled tokens; token i is predicted by the logits at position i - 1. The loss is the mean over every
response token of the batch (token_mean), or the mean over sequences of each sequence's mean
(sequence_mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """The tensors of one scored batch, as the roles produced them (no opd_ray types)."""

    input_ids: torch.Tensor  # B x L, long
    attention: torch.Tensor  # B x L
    response: torch.Tensor  # B x L, 1 on sampled tokens
    rollout_logprobs: torch.Tensor  # B x L: log p_old(y_i) from the sampler
    teacher_logprobs: torch.Tensor  # B x L: log q(y_i) from the teacher
    teacher_topk_ids: torch.Tensor  # B x L x K: the teacher's own top ids at i, by rank
    teacher_topk_logprobs: torch.Tensor  # B x L x K
    student_topk_ids: torch.Tensor  # B x L x K: the sampler's top ids at i, by rank
    teacher_at_student_topk: torch.Tensor  # B x L x K: log q at those ids


def response_positions(batch: Batch) -> list[tuple[int, int]]:
    """(row, position) of every response token, in row-major order."""
    rows, length = batch.input_ids.shape
    return [(b, i) for b in range(rows) for i in range(length) if batch.response[b, i]]


def next_token_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """B x L x V: log p(. | tokens < i) at position i (row i - 1 of the logits), float64."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention).logits.double()
    shifted = torch.zeros_like(logits)
    shifted[:, 1:] = logits[:, :-1]
    return torch.log_softmax(shifted, dim=-1)


def mean_over_tokens(losses: dict[tuple[int, int], torch.Tensor], aggregation: str) -> torch.Tensor:
    """token_mean: every response token weighs the same; sequence_mean: every sequence does."""
    if aggregation == "token_mean":
        return torch.stack(list(losses.values())).sum() / len(losses)
    rows: dict[int, list[torch.Tensor]] = {}
    for (b, _), value in losses.items():
        rows.setdefault(b, []).append(value)
    return torch.stack([torch.stack(values).mean() for values in rows.values()]).mean()


# ---- divergences on a support, from their definitions ----

TAIL_FLOOR = 1e-6


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) for probability vectors; terms with a = 0 are 0."""
    present = a > 0
    return (a[present] * (torch.log(a[present]) - torch.log(b[present]))).sum()


def divergence(p: torch.Tensor, q: torch.Tensor, name: str, beta: float) -> torch.Tensor:
    """reverse_kl = KL(p || q), forward_kl = KL(q || p), jsd = beta KL(q || m) + (1 - beta) KL(p || m)
    with m = beta q + (1 - beta) p (GKD's generalised JSD, TRL's convention)."""
    if name == "reverse_kl":
        return kl(p, q)
    if name == "forward_kl":
        return kl(q, p)
    mixture = beta * q + (1 - beta) * p
    return beta * kl(q, mixture) + (1 - beta) * kl(p, mixture)


def support_ids(batch: Batch, b: int, i: int, support: str, k: int) -> tuple[list[int], dict[int, float]]:
    """The ids of S_t and the teacher's log-probabilities there (as the teacher sent them)."""
    teacher = dict(
        zip(batch.teacher_topk_ids[b, i, :k].tolist(), batch.teacher_topk_logprobs[b, i, :k].tolist(), strict=True)
    )
    student = dict(
        zip(batch.student_topk_ids[b, i, :k].tolist(), batch.teacher_at_student_topk[b, i, :k].tolist(), strict=True)
    )
    if support == "teacher":
        return list(teacher), teacher
    if support == "student":
        return list(student), student
    union = {**teacher, **student}
    return list(dict.fromkeys([*student, *teacher])), union


def teacher_logprobs_on(teacher: dict[int, float], vocabulary: int) -> torch.Tensor:
    """The teacher's log-probabilities as a vocabulary-sized vector: what it sent, -inf elsewhere."""
    q_logprobs = torch.full((vocabulary,), float("-inf"), dtype=torch.float64)
    for v, value in teacher.items():
        q_logprobs[v] = value
    return q_logprobs


def on_support(logprobs: torch.Tensor, ids: list[int], tail: bool) -> torch.Tensor:
    """Probabilities on `ids` renormalised to 1, or (tail) kept as they are plus one bucket for the rest.

    The bucket is floored at TAIL_FLOOR: below it, 1 - sum is float32 rounding of the log-probs it is made
    from (each off by ~1e-7 near 0), not a probability; the floor also keeps log(tail) finite when the
    support is the whole vocabulary."""
    probs = torch.stack([logprobs[v].exp() for v in ids])
    if not tail:
        return probs / probs.sum()
    return torch.cat([probs, (1 - probs.sum()).clamp(min=TAIL_FLOOR).reshape(1)])


# ---- one loss per family ----


def topk_loss(model: torch.nn.Module, batch: Batch, support: str, k: int, tail: bool, name: str = "reverse_kl",
              beta: float = 0.5, aggregation: str = "token_mean") -> torch.Tensor:  # fmt: skip
    """The divergence between the student and the teacher on the support S_t at every response token."""
    logp = next_token_logprobs(model, batch)
    losses = {}
    for b, i in response_positions(batch):
        ids, teacher = support_ids(batch, b, i, support, k)
        q_logprobs = teacher_logprobs_on(teacher, logp.shape[-1])
        losses[b, i] = divergence(on_support(logp[b, i], ids, tail), on_support(q_logprobs, ids, tail), name, beta)
    return mean_over_tokens(losses, aggregation)


def full_vocab_loss(model: torch.nn.Module, teacher: torch.nn.Module, batch: Batch, name: str, beta: float = 0.5,
                    aggregation: str = "token_mean") -> torch.Tensor:  # fmt: skip
    """The divergence over the whole vocabulary, the teacher's distribution from its own forward."""
    logp = next_token_logprobs(model, batch)
    with torch.no_grad():
        logq = next_token_logprobs(teacher, batch)
    losses = {(b, i): divergence(logp[b, i].exp(), logq[b, i].exp(), name, beta) for b, i in response_positions(batch)}
    return mean_over_tokens(losses, aggregation)


def sft_loss(model: torch.nn.Module, batch: Batch, aggregation: str = "token_mean") -> torch.Tensor:
    """Negative log-likelihood of every response token."""
    logp = next_token_logprobs(model, batch)
    losses = {(b, i): -logp[b, i, batch.input_ids[b, i]] for b, i in response_positions(batch)}
    return mean_over_tokens(losses, aggregation)


def rewards(batch: Batch) -> dict[tuple[int, int], float]:
    """The dense per-token reward r_i = log q(y_i) - log p_old(y_i)."""
    return {
        (b, i): float(batch.teacher_logprobs[b, i] - batch.rollout_logprobs[b, i]) for b, i in response_positions(batch)
    }


def advantages(batch: Batch, discount: float, standardize: bool) -> dict[tuple[int, int], float]:
    """discount 0: A_i = r_i; otherwise the return sum_{j >= i} discount^(j - i) r_j within the response;
    standardize: (A - mean) / std over every response token of the batch (population std)."""
    reward = rewards(batch)
    result = {}
    for b, i in reward:
        later = [(j, r) for (row, j), r in reward.items() if row == b and j >= i]
        result[b, i] = sum(discount ** (j - i) * r for j, r in later) if discount > 0 else reward[b, i]
    if standardize:
        values = torch.tensor(list(result.values()), dtype=torch.float64)
        mean, std = values.mean(), values.var(unbiased=False).add(1e-8).sqrt()
        result = {key: float((value - mean) / std) for key, value in result.items()}
    return result


def sampled_token_loss(model: torch.nn.Module, batch: Batch, clip_eps: float | None = None, discount: float = 0.0,
                       standardize: bool = False, vopd: bool = False, k: int = 0,
                       aggregation: str = "token_mean") -> torch.Tensor:  # fmt: skip
    """tinker's surrogate: -ratio * A per token with ratio = p_theta(y_i) / p_old(y_i); PPO's clipped
    form -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) with `clip_eps`. vOPD subtracts the baseline
    V(s_i) = -KL(p_i || q_i) on the teacher's top-k (both renormalised there), computed without gradient."""
    logp = next_token_logprobs(model, batch)
    advantage = advantages(batch, discount, standardize)
    losses = {}
    for b, i in response_positions(batch):
        a = advantage[b, i]
        if vopd:
            with torch.no_grad():
                ids, teacher = support_ids(batch, b, i, "teacher", k)
                q_logprobs = teacher_logprobs_on(teacher, logp.shape[-1])
                a = a + float(kl(on_support(logp[b, i], ids, False), on_support(q_logprobs, ids, False)))
        ratio = torch.exp(logp[b, i, batch.input_ids[b, i]] - batch.rollout_logprobs[b, i].double())
        surrogate = ratio * a
        if clip_eps is not None:
            surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
        losses[b, i] = -surrogate
    return mean_over_tokens(losses, aggregation)
