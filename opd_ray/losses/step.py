"""One learner rank's step as tensor work: its rows of a batch -> per-token tensors -> loss and statistics.

The learner actor (actors/learner.py) keeps what needs DeepSpeed, Ray or the process group:
the backward and optimizer step, all ranks agreeing to skip a non-finite loss, checkpoints.
Everything here takes the model as a callable and its output head, so a unit test runs it
on a plain transformers model.

Metrics come back as this rank's share of a step: plain numbers are shares of a global mean
(added across ranks) and (sum, count) pairs are added and then divided (`combine_rank_metrics`),
so every step metric is exact whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from opd_ray.losses.advantages import finish_token_batch, flatten_tokens, with_batch_statistics
from opd_ray.losses.batch import RolloutBatch
from opd_ray.losses.diagnostics import masked_sums, student_entropy, support_entropy, token_diagnostics
from opd_ray.losses.hidden import response_hidden_states
from opd_ray.losses.objectives import (
    ObjectiveInputs,
    TokenBatch,
    aggregation_weights,
    chunked_loss,
    forward_to_reverse_weight,
    token_logprobs,
    vopd_baseline,
)
from opd_ray.spec import AlgorithmSpec

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepModels:
    """What a rank computes with: the student (with grad), an optional frozen teacher for
    full-vocabulary objectives, and how many response tokens' logits may exist at once."""

    student: Callable[..., Any]
    student_head: Head
    device: torch.device | str
    chunk_tokens: int
    teacher: Callable[..., Any] | None = None
    teacher_head: Head | None = None


@dataclass
class RankShare:
    """This rank's rows of the step's batch, their response mask and flat token batch."""

    batch: RolloutBatch
    mask_BT: torch.Tensor
    tokens: TokenBatch


def rank_share(
    full: RolloutBatch, algorithm: AlgorithmSpec, rank: int, world_size: int, device: torch.device | str
) -> RankShare:
    """Rows rank, rank+N, ... (long and short sequences spread evenly), weighted for the global mean.

    Returns and centred task rewards need every rank's rows, so they are computed on `full` first."""
    global_tokens, global_sequences = full.num_response_tokens, full.num_sequences
    full = with_batch_statistics(full, algorithm)
    batch = full.select(slice(rank, None, world_size))
    mask_BT = batch.response_mask_BL[:, 1:].to(device)
    weights_BT = aggregation_weights(mask_BT, algorithm.aggregation, global_tokens, global_sequences)
    return RankShare(batch, mask_BT, flatten_tokens(batch, weights_BT, device))


def token_statistics(
    models: StepModels,
    hidden_NH: torch.Tensor,
    tokens: TokenBatch,
    algorithm: AlgorithmSpec,
    diagnostics_k: int | None,
    on_student_samples: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A no-grad pass over the chunks: metrics, diagnostics (at student-visited states only),
    and per-token values the loss needs from the current student (vOPD baseline, entropies)."""
    has_teacher_topk = tokens.teacher_logprobs_N is not None and tokens.teacher_topk_ids_NK is not None
    per_token = _per_token_values(
        models,
        hidden_NH,
        tokens,
        vopd=has_teacher_topk and algorithm.baseline == "vopd",
        entropies=has_teacher_topk and algorithm.entropy_gate.enabled,
        diagnostics_k=diagnostics_k if has_teacher_topk and on_student_samples else None,
    )
    count = float(tokens.num_tokens)
    metrics: dict[str, Any] = {"student_logprob": (float(per_token["student_logprob"].sum()), count)}
    if tokens.teacher_logprobs_N is not None:
        metrics["teacher_logprob"] = (float(tokens.teacher_logprobs_N.double().sum()), count)
        if on_student_samples:  # dataset answers have no sampling log-probs
            sampled_kl = (tokens.rollout_logprobs_N - tokens.teacher_logprobs_N).double().sum()
            metrics["sampled_reverse_kl"] = (float(sampled_kl), count)
    diagnostics = {name.split(":", 1)[1]: values for name, values in per_token.items() if name.startswith("diag:")}
    if diagnostics:
        metrics.update(masked_sums(diagnostics, tokens.bucket_N))
    return metrics, {name: values for name, values in per_token.items() if not name.startswith("diag:")}


def _per_token_values(
    models: StepModels,
    hidden_NH: torch.Tensor,
    tokens: TokenBatch,
    vopd: bool,
    entropies: bool,
    diagnostics_k: int | None,
) -> dict[str, torch.Tensor]:
    """name -> one value per token, computed one chunk of logits at a time; diagnostics as `diag:<name>`."""
    pieces: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, values: torch.Tensor) -> None:
        pieces.setdefault(name, []).append(values.double())

    with torch.no_grad():
        for start in range(0, tokens.num_tokens, models.chunk_tokens):
            part = slice(start, start + models.chunk_tokens)
            chunk = tokens.slice(part)
            logits_NV = models.student_head(hidden_NH[part]).float()
            student_logprob_N = token_logprobs(logits_NV, chunk.target_ids_N)
            keep("student_logprob", student_logprob_N)
            if vopd:
                keep("vopd_baseline", vopd_baseline(ObjectiveInputs(logits_NV, chunk)))
            if entropies:
                keep("student_entropy", student_entropy(logits_NV))
                keep("teacher_entropy", support_entropy(chunk.teacher_topk_logprobs_NK))
            if diagnostics_k:
                found = token_diagnostics(
                    logits_NV,
                    chunk.teacher_topk_ids_NK,
                    chunk.teacher_topk_logprobs_NK,
                    student_logprob_N,
                    chunk.teacher_logprobs_N,
                    diagnostics_k,
                )
                for name, values in found.items():
                    keep(f"diag:{name}", values)
    return {name: torch.cat(values) for name, values in pieces.items()}


def batch_counts(share: RankShare) -> dict[str, Any]:
    """What this rank's rows hold: tokens, sequences, truncations and the verifier's score of them."""
    batch = share.batch
    counts: dict[str, Any] = {
        "response_tokens": batch.num_response_tokens,
        "sequences": batch.num_sequences,
        "truncated_responses": int((~batch.finished_B).sum()),
    }
    if share.tokens.keep_N is not None:
        counts["gate/kept_fraction"] = (float(share.tokens.keep_N.sum()), float(share.tokens.num_tokens))
    if batch.task_rewards_B is not None:
        counts["sample_reward"] = (float(batch.task_rewards_B.sum()), float(batch.num_sequences))
    return counts


def step_loss(
    models: StepModels,
    full: RolloutBatch,
    algorithm: AlgorithmSpec,
    rank: int,
    world_size: int,
    diagnostics_k: int | None = None,
    step: int = 1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """This rank's share of the step's loss (with grad, ready for backward) and of its metrics."""
    share = rank_share(full, algorithm, rank, world_size, models.device)
    hidden_NH = response_hidden_states(models.student, share.batch, models.device)
    teacher_hidden_NH = None
    if models.teacher is not None:
        with torch.no_grad():
            teacher_hidden_NH = response_hidden_states(models.teacher, share.batch, models.device)
    on_student_samples = share.batch.source == "student"
    if not on_student_samples:  # dataset answers have no sampling log-probs to correct against
        algorithm = algorithm.model_copy(update={"importance_cap": None})
    metrics, per_token = token_statistics(models, hidden_NH, share.tokens, algorithm, diagnostics_k, on_student_samples)
    share.tokens = finish_token_batch(share.tokens, per_token, share.mask_BT, algorithm)
    metrics.update(batch_counts(share))
    reverse_weight = forward_to_reverse_weight(step, algorithm.anneal_steps)
    if algorithm.divergence == "forward_to_reverse":
        metrics["reverse_kl_weight"] = (reverse_weight, 1.0)  # a (sum, count) pair: the same on every rank
    loss = chunked_loss(
        hidden_NH,
        models.student_head,
        share.tokens,
        algorithm,
        models.chunk_tokens,
        teacher_hidden_NH,
        models.teacher_head,
        reverse_weight,
    )
    return loss, metrics


def diagnose(
    models: StepModels, full: RolloutBatch, algorithm: AlgorithmSpec, rank: int, world_size: int, diagnostics_k: int
) -> dict[str, Any]:
    """A step's metrics and diagnostics without a loss (`opd-ray probe`): what step 1 of a run would log."""
    share = rank_share(full, algorithm, rank, world_size, models.device)
    with torch.no_grad():
        hidden_NH = response_hidden_states(models.student, share.batch, models.device)
    metrics, _ = token_statistics(models, hidden_NH, share.tokens, algorithm, diagnostics_k, on_student_samples=True)
    metrics["response_tokens"] = share.batch.num_response_tokens
    metrics["sequences"] = share.batch.num_sequences
    return metrics


SAME_ON_EVERY_RANK = ("lr", "skipped_update")
SLOWEST_RANK = ("time/learner_fetch", "time/learner_compute")  # the step waits for the slowest rank


def combine_rank_metrics(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """Ranks report shares of a global mean (added) or (sum, count) pairs (added, then divided)."""
    totals: dict[str, float] = {}
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        if values[0] is None or key in SAME_ON_EVERY_RANK:
            totals[key] = values[0]
        elif key in SLOWEST_RANK:
            totals[key] = max(values)
        elif isinstance(values[0], tuple):
            count = sum(v[1] for v in values)
            if count:
                totals[key] = sum(v[0] for v in values) / count
        else:
            totals[key] = sum(values)
    return totals
