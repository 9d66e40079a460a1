"""Checkpoints that survive a kill at any moment: written aside, then renamed into place.

A checkpoint is `run_dir/checkpoints/step_00000050/` holding the student in Hugging Face
format (`student/`, safetensors), the DeepSpeed engine state (`deepspeed/`: weights,
optimizer, scheduler, per rank) and `trainer_state.json` (step, weight version, data-order
position, the accuracies measured before training). Everything is written under a
`.partial-` name first; only a complete directory is renamed to `step_*`, and a rename is
atomic, so a kill mid-write leaves the previous checkpoint the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFIX = "step_"
PARTIAL = ".partial-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the driver needs, beside the learners' state, to continue exactly where it stopped."""

    step: int
    weight_version: int
    sampler_epoch: int
    sampler_position: int
    summary: dict = field(default_factory=dict)  # accuracies measured before training

    def write(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def read(directory: Path) -> TrainerState:
        return TrainerState(**json.loads((directory / STATE_FILE).read_text()))


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones never carry the `step_` name)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(run_dir: Path, state: TrainerState, write_contents: Callable[[Path], None], keep: int) -> Path:
    """`write_contents(tmp_dir)` writes the heavy parts (the learners do); then the state file,
    an fsync of the state, the atomic rename, and pruning down to the newest `keep`."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:08d}"
    partial = root / f"{PARTIAL}{final.name}"
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier kill
    partial.mkdir()
    write_contents(partial)
    state.write(partial)
    with open(partial / STATE_FILE) as handle:
        os.fsync(handle.fileno())
    if final.exists():  # re-reaching a step after a resume from an older checkpoint
        shutil.rmtree(final)
    os.rename(partial, final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
