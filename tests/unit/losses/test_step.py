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
    assert metrics["repetitive_share"] == (0.0, 4.0)  # responses of 2-5 tokens cannot repeat a 4-gram


def test_the_sample_reward_averages_only_rows_with_a_reference_answer(student) -> None:
    batch = scored_batch()
    batch.task_rewards_B = torch.tensor([1.0, float("nan"), 0.0, float("nan")])  # rows 1 and 3 have no answer
    _, metrics = step_loss(models(student), batch, AlgorithmSpec(objective="topk"), rank=0, world_size=1)
    assert metrics["sample_reward"] == (1.0, 2.0)
    assert combine_rank_metrics([metrics])["sample_reward"] == 0.5


def test_a_looping_response_counts_as_repetitive(student) -> None:
    loop = [5, 6, 7, 8] * 4 + [5]  # one 4-gram four times and more
    batch = batch_from_rows(
        [ResponseRow([3, 4], loop, 0, False, [-0.1] * len(loop)), ResponseRow([3], [9, 10], 1, True, [-0.1] * 2)]
    )
    batch.teacher_logprobs_BL = torch.zeros_like(batch.rollout_logprobs_BL)
    _, metrics = step_loss(models(student), batch, AlgorithmSpec(objective="sampled_token"), rank=0, world_size=1)
    assert metrics["repetitive_share"] == (1.0, 2.0)


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


class CountingHead(torch.nn.Module):
    """The student's output head, counting how often a step applies it."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head, self.calls = head, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(hidden)


@pytest.mark.parametrize(
    ("algorithm", "chunk_tokens", "expected_calls"),
    [
        (AlgorithmSpec(objective="topk"), 100, 1),  # statistics folded into the loss pass, no recompute
        (AlgorithmSpec(objective="topk"), 10, 4),  # two checkpointed chunks: forward + recompute each
        (AlgorithmSpec(objective="sampled_token", baseline="vopd"), 100, 2),  # the baseline changes the loss
        (AlgorithmSpec(objective="topk", entropy_gate={"mastered_percentile": 20}), 100, 2),
    ],
)
def test_the_output_head_runs_once_per_chunk_unless_the_loss_needs_values_first(
    student, algorithm: AlgorithmSpec, chunk_tokens: int, expected_calls: int
) -> None:
    head = CountingHead(student.get_output_embeddings())
    step_models = StepModels(student, head, "cpu", chunk_tokens)
    loss, metrics = step_loss(step_models, scored_batch(seed=4), algorithm, 0, 1, diagnostics_k=4)
    loss.backward()
    student.zero_grad(set_to_none=True)
    assert head.calls == expected_calls
    assert "diag/overlap_ratio" in metrics


def loss_gradients_and_metrics(student, chunk_tokens: int, objective: str = "topk"):
    student.zero_grad(set_to_none=True)
    loss, metrics = step_loss(
        models(student, chunk_tokens), scored_batch(seed=5), AlgorithmSpec(objective=objective), 0, 1, 4
    )
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return float(loss.detach()), gradients, metrics


def assert_same_step(got, want) -> None:
    (loss, gradients, metrics), (want_loss, want_gradients, want_metrics) = got, want
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert gradients.keys() == want_gradients.keys() and gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, want_gradients[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("objective", ["topk", "sampled_token"])
def test_checkpointed_chunks_give_the_loss_gradients_and_diagnostics_of_one_plain_chunk(student, objective) -> None:
    assert_same_step(
        loss_gradients_and_metrics(student, 3, objective), loss_gradients_and_metrics(student, 1000, objective)
    )


def test_activation_checkpointing_of_the_decoder_layers_changes_no_number(tiny_dir: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir / "student").float().train()
    checkpointed = AutoModelForCausalLM.from_pretrained(tiny_dir / "student").float().train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert_same_step(loss_gradients_and_metrics(checkpointed, 4), loss_gradients_and_metrics(plain, 4))


def test_per_teacher_metrics_are_each_teachers_rows_alone_and_coefficients_weigh_the_loss(student) -> None:
    """Rows 0 and 2 scored by teacher "a", rows 1 and 3 by "b" (coefficient 3): each teacher's numbers are
    the one-teacher numbers of its rows alone, on one rank or split over two; the loss counts b's tokens 3x."""
    algorithm = AlgorithmSpec(objective="topk")
    batch = scored_batch()
    batch.teacher_id_B = torch.tensor([0, 1, 0, 1])
    names = ("a", "b")
    _, metrics = step_loss(models(student), batch, algorithm, 0, 1, diagnostics_k=4, teacher_names=names)
    for index, name in enumerate(names):
        own = batch.select(batch.teacher_id_B == index)
        own.teacher_id_B = None
        own_loss, alone = step_loss(models(student), own, algorithm, 0, 1, diagnostics_k=4)
        alone = combine_rank_metrics([alone])
        for key in ("teacher_logprob", "student_logprob", "sampled_reverse_kl", "diag/overlap_ratio", "sample_reward"):
            assert metrics[f"teacher/{name}/{key}"][0] / metrics[f"teacher/{name}/{key}"][1] == pytest.approx(
                alone[key], rel=1e-6
            ), (name, key)
        assert metrics[f"teacher/{name}/response_tokens"] == own.num_response_tokens
        loss_sum, loss_tokens = metrics[f"teacher/{name}/loss"]
        assert loss_sum / loss_tokens == pytest.approx(
            float(own_loss.detach()), rel=1e-5
        )  # a token mean, coefficient 1
    split = combine_rank_metrics(
        [step_loss(models(student), batch, algorithm, r, 2, diagnostics_k=4, teacher_names=names)[1] for r in (0, 1)]
    )
    whole = combine_rank_metrics([metrics])
    for key in [k for k in whole if k.startswith("teacher/")]:
        assert split[key] == pytest.approx(whole[key], rel=1e-6), key

    weighted = batch.select(slice(None))
    weighted.teacher_coef_B = torch.tensor([1.0, 3.0, 1.0, 3.0])
    loss_weighted, _ = step_loss(models(student), weighted, algorithm, 0, 1)
    plain, _ = step_loss(models(student), batch, algorithm, 0, 1)
    tokens_b = float(batch.response_mask_BL[batch.teacher_id_B == 1].sum())
    per_token_b = metrics["teacher/b/loss"][0] / metrics["teacher/b/loss"][1]
    expected = float(plain.detach()) + 2 * per_token_b * tokens_b / batch.num_response_tokens
    assert float(loss_weighted.detach()) == pytest.approx(expected, rel=1e-5)


def test_ranks_combine_keys_only_some_of_them_report() -> None:
    combined = combine_rank_metrics([{"x": (2.0, 1.0), "teacher/a/x": (3.0, 1.0)}, {"x": (4.0, 1.0)}])
    assert combined == {"x": 3.0, "teacher/a/x": 3.0}
