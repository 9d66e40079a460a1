"""Adding an objective is one record and one function: a toy objective added that way validates in a spec,
refuses keys it does not read, and trains in a learner step, with no other file touched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_ray.errors import SpecError
from opd_ray.losses.objectives import OBJECTIVES, ObjectiveInputs, register_objective, token_logprobs
from opd_ray.losses.step import step_loss
from opd_ray.spec import AlgorithmSpec, load_spec, spec_to_yaml
from opd_ray.spec.objectives import OBJECTIVE_RECORDS, ObjectiveRecord
from tests.conftest import REPO
from tests.unit.losses.test_step import models, scored_batch


# --8<-- [start:toy_objective]
def squared_log_ratio(inputs: ObjectiveInputs, algorithm: AlgorithmSpec) -> torch.Tensor:
    """1/2 (log p(y_t) - log q(y_t))^2 at the sampled token: the "k2" estimator of the reverse KL, whose
    gradient is the sampled-token reverse-KL gradient on the student's own samples."""
    log_p_N = token_logprobs(inputs.student_logits_NV, inputs.tokens.target_ids_N)
    return 0.5 * (log_p_N - inputs.tokens.teacher_logprobs_N) ** 2


TOY = ObjectiveRecord(name="toy_k2", summary="squared log-ratio at the sampled token (a test's toy)")


@pytest.fixture
def toy_objective() -> Iterator[ObjectiveRecord]:
    register_objective(TOY, squared_log_ratio)
    yield TOY
    del OBJECTIVE_RECORDS[TOY.name], OBJECTIVES[TOY.name]


# --8<-- [end:toy_objective]


def test_every_record_has_a_loss_and_every_loss_a_record() -> None:
    assert set(OBJECTIVES) == set(OBJECTIVE_RECORDS)


def test_a_toy_objective_validates_and_refuses_keys_it_does_not_read(toy_objective: ObjectiveRecord) -> None:
    spec = load_spec(REPO / "examples/quickstart.yaml", [f"algorithm.objective={toy_objective.name}"])
    assert spec.algorithm.record is toy_objective
    assert not spec.algorithm.needs_student_topk
    with pytest.raises(SpecError, match=r"algorithm\.clip_eps is read by objective sampled_token only"):
        load_spec(
            REPO / "examples/quickstart.yaml",
            [f"algorithm.objective={toy_objective.name}", "algorithm.clip_eps=1"],
        )


def test_a_toy_objective_trains_in_a_learner_step(toy_objective: ObjectiveRecord, tiny_dir: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "student").float()
    batch = scored_batch()
    loss, _ = step_loss(models(student), batch, AlgorithmSpec(objective=toy_objective.name), rank=0, world_size=1)
    with torch.no_grad():
        logits_BLV = student(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    log_p_BT = torch.log_softmax(logits_BLV[:, :-1], -1).gather(-1, batch.input_ids_BL[:, 1:, None])[..., 0]
    mask_BT = batch.response_mask_BL[:, 1:].bool()
    want = (0.5 * (log_p_BT - batch.teacher_logprobs_BL[:, 1:]) ** 2)[mask_BT].mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)


def test_switching_objective_on_the_command_line_sets_the_file_s_own_keys_aside(
    capsys: pytest.CaptureFixture,
) -> None:
    spec = load_spec(REPO / "examples/smollm2_distill.yaml", ["algorithm.objective=sft"])
    assert spec.algorithm.objective == "sft" and not spec.algorithm.topk_tail
    assert "algorithm.topk_support, algorithm.top_k, algorithm.topk_tail (not read by sft) set aside" in (
        capsys.readouterr().err
    )
    with pytest.raises(SpecError, match=r"algorithm\.topk_tail is read by objective topk only"):
        load_spec(REPO / "examples/smollm2_distill.yaml", ["algorithm.objective=sft", "algorithm.topk_tail=true"])


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_RECORDS))
def test_the_spec_a_run_writes_loads_again_whatever_its_objective(objective: str, tmp_path: Path) -> None:
    """spec.yaml holds every key, other families' at their defaults: those are not refused."""
    spec = load_spec(REPO / "examples/quickstart.yaml", [f"algorithm.objective={objective}"])
    written = tmp_path / "spec.yaml"
    written.write_text(spec_to_yaml(spec))
    assert load_spec(written) == spec
