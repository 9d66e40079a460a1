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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from opd_ray.actors.runtime import get_or_raise_first
from opd_ray.console import console
from opd_ray.errors import RunStopped, UserError
from opd_ray.files import written_aside
from opd_ray.spec import ExperimentSpec

PREFIX = "step_"
STATE_FILE = "trainer_state.json"
BEFORE_TRAINING = ("teacher_accuracy", "student_accuracy_before")  # what a resumed run cannot measure again


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
    final = checkpoint_root(run_dir) / f"{PREFIX}{state.step:08d}"
    with written_aside(final, directory=True) as partial:
        write_contents(partial)
        state.write(partial)
        with open(partial / STATE_FILE) as handle:
            os.fsync(handle.fileno())
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_point(run_dir: Path, resume: bool) -> tuple[Path | None, TrainerState | None]:
    """The checkpoint to continue from; refuses to start over a run that has checkpoints."""
    latest = latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest: {latest.name}): pass --resume to continue that run, "
            "or set run.output_dir to a new directory"
        )
    if resume and latest is None:
        console.print(f"--resume: no complete checkpoint in {run_dir}, starting at step 1")
    return latest, TrainerState.read(latest) if latest is not None else None


def save_checkpoint(spec: ExperimentSpec, roles, run_dir: Path, state: TrainerState) -> None:
    """Only finite weights are checkpointed: a poisoned model must never replace a good checkpoint."""
    if not all(ray.get(roles.learners.call("parameters_finite"))):
        raise RunStopped(f"the student's weights are not finite at step {state.step}; no checkpoint written")

    def learners_write(directory: Path) -> None:
        get_or_raise_first(roles.learners.call("save_checkpoint", str(directory), spec.models.student.path))

    write_checkpoint(run_dir, state, learners_write, spec.trainer.keep_checkpoints)


@contextmanager
def learner_death_stops_run(run_dir: Path) -> Iterator[None]:
    """A learner rank's optimizer state dies with it: stop cleanly and point at the last checkpoint."""
    try:
        yield
    except RayActorError as exc:
        last = latest_checkpoint(run_dir)
        resume = f"resume from {last} with --resume" if last else "no checkpoint yet: set trainer.checkpoint_every"
        raise RunStopped(f"a learner rank died ({type(exc).__name__}); {resume}") from None
