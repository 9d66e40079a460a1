"""The one container that travels between roles (by ObjectRef): rollout -> teacher -> learner.

Every per-token tensor is aligned to `input_ids_BL`: entry [b, i] describes the token at
position i of sequence b (the token the model predicted from positions < i). Suffixes give
the axes: B sequences, L positions, K top-k candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    input_ids_BL: torch.Tensor  # long, prompt then response, right-padded
    attention_mask_BL: torch.Tensor  # 1 on real tokens
    response_mask_BL: torch.Tensor  # 1 on sampled response tokens (the training targets)
    rollout_logprobs_BL: torch.Tensor  # float, log p_old(y_t) at sampling time; 0 off-response
    prompt_index_B: torch.Tensor  # long, row of the prompt in the dataset
    finished_B: torch.Tensor  # bool, response ended with end-of-sequence (not truncated)
    weight_version: int
    student_topk_ids_BLK: torch.Tensor | None = None  # sampling-time student top-k ids, if asked for
    task_rewards_B: torch.Tensor | None = None  # verifier score of each response, if answers are known
    source: str = "student"  # "student" samples, or "dataset" reference answers (GKD's off-policy share)
    teacher_logprobs_BL: torch.Tensor | None = None  # log q(y_t)
    teacher_topk_ids_BLK: torch.Tensor | None = None  # teacher's top-k token ids per position
    teacher_topk_logprobs_BLK: torch.Tensor | None = None
    teacher_logprobs_at_student_topk_BLK: torch.Tensor | None = None  # transformers backend only
    teacher_id_B: torch.Tensor | None = None  # long: which of the run's teachers scored each row (its index)
    teacher_coef_B: torch.Tensor | None = None  # that teacher's loss coefficient
    aligned_BL: torch.Tensor | None = None  # cross-tokenizer teachers: 1 where a token is one aligned chunk alone
    advantages_BL: torch.Tensor | None = None  # set by the learner over the whole batch, before sharding
    task_advantages_B: torch.Tensor | None = None  # likewise

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids_BL.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BL.sum())

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        """Rows of every per-sequence tensor: how a learner rank takes its shard."""
        updates = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                updates[f.name] = value[rows]
        return replace(self, **updates)

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Joins shards from several rollout workers, padding to the longest sequence.

        In asynchronous mode shards of one step may come from different weight versions: the
        joined batch carries the oldest (each row keeps its own sampling log-probs)."""
        if len(batches) == 1:
            return batches[0]
        sources = {b.source for b in batches}
        if len(sources) != 1:
            raise ValueError(f"cannot join batches of different sources {sorted(sources)}")
        length = max(b.input_ids_BL.shape[1] for b in batches)
        joined = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            if f.name == "weight_version":
                joined[f.name] = min(values)
            elif f.name == "source":
                joined[f.name] = values[0]
            elif f.name == "aligned_BL" and any(v is not None for v in values):
                # rows of a same-tokenizer teacher beside a cross-tokenizer one: every position is aligned
                values = [b.response_mask_BL if v is None else v for b, v in zip(batches, values, strict=True)]
                joined[f.name] = torch.cat([_pad_positions(v, length) for v in values])
            elif any(v is None for v in values):
                joined[f.name] = None
            elif values[0].dim() == 1:
                joined[f.name] = torch.cat(values)
            else:
                joined[f.name] = torch.cat([_pad_positions(v, length) for v in values])
        return RolloutBatch(**joined)


def _pad_positions(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    pad_shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=1)


@dataclass
class ResponseRow:
    """One prompt and one response, before layout: a student sample or a dataset's reference answer."""

    prompt_ids: list[int]
    response_ids: list[int]  # end-of-sequence included when the response finished
    prompt_index: int = -1  # row of the prompt in the dataset
    finished: bool = True
    logprobs: list[float] | None = None  # sampling-time log-probs of the response tokens
    topk_ids: list[list[int]] | None = None  # sampling-time student top-k ids per response token


def batch_from_rows(
    rows: list[ResponseRow], weight_version: int = 0, source: str = "student", top_k_ids: int = 0
) -> RolloutBatch:
    """Lays rows out right-padded, per-token values aligned to input positions; zeros where a row has none.

    `top_k_ids` > 0 adds the student's sampling-time top-k ids (topk objectives on the student's support)."""
    length = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    batch_size = len(rows)
    input_ids_BL = torch.zeros(batch_size, length, dtype=torch.long)
    attention_mask_BL = torch.zeros(batch_size, length, dtype=torch.long)
    response_mask_BL = torch.zeros(batch_size, length)
    rollout_logprobs_BL = torch.zeros(batch_size, length)
    student_topk_ids_BLK = torch.zeros(batch_size, length, top_k_ids, dtype=torch.long) if top_k_ids else None
    for b, row in enumerate(rows):
        start, end = len(row.prompt_ids), len(row.prompt_ids) + len(row.response_ids)
        input_ids_BL[b, :end] = torch.tensor(row.prompt_ids + row.response_ids)
        attention_mask_BL[b, :end] = 1
        response_mask_BL[b, start:end] = 1
        if row.logprobs:
            rollout_logprobs_BL[b, start:end] = torch.tensor(row.logprobs)
        if student_topk_ids_BLK is not None and row.topk_ids:
            student_topk_ids_BLK[b, start:end] = torch.tensor(row.topk_ids)
    return RolloutBatch(
        input_ids_BL=input_ids_BL,
        attention_mask_BL=attention_mask_BL,
        response_mask_BL=response_mask_BL,
        rollout_logprobs_BL=rollout_logprobs_BL,
        prompt_index_B=torch.tensor([r.prompt_index for r in rows], dtype=torch.long),
        finished_B=torch.tensor([r.finished for r in rows], dtype=torch.bool),
        weight_version=weight_version,
        student_topk_ids_BLK=student_topk_ids_BLK,
        source=source,
    )


def supervised_batch(rows: list[tuple[list[int], list[int]]], prompt_index: list[int] | None = None) -> RolloutBatch:
    """Prompt + reference answer (end-of-sequence included in the answer ids); loss on the answer only."""
    indices = prompt_index or [-1] * len(rows)
    return batch_from_rows(
        [ResponseRow(prompt, answer, index) for (prompt, answer), index in zip(rows, indices, strict=True)],
        source="dataset",
    )


def response_values(values_BL: torch.Tensor, from_mask_BL: torch.Tensor, to_mask_BL: torch.Tensor) -> torch.Tensor:
    """Per-token values moved from one layout of the same responses to another (other prompts before them):
    the k-th response token of a row keeps its value; everything off the responses is zero."""
    out = values_BL.new_zeros((*to_mask_BL.shape, *values_BL.shape[2:]))
    out[to_mask_BL.bool()] = values_BL[from_mask_BL.bool()]
    return out


PER_TOKEN_FIELDS = (
    "rollout_logprobs_BL",
    "student_topk_ids_BLK",
    "teacher_logprobs_BL",
    "teacher_topk_ids_BLK",
    "teacher_topk_logprobs_BLK",
    "teacher_logprobs_at_student_topk_BLK",
    "advantages_BL",
)


def with_prompts(batch: RolloutBatch, prompts_P: dict[int, list[int]]) -> RolloutBatch:
    """The batch's responses after other prompts (a teacher's own, e.g. with the reference answer shown):
    what that teacher scores. Its per-token values follow the response tokens; `scores_from` maps back."""
    rows = [
        ResponseRow(prompts_P[int(index)], ids[mask.bool()].tolist(), int(index))
        for ids, mask, index in zip(batch.input_ids_BL, batch.response_mask_BL, batch.prompt_index_B, strict=True)
    ]
    laid_out = batch_from_rows(rows)
    moved = {
        name: response_values(getattr(batch, name), batch.response_mask_BL, laid_out.response_mask_BL)
        for name in PER_TOKEN_FIELDS
        if getattr(batch, name) is not None
    }
    return replace(
        batch,
        input_ids_BL=laid_out.input_ids_BL,
        attention_mask_BL=laid_out.attention_mask_BL,
        response_mask_BL=laid_out.response_mask_BL,
        **moved,
    )


TEACHER_FIELDS = (
    "teacher_logprobs_BL",
    "teacher_topk_ids_BLK",
    "teacher_topk_logprobs_BLK",
    "teacher_logprobs_at_student_topk_BLK",
)


def scores_from(batch: RolloutBatch, scored_view: RolloutBatch) -> RolloutBatch:
    """The teacher's scores of `with_prompts(batch, ...)` back on the batch's own layout."""
    moved = {
        name: response_values(getattr(scored_view, name), scored_view.response_mask_BL, batch.response_mask_BL)
        for name in TEACHER_FIELDS
        if getattr(scored_view, name) is not None
    }
    return replace(batch, **moved)
