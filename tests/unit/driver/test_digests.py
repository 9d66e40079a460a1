"""Content digests (the resume fingerprint, the teacher-accuracy cache): every byte counts, folders are read to
the bottom, and a big file is hashed once per version of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_ray.driver import digests


@pytest.fixture(autouse=True)
def own_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "_remembered", {})


def test_a_changed_byte_in_the_middle_of_a_big_file_changes_the_digest(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    data = bytearray(70 << 20)  # past the 64 MiB from which older builds digested only the edges
    weights.write_bytes(bytes(data))
    before = digests.contents_digest(weights)
    data[35 << 20] = 1  # a fine-tuned copy of the same shape
    weights.write_bytes(bytes(data))
    assert digests.contents_digest(weights) != before


def test_a_folder_digest_covers_its_subfolders_and_leaves_out_hidden_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    before = digests.contents_digest(model)
    (model / ".opd-ray-cache.lock").write_text("pid 1")
    assert digests.contents_digest(model) == before
    (model / "tokenizer" / "vocab.json").write_text('{"b": 0}')
    assert digests.contents_digest(model) != before


def test_a_file_is_hashed_once_per_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Path] = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda path: hashed.append(path) or real(path))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"one")
    first = digests.file_digest(weights)
    monkeypatch.setattr(digests, "_remembered", {})  # another process: the memo on disk answers
    assert digests.file_digest(weights) == first and len(hashed) == 1
    weights.write_bytes(b"two")
    status = weights.stat()
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))  # a coarse clock: a later mtime
    assert digests.file_digest(weights) != first and len(hashed) == 2
