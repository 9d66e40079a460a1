"""Files that are either whole or absent: written under a hidden `.partial-` name, then renamed into place.

A rename within one directory is atomic, so a process killed mid-write leaves the previous
version (or nothing) under the real name, never half a file: checkpoints, stage outputs,
SFT results and built models all go through `written_aside`.
"""

from __future__ import annotations

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


@contextmanager
def written_aside(final: Path, directory: bool = False) -> Iterator[Path]:
    """Yields the partial path to write `final` into (created empty when `directory`); when the block
    completes it replaces `final`. A failure leaves the partial path behind and `final` untouched."""
    partial = partial_path(final)
    remove(partial)  # left by an earlier kill
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        partial.mkdir()
    yield partial
    if final.is_dir():  # a directory cannot be replaced by a rename
        shutil.rmtree(final)
    os.replace(partial, final)
