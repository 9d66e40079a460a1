"""Write-aside: a file or directory is either whole under its name or not there at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.files import partial_path, written_aside


def test_a_completed_write_replaces_the_old_file_and_leaves_nothing_aside(tmp_path: Path) -> None:
    final = tmp_path / "done.json"
    final.write_text("old")
    with written_aside(final) as partial:
        partial.write_text("new")
        assert final.read_text() == "old"  # readers see the old version until the rename
    assert final.read_text() == "new"
    assert not partial_path(final).exists()


def test_a_failed_write_leaves_the_previous_directory_whole(tmp_path: Path) -> None:
    final = tmp_path / "student"
    final.mkdir()
    (final / "weights").write_text("good")
    with pytest.raises(RuntimeError), written_aside(final, directory=True) as partial:
        (partial / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (final / "weights").read_text() == "good"
    with written_aside(final, directory=True) as partial:  # the next attempt clears the leftover
        assert list(partial.iterdir()) == []
        (partial / "weights").write_text("better")
    assert (final / "weights").read_text() == "better"
    assert not partial_path(final).exists()


def test_the_partial_name_is_hidden_and_never_matches_the_final_one(tmp_path: Path) -> None:
    partial = partial_path(tmp_path / "step_00000002")
    assert partial.name.startswith(".") and not partial.name.startswith("step_")
