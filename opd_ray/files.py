"""Files that are either whole or absent: written under a hidden `.partial-` name of the writing process's own,
then renamed into place.

A rename within one directory is atomic, so a process killed mid-write leaves the previous
version (or nothing) under the real name, never half a file: checkpoints, stage outputs,
SFT results, built models and every JSON record go through `written_aside`. Before the rename
the new files and folders are fsynced, and after it the parent folder, so that after a host
crash (not just a killed process) the name points at complete contents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from opd_ray.errors import UserError

PARTIAL = ".partial-"
REPLACED = ".replaced-"
BUILD_RECORD = "build.json"  # what opd-ray writes into every model folder it builds or imports


def writer_tag() -> str:
    """This process, as it names what it writes aside: two processes writing one name never share a file."""
    return f"{socket.gethostname()}.{os.getpid()}"


def partial_path(final: Path) -> Path:
    """Where `final` is written first: the hidden prefix keeps it out of any listing of finished ones, and the
    host and pid make it this process's own (two runs saving one shared cache entry at once)."""
    return final.with_name(f"{PARTIAL}{final.name}.{writer_tag()}")


def aside_path(final: Path) -> Path:
    """Where a replaced folder waits until its successor is in place (this process's own, as partial_path)."""
    return final.with_name(f"{REPLACED}{final.name}.{writer_tag()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_leftovers(final: Path) -> list[Path]:
    """What processes on this host that died mid-write left aside for `final` (a live writer's, or another
    host's on shared storage, are left alone)."""
    host, found = socket.gethostname(), []
    for prefix in (PARTIAL, REPLACED):
        for path in final.parent.glob(f"{prefix}{glob.escape(final.name)}.*"):
            writer_host, _, pid = path.name[len(prefix) + len(final.name) + 1 :].rpartition(".")
            if writer_host == host and pid.isdigit() and not process_alive(int(pid)):
                found.append(path)
    return found


def cache_dir() -> Path:
    """Where opd-ray keeps what it builds or measures once: $OPD_RAY_CACHE, else .cache/opd-ray (as the shipped
    specs' model folders do)."""
    return Path(os.environ.get("OPD_RAY_CACHE", ".cache/opd-ray")).expanduser()


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks (model weights and optimizer states run to GBs)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flushes a file's or a folder's (its entries') contents to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root`, and `root` itself."""
    if root.is_dir():
        for folder, _, files in os.walk(root):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(Path(folder))
    elif root.exists():
        fsync_path(root)


@contextmanager
def written_aside(final: Path, directory: bool = False) -> Iterator[Path]:
    """Yields the partial path to write `final` into (created empty when `directory`); when the block
    completes it is made durable and replaces `final`. A failure leaves the partial path behind and
    `final` untouched."""
    partial = partial_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [partial, *stale_leftovers(final)]:  # this process's failed attempt, or a killed writer's
        remove(leftover)
    if directory:
        partial.mkdir()
    yield partial
    fsync_tree(partial)
    if final.is_dir():  # a directory cannot be replaced by a rename: move it aside first, delete it last
        old = aside_path(final)
        remove(old)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)
    fsync_path(final.parent)


def check_replaceable(folder: Path, field: str) -> None:
    """Refuses to write a model over `folder` unless it is absent, empty or a folder opd-ray built (it holds
    a build.json): a user's folder, a model someone copied in or a directory of other files is never
    deleted to make room."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{field}: {folder} is a file; opd-ray writes a model folder there only where nothing is")
    if any(folder.iterdir()) and not (folder / BUILD_RECORD).is_file():
        raise UserError(
            f"{field}: {folder} holds files opd-ray did not write (no {BUILD_RECORD}); it is never replaced: "
            "name a new folder, or move that one away"
        )


def write_text_durably(path: Path, text: str) -> None:
    """`path.write_text(text)`, but whole or not at all, and on the disk when it returns."""
    with written_aside(path) as partial:
        partial.write_text(text)


def write_json(path: Path, value: object) -> None:
    write_text_durably(path, json.dumps(value, indent=2))


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object a line, written aside: a reader never sees a half-written file."""
    with written_aside(path) as partial:
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows))


MANIFEST_FILE = "manifest.json"


def write_manifest(directory: Path) -> None:
    """{relative path: {size, sha256}} of every file under `directory` (written last: it covers all the others),
    so that whoever loads the folder can check each file it reads against what was written."""
    files = {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(files, indent=1))


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest as {name: {"size": ..., "sha256": ...}} (older ones hold sizes only); None if unreadable."""
    try:
        listed = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(listed, dict):
        return None
    return {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in listed.items()}


def manifest_faults(directory: Path, reads: Callable[[str], bool] = lambda name: True) -> list[str]:
    """What is wrong with the files `reads` selects against the manifest: an unreadable or empty manifest, a file
    listed but missing or changed (sha256), a file present but not listed. [] when they are as written."""
    listed = read_manifest(directory)
    if not listed:
        return [f"{MANIFEST_FILE} is {'empty' if listed == {} else 'missing or unreadable'}"]
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    faults = [f"{name} (not in the manifest)" for name in sorted(present - listed.keys()) if reads(name)]
    for name, entry in listed.items():
        if not reads(name):
            continue
        if name not in present:
            faults.append(f"{name} (missing)")
        elif "sha256" in entry and sha256_file(directory / name) != entry["sha256"]:
            faults.append(f"{name} (changed)")
    return faults
