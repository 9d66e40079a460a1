"""Teacher scoring service: replicas holding the teacher in vLLM.

For every sampled response token it returns the teacher's log-prob of that token and its
top-k (ids, log-probs) at that state, computed by vLLM's prompt scoring. Only k numbers per
token leave the replica: a full-vocabulary tensor never enters the object store.
"""

from __future__ import annotations

from dataclasses import replace

import ray
import torch

from opd_ray.batch import RolloutBatch
from opd_ray.spec import EngineSpec, ModelSpec
from opd_ray.vllm_engine import Completion, create_engine, greedy, prompt_logprobs


def attach_teacher_scores(batch: RolloutBatch, scored_positions_B: list[list[dict]], top_k: int) -> RolloutBatch:
    batch_size, length = batch.input_ids_BL.shape
    teacher_logprobs_BL = torch.zeros(batch_size, length)
    topk_ids_BLK = torch.zeros(batch_size, length, top_k, dtype=torch.long)
    topk_logprobs_BLK = torch.zeros(batch_size, length, top_k)
    for b, positions in enumerate(scored_positions_B):
        for i in torch.nonzero(batch.response_mask_BL[b]).flatten().tolist():
            entry = positions[i]
            token = int(batch.input_ids_BL[b, i])
            teacher_logprobs_BL[b, i] = entry[token].logprob
            # vLLM adds the actual token to the top-k when it ranks lower; keep ranks 1..k only.
            ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:top_k]
            topk_ids_BLK[b, i] = torch.tensor([t for t, _ in ranked])
            topk_logprobs_BLK[b, i] = torch.tensor([lp.logprob for _, lp in ranked])
    return replace(
        batch,
        teacher_logprobs_BL=teacher_logprobs_BL,
        teacher_topk_ids_BLK=topk_ids_BLK,
        teacher_topk_logprobs_BLK=topk_logprobs_BLK,
    )


@ray.remote
class TeacherScorer:
    def __init__(self, model: ModelSpec, engine: EngineSpec, top_k: int, seed: int) -> None:
        self.llm = create_engine(model, engine, seed)
        self.top_k = top_k

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        sequences = [
            batch.input_ids_BL[b, : int(batch.attention_mask_BL[b].sum())].tolist() for b in range(batch.num_sequences)
        ]
        return attach_teacher_scores(batch, prompt_logprobs(self.llm, sequences, self.top_k), self.top_k)

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
        return greedy(self.llm, prompts_P, max_new_tokens)
