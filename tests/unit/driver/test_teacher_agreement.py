"""Teacher-aligned prompts: the teacher's confidence per prompt and the fraction kept."""

from __future__ import annotations


def test_teacher_confidence_averages_response_tokens_per_sample_and_groups_by_prompt() -> None:
    import torch

    from opd_ray.driver.teacher_agreement import teacher_confidence
    from opd_ray.losses.batch import RolloutBatch

    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float32)
    teacher = torch.tensor([[0.0, -1.0, -3.0, 0.0], [0.0, 0.0, -0.5, -0.5], [0.0, -4.0, 0.0, 0.0]]) * mask
    batch = RolloutBatch(
        input_ids_BL=torch.zeros(3, 4, dtype=torch.long),
        attention_mask_BL=torch.ones(3, 4, dtype=torch.long),
        response_mask_BL=mask,
        rollout_logprobs_BL=torch.zeros(3, 4),
        prompt_index_B=torch.tensor([7, 7, 2]),
        finished_B=torch.ones(3, dtype=torch.bool),
        weight_version=0,
        teacher_logprobs_BL=teacher,
    )
    assert teacher_confidence(batch) == {7: [-2.0, -0.5], 2: [-4.0]}


def test_top_fraction_keeps_the_best_rounding_up_and_breaks_ties_by_row() -> None:
    from opd_ray.driver.teacher_agreement import top_fraction

    scores = {0: -1.0, 1: -0.2, 2: -0.2, 3: -3.0, 4: -0.1}
    assert top_fraction(scores, 0.4) == [1, 4]
    assert top_fraction(scores, 0.5) == [1, 2, 4]  # ceil(2.5) = 3
    assert top_fraction(scores, 1.0) == [0, 1, 2, 3, 4]
