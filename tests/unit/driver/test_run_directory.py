"""Where a run's directory lands: never in Ray's temporary copy of a job's working directory, never over a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.driver.run_dir import run_directory
from opd_ray.errors import UserError


def test_a_relative_run_directory_inside_a_ray_job_copy_is_refused(tmp_path: Path, monkeypatch) -> None:
    """`ray job submit --working-dir .` runs the driver in /tmp/ray/session_*/runtime_resources/...: a relative
    run.output_dir would land there and go with the session."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(UserError, match=r"run.output_dir 'runs/x' is relative.*Ray's temporary copy.*absolute"):
        run_directory("runs/x")
    assert run_directory(tmp_path / "runs" / "x") == tmp_path / "runs" / "x"
    assert not (copy / "runs").exists()
    monkeypatch.chdir(tmp_path)
    assert run_directory("runs/x") == tmp_path / "runs" / "x"  # outside a job a relative path is the user's


def test_a_run_directory_that_names_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"run.output_dir: .*notes.txt is a file"):
        run_directory(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
