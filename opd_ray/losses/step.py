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

from opd_ray.data.repetition import is_repetitive
from opd_ray.losses.advantages import finish_token_batch, flatten_tokens, with_batch_statistics
from opd_ray.losses.batch import RolloutBatch
from opd_ray.losses.diagnostics import masked_sums, student_entropy, support_entropy, token_diagnostics
from opd_ray.losses.hidden import pack_rows, packed_width, response_hidden_states
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


def sampling_head(head: Head, temperature: float) -> Head:
    """The student's logits as it samples them: divided by `rollout.temperature`. vLLM samples from
    softmax(logits / T), and the rollout engine reports those log-probs (actors/vllm_engine.py), so with the
    learner's recompute also at T the importance ratio is 1 on-policy, the reward log q - log p is of the
    distribution the tokens came from, and every divergence trains the policy that samples."""
    if temperature == 1.0:
        return head
    return lambda hidden: head(hidden) / temperature


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
    pack: bool = False  # run the rows packed end to end (losses/hidden.py: packed_hidden_states)


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
    if batch.teacher_coef_B is not None:  # each teacher's loss coefficient weighs its rows' tokens
        weights_BT = weights_BT * batch.teacher_coef_B[:, None].to(weights_BT)
    return RankShare(batch, mask_BT, flatten_tokens(batch, weights_BT, device))


@dataclass(frozen=True)
class WantedValues:
    """Which per-token values a step computes from the student's logits, chunk by chunk."""

    vopd: bool  # sampled_token's vOPD baseline: changes the loss, so needed before it
    entropies: bool  # the entropy gate: needs every token's entropy before any loss
    diagnostics_k: int | None  # the paper's diagnostics at k (student-visited states only)

    @property
    def before_loss(self) -> bool:
        """True when the loss itself depends on them: then a separate no-grad pass comes first.
        Otherwise they are read off the loss's own head pass (`chunked_loss(observe=...)`)."""
        return self.vopd or self.entropies


def wanted_values(
    tokens: TokenBatch, algorithm: AlgorithmSpec, diagnostics_k: int | None, on_student_samples: bool
) -> WantedValues:
    has_teacher_topk = tokens.teacher_logprobs_N is not None and tokens.teacher_topk_ids_NK is not None
    return WantedValues(
        vopd=has_teacher_topk and algorithm.record.sequence_advantages and algorithm.baseline == "vopd",
        entropies=has_teacher_topk and algorithm.entropy_gate.enabled,
        diagnostics_k=diagnostics_k if has_teacher_topk and on_student_samples else None,
    )


class ValueCollector:
    """Collects per-token values chunk by chunk: `collect(logits_NV, chunk)` is an observer for
    `chunked_loss` or is called by `values_pass`; `values()` joins the chunks."""

    def __init__(self, wanted: WantedValues) -> None:
        self.wanted = wanted
        self.pieces: dict[str, list[torch.Tensor]] = {}

    def keep(self, name: str, values: torch.Tensor) -> None:
        self.pieces.setdefault(name, []).append(values.double())

    def collect(self, logits_NV: torch.Tensor, chunk: TokenBatch) -> None:
        logits_NV = logits_NV.float()
        logprobs_NV = None  # one log-softmax over the vocabulary serves every diagnostic
        if self.wanted.diagnostics_k:
            logprobs_NV = torch.log_softmax(logits_NV, -1)
            student_logprob_N = logprobs_NV.gather(-1, chunk.target_ids_N[:, None])[:, 0]
        else:
            student_logprob_N = token_logprobs(logits_NV, chunk.target_ids_N)
        self.keep("student_logprob", student_logprob_N)
        if self.wanted.vopd:
            self.keep("vopd_baseline", vopd_baseline(ObjectiveInputs(logits_NV, chunk)))
        if self.wanted.entropies:
            self.keep("student_entropy", student_entropy(logits_NV))
            self.keep("teacher_entropy", support_entropy(chunk.teacher_topk_logprobs_NK))
        if self.wanted.diagnostics_k:
            found = token_diagnostics(
                logprobs_NV,
                chunk.teacher_topk_ids_NK,
                chunk.teacher_topk_logprobs_NK,
                student_logprob_N,
                chunk.teacher_logprobs_N,
                self.wanted.diagnostics_k,
                normalised=True,
            )
            for name, values in found.items():
                self.keep(f"diag:{name}", values)

    def values(self) -> dict[str, torch.Tensor]:
        """name -> one value per token; diagnostics as `diag:<name>`."""
        return {name: torch.cat(values) for name, values in self.pieces.items()}


def values_pass(models: StepModels, hidden_NH: torch.Tensor, tokens: TokenBatch, wanted: WantedValues):
    """A no-grad pass of the output head over the chunks, for values needed before the loss (or without one)."""
    collector = ValueCollector(wanted)
    with torch.no_grad():
        for start in range(0, tokens.num_tokens, models.chunk_tokens):
            part = slice(start, start + models.chunk_tokens)
            collector.collect(models.student_head(hidden_NH[part]), tokens.slice(part))
    return collector.values()


def token_statistics(
    per_token: dict[str, torch.Tensor], tokens: TokenBatch, on_student_samples: bool
) -> dict[str, Any]:
    """A step's metrics from its per-token values: log-probs, sampled reverse KL and the diagnostics (overall
    and by position). With a cross-tokenizer teacher the diagnostics cover the positions where its top-k
    applies (one-to-one chunks, over the tokens both vocabularies share); their share is logged."""
    count = float(tokens.num_tokens)
    values = token_mean_values(per_token, tokens, on_student_samples)
    metrics: dict[str, Any] = {key: (float(v.double().sum()), count) for key, v in values.items()}
    diagnostics = {name.split(":", 1)[1]: values for name, values in per_token.items() if name.startswith("diag:")}
    buckets_N = tokens.bucket_N
    if tokens.aligned_N is not None:  # a cross-tokenizer teacher: its top-k exists at aligned positions only
        aligned_N = tokens.aligned_N.bool()
        metrics["cross_tokenizer/aligned_share"] = (float(aligned_N.sum()), count)
        diagnostics = {name: values[aligned_N] for name, values in diagnostics.items()}
        buckets_N = buckets_N[aligned_N]
    if diagnostics:
        metrics.update(masked_sums(diagnostics, buckets_N))
    return metrics


def token_mean_values(
    per_token: dict[str, torch.Tensor], tokens: TokenBatch, on_student_samples: bool
) -> dict[str, torch.Tensor]:
    """The per-token values behind the log-prob and sampled-KL metrics, by metric name."""
    values = {"student_logprob": per_token["student_logprob"]}
    if tokens.teacher_logprobs_N is not None:
        values["teacher_logprob"] = tokens.teacher_logprobs_N
        values["teacher_logprob_sq"] = tokens.teacher_logprobs_N.double().square()  # a constant teacher: no spread
        if on_student_samples:  # dataset answers have no sampling log-probs
            values["sampled_reverse_kl"] = tokens.rollout_logprobs_N - tokens.teacher_logprobs_N
    return values


def response_token_lists(batch: RolloutBatch) -> list[list[int]]:
    """Each sequence's response token ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids_BL, batch.response_mask_BL, strict=True)]


def repetitive_rows(batch: RolloutBatch) -> torch.Tensor:
    """Whether each response repeats itself (data/repetition.py): what a collapse looks like."""
    return torch.tensor([is_repetitive(ids) for ids in response_token_lists(batch)], dtype=torch.bool)


def batch_counts(batch: RolloutBatch, tokens: TokenBatch, repetitive_B: torch.Tensor) -> dict[str, Any]:
    """What these rows hold: tokens, sequences, truncations and the verifier's score of them."""
    counts: dict[str, Any] = {
        "response_tokens": batch.num_response_tokens,
        "sequences": batch.num_sequences,
        "truncated_responses": int((~batch.finished_B).sum()),
        "cut_off_share": (float((~batch.finished_B).sum()), float(batch.num_sequences)),  # a collapse runs long
        "repetitive_share": (float(repetitive_B.sum()), float(batch.num_sequences)),
        **padding_shares(batch.attention_mask_BL),
    }
    if tokens.keep_N is not None:
        counts["gate/kept_fraction"] = (float(tokens.keep_N.sum()), float(tokens.num_tokens))
    if batch.task_rewards_B is not None:  # NaN: a row without a reference answer, left out of the mean
        answered_B = ~batch.task_rewards_B.isnan()
        counts["sample_reward"] = (float(batch.task_rewards_B[answered_B].sum()), float(answered_B.sum()))
    return counts


def padding_shares(attention_mask_BL: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Share of the positions a forward computes that are padding: rows padded to the longest (`padded`), and
    the rows packed end to end (`packed`, learner.pack_sequences; losses/hidden.py: packed_width)."""
    lengths = attention_mask_BL.sum(-1).tolist()
    width, packed_row = attention_mask_BL.shape[1], packed_width(attention_mask_BL.shape[1])
    real = float(sum(lengths))
    padded, packed = float(len(lengths) * width), float(len(pack_rows(lengths, packed_row)) * packed_row)
    return {"padding_share/padded": (padded - real, padded), "padding_share/packed": (packed - real, packed)}


def token_teacher_ids(batch: RolloutBatch, tokens: TokenBatch) -> torch.Tensor:
    """The teacher index of each flat response token (TokenBatch order: sequence, then position)."""
    mask_BT = batch.response_mask_BL[:, 1:].bool()
    return batch.teacher_id_B[:, None].expand(mask_BT.shape)[mask_BT].to(tokens.target_ids_N.device)


def per_teacher_metrics(
    share: RankShare,
    per_token: dict[str, torch.Tensor],
    token_losses: list[torch.Tensor] | None,
    teacher_names: tuple[str, ...],
    on_student_samples: bool,
    repetitive_B: torch.Tensor,
) -> dict[str, Any]:
    """`teacher/<name>/...`: the step's statistics, diagnostics (not per position) and token-mean loss over the
    rows each teacher scored, as (sum, count) pairs; a teacher with no rows on this rank reports nothing
    (ranks are combined key by key). Every value is summed per teacher in one pass over the tokens, so the
    cost does not grow with the number of teachers."""
    batch, tokens = share.batch, share.tokens
    if batch.teacher_id_B is None or not teacher_names:
        return {}
    teachers = len(teacher_names)
    ids_N = token_teacher_ids(batch, tokens)
    token_counts = torch.bincount(ids_N, minlength=teachers).tolist()
    sums = {
        key: sum_by(values_N, ids_N, teachers)
        for key, values_N in per_token_values(per_token, tokens, token_losses, on_student_samples).items()
    }
    ids_B = batch.teacher_id_B
    row_counts = torch.bincount(ids_B, minlength=teachers).tolist()
    row_sums = {"cut_off_share": sum_by((~batch.finished_B).double(), ids_B, teachers)}
    row_sums["repetitive_share"] = sum_by(repetitive_B.double(), ids_B, teachers)
    answered = None
    if batch.task_rewards_B is not None:
        answered_B = ~batch.task_rewards_B.isnan()
        row_sums["sample_reward"] = sum_by(batch.task_rewards_B.nan_to_num(0.0), ids_B, teachers)
        answered = sum_by(answered_B.double(), ids_B, teachers)
    metrics: dict[str, Any] = {}
    for t, name in enumerate(teacher_names):
        if not row_counts[t]:
            continue
        own = {key: (values[t], float(token_counts[t])) for key, values in sums.items()}
        own.update({key: (values[t], float(row_counts[t])) for key, values in row_sums.items()})
        if answered is not None:
            own["sample_reward"] = (row_sums["sample_reward"][t], answered[t])
        own.update(response_tokens=token_counts[t], sequences=row_counts[t])
        own["truncated_responses"] = int(row_sums["cut_off_share"][t])
        metrics.update({f"teacher/{name}/{key}": value for key, value in own.items()})
    return metrics


def per_token_values(
    per_token: dict[str, torch.Tensor],
    tokens: TokenBatch,
    token_losses: list[torch.Tensor] | None,
    on_student_samples: bool,
) -> dict[str, torch.Tensor]:
    """The per-token values behind a step's token-mean metrics, by metric name: `token_mean_values`, the
    diagnostics (not by position), the loss and the entropy gate's kept share."""
    values = token_mean_values(per_token, tokens, on_student_samples)
    values.update({f"diag/{k.split(':', 1)[1]}": v for k, v in per_token.items() if k.startswith("diag:")})
    if token_losses:
        values["loss"] = torch.cat(token_losses)
    if tokens.keep_N is not None:
        values["gate/kept_fraction"] = tokens.keep_N
    return values


def sum_by(values: torch.Tensor, groups: torch.Tensor, count: int) -> list[float]:
    """Sums of `values` per group id (0..count-1), in float64."""
    totals = torch.zeros(count, dtype=torch.float64, device=values.device)
    return totals.index_add_(0, groups.to(values.device), values.double()).tolist()


def step_loss(
    models: StepModels,
    full: RolloutBatch,
    algorithm: AlgorithmSpec,
    rank: int,
    world_size: int,
    diagnostics_k: int | None = None,
    step: int = 1,
    teacher_names: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """This rank's share of the step's loss (with grad, ready for backward) and of its metrics; with
    `teacher_names` (the run's teachers, by index) also per teacher.

    The output head runs once per chunk for the loss, and its logits also give the statistics
    and diagnostics; only a vOPD baseline or an entropy gate (which change the loss) need a
    no-grad pass first. At a 151k vocabulary a small model is mostly output head."""
    share = rank_share(full, algorithm, rank, world_size, models.device)
    hidden_NH = response_hidden_states(models.student, share.batch, models.device, models.pack)
    teacher_hidden_NH = None
    if models.teacher is not None:
        with torch.no_grad():
            teacher_hidden_NH = response_hidden_states(models.teacher, share.batch, models.device, models.pack)
    on_student_samples = share.batch.source == "student"
    if not on_student_samples:  # dataset answers have no sampling log-probs to correct against
        algorithm = algorithm.model_copy(update={"importance_cap": None})
    wanted = wanted_values(share.tokens, algorithm, diagnostics_k, on_student_samples)
    collector = None
    if wanted.before_loss:
        per_token = values_pass(models, hidden_NH, share.tokens, wanted)
        share.tokens = finish_token_batch(share.tokens, per_token, share.mask_BT, algorithm)
    else:
        share.tokens = finish_token_batch(share.tokens, {}, share.mask_BT, algorithm)
        collector = ValueCollector(wanted)
    reverse_weight = forward_to_reverse_weight(step, algorithm.anneal_steps)
    token_losses: list[torch.Tensor] | None = [] if teacher_names else None
    loss = chunked_loss(
        hidden_NH,
        models.student_head,
        share.tokens,
        algorithm,
        models.chunk_tokens,
        teacher_hidden_NH,
        models.teacher_head,
        reverse_weight,
        observe=None if collector is None else collector.collect,
        token_losses=token_losses,
    )
    if collector is not None:
        per_token = collector.values()
    metrics = token_statistics(per_token, share.tokens, on_student_samples)
    repetitive_B = repetitive_rows(share.batch)
    metrics.update(batch_counts(share.batch, share.tokens, repetitive_B))
    metrics.update(per_teacher_metrics(share, per_token, token_losses, teacher_names, on_student_samples, repetitive_B))
    if algorithm.divergence == "forward_to_reverse":
        metrics["reverse_kl_weight"] = (reverse_weight, 1.0)  # a (sum, count) pair: the same on every rank
    return loss, metrics


def diagnose(
    models: StepModels,
    full: RolloutBatch,
    algorithm: AlgorithmSpec,
    rank: int,
    world_size: int,
    diagnostics_k: int,
    teacher_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A step's metrics and diagnostics without a loss (`opd-ray probe`): what step 1 of a run would log,
    per teacher too with `teacher_names`."""
    share = rank_share(full, algorithm, rank, world_size, models.device)
    with torch.no_grad():
        hidden_NH = response_hidden_states(models.student, share.batch, models.device)
    wanted = wanted_values(share.tokens, algorithm, diagnostics_k, on_student_samples=True)
    per_token = values_pass(models, hidden_NH, share.tokens, wanted)
    metrics = token_statistics(per_token, share.tokens, True)
    metrics["response_tokens"] = share.batch.num_response_tokens
    metrics["sequences"] = share.batch.num_sequences
    metrics.update(per_teacher_metrics(share, per_token, None, teacher_names, True, repetitive_rows(share.batch)))
    return metrics


SAME_ON_EVERY_RANK = ("lr", "skipped_update", "grad_norm")
SLOWEST_RANK = ("time/learner_fetch", "time/learner_compute")  # the step waits for the slowest rank


def combine_rank_metrics(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """Ranks report shares of a global mean (added) or (sum, count) pairs (added, then divided). A key only
    some ranks report (a teacher with rows on some ranks) is combined over those."""
    keys = list(dict.fromkeys(key for r in per_rank for key in r))
    totals: dict[str, float] = {}
    for key in keys:
        values = [r[key] for r in per_rank if key in r]
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
