"""The shared model cache's lock: a run reading built models is never rebuilt under, a build in progress is
waited for, and a dead holder never leaves the cache locked. The other processes are real ones this test
starts (and ends by the pid it holds)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_ray.errors import UserError
from opd_ray.recipe import model_cache

HOLDER = """
import fcntl, json, os, socket, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX if sys.argv[2] == "build" else fcntl.LOCK_SH)
if sys.argv[2] == "build":
    handle.truncate(0); handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()})); handle.flush()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
if sys.argv[2] == "build":
    open(sys.argv[4], "w").write("built by the other process")
    handle.truncate(0); handle.flush()
    fcntl.flock(handle, fcntl.LOCK_SH)  # and goes on reading its models (a run training on them)
    print("built", flush=True)
    time.sleep(float(sys.argv[5]))
"""


@pytest.fixture(autouse=True)
def fresh_holds(monkeypatch):
    """Each test is a new process as far as the cache is concerned."""
    monkeypatch.setattr(model_cache, "HELD", {})
    monkeypatch.setattr(model_cache, "READERS_GRACE_S", 0.5)


def other_process(
    root: Path, mode: str, seconds: float, marker: Path | None = None, reads_after: float = 0
) -> subprocess.Popen:
    """A process holding the cache: `read`, or `build` for `seconds`, then reading `reads_after` seconds more."""
    root.mkdir(parents=True, exist_ok=True)
    lock = str(root / model_cache.LOCK_FILE)
    args = [sys.executable, "-c", HOLDER, lock, mode, str(seconds), str(marker), str(reads_after)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_rebuild_under_a_reading_run_is_refused_and_reading_alongside_it_is_not(tmp_path: Path) -> None:
    reader = other_process(tmp_path, "read", 30)
    built: list = []
    try:
        model_cache.ensure_built(tmp_path, lambda: [], built.append, wait_s=10)  # nothing to build: reads too
        with pytest.raises(UserError, match="another opd-ray process is using them"):
            model_cache.ensure_built(tmp_path, lambda: ["student"], built.append, wait_s=10)
    finally:
        reader.kill()
        reader.wait()
    assert built == []
    model_cache.ensure_built(tmp_path, lambda: [] if built else ["student"], built.append, wait_s=10)
    assert built == [["student"]], "with the reader gone the build goes ahead"


def test_a_build_in_progress_is_waited_for_and_not_repeated(tmp_path: Path) -> None:
    marker = tmp_path / "model"
    builder = other_process(tmp_path, "build", 2, marker)
    built: list = []
    started = time.monotonic()
    try:
        model_cache.ensure_built(tmp_path, lambda: [] if marker.exists() else ["model"], built.append, wait_s=60)
    finally:
        builder.kill()
        builder.wait()
    assert built == [] and marker.read_text() == "built by the other process"
    assert time.monotonic() - started >= 1


def test_a_waiter_uses_the_models_a_builder_built_while_that_builder_goes_on_training(tmp_path: Path) -> None:
    marker = tmp_path / "model"
    builder = other_process(tmp_path, "build", 1.5, marker, reads_after=30)
    handle = (tmp_path / model_cache.LOCK_FILE).open("a+")
    try:
        # this process found the model missing under its shared hold and asks to build it: the other got there first
        upgraded = model_cache.take_exclusive(handle, tmp_path, 60, lambda: [] if marker.exists() else ["model"])
        assert builder.stdout.readline().strip() == "built" and builder.poll() is None  # still reading
        assert not upgraded and model_cache.try_lock(handle, fcntl.LOCK_SH)  # it reads beside the builder
    finally:
        builder.kill()
        builder.wait()
        handle.close()
    assert marker.read_text() == "built by the other process"


def test_a_killed_builder_leaves_the_cache_usable(tmp_path: Path) -> None:
    builder = other_process(tmp_path, "build", 60)
    builder.kill()
    builder.wait()
    built: list = []
    model_cache.ensure_built(tmp_path, lambda: [] if built else ["model"], built.append, wait_s=5)
    assert built == [["model"]]
    assert (tmp_path / model_cache.LOCK_FILE).read_text() == ""  # no builder recorded after the build


def test_another_seed_never_rewrites_the_task_files_a_running_run_reads(tmp_path: Path, recorded_training) -> None:
    """`run.seed=1` changes the tiny recipe; with a seed-0 run reading the cache, the build is refused and the
    task files stay the seed-0 ones (before the lock they were truncated in place)."""
    from opd_ray.recipe import tiny_models
    from opd_ray.spec import load_spec

    quickstart = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"
    common = [f"models.build_tiny.directory={tmp_path}"]
    tiny_models.ensure_tiny_models(load_spec(quickstart, common))
    train = (tmp_path / "train.jsonl").read_text()
    model_cache.HELD.clear()  # from here on this test is a second process
    reader = other_process(tmp_path, "read", 30)
    try:
        with pytest.raises(UserError, match="another opd-ray process is using them"):
            tiny_models.ensure_tiny_models(load_spec(quickstart, [*common, "run.seed=1"]))
    finally:
        reader.kill()
        reader.wait()
    assert (tmp_path / "train.jsonl").read_text() == train
    assert json.loads((tmp_path / "student" / "build.json").read_text())["seed"] == 0


def test_a_filesystem_without_flock_is_one_line_for_the_cache_and_the_run_directory(tmp_path: Path, monkeypatch):
    import errno

    from opd_ray.driver.run_dir import run_directory_lock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(UserError, match=r"cannot be locked \(No locks available\): the filesystem does not support"):
        model_cache.ensure_built(tmp_path / "cache", lambda: [], lambda todo: None, wait_s=5)
    with pytest.raises(UserError, match=r"cannot be locked .*set run.output_dir"), run_directory_lock(tmp_path / "run"):
        pass
