"""Files that are either whole or absent: written under a hidden `.partial-` name, then renamed into place.

A rename within one directory is atomic, so a process killed mid-write leaves the previous
version (or nothing) under the real name, never half a file: checkpoints, stage outputs,
SFT results, built models and every JSON record go through `written_aside`. Before the rename
the new files and folders are fsynced, and after it the parent folder, so that after a host
crash (not just a killed process) the name points at complete contents.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"


def partial_path(final: Path) -> Path:
    """Where `final` is written first; the hidden prefix keeps it out of any listing of finished ones."""
    return final.with_name(PARTIAL + final.name)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


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
    remove(partial)  # left by an earlier kill
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        partial.mkdir()
    yield partial
    fsync_tree(partial)
    if final.is_dir():  # a directory cannot be replaced by a rename
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_path(final.parent)


def write_text_durably(path: Path, text: str) -> None:
    """`path.write_text(text)`, but whole or not at all, and on the disk when it returns."""
    with written_aside(path) as partial:
        partial.write_text(text)


def write_json(path: Path, value: object) -> None:
    write_text_durably(path, json.dumps(value, indent=2))
