"""Write-aside: a file or directory is either whole under its name or not there at all."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from opd_ray.files import PARTIAL, partial_path, written_aside


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


def test_two_processes_writing_one_name_write_aside_into_files_of_their_own(tmp_path: Path) -> None:
    """Two runs saving the same cache entry at once: each writes its own partial file, and neither removes the
    other's while its writer lives; a dead writer's leftover is cleared by the next write."""
    final = tmp_path / "entry.json"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = final.with_name(f"{PARTIAL}{final.name}.{socket.gethostname()}.{other.pid}")
        theirs.write_text("the other process, mid-write")
        with written_aside(final) as partial:
            assert partial != theirs and theirs.exists()
            partial.write_text("ours")
        assert final.read_text() == "ours" and theirs.exists()
    finally:
        other.kill()
        other.wait()
    with written_aside(final) as partial:
        partial.write_text("again")
    assert not theirs.exists() and final.read_text() == "again"
