"""The trackers of one run: every step fanned out to them, and trackers.json to continue them on resume.

TensorBoard takes each step as it is written. W&B, MLflow and trackio cannot take a step back, and a
resumed run re-runs the steps after its checkpoint, so they are handed a step once it is durable: when
a checkpoint holds it, when the run ends, or at once when checkpoints are off (nothing can re-run it).
trackers.json records each tracked run's id and the last step it received; a resume reopens that run
and first sends the durable steps it missed (from metrics.jsonl), so each step reaches it once.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from opd_ray.errors import UserError
from opd_ray.files import write_json
from opd_ray.spec import TRACKER_RECORDS, ExperimentSpec
from opd_ray.tracking.base import RunIdentity, Tracker, scalars
from opd_ray.tracking.lanes import TrackerDropped, TrackerLane

STATE_FILE = "trackers.json"
TRACKER_TYPES: dict[str, type] = {}  # name -> Tracker class, imported from its record the first time a run uses it
DEFAULT_TIMEOUT_S = 120.0  # logging.tracker_timeout_s's default, for trackers built outside a spec


class Trackers:
    """The spec's trackers for one run, each on its own thread (lanes.py): the driver queues a step and goes on.
    A tracker that fails, hangs past logging.tracker_timeout_s or falls behind is dropped with one warning:
    the run goes on, and metrics.jsonl still holds every step."""

    def __init__(self, run_dir: Path, trackers: list[Tracker], state: dict, every_step_durable: bool) -> None:
        self.run_dir, self.state = run_dir, state
        self.every_step_durable = every_step_durable
        self.lanes: list[TrackerLane] = []
        self.pending: list[tuple[int, dict[str, float]]] = []  # steps durable trackers have not been handed
        self.last_step = 0  # the run's last step so far: where the summary goes
        self.handed: dict[str, int] = {}  # the last step queued to each durable tracker
        self._state_lock = threading.Lock()  # the lanes record what their tracker received; the driver writes it
        for tracker in trackers:
            self.add(TrackerLane(tracker, DEFAULT_TIMEOUT_S))

    def add(self, lane: TrackerLane) -> None:
        self.lanes.append(lane)
        self.handed[lane.name] = self.state.get(lane.name, {}).get("last_step", 0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = scalars(metrics)
        for lane in self._of_kind(durable_only=False):
            lane.call("log", step, numbers)
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
        """Steps <= up_to are final (a checkpoint holds them): the durable trackers are handed them, once, and
        trackers.json records how far each has received (their threads may still be sending the newest)."""
        self._hand_on(up_to)
        self.save_state()

    def _hand_on(self, up_to: int) -> None:
        """The pending steps <= up_to to the durable trackers' queues, each step once."""
        ready = [(step, row) for step, row in self.pending if step <= up_to]
        self.pending = [(step, row) for step, row in self.pending if step > up_to]
        for lane in self._of_kind(durable_only=True):
            for step, row in ready:
                if step > self.handed[lane.name]:
                    lane.call("log", step, row, on_done=partial(self._received, lane.name, step))
                    self.handed[lane.name] = step

    def _received(self, name: str, step: int) -> None:
        with self._state_lock:
            self.state[name]["last_step"] = step

    def settle(self, timeout_s: float) -> None:
        """Waits (at most `timeout_s` per tracker) until every tracker has taken what it was handed."""
        for lane in self.lanes:
            try:
                lane.wait(lane.call(None), timeout_s)  # a marker queued last: done once the rest are
            except TrackerDropped:
                pass

    def finish(self, summary: dict[str, Any] | None, succeeded: bool) -> None:
        """The run's end: its steps are final (a finished run saved the student), its summary goes in. Waits
        for the trackers at most their deadline, all together; one still busy then is left behind."""
        if succeeded:
            self._hand_on(self.last_step)
        for lane in self.lanes:
            if summary is not None:
                lane.call("log_summary", summary, self.last_step)
            lane.call("finish", succeeded)
            lane.close()
        ends = time.monotonic() + max((lane.deadline_s for lane in self.lanes), default=0)
        for lane in self.lanes:
            lane.check_deadline()
            if not lane.dropped:  # a tracker already dropped (hung) is not waited for
                lane.join(max(0.0, ends - time.monotonic()))
        self.lanes = []
        self.save_state()

    def save_state(self) -> None:
        with self._state_lock:
            write_json(self.run_dir / STATE_FILE, self.state)

    def _of_kind(self, durable_only: bool) -> list[TrackerLane]:
        return [lane for lane in self.lanes if lane.tracker.durable_only == durable_only and not lane.dropped]


def tracker_type(name: str) -> type:
    """The class of tracker `name`, from its record's `module:Class` (spec/tracking.py)."""
    if name not in TRACKER_TYPES:
        module, _, cls = TRACKER_RECORDS[name].implementation.partition(":")
        TRACKER_TYPES[name] = getattr(importlib.import_module(module), cls)
    return TRACKER_TYPES[name]


def open_trackers(spec: ExperimentSpec, run_dir: Path, spec_yaml: str, resume_after: int | None) -> Trackers:
    """Starts the spec's trackers (before the roles: a tracker that cannot start costs seconds, not minutes),
    each within logging.tracker_timeout_s. `spec_yaml` is the spec as spec.yaml holds it (the run config);
    `resume_after` the checkpoint's step on a resume (None for a new run). A tracker that cannot start ends
    the ones started before it (their tracked runs marked failed) and stops the command in one line."""
    path = run_dir / STATE_FILE
    state: dict = json.loads(path.read_text()) if resume_after is not None and path.is_file() else {}
    base = run_identity(spec, run_dir, spec_yaml)
    trackers = Trackers(run_dir, [], state, every_step_durable=not spec.trainer.checkpoint_every)
    try:
        for name in spec.logging.trackers:
            lane = TrackerLane(tracker_type(name)(), spec.logging.tracker_timeout_s)
            own = state.get(name, {})
            identity = replace(base, resume_id=own.get("id"))
            tracked_id = start_tracker(lane, identity, resume_after)
            state[name] = {"id": tracked_id, "last_step": own.get("last_step", 0)}
            trackers.add(lane)
    except BaseException:
        trackers.finish(None, succeeded=False)
        raise
    trackers.save_state()
    return trackers


def start_tracker(lane: TrackerLane, identity: RunIdentity, resume_after: int | None) -> str | None:
    """The tracker's start on its own thread, within its deadline; a failure is one line naming it."""
    try:
        return lane.wait(lane.call("start", identity, resume_after), warn=False)
    except UserError:
        raise
    except TrackerDropped as exc:
        raise UserError(f"logging.trackers: {lane.name} could not start: {exc}") from None
    except Exception as exc:
        raise UserError(f"logging.trackers: {lane.name} could not start: {type(exc).__name__}: {exc}") from None


def run_identity(spec: ExperimentSpec, run_dir: Path, spec_yaml: str) -> RunIdentity:
    """The tracked run's name, project, tags and config (spec.yaml's: environment values stay `${oc.env:...}`,
    so no secret reaches a tracker)."""
    return RunIdentity(
        run_dir=run_dir,
        name=spec.run.name,
        project=spec.logging.project,
        tags=tuple(spec.logging.tags),
        config=yaml.safe_load(spec_yaml),
        settings={"tracking_uri": spec.logging.mlflow_tracking_uri, "trackio_space_id": spec.logging.trackio_space_id},
    )
