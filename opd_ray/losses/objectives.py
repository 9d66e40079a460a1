"""Distillation objectives: pure tensor functions over response tokens, testable without Ray or DeepSpeed.

The learner flattens every response token of its shard into one axis N (prompt and padding
positions never reach an objective) and calls an objective on chunks of those tokens, so
the student's N x |V| logits exist one chunk at a time (see `chunked_loss`). An objective
maps an `ObjectiveInputs` chunk to per-token losses; `token_weight_N` then turns them into
this rank's share of the global token-mean or sequence-mean.

A new objective is one record in spec/objectives.py (what it needs from the other roles, which
`algorithm.*` keys it reads) and one function `(ObjectiveInputs, AlgorithmSpec) -> loss_N` in
`OBJECTIVES` here; `register_objective` adds both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from opd_ray.spec import AlgorithmSpec
from opd_ray.spec.objectives import ObjectiveRecord, add_objective


@dataclass
class TokenBatch:
    """Per-token tensors of one rank's response tokens, flattened in (sequence, position) order."""

    target_ids_N: torch.Tensor
    rollout_logprobs_N: torch.Tensor  # log p_old(y_t), detached
    token_weight_N: torch.Tensor  # aggregation weight: 1/global_tokens, or 1/(length * global_sequences)
    teacher_logprobs_N: torch.Tensor | None = None  # log q(y_t)
    teacher_topk_ids_NK: torch.Tensor | None = None  # teacher's own top-k, by rank
    teacher_topk_logprobs_NK: torch.Tensor | None = None
    student_topk_ids_NK: torch.Tensor | None = None  # rollout-time student top-k, by rank
    teacher_logprobs_at_student_topk_NK: torch.Tensor | None = None
    advantage_N: torch.Tensor | None = None  # sampled_token: reward after returns/baseline/weights
    task_advantage_N: torch.Tensor | None = None  # verifier reward, centred, on every token of a sequence
    bucket_N: torch.Tensor | None = None  # 0/1/2 = start/middle/end third of its response (diagnostics)
    keep_N: torch.Tensor | None = None  # entropy gate: 0 = no gradient from this token
    aligned_N: torch.Tensor | None = None  # cross-tokenizer teachers: 1 where the teacher's top-k applies

    @property
    def num_tokens(self) -> int:
        return int(self.target_ids_N.shape[0])

    def slice(self, part: slice) -> TokenBatch:
        updates = {f.name: getattr(self, f.name)[part] for f in fields(self) if getattr(self, f.name) is not None}
        return replace(self, **updates)


@dataclass
class ObjectiveInputs:
    """A chunk of tokens, the student's logits there (with grad) and, for full_vocab, the teacher's."""

    student_logits_NV: torch.Tensor
    tokens: TokenBatch
    teacher_logits_NV: torch.Tensor | None = None  # full-vocabulary objectives only, no grad
    reverse_weight: float = 1.0  # forward->reverse annealing: weight of the reverse KL this step


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to float32 before softmax; float64 (the tests' references) stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


# ---- divergences between two distributions over the same support (last axis) ----


# Log-probability of ids outside a support: exp() is exactly 0, yet differences stay finite, so
# no NaN reaches a gradient (an -inf here would make 0 * (-inf - -inf) = NaN).
OUTSIDE = -1e30


def _plogp_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a(v) (log a(v) - log b(v)); entries at OUTSIDE in both contribute exactly 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mode-seeking, the on-policy distillation objective."""
    return _plogp_ratio(log_p, log_q)


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mass-covering, what supervised distillation minimises."""
    return _plogp_ratio(log_q, log_p)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD(beta) in TRL's convention: mixture m = beta q + (1 - beta) p,
    beta KL(q || m) + (1 - beta) KL(p || m); beta = 0 is forward KL and beta = 1 reverse KL
    (the limits of the mixture vanish, so the ends are special-cased as TRL does)."""
    if beta == 0:
        return forward_kl(log_p, log_q)
    if beta == 1:
        return reverse_kl(log_p, log_q)
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
    return beta * _plogp_ratio(log_q, log_m) + (1 - beta) * _plogp_ratio(log_p, log_m)


def divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, algorithm: AlgorithmSpec, reverse_weight: float
) -> torch.Tensor:
    """The divergence the spec names; `forward_to_reverse` blends the two KLs with this step's weight."""
    if algorithm.divergence == "reverse_kl":
        return reverse_kl(log_p, log_q)
    if algorithm.divergence == "forward_kl":
        return forward_kl(log_p, log_q)
    if algorithm.divergence == "jsd":
        return generalized_jsd(log_p, log_q, algorithm.jsd_beta)
    return reverse_weight * reverse_kl(log_p, log_q) + (1 - reverse_weight) * forward_kl(log_p, log_q)


def forward_to_reverse_weight(step: int, anneal_steps: int) -> float:
    """Cosine ramp of the reverse-KL weight from 0 at step 1 to 1 at `anneal_steps` (SEAD's schedule)."""
    if anneal_steps <= 1:
        return 1.0
    progress = min(1.0, max(0, step - 1) / (anneal_steps - 1))
    return 0.5 * (1 - math.cos(math.pi * progress))


# ---- top-k supports ----


def topk_support(tokens: TokenBatch, support: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_NS, teacher log q at ids_NS, keep_NS) for the chosen support S_t.

    student / teacher: that model's top-k. intersection: the student's top-k ids the teacher
    also ranks in its top-k. union: the student's top-k plus the teacher's ids not already in it.
    A teacher id of -1 is a token the student's vocabulary lacks (a cross-tokenizer teacher,
    actors/cross_tokenizer.py): it is left off the support, so its mass falls in the tail.
    """
    if support == "teacher":
        ids_NS = tokens.teacher_topk_ids_NK[:, :k]
        return ids_NS.clamp(min=0), tokens.teacher_topk_logprobs_NK[:, :k], ids_NS >= 0
    student_ids_Nk = tokens.student_topk_ids_NK[:, :k]
    teacher_at_student_Nk = tokens.teacher_logprobs_at_student_topk_NK[:, :k]
    if support == "student":
        return student_ids_Nk, teacher_at_student_Nk, torch.ones_like(student_ids_Nk, dtype=torch.bool)
    teacher_ids_Nk = tokens.teacher_topk_ids_NK[:, :k]
    same_Nkk = student_ids_Nk.unsqueeze(-1) == teacher_ids_Nk.unsqueeze(-2)
    if support == "intersection":
        return student_ids_Nk, teacher_at_student_Nk, same_Nkk.any(-1)
    teacher_only_Nk = ~same_Nkk.any(-2)
    return (
        torch.cat([student_ids_Nk, teacher_ids_Nk], -1),
        torch.cat([teacher_at_student_Nk, tokens.teacher_topk_logprobs_NK[:, :k]], -1),
        torch.cat([torch.ones_like(teacher_only_Nk), teacher_only_Nk], -1),
    )


def _on_support(logprobs_NS: torch.Tensor, keep_NS: torch.Tensor, tail: bool) -> torch.Tensor:
    """Renormalise on the kept ids, or (tail) keep true probabilities and add one bucket for the rest."""
    kept_NS = logprobs_NS.masked_fill(~keep_NS, OUTSIDE)
    if not tail:
        return kept_NS - torch.logsumexp(kept_NS, -1, keepdim=True)
    # log(1 - sum), the sum in float64: where a confident teacher's top-k holds 0.9999 of its mass, a float32
    # sum keeps ~3 digits of the 1e-4 left (tests/unit/losses/test_reference.py found the loss 1e-3 off per
    # token). Clamped below 0 so a support covering everything keeps a finite gradient.
    mass_N1 = torch.logsumexp(kept_NS.double(), -1, keepdim=True)
    tail_N1 = torch.log(-torch.expm1(mass_N1.clamp(max=-1e-6))).to(kept_NS.dtype)
    return torch.cat([kept_NS, tail_N1], -1)


def topk_divergence(inputs: ObjectiveInputs, algorithm: AlgorithmSpec) -> torch.Tensor:
    """Analytic divergence on S_t: the student's logits are needed at |S_t| ids only, the teacher's are k numbers.

    With k = |V| and no tail this is the exact full-vocabulary divergence. Tokens whose
    support is empty (an empty intersection) get zero loss.
    """
    ids_NS, teacher_logprobs_NS, keep_NS = topk_support(inputs.tokens, algorithm.topk_support, algorithm.top_k)
    student_logprobs_NV = torch.log_softmax(upcast(inputs.student_logits_NV), -1)
    log_p_NS = _on_support(student_logprobs_NV.gather(-1, ids_NS), keep_NS, algorithm.topk_tail)
    log_q_NS = _on_support(upcast(teacher_logprobs_NS), keep_NS, algorithm.topk_tail)
    loss_N = divergence(log_p_NS, log_q_NS, algorithm, inputs.reverse_weight)
    return torch.where(keep_NS.any(-1), loss_N, torch.zeros_like(loss_N))


def full_vocab_divergence(inputs: ObjectiveInputs, algorithm: AlgorithmSpec) -> torch.Tensor:
    """Exact divergence over the whole vocabulary against the learner-side teacher's logits."""
    log_p_NV = torch.log_softmax(upcast(inputs.student_logits_NV), -1)
    log_q_NV = torch.log_softmax(upcast(inputs.teacher_logits_NV), -1)
    return divergence(log_p_NV, log_q_NV, algorithm, inputs.reverse_weight)


# ---- the sampled-token (policy-gradient) family ----


def token_logprobs(logits_NV: torch.Tensor, target_ids_N: torch.Tensor) -> torch.Tensor:
    """log softmax at the chosen token, without materialising a second N x V tensor."""
    logits_NV = upcast(logits_NV)
    return logits_NV.gather(-1, target_ids_N.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits_NV, -1)


def policy_gradient_surrogate(
    student_logprobs_N: torch.Tensor,
    rollout_logprobs_N: torch.Tensor,
    advantage_N: torch.Tensor,
    clip_eps: float | None,
) -> torch.Tensor:
    """-min(ratio A, clip(ratio) A) with ratio p_theta / p_old; `clip_eps=None` is plain importance sampling."""
    ratio_N = torch.exp(student_logprobs_N - rollout_logprobs_N)
    surrogate_N = ratio_N * advantage_N
    if clip_eps is not None:
        surrogate_N = torch.minimum(surrogate_N, ratio_N.clamp(1 - clip_eps, 1 + clip_eps) * advantage_N)
    return -surrogate_N


REVERSE_KL_ON_TEACHER_TOPK = AlgorithmSpec(objective="topk", topk_support="teacher", divergence="reverse_kl")


def vopd_baseline(inputs: ObjectiveInputs) -> torch.Tensor:
    """V(s_t) = -KL(p_t || q_t) in closed form on the teacher's top-k, detached (vOPD).

    The one-sample reward r_t has expectation -KL(p_t || q_t) under the student, so
    subtracting it leaves the gradient unbiased and removes most of its variance.
    """
    with torch.no_grad():
        return -topk_divergence(inputs, REVERSE_KL_ON_TEACHER_TOPK)


def truncated_importance_weight(
    student_logprobs_N: torch.Tensor, rollout_logprobs_N: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(p_theta(y_t) / p_rollout(y_t), cap), detached: how much a token sampled by older weights
    (asynchronous mode) counts now. The cap bounds the variance a stale, unlikely sample can add."""
    with torch.no_grad():
        return torch.exp(student_logprobs_N - rollout_logprobs_N).clamp(max=cap)


def sampled_token_reverse_kl(inputs: ObjectiveInputs, algorithm: AlgorithmSpec) -> torch.Tensor:
    """One-sample reverse KL as a dense reward inside an importance-sampled surrogate.

    `tokens.advantage_N` already holds r_t = log q(y_t) - log p_old(y_t) after returns,
    standardisation, the vOPD baseline, IW-OPD weights and any task reward (the learner
    assembles it; those need whole sequences or the whole batch). PPO clipping when
    `clip_eps` is set, so a stale or mismatched p_old cannot blow up.
    """
    tokens = inputs.tokens
    student_logprobs_N = token_logprobs(inputs.student_logits_NV, tokens.target_ids_N)
    surrogate_N = policy_gradient_surrogate(
        student_logprobs_N, tokens.rollout_logprobs_N, tokens.advantage_N, algorithm.clip_eps
    )
    if algorithm.importance_cap is None:
        return surrogate_N
    # The surrogate's gradient carries the ratio itself; scale it down to the capped ratio.
    ratio_N = torch.exp(student_logprobs_N - tokens.rollout_logprobs_N).detach()
    return surrogate_N * ratio_N.clamp(max=algorithm.importance_cap) / ratio_N


def sft_cross_entropy(inputs: ObjectiveInputs, algorithm: AlgorithmSpec) -> torch.Tensor:
    """Negative log-likelihood of each response token: the supervised control arm."""
    return -token_logprobs(inputs.student_logits_NV, inputs.tokens.target_ids_N)


Objective = Callable[[ObjectiveInputs, AlgorithmSpec], torch.Tensor]

# name in `algorithm.objective` -> per-token loss. A new objective is one record in spec/objectives.py (what it
# needs, its keys) and one function here; `register_objective` adds both at once.
OBJECTIVES: dict[str, Objective] = {
    "sampled_token": sampled_token_reverse_kl,
    "topk": topk_divergence,
    "full_vocab": full_vocab_divergence,
    "sft": sft_cross_entropy,
}


def register_objective(record: ObjectiveRecord, loss: Objective) -> None:
    """Adds an objective: its record (validators, driver and learner read it) and its per-token loss."""
    add_objective(record)
    OBJECTIVES[record.name] = loss


def token_loss(inputs: ObjectiveInputs, algorithm: AlgorithmSpec) -> torch.Tensor:
    """The objective's per-token loss, plus the task-reward policy gradient for analytic objectives,
    weighted by the truncated importance ratio when `importance_cap` is set.

    (sampled_token already carries the task reward inside its advantage, tinker-style, and its
    importance ratio inside its surrogate.)
    """
    record = algorithm.record
    loss_N = OBJECTIVES[record.name](inputs, algorithm)
    tokens = inputs.tokens
    add_task_reward = tokens.task_advantage_N is not None and not record.sequence_advantages
    # a policy-gradient surrogate carries its own ratio; the supervised control has no rollout to weigh
    apply_cap = algorithm.importance_cap is not None and record.needs_teacher and not record.sequence_advantages
    if add_task_reward or apply_cap:  # one pass over the chunk's logits serves both
        student_logprobs_N = token_logprobs(inputs.student_logits_NV, tokens.target_ids_N)
    if add_task_reward:
        loss_N = loss_N + policy_gradient_surrogate(
            student_logprobs_N, tokens.rollout_logprobs_N, algorithm.task_reward_coef * tokens.task_advantage_N, None
        )
    if apply_cap:
        loss_N = loss_N * truncated_importance_weight(
            student_logprobs_N, tokens.rollout_logprobs_N, algorithm.importance_cap
        )
    if tokens.keep_N is not None:
        loss_N = loss_N * tokens.keep_N
    return loss_N


def aggregation_weights(mask_BT: torch.Tensor, mode: str, global_tokens: int, global_sequences: int) -> torch.Tensor:
    """Per-token weights whose weighted sum of losses is this rank's share of the global mean."""
    if mode == "token_mean":
        return mask_BT / max(1, global_tokens)
    tokens_B1 = mask_BT.sum(-1, keepdim=True).clamp(min=1)
    return mask_BT / tokens_B1 / max(1, global_sequences)


Observer = Callable[[torch.Tensor, TokenBatch], None]


def chunked_loss(
    hidden_NH: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: TokenBatch,
    algorithm: AlgorithmSpec,
    chunk_tokens: int,
    teacher_hidden_NH: torch.Tensor | None = None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reverse_weight: float = 1.0,
    observe: Observer | None = None,
    token_losses: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted sum of per-token losses, computing logits `chunk_tokens` rows at a time.

    With more than one chunk, each runs under activation checkpointing: its N_c x |V| logits
    are freed after the forward and recomputed in the backward, so peak memory holds one
    chunk's logits instead of all N x |V| (benchmarks/full_vocab_memory.py measures it). When
    one chunk holds every token the logits fit by definition, and the recompute would only
    cost a third application of the output head, so it is skipped.

    `observe(logits_NV, chunk)` sees each chunk's detached logits once (not again in a
    recompute): the step's statistics and diagnostics come from the same head pass as the loss.
    `token_losses` receives each chunk's detached per-token losses (per-teacher loss metrics).
    """
    checkpointed = tokens.num_tokens > chunk_tokens
    total = hidden_NH.new_zeros((), dtype=torch.float32)
    for start in range(0, tokens.num_tokens, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        chunk = tokens.slice(part)
        teacher_part = None if teacher_hidden_NH is None else teacher_hidden_NH[part]
        watch = _FirstPass(observe, chunk, token_losses)
        piece = partial(_chunk_loss, head, chunk, algorithm, teacher_part, teacher_head, reverse_weight, watch)
        chunk_loss = checkpoint(piece, hidden_NH[part], use_reentrant=False) if checkpointed else piece(hidden_NH[part])
        total = total + chunk_loss
    return total


class _FirstPass:
    """Hands a chunk's logits to an observer, and its per-token losses to a list, the first time they are
    computed, not again in the backward's recompute."""

    def __init__(self, observe: Observer | None, chunk: TokenBatch, token_losses: list | None) -> None:
        self.observe, self.chunk, self.token_losses = observe, chunk, token_losses
        self.logits_seen = self.losses_seen = False

    def logits(self, logits_NV: torch.Tensor) -> None:
        if self.observe is None or self.logits_seen:
            return
        self.logits_seen = True
        with torch.no_grad():
            self.observe(logits_NV.detach(), self.chunk)

    def losses(self, loss_N: torch.Tensor) -> None:
        if self.token_losses is None or self.losses_seen:
            return
        self.losses_seen = True
        self.token_losses.append(loss_N.detach())


def _chunk_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: TokenBatch,
    algorithm: AlgorithmSpec,
    teacher_hidden_NH: torch.Tensor | None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
    reverse_weight: float,
    watch: _FirstPass,
    hidden_NH: torch.Tensor,
) -> torch.Tensor:
    teacher_logits_NV = None
    if teacher_hidden_NH is not None:
        with torch.no_grad():
            teacher_logits_NV = teacher_head(teacher_hidden_NH)
    student_logits_NV = head(hidden_NH)
    watch.logits(student_logits_NV)
    loss_N = token_loss(ObjectiveInputs(student_logits_NV, tokens, teacher_logits_NV, reverse_weight), algorithm)
    watch.losses(loss_N)
    return (loss_N * tokens.token_weight_N).sum()
