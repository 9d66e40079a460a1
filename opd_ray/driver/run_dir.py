"""The run directory: one process at a time, and a previous run's results are never silently replaced.

A second `opd-ray train` into a directory that holds results is refused unless the user says what
to do with them: `--resume` continues that run, `--overwrite` deletes its results first. An
exclusive lock (`flock` on `.opd-ray.lock`) keeps a second process out while a run is using the
directory; the kernel drops the lock when its holder dies, so a lock left by a killed run is
simply taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from opd_ray.console import console
from opd_ray.errors import UserError
from opd_ray.files import remove

LOCK_FILE = ".opd-ray.lock"
# What a run leaves that another run must not clobber; the rest (spec.yaml, placement.json) is rewritten.
RESULTS = ("summary.json", "metrics.jsonl", "checkpoints", "stages", "student")
# Also removed by --overwrite: records of the old run that would otherwise mix with the new one's.
# trackers.json goes so that a new run starts new tracked runs; W&B's offline runs (wandb/) are left for
# `wandb sync`: each has its own id, so they never mix.
RECORDS = (
    "spec.yaml",
    "placement.json",
    "selection.json",
    "teacher_agreement.json",
    "tensorboard",
    "probe.json",
    "trackers.json",
)

Mode = Literal["new", "resume", "overwrite"]


# What the OPD stage itself recorded: a resume without a checkpoint would start over and replace these.
TRAINING_RECORDS = ("metrics.jsonl", "summary.json", "student")


def previous_results(run_dir: Path, names: tuple[str, ...] = RESULTS) -> list[str]:
    """The result files and folders in `run_dir` (of `names`) that hold something."""
    found = []
    for name in names:
        path = run_dir / name
        if (path.is_file() and path.stat().st_size > 0) or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def refuse_to_clobber(run_dir: Path, mode: Mode) -> None:
    """A new run into a directory with results stops here; --overwrite removes them first; --resume needs
    something to continue (HF Trainer's "no valid checkpoint found")."""
    found = previous_results(run_dir)
    if mode == "resume" and not found:
        raise UserError(
            f"--resume: {run_dir} holds no run to continue (no checkpoint, finished stage or metrics); "
            "run without --resume to start one"
        )
    if not found or mode == "resume":
        return
    if mode == "new":
        raise UserError(
            f"{run_dir} holds a previous run's results ({', '.join(found)}): pass --resume to continue that run, "
            "--overwrite to delete them, or set run.output_dir to a new directory"
        )
    console.print(f"--overwrite: deleting the previous run's results in {run_dir} ({', '.join(found)})")
    for name in (*RESULTS, *RECORDS):
        remove(run_dir / name)


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Holds `run_dir`'s exclusive lock for the block; another live holder is named in the refusal."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"{run_dir} is in use by {holder} (lock {path}); wait for it, stop it, or set run.output_dir "
                "to another directory"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem mounted without flock (some NFS, FUSE)
            raise UserError(
                f"{path}: cannot be locked ({exc.strerror}): the filesystem does not support flock; set "
                "run.output_dir to a filesystem that does (a local disk, or NFS with locking)"
            ) from None
        handle.seek(0)
        stale = handle.read().strip()
        if stale:
            console.print(f"{run_dir}: taking over the lock left by {stale}, which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # an empty lock file: nobody to name as stale
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def in_ray_job_copy(directory: Path) -> bool:
    """`ray job submit --working-dir` runs the command in Ray's temporary copy of that folder
    (/tmp/ray/session_*/runtime_resources/working_dir_files/...), which Ray deletes with the session."""
    return "runtime_resources" in directory.parts


def run_directory(output_dir: str | Path) -> Path:
    """`run.output_dir` made absolute, before anything is written: refused when it would land in Ray's
    temporary copy of a job's working directory, or when it names a file."""
    path = Path(output_dir)
    if not path.is_absolute() and in_ray_job_copy(Path.cwd()):
        raise UserError(
            f"run.output_dir {output_dir!r} is relative, and this command runs in Ray's temporary copy of the "
            f"job's working directory ({Path.cwd()}), which Ray deletes: set run.output_dir to an absolute path "
            "on storage every node shares, e.g. run.output_dir=/shared/runs/<name>"
        )
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"run.output_dir: {path} is a file, not a directory: name a directory for the run")
    return path


@contextmanager
def claimed(run_dir: Path, mode: Mode) -> Iterator[Path]:
    """The run directory, made absolute, locked for this process and checked for a previous run's results."""
    run_dir = run_directory(run_dir)
    with run_directory_lock(run_dir):
        refuse_to_clobber(run_dir, mode)
        yield run_dir
