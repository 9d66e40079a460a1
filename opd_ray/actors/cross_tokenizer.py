"""A teacher with another tokenizer scores the student's text in its own tokens; its numbers come back here.

`teacher_view` turns a batch of student samples into what the teacher reads: its own prompt (tokenized
by its own tokenizer on the driver, data/prompts.py) and the student's response text re-tokenized by
it, with its end-of-sequence token where the student's response ended. `student_scores` brings the
teacher's scores back onto the student's tokens through the byte alignment (data/tokenizer_matching.py):

- the sampled-token value of every student token carries its chunk's reward (`chunk_teacher_logprobs`);
- the teacher's top-k is kept where a chunk is one student token and one teacher token, with ids
  mapped to the student's vocabulary by their text (-1 where the student has no such token); those
  positions are marked in `aligned_BL` (the diagnostics read only them);
- a student token that spans several teacher tokens ("12" against "1" "2") gets its own teacher
  probability, the product of the teacher's conditionals along the span (NeMo-RL's span projection), as
  a top-k of one id: with `algorithm.topk_tail` the top-k objective there compares the two models'
  probability of that token and of everything else;
- every other position (several student tokens in one chunk) has no top-k (ids -1): top-k objectives
  skip it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opd_ray.data.tokenizer_matching import (
    EOS_BYTE,
    Chunk,
    aligned_chunks,
    chunk_teacher_logprobs,
    response_text,
    token_bytes,
    vocabulary_map,
)
from opd_ray.losses.batch import ResponseRow, RolloutBatch, batch_from_rows


class CrossTokenizer:
    """The student's and one teacher's tokenizers, and the match between their vocabularies (built once)."""

    def __init__(self, student_tokenizer, teacher_tokenizer) -> None:
        self.student_table = token_bytes(student_tokenizer)
        self.teacher_table = token_bytes(teacher_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
        self.to_student_V = vocabulary_map(self.teacher_table, self.student_table)
        # one tokenizer, heads of different sizes (padding rows): the student's prompt ids are the teacher's too
        self.same_vocabulary = student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()

    @property
    def shared_tokens(self) -> int:
        return int((self.to_student_V >= 0).sum())

    def teacher_view(
        self, batch: RolloutBatch, teacher_prompts_P: dict[int, list[int]] | None
    ) -> tuple[RolloutBatch, list[list[Chunk]]]:
        """The batch as the teacher reads it (its prompts, the responses in its tokens) and each row's chunks."""
        if teacher_prompts_P is None and not self.same_vocabulary:
            raise ValueError("a cross-tokenizer teacher needs its own prompts (tokenized by its tokenizer)")
        if teacher_prompts_P is None:
            prompt_BL = batch.attention_mask_BL.bool() & ~batch.response_mask_BL.bool()
            teacher_prompts_P = {
                int(i): ids[m].tolist()
                for ids, m, i in zip(batch.input_ids_BL, prompt_BL, batch.prompt_index_B, strict=True)
            }
        rows, alignments = [], []
        eos = self.teacher_tokenizer.eos_token_id
        for ids_L, mask_L, index, finished in zip(
            batch.input_ids_BL, batch.response_mask_BL, batch.prompt_index_B, batch.finished_B, strict=True
        ):
            student_ids = ids_L[mask_L.bool()].tolist()
            text = response_text(student_ids, self.student_table)
            teacher_ids = self.teacher_tokenizer(text, add_special_tokens=False).input_ids
            if student_ids and self.student_table[student_ids[-1]] == EOS_BYTE:
                teacher_ids.append(eos)
            rows.append(ResponseRow(teacher_prompts_P[int(index)], teacher_ids, int(index), bool(finished)))
            alignments.append(
                aligned_chunks(
                    [len(self.student_table[i]) for i in student_ids],
                    [len(self.teacher_table[i]) for i in teacher_ids],
                )
            )
        return batch_from_rows(rows, batch.weight_version, batch.source), alignments

    def student_ids(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids -> student ids with the same text, -1 where none (or past the tokenizer: padding rows)."""
        size = len(self.to_student_V)
        inside = teacher_ids < size
        return torch.where(inside, self.to_student_V[teacher_ids.clamp(max=size - 1)], -1)

    def student_scores(self, batch: RolloutBatch, scored_view: RolloutBatch, alignments: list[list[Chunk]]):
        """The teacher's scores of `teacher_view(batch)` on the student's tokens (see the module docstring)."""
        top_k = scored_view.teacher_topk_ids_BLK.shape[-1]
        teacher_BL = torch.zeros(batch.input_ids_BL.shape)
        ids_BLK = torch.zeros(*batch.input_ids_BL.shape, top_k, dtype=torch.long)
        logprobs_BLK = torch.zeros(*batch.input_ids_BL.shape, top_k)
        aligned_BL = torch.zeros(batch.input_ids_BL.shape)
        for b, chunks in enumerate(alignments):
            student_at = batch.response_mask_BL[b].nonzero()[:, 0]
            teacher_at = scored_view.response_mask_BL[b].nonzero()[:, 0]
            teacher_BL[b, student_at] = chunk_teacher_logprobs(
                batch.rollout_logprobs_BL[b, student_at], scored_view.teacher_logprobs_BL[b, teacher_at], chunks
            )
            ids_BLK[b, student_at] = -1
            for chunk in (c for c in chunks if c.one_student_token_spanning):
                at = student_at[chunk.student_start]
                ids_BLK[b, at, 0] = batch.input_ids_BL[b, at]
                logprobs_BLK[b, at, 0] = teacher_BL[b, at]  # the span's summed log-probs (chunk_teacher_logprobs)
            pairs = [(c.student_start, c.teacher_start) for c in chunks if c.one_to_one]
            if not pairs:
                continue
            student_index, teacher_index = (torch.tensor(side) for side in zip(*pairs, strict=True))
            at_student, at_teacher = student_at[student_index], teacher_at[teacher_index]
            ids_BLK[b, at_student] = self.student_ids(scored_view.teacher_topk_ids_BLK[b, at_teacher])
            logprobs_BLK[b, at_student] = scored_view.teacher_topk_logprobs_BLK[b, at_teacher]
            aligned_BL[b, at_student] = 1.0
        return replace(
            batch,
            teacher_logprobs_BL=teacher_BL,
            teacher_topk_ids_BLK=ids_BLK,
            teacher_topk_logprobs_BLK=logprobs_BLK,
            teacher_logprobs_at_student_topk_BLK=None,
            aligned_BL=aligned_BL,
        )
