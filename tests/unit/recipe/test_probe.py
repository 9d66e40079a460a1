"""`opd-ray probe`: the verdict's rules."""

from __future__ import annotations

import pytest

from opd_ray.recipe.probe import judge
from opd_ray.spec import ProbeSpec

RULES = ProbeSpec(min_overlap=0.6, min_accuracy_gap=0.05)


def test_both_conditions_met_is_likely_to_help() -> None:
    verdict = judge(0.8, 0.9, 0.5, RULES, k=16)
    assert verdict.likely_to_help
    assert verdict.reasons == [
        "they think alike: overlap ratio@16 0.80 >= 0.6",
        "the teacher knows more: accuracy 0.900 vs the student's 0.500 (gap +0.400 >= 0.05)",
    ]


@pytest.mark.parametrize(
    ("overlap", "teacher", "student", "failing"),
    [(0.4, 0.9, 0.5, "they think differently"), (0.9, 0.52, 0.5, "little to teach"), (0.3, 0.5, 0.6, "both")],
)
def test_either_condition_failing_says_which_and_what_to_do(
    overlap: float, teacher: float, student: float, failing: str
) -> None:
    verdict = judge(overlap, teacher, student, RULES, k=4)
    assert not verdict.likely_to_help
    text = " ".join(verdict.reasons)
    if failing in ("they think differently", "both"):
        assert "they think differently: overlap ratio@4" in text and "cold start" in text
    if failing in ("little to teach", "both"):
        assert "little to teach" in text and "stronger teacher" in text


def test_without_answers_only_the_overlap_decides_and_the_gap_is_said_unmeasured() -> None:
    verdict = judge(0.7, None, None, RULES, k=16)
    assert verdict.likely_to_help
    assert "not measured" in verdict.reasons[1]


def test_a_candidate_spec_brings_its_teachers_own_settings_and_must_share_student_and_data(tiny_dir, tmp_path) -> None:
    """`--teacher SPEC.yaml`: another family's teacher comes with its prompt format; the comparison is only one
    if the student and the data are the probed spec's."""
    import yaml

    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.errors import UserError
    from opd_ray.recipe.probe import check_candidates
    from opd_ray.spec import ExperimentSpec
    from tests.conftest import tiny_spec_dict

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    spec = ExperimentSpec.model_validate(raw)
    inputs = load_run_inputs(spec)
    other = {**raw, "teacher": {**raw.get("teacher", {}), "prompt_template": "1+{prompt}"}}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    own, candidate = check_candidates(spec, inputs, [str(path)])
    assert own.spec is spec and candidate.spec.teachers["teacher"].prompt_template == "1+{prompt}"
    assert candidate.inputs.train.teacher_prompts([0])[0] != inputs.train.prompt_ids[0]  # its own prompt
    assert candidate.spec.run == spec.run  # writes nothing of its own

    path.write_text(yaml.safe_dump({**other, "data": {**raw["data"], "prompt_template": "{prompt}="}}))
    with pytest.raises(UserError, match=r"--teacher #1 \(.*other.yaml\): its data differs"):
        check_candidates(spec, inputs, [str(path)])
