"""The trackers of one run: every step fanned out to them, and trackers.json to continue them on resume.

TensorBoard takes each step as it is written. W&B, MLflow and trackio cannot take a step back, and a
resumed run re-runs the steps after its checkpoint, so they are handed a step once it is durable: when
a checkpoint holds it, when the run ends, or at once when checkpoints are off (nothing can re-run it).
trackers.json records each tracked run's id and the last step it received; a resume reopens that run
and first sends the durable steps it missed (from metrics.jsonl), so each step reaches it once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from opd_ray.errors import UserError
from opd_ray.files import write_json
from opd_ray.spec import ExperimentSpec
from opd_ray.tracking.base import RunIdentity, Tracker, scalars
from opd_ray.tracking.mlflow_tracker import MlflowTracker
from opd_ray.tracking.tensorboard import TensorBoardTracker
from opd_ray.tracking.trackio_tracker import TrackioTracker
from opd_ray.tracking.wandb_tracker import WandbTracker

STATE_FILE = "trackers.json"
TRACKER_TYPES: dict[str, type] = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)}


def warn(message: str) -> None:
    print(f"opd-ray: warning: {message}", file=sys.stderr)


class Trackers:
    """The spec's trackers for one run. A tracker that fails mid-run is dropped with one warning: the run
    goes on, and metrics.jsonl still holds every step."""

    def __init__(self, run_dir: Path, trackers: list[Tracker], state: dict, every_step_durable: bool) -> None:
        self.run_dir, self.trackers, self.state = run_dir, trackers, state
        self.every_step_durable = every_step_durable
        self.pending: list[tuple[int, dict[str, float]]] = []  # steps durable trackers have not received
        self.last_step = 0  # the run's last step so far: where the summary goes

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = scalars(metrics)
        for tracker in self._of_kind(durable_only=False):
            self._call(tracker, "log", step, numbers)
        self.pending.append((step, numbers))
        self.last_step = step
        if self.every_step_durable:  # nothing can re-run a step: no trackers.json to keep (no resume)
            self._hand_on(step)

    def catch_up(self, rows: list[dict[str, Any]], up_to: int) -> None:
        """A resume: the durable steps in metrics.jsonl (up to the checkpoint's) that a tracker has not
        received yet (the run stopped between a checkpoint and handing its steps on) go to it first."""
        self.pending = [(row["step"], scalars({k: v for k, v in row.items() if k != "step"})) for row in rows]
        if rows:
            self.last_step = rows[-1]["step"]
        self.durable(up_to)

    def durable(self, up_to: int) -> None:
        """Steps <= up_to are final (a checkpoint holds them): the durable trackers receive them, once, and
        trackers.json records how far each got."""
        if self._hand_on(up_to):
            write_json(self.run_dir / STATE_FILE, self.state)

    def _hand_on(self, up_to: int) -> bool:
        """The pending steps <= up_to to the durable trackers (each step once); whether any received one."""
        ready = [(step, row) for step, row in self.pending if step <= up_to]
        self.pending = [(step, row) for step, row in self.pending if step > up_to]
        received = False
        for tracker in self._of_kind(durable_only=True):
            last = self.state[tracker.name].get("last_step", 0)
            for step, row in ready:
                if step > last and self._call(tracker, "log", step, row):
                    self.state[tracker.name]["last_step"] = step
                    received = True
        return received

    def finish(self, summary: dict[str, Any] | None, succeeded: bool) -> None:
        """The run's end: its steps are final (a finished run saved the student), its summary goes in."""
        if succeeded:
            self._hand_on(self.last_step)
        for tracker in self.trackers:
            if summary is not None:
                self._call(tracker, "log_summary", summary, self.last_step)
            self._call(tracker, "finish", succeeded)
        self.trackers = []
        write_json(self.run_dir / STATE_FILE, self.state)

    def _of_kind(self, durable_only: bool) -> list[Tracker]:
        return [t for t in self.trackers if t.durable_only == durable_only]

    def _call(self, tracker: Tracker, method: str, *args: Any) -> bool:
        try:
            getattr(tracker, method)(*args)
            return True
        except UserError:  # opd-ray's own (a SIGTERM before training is one): not the tracker's failure
            raise
        except Exception as exc:  # a tracker's failure must not end a run whose metrics.jsonl is intact
            warn(f"logging.trackers: {tracker.name} failed in {method} ({type(exc).__name__}: {exc}); dropped")
            self.trackers = [t for t in self.trackers if t is not tracker]
            return False


def open_trackers(spec: ExperimentSpec, run_dir: Path, spec_yaml: str, resume_after: int | None) -> Trackers:
    """Starts the spec's trackers (before the roles: a tracker that cannot start costs seconds, not minutes).
    `spec_yaml` is the spec as spec.yaml holds it (the run config); `resume_after` the checkpoint's step on
    a resume (None for a new run)."""
    path = run_dir / STATE_FILE
    state: dict = json.loads(path.read_text()) if resume_after is not None and path.is_file() else {}
    base = run_identity(spec, run_dir, spec_yaml)
    trackers = []
    for name in spec.logging.trackers:
        tracker = TRACKER_TYPES[name]()
        own = state.get(name, {})
        identity = replace(base, resume_id=own.get("id"))
        try:
            tracked_id = tracker.start(identity, resume_after)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"logging.trackers: {name} could not start: {type(exc).__name__}: {exc}") from None
        state[name] = {"id": tracked_id, "last_step": own.get("last_step", 0)}
        trackers.append(tracker)
    write_json(path, state)
    return Trackers(run_dir, trackers, state, every_step_durable=not spec.trainer.checkpoint_every)


def run_identity(spec: ExperimentSpec, run_dir: Path, spec_yaml: str) -> RunIdentity:
    """The tracked run's name, project, tags and config (spec.yaml's: environment values stay `${oc.env:...}`,
    so no secret reaches a tracker)."""
    return RunIdentity(
        run_dir=run_dir,
        name=spec.run.name,
        project=spec.logging.project,
        tags=tuple(spec.logging.tags),
        config=yaml.safe_load(spec_yaml),
        settings={"tracking_uri": spec.logging.mlflow_tracking_uri},
    )
