"""Each kind of extension is one registry of records: the names a spec may use are the registry's, and every
record has what runs it (a stage its runner, a tracker its class, a condition its rule)."""

from __future__ import annotations

from opd_ray.health.conditions import CONDITIONS
from opd_ray.recipe.stages import STAGE_RUNNERS
from opd_ray.spec import CONDITION_RECORDS, TRACKER_RECORDS
from opd_ray.spec.objectives import OBJECTIVE_RECORDS
from opd_ray.spec.stages import STAGE_RECORDS
from opd_ray.tracking.run import tracker_type


def test_every_stage_before_opd_has_a_runner_and_opd_runs_last() -> None:
    assert list(STAGE_RECORDS)[-1] == "opd" and set(STAGE_RUNNERS) == set(STAGE_RECORDS) - {"opd"}


def test_every_tracker_record_names_its_class() -> None:
    for name in TRACKER_RECORDS:
        assert tracker_type(name).name == name


def test_the_spec_names_the_conditions_the_doctor_judges() -> None:
    assert set(CONDITION_RECORDS) == set(CONDITIONS)  # never_ends included: trainer.stop_on may name it


def test_every_objective_has_a_loss() -> None:
    from opd_ray.losses.objectives import OBJECTIVES

    assert set(OBJECTIVE_RECORDS) == set(OBJECTIVES)


def test_every_teacher_backend_record_names_its_class() -> None:
    from opd_ray.actors.teacher_backends import backend_class
    from opd_ray.spec.teacher_backends import TEACHER_BACKEND_RECORDS, automatic_backend

    assert {automatic_backend(True), automatic_backend(False)} == {"vllm", "transformers"}
    for record in TEACHER_BACKEND_RECORDS.values():
        assert backend_class(record.implementation).__name__ == record.implementation.partition(":")[2]
