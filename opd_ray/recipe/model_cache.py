"""The model cache (`models.build_tiny.directory`, `models.import_pretrained.directory`), shared by processes.

Several runs on one machine read the same built models while another command may want to rebuild
them (another recipe, a changed source). A reader-writer lock (`flock` on `<directory>/.opd-ray-cache.lock`)
keeps them apart: a command that uses the cache holds it shared until the process exits (its actors
read the folders for as long as it runs, restarts included); a build holds it exclusively, and gets
it only when no other process holds it. A build that another process is running is waited for
(`trainer.timeouts.build_wait_s`), then re-checked; a rebuild while another run reads the folders is
refused in one line that names the fix. The kernel drops a dead holder's lock, so a killed build or run
never leaves the cache locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from opd_ray.console import console
from opd_ray.errors import UserError
from opd_ray.files import BUILD_RECORD

LOCK_FILE = ".opd-ray-cache.lock"
READERS_GRACE_S = 5.0  # how long a would-be builder waits for other readers to let go before it refuses
POLL_S = 0.5
HELD: dict[Path, TextIO] = {}  # cache folder -> this process's open lock file (flock is per open file)


def holder(handle: TextIO) -> dict | None:
    """The builder recorded in the lock file, if it still runs (readers record nothing)."""
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "null")
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError):
            return None  # a build killed before it could clear its record
        except PermissionError:
            pass
    return record


def try_lock(handle: TextIO, mode: int) -> bool:
    """Whether the lock was taken; another holder is False, a filesystem that cannot lock is one line."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem mounted without flock (some NFS, FUSE)
        raise UserError(
            f"{handle.name}: cannot be locked ({exc.strerror}): the filesystem does not support flock; put the "
            "model cache (models.build_tiny.directory / models.import_pretrained.directory) on a local disk"
        ) from None


def is_built(folder: Path, record: dict) -> bool:
    """The folder holds a model built from exactly `record` (its build.json): a tiny recipe or an import's source."""
    marker = folder / BUILD_RECORD
    return marker.is_file() and json.loads(marker.read_text()) == record


def check_distinct_folders(wanted: list[tuple], field: str) -> None:
    """Two roles given one folder to build would overwrite each other (a pruned student over its teacher)."""
    seen: dict[Path, str] = {}
    for label, directory, *_ in wanted:
        where = directory.resolve()
        if where in seen:
            raise UserError(
                f"{field}: models.{seen[where]} and models.{label} name the same folder {directory}; "
                "the build would write one over the other: give each its own path"
            )
        seen[where] = label


def hold_shared(root: Path, wait_s: float) -> TextIO:
    """This process's shared hold on `root`, taken once (waiting for a build in progress, bounded)."""
    root = root.resolve()
    if root in HELD:
        return HELD[root]
    root.mkdir(parents=True, exist_ok=True)
    handle = (root / LOCK_FILE).open("a+")
    deadline, announced = time.monotonic() + wait_s, False
    while not try_lock(handle, fcntl.LOCK_SH):
        if time.monotonic() > deadline:
            handle.close()
            raise UserError(
                f"{root} has been locked by another opd-ray build for over {wait_s:g} s "
                "(trainer.timeouts.build_wait_s); wait for it, or set the cache directory to another folder"
            )
        if not announced:
            console.print(f"{root}: waiting for {describe(holder(handle))} to finish building models there")
            announced = True
        time.sleep(POLL_S)
    HELD[root] = handle
    return handle


def describe(record: dict | None) -> str:
    return f"pid {record['pid']} on {record['host']}" if record else "another opd-ray process"


def take_exclusive(handle: TextIO, root: Path, wait_s: float, pending: Callable[[], list]) -> bool:
    """Upgrades this process's hold to exclusive: waits for another process's build (bounded); refuses when
    other processes read the cache (a run whose models would change under it). False when, while it waited,
    another process built what `pending()` listed (that builder goes on reading it: no lock for us to take)."""
    started, announced = time.monotonic(), False
    fcntl.flock(handle, fcntl.LOCK_UN)  # an upgrade is not atomic; letting go lets a racing builder through
    while not try_lock(handle, fcntl.LOCK_EX):
        building, waited = holder(handle), time.monotonic() - started
        if building is None and not pending():
            restore_shared(handle, root, wait_s)
            return False
        if building is None and waited > READERS_GRACE_S:
            restore_shared(handle, root, wait_s)
            raise UserError(
                f"{root}: models there must be (re)built for this spec, but another opd-ray process is using them "
                "(a run or a test reading these folders); wait for it to finish, or set the cache directory "
                "(models.build_tiny.directory / models.import_pretrained.directory) to another folder"
            )
        if waited > wait_s:
            restore_shared(handle, root, wait_s)
            raise UserError(
                f"{root}: {describe(building)} has been building models there for over {wait_s:g} s "
                "(trainer.timeouts.build_wait_s)"
            )
        if building is not None and not announced:
            console.print(f"{root}: waiting for {describe(building)} to finish building models there")
            announced = True
        time.sleep(POLL_S)
    return True


def restore_shared(handle: TextIO, root: Path, wait_s: float) -> None:
    """Takes the shared hold back (a builder may have taken the folder meanwhile: bounded, like every wait)."""
    deadline = time.monotonic() + wait_s
    while not try_lock(handle, fcntl.LOCK_SH):
        if time.monotonic() > deadline:
            raise UserError(
                f"{root}: {describe(holder(handle))} has held the model cache for over {wait_s:g} s "
                "(trainer.timeouts.build_wait_s)"
            )
        time.sleep(POLL_S)


def record_builder(handle: TextIO, record: dict | None) -> None:
    handle.seek(0)
    handle.truncate()
    if record is not None:
        handle.write(json.dumps(record))
    handle.flush()


def ensure_built(root: Path, pending: Callable[[], list], build: Callable[[list], None], wait_s: float) -> None:
    """Builds what `pending()` lists into the cache at `root`, under the exclusive lock, re-checked once held
    (another process may have built it meanwhile); the process keeps reading `root` under its shared hold."""
    handle = hold_shared(root, wait_s)
    if not pending():
        return
    if not take_exclusive(handle, root.resolve(), wait_s, pending):
        return
    try:
        todo = pending()
        if todo:
            record_builder(handle, {"pid": os.getpid(), "host": socket.gethostname()})
            build(todo)
    finally:
        record_builder(handle, None)
        restore_shared(handle, root.resolve(), wait_s)
