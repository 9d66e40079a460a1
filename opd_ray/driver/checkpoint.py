"""Checkpoints that survive a kill at any moment: written aside, then renamed into place.

A checkpoint is `run_dir/checkpoints/step_00000050/` holding the student in Hugging Face
format (`student/`, safetensors), the DeepSpeed engine state (`deepspeed/`: weights,
optimizer, scheduler, per rank) and `trainer_state.json` (step, weight version, data-order
position, the accuracies measured before training, the run's fingerprint) and `manifest.json`
(every file, its size and sha256, checked before a resume loads it). Everything is written
under a `.partial-` name first and fsynced; only then is the directory renamed to `step_*`
(atomic), the rename fsynced, and older checkpoints pruned. A kill or a host crash mid-write
leaves the previous checkpoint the latest one, and a checkpoint whose files do not match its
manifest (a disk that lost them) is skipped in favour of the one before.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray.exceptions import RayActorError

from opd_ray.console import console
from opd_ray.driver.fingerprint import check_same_run
from opd_ray.driver.run_dir import TRAINING_RECORDS, previous_results
from opd_ray.errors import RunStopped, UserError
from opd_ray.files import MANIFEST_FILE, manifest_faults, read_manifest, write_manifest, written_aside
from opd_ray.spec import ExperimentSpec

PREFIX = "step_"
STATE_FILE = "trainer_state.json"
# what a resumed run cannot measure again ("teachers": the same, per teacher, when the spec names them)
BEFORE_TRAINING = ("teacher_accuracy", "student_accuracy_before", "teachers")


@dataclass
class TrainerState:
    """What the driver needs, beside the learners' state, to continue exactly where it stopped."""

    step: int
    weight_version: int
    sampler_epoch: int
    sampler_position: int
    summary: dict = field(default_factory=dict)  # accuracies measured before training
    fingerprint: dict = field(default_factory=dict)  # what defines the run (fingerprint.py)
    schedule_steps: int = 0  # the learning-rate schedule's horizon: trainer.steps the run began with (0: older)

    def write(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def read(directory: Path) -> TrainerState:
        return TrainerState(**json.loads((directory / STATE_FILE).read_text()))


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def missing_files(checkpoint: Path) -> list[str]:
    """Files the checkpoint's manifest lists that are absent or of another size; [] when it is whole."""
    listed = read_manifest(checkpoint)
    if not listed:  # unreadable, or empty: a manifest of nothing vouches for nothing
        return [MANIFEST_FILE]
    return [
        name
        for name, entry in listed.items()
        if not ((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == entry["size"])
    ]


def check_contents(checkpoint: Path) -> None:
    """Before anything is loaded (unpickled) from `checkpoint`: every file against its manifest (each learner
    rank checks the files it reads again when it loads them: on another node it reads its own copy)."""
    listed = read_manifest(checkpoint) or {}
    if listed and any("sha256" not in entry for entry in listed.values()):
        console.print(f"[yellow]{checkpoint}: its manifest has no content hashes (an older opd-ray wrote it)[/]")
        return
    older = STATE_FILE not in listed  # written before the manifest covered the state file
    faults = manifest_faults(checkpoint, lambda name: not (older and name == STATE_FILE))
    if faults:
        raise UserError(
            f"checkpoint {checkpoint}: {', '.join(faults[:3])}: not as written (changed or corrupted since); not "
            "loaded. Remove that checkpoint to resume from the one before"
        )


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: partial ones never carry the `step_` name, and one whose files
    do not match its manifest is left out (with a warning) so that resume falls back to the one before."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not (path.is_dir() and path.name.startswith(PREFIX) and (path / STATE_FILE).is_file()):
            continue
        missing = missing_files(path)
        if missing:
            console.print(
                f"[yellow]checkpoint {path} is incomplete (missing or short: {', '.join(missing[:3])}); skipped[/]"
            )
            continue
        found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(run_dir: Path, state: TrainerState, write_contents: Callable[[Path], None], keep: int) -> Path:
    """`write_contents(tmp_dir)` writes the heavy parts (the learners do); then the state file and the
    manifest of them all; `written_aside` fsyncs them all, renames, and fsyncs the rename; only then are older
    checkpoints pruned down to the newest `keep`."""
    final = checkpoint_root(run_dir) / f"{PREFIX}{state.step:08d}"
    with written_aside(final, directory=True) as partial:
        write_contents(partial)
        state.write(partial)
        write_manifest(partial)  # last: it covers every file, the state included
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_point(
    spec: ExperimentSpec, run_dir: Path, resume: bool, force: bool = False
) -> tuple[Path | None, TrainerState | None]:
    """The checkpoint to continue from, once it is known to belong to the run `spec` defines; refuses to
    start over a run that has checkpoints."""
    latest = latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest: {latest.name}): pass --resume to continue that run, "
            "or set run.output_dir to a new directory"
        )
    if resume and latest is None:
        refuse_resume_without_checkpoint(spec, run_dir)
        console.print(f"--resume: no checkpoint in {run_dir} and nothing trained yet; OPD starts at step 1")
    if latest is None:
        return None, None
    state = TrainerState.read(latest)
    check_same_run(state.fingerprint, spec, f"checkpoint {latest}", force)
    if spec.trainer.steps < state.step:
        raise UserError(
            f"--resume: trainer.steps is {spec.trainer.steps} but checkpoint {latest} is at step {state.step}: "
            f"set trainer.steps to {state.step} to finish that run, or more to extend it"
        )
    check_contents(latest)
    return latest, state


def schedule_horizon(spec: ExperimentSpec, state: TrainerState | None) -> int:
    """The steps the learning-rate schedule spans: the trainer.steps a run began with, kept by its checkpoints.
    A resume that extends the run (more trainer.steps) continues at the schedule's final value past its end
    (min_lr_ratio for cosine) instead of pulling the learning rate back up to the middle of a longer cosine."""
    if state is None or not state.schedule_steps:
        return spec.trainer.steps
    if spec.trainer.steps > state.schedule_steps:
        console.print(
            f"trainer.steps {spec.trainer.steps} extends the run's {state.schedule_steps}: the learning rate "
            f"stays at its schedule's final value after step {state.schedule_steps}"
        )
    return state.schedule_steps


def refuse_resume_without_checkpoint(spec: ExperimentSpec, run_dir: Path) -> None:
    """Without a checkpoint a resume would start OPD over and replace what it recorded (metrics.jsonl,
    TensorBoard, summary.json, the student): refused, naming what is there and what would work."""
    recorded = previous_results(run_dir, TRAINING_RECORDS)
    if not recorded:
        return
    every = spec.trainer.checkpoint_every
    why = "checkpoints are off (trainer.checkpoint_every: 0)" if not every else "it never reached a checkpoint"
    raise UserError(
        f"--resume: {run_dir} has no checkpoint to continue from ({why}); resuming would start over and replace "
        f"its {', '.join(recorded)}. Start over with --overwrite, or train further into a new run.output_dir "
        "with models.student.path set to its student/ (set trainer.checkpoint_every to make later runs resumable)"
    )


def save_checkpoint(spec: ExperimentSpec, roles, run_dir: Path, state: TrainerState) -> None:
    """Only finite weights are checkpointed: a poisoned model must never replace a good checkpoint."""
    limit = spec.trainer.timeouts.checkpoint_s
    if not roles.learners.parameters_finite(limit):
        raise RunStopped(f"the student's weights are not finite at step {state.step}; no checkpoint written")

    def learners_write(directory: Path) -> None:
        roles.learners.save_checkpoint(str(directory), spec.models.student.path, limit)

    write_checkpoint(run_dir, state, learners_write, spec.trainer.keep_checkpoints)


def check_shared_storage(learners, run_dir: Path, timeout_s: float, field: str = "run.output_dir") -> None:
    """Before training: every learner rank writes a mark file into the run directory and the driver
    reads it back. On a multi-node cluster without shared storage a rank on another node writes to its
    own disk, and its checkpoint shards (or the SFT student) would never be found; that stops the run
    here, not at resume or after training."""
    token = f".storage-check-{uuid.uuid4().hex[:8]}"
    written = learners.write_storage_mark(str(run_dir), token, timeout_s)
    unseen = [rank for rank, path in enumerate(written) if not Path(path).is_file()]
    for path in written:
        Path(path).unlink(missing_ok=True)
    if unseen:
        raise UserError(
            f"learner ranks {unseen} wrote into {run_dir} on their node, but this node (the driver's) does not see "
            f"the files: {field} must be on storage every node shares (NFS, a mounted bucket), or place the "
            "learners on the driver's node (learner.resources.custom / placement)"
        )


@contextmanager
def learner_death_stops_run(run_dir: Path) -> Iterator[None]:
    """A learner rank's optimizer state dies with it: stop cleanly and point at the last checkpoint."""
    try:
        yield
    except RayActorError as exc:
        last = latest_checkpoint(run_dir)
        resume = f"resume from {last} with --resume" if last else "no checkpoint yet: set trainer.checkpoint_every"
        raise RunStopped(f"a learner rank died ({type(exc).__name__}); {resume}") from None
