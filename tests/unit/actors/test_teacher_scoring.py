"""The transformers teacher's scoring, on the tiny shipped teacher (no Ray, no engine): samples of one prompt
scored on top of the prompt's KV cache give what scoring each whole sequence gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_ray.actors.teacher import score_with_transformers
from opd_ray.losses.batch import ResponseRow, batch_from_rows
from opd_ray.losses.hidden import prompt_groups
from opd_ray.recipe.tiny_models import SHIPPED


def sampled_batch(samples: int):
    """Three prompts of different lengths, `samples` responses of different lengths each, rows interleaved
    (row order is the rollout's, not grouped by prompt)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 15, (4 + p,), generator=generator).tolist() for p in range(3)]
    rows = []
    for s in range(samples):
        for p, prompt in enumerate(prompts):
            response = torch.randint(3, 15, (2 + (s + p) % 4,), generator=generator).tolist()
            rows.append(ResponseRow(prompt, response, p, True, [-1.0] * len(response)))
    return batch_from_rows(rows)


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(SHIPPED / "teacher").eval()


def test_rows_are_grouped_by_their_prompt() -> None:
    assert prompt_groups(sampled_batch(samples=3)) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_scoring_each_prompt_once_gives_the_whole_sequence_scores(teacher) -> None:
    batch = sampled_batch(samples=3)
    batch.student_topk_ids_BLK = torch.randint(0, 15, (*batch.input_ids_BL.shape, 4))
    shared = score_with_transformers(teacher, batch, top_k=8, chunk_tokens=5, share_prompts=True)
    whole = score_with_transformers(teacher, batch, top_k=8, chunk_tokens=5, share_prompts=False)
    for name in ("teacher_logprobs_BL", "teacher_topk_logprobs_BLK", "teacher_logprobs_at_student_topk_BLK"):
        torch.testing.assert_close(getattr(shared, name), getattr(whole, name), rtol=1e-4, atol=1e-4, msg=name)
    same_ids = shared.teacher_topk_ids_BLK == whole.teacher_topk_ids_BLK
    assert same_ids[..., :4].float().mean() > 0.99  # ranks can swap only between near-equal candidates
    assert float(shared.teacher_logprobs_BL.abs().sum()) > 0  # real scores, on response positions
    assert not bool((shared.teacher_logprobs_BL * (1 - batch.response_mask_BL)).any())
