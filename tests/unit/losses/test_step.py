"""A learner rank's step as pure tensor work, on a plain transformers model (no DeepSpeed, no Ray).

The learner actor only adds the backward, the optimizer step and the agreement across ranks;
everything a step computes is checked here: the loss against a direct computation from full
logits, and rank shares that add up to the one-rank numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_ray.losses.batch import ResponseRow, RolloutBatch, batch_from_rows
from opd_ray.losses.step import StepModels, combine_rank_metrics, diagnose, step_loss
from opd_ray.spec import AlgorithmSpec

VOCAB = 15  # the tiny models' character vocabulary


@pytest.fixture(scope="module")
def student(tiny_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_dir / "student").float()


def models(student, chunk_tokens: int = 5) -> StepModels:
    return StepModels(student, student.get_output_embeddings(), "cpu", chunk_tokens)


def scored_batch(seed: int = 0, rows: int = 4) -> RolloutBatch:
    """Random prompts and responses of different lengths, scored by a random full-vocabulary teacher."""
    generator = torch.Generator().manual_seed(seed)
    layout = []
    for b in range(rows):
        prompt = torch.randint(3, VOCAB, (3 + b % 2,), generator=generator).tolist()
        response = torch.randint(3, VOCAB, (2 + b,), generator=generator).tolist()
        logprobs = (-torch.rand(len(response), generator=generator)).tolist()
        layout.append(ResponseRow(prompt, response, prompt_index=b, finished=b % 3 != 0, logprobs=logprobs))
    batch = batch_from_rows(layout)
    teacher_logprobs_BLV = torch.log_softmax(torch.randn(*batch.input_ids_BL.shape, VOCAB, generator=generator), -1)
    response_BL = batch.response_mask_BL
    top = teacher_logprobs_BLV.topk(VOCAB, -1)
    batch.teacher_logprobs_BL = teacher_logprobs_BLV.gather(-1, batch.input_ids_BL[..., None])[..., 0] * response_BL
    batch.teacher_topk_ids_BLK = top.indices * response_BL.long()[..., None]
    batch.teacher_topk_logprobs_BLK = top.values * response_BL[..., None]
    batch.task_rewards_B = torch.tensor([1.0, 0.0, 1.0, 0.0][:rows])
    return batch


def reverse_kl_from_full_logits(student, batch: RolloutBatch) -> torch.Tensor:
    """Mean over response tokens of KL(p || q), from the model's own full logits: no chunks, no supports."""
    with torch.no_grad():
        logits_BLV = student(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    log_p_BTV = torch.log_softmax(logits_BLV[:, :-1].double(), -1)
    order_BTK = batch.teacher_topk_ids_BLK[:, 1:]
    log_q_BTV = torch.empty_like(log_p_BTV).scatter_(-1, order_BTK, batch.teacher_topk_logprobs_BLK[:, 1:].double())
    kl_BT = (log_p_BTV.exp() * (log_p_BTV - log_q_BTV)).sum(-1)
    mask_BT = batch.response_mask_BL[:, 1:].bool()
    return kl_BT[mask_BT].mean()


def test_topk_loss_over_the_whole_vocabulary_is_the_reverse_kl_of_the_full_logits(student) -> None:
    batch = scored_batch()
    algorithm = AlgorithmSpec(objective="topk", topk_support="teacher")
    loss, metrics = step_loss(models(student), batch, algorithm, rank=0, world_size=1)
    assert loss.requires_grad
    assert float(loss.detach()) == pytest.approx(float(reverse_kl_from_full_logits(student, batch)), rel=1e-5)
    assert metrics["response_tokens"] == batch.num_response_tokens == 2 + 3 + 4 + 5
    assert metrics["truncated_responses"] == 2
    assert metrics["sample_reward"] == (2.0, 4.0)


@pytest.mark.parametrize("objective", ["topk", "sampled_token", "sft"])
def test_two_ranks_shares_add_up_to_the_one_rank_loss_and_metrics(student, objective: str) -> None:
    batch = scored_batch(seed=1)
    algorithm = AlgorithmSpec(objective=objective)
    whole_loss, whole = step_loss(models(student), batch, algorithm, 0, 1, diagnostics_k=4)
    shares = [step_loss(models(student, chunk_tokens=3), batch, algorithm, rank, 2, diagnostics_k=4) for rank in (0, 1)]
    summed = float(sum(loss.detach() for loss, _ in shares))
    assert summed == pytest.approx(float(whole_loss.detach()), rel=1e-5, abs=1e-7)
    combined = combine_rank_metrics([metrics for _, metrics in shares])
    single = combine_rank_metrics([whole])
    assert combined.keys() == single.keys()
    for key, value in single.items():
        assert combined[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key  # float32 sums in another order
    assert "diag/overlap_ratio" in single


def test_dataset_rows_have_no_sampling_corrections_to_apply(student) -> None:
    batch = scored_batch(seed=2)
    batch.source = "dataset"
    algorithm = AlgorithmSpec(objective="topk", importance_cap=2.0)
    loss, metrics = step_loss(models(student), batch, algorithm, 0, 1, diagnostics_k=4)
    assert torch.isfinite(loss)
    assert "sampled_reverse_kl" not in metrics  # dataset answers were not sampled
    assert not any(key.startswith("diag/") for key in metrics)  # diagnostics are about student-visited states


def test_diagnose_reports_what_a_step_would_log_without_a_gradient(student) -> None:
    batch = scored_batch(seed=3)
    algorithm = AlgorithmSpec(objective="topk")
    _, logged = step_loss(models(student), batch, algorithm, 0, 1, diagnostics_k=4)
    probed = diagnose(models(student), batch, algorithm, 0, 1, diagnostics_k=4)
    for key in ("diag/overlap_ratio", "diag/top1_agreement", "sampled_reverse_kl", "student_logprob"):
        assert probed[key] == pytest.approx(logged[key])
