"""Content digests of the files and folders a run reads: the resume fingerprint and the teacher-accuracy cache key.

A digest must change whenever the contents do, so every byte is hashed (a digest of a big file's size, head
and tail would miss a fine-tuned copy of the same shape). Hashing a teacher's weights takes seconds per GB,
so a file's sha256 is remembered in `$OPD_RAY_CACHE/digests.json` under its path, size, modification time
and inode: a file rewritten in place changes its mtime, a file replaced by another changes its inode. A folder's
digest covers every file below it, by relative path (hidden names, such as the cache lock and files being
written aside, are left out).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from opd_ray.files import cache_dir, sha256_file, write_json

DIGEST_SCHEME = "sha256 of every byte, folders recursive"  # recorded in fingerprints (fingerprint.py)
_remembered: dict[str, str] = {}


def memo_path() -> Path:
    return cache_dir() / "digests.json"


def identity_of(path: Path) -> str:
    """What says a file is unchanged since it was hashed: its path, size, mtime and inode."""
    status = path.stat()
    return f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}|{status.st_ino}"


def load_memo() -> dict[str, str]:
    try:
        stored = json.loads(memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def file_digest(path: Path) -> str:
    """sha256 of every byte of `path` (first 16 hex digits), hashed once per version of the file."""
    identity = identity_of(path)
    if identity not in _remembered:
        _remembered.update(load_memo())
    if identity not in _remembered:
        _remembered[identity] = sha256_file(path)[:16]
        remember(identity, _remembered[identity])
    return _remembered[identity]


def remember(identity: str, digest: str) -> None:
    """Adds one digest to the memo on disk (another process may have added others meanwhile: kept)."""
    memo = load_memo()
    memo[identity] = digest
    try:
        write_json(memo_path(), memo)
    except OSError:  # a read-only cache: the digest is only recomputed next time
        pass


def visible_files(folder: Path) -> list[Path]:
    """Every file below `folder` whose path has no hidden part, in a fixed order."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def contents_digest(path: Path) -> str:
    """A file's digest, or a folder's (every file below it, by relative path); 'missing' when neither exists."""
    path = path.expanduser()
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for item in visible_files(path):
        digest.update(f"{item.relative_to(path).as_posix()}:{file_digest(item)};".encode())
    return digest.hexdigest()[:16]
