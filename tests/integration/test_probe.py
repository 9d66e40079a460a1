"""`opd-ray probe` end to end: the measured signals on a case whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


@pytest.mark.integration
def test_probe_of_a_student_against_itself(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """Teacher = student: the top-k sets coincide (overlap 1, shared mass = top-k mass of each, the same),
    the entropy gap and advantage are ~0, accuracies are equal, and the verdict is "little to teach"."""
    from opd_ray.recipe.probe import run_probe

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["models"]["teacher"] = raw["models"]["student"]
    raw["probe"] = {"prompts": 32, "eval_prompts": 16}
    result = run_probe(ExperimentSpec.model_validate(raw))

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
