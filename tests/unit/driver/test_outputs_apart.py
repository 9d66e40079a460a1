"""Outputs never overwrite inputs: a run directory over anything the run reads is refused naming both, and `~`
means the home directory wherever a path is read (the tiny build's own files: tests/unit/recipe/test_tiny_models.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_ray.driver.outputs_apart import check_outputs_apart
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def spec_with(tiny_dir: Path, run_dir: Path) -> ExperimentSpec:
    return ExperimentSpec.model_validate(tiny_spec_dict(tiny_dir, run_dir))


def test_a_run_directory_over_a_model_or_data_the_run_reads_is_refused_naming_both(tiny_dir: Path, tmp_path) -> None:
    check_outputs_apart(spec_with(tiny_dir, tmp_path / "run"))  # apart: fine
    with pytest.raises(UserError, match=r"run.output_dir .* holds models.student \(.*student\)"):
        check_outputs_apart(spec_with(tiny_dir, tiny_dir))  # the folder of the tiny models and task files
    with pytest.raises(UserError, match=r"run.output_dir .* is teachers.teacher.model"):
        check_outputs_apart(spec_with(tiny_dir, tiny_dir / "teacher"))
    with pytest.raises(UserError, match=r"run.output_dir .* lies inside models.student"):
        check_outputs_apart(spec_with(tiny_dir, tiny_dir / "student" / "runs"))


def test_a_spec_file_the_run_would_overwrite_is_refused_unless_the_run_resumes_from_it(tiny_dir, tmp_path) -> None:
    """A user's own spec.yaml in the run directory: record_spec rewrote it, --overwrite deleted it."""
    spec = spec_with(tiny_dir, tmp_path / "run")
    own = tmp_path / "run" / "spec.yaml"
    with pytest.raises(UserError, match=r"holds the spec file"):
        check_outputs_apart(spec, own)
    check_outputs_apart(spec, own, resume=True)  # the run's own record, resumed from
    check_outputs_apart(spec, tmp_path / "spec.yaml")


def test_a_tilde_in_any_path_of_the_spec_is_the_home_directory(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["run"]["output_dir"] = "~/runs/test"
    raw["models"]["student"]["path"] = "~/student"
    raw["data"]["train"]["path"] = "~/train.jsonl"
    spec = ExperimentSpec.model_validate(raw)
    assert spec.run.output_dir == str(tmp_path / "runs" / "test")
    assert spec.models.student.path == str(tmp_path / "student")
    assert spec.data.train.path == str(tmp_path / "train.jsonl")
    assert not (Path.cwd() / "~").exists() and os.path.expanduser("~") == str(tmp_path)
