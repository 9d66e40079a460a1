"""A torch extension build killed midway leaves its `lock`; later learners must not wait on it forever."""

from __future__ import annotations

import os
import time
from pathlib import Path

from opd_ray.actors.runtime import clear_stale_build_locks


def test_a_lock_older_than_any_build_is_removed_and_a_fresh_one_is_kept(tmp_path: Path, capsys) -> None:
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"  # torch's default root nests one folder deeper
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()
    printed = capsys.readouterr().out
    assert "its builder died mid-build" in printed and "build in progress; waiting for it" in printed
