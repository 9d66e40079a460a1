"""`opd-ray probe` end to end: the measured signals on a case whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


@pytest.mark.integration
def test_probe_of_a_student_against_itself_and_a_second_candidate(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """Teacher = student: the top-k sets coincide (overlap 1, shared mass = top-k mass of each, the same),
    the entropy gap and advantage are ~0, accuracies are equal, and the verdict is "little to teach"."""
    from opd_ray.recipe.probe import run_probe

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["models"]["teacher"] = raw["models"]["student"]
    raw["probe"] = {"prompts": 32, "eval_prompts": 16}
    other = str(tiny_dir / "teacher")  # a second candidate: a random 2-layer model
    result = run_probe(ExperimentSpec.model_validate(raw), [other])

    signals = result["signals"]
    assert result["prompts"] == 32 and result["response_tokens"] > 32
    assert signals["diag/overlap_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert signals["diag/top1_agreement"] == pytest.approx(1.0, abs=1e-3)
    assert signals["diag/overlap_mass_student"] == pytest.approx(signals["diag/overlap_mass_teacher"], abs=1e-4)
    assert abs(signals["diag/overlap_advantage"]) < 1e-4
    assert signals["diag/entropy_gap"] < 1e-3
    assert abs(signals["sampled_reverse_kl"]) < 1e-3
    assert result["teacher_accuracy"] == result["student_accuracy"]
    assert not result["verdict"]["likely_to_help"]
    assert "little to teach" in result["verdict"]["reasons"][1]
    assert json.loads((tmp_path / "run" / "probe.json").read_text()) == result

    # both candidates scored the same student samples; the student itself ranks first (overlap 1)
    ranked = result["candidates"]
    assert [c["teacher"] for c in ranked] == [raw["models"]["student"]["path"], other]
    assert ranked[0]["signals"] == signals
    assert ranked[1]["response_tokens"] == result["response_tokens"] and ranked[1]["prompts"] == 32
    assert ranked[1]["signals"]["diag/overlap_ratio"] < 0.99
    assert ranked[1]["student_accuracy"] == result["student_accuracy"]
