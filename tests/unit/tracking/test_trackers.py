"""Each tracker against its real library in its offline/local mode: the steps a run wrote, read back through
the library's own API, equal metrics.jsonl's; a resume continues the same tracked run with each step once."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from opd_ray.driver.metrics import MetricsWriter, read_metrics
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec, spec_to_yaml
from opd_ray.tracking import open_trackers
from tests.conftest import tiny_spec_dict
from tests.trackers import mlflow_history, trackio_history, wandb_config, wandb_history

TRACKED = ["tensorboard", "wandb", "mlflow", "trackio"]


def tracked_spec(tmp_path: Path, project: str) -> ExperimentSpec:
    raw = tiny_spec_dict(tmp_path / "models", tmp_path / "run")
    raw["trainer"].update(checkpoint_every=1)
    raw["logging"] = {"trackers": TRACKED, "project": project, "tags": ["unit"]}
    return ExperimentSpec.model_validate(raw)


def step_metrics(step: int, attempt: int) -> dict:
    """What a step logs, with values that differ between a first attempt and its re-run after a resume."""
    return {"loss": 1.0 / step + attempt, "eval/student_accuracy": 0.1 * step, "prompts_digest": "ab", "ok": True}


def test_a_resumed_run_continues_each_tracked_run_with_every_step_once(tmp_path: Path) -> None:
    spec = tracked_spec(tmp_path, project="opd-ray-unit-resume")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(spec_to_yaml(spec))  # what the loop writes first: MLflow's artifact
    # the first attempt: checkpoints after steps 1 and 2, but the process dies after step 3, before the
    # checkpoint of step 2 was handed to the trackers (so they hold step 1 only)
    writer = MetricsWriter(run_dir, open_trackers(spec, run_dir, spec_to_yaml(spec), resume_after=None))
    for step in (1, 2, 3):
        writer.write(step, step_metrics(step, attempt=0))
        if step == 1:
            writer.durable(1)
    writer.close(None, succeeded=False)
    stored = json.loads((run_dir / "trackers.json").read_text())
    assert stored["mlflow"]["last_step"] == 1 and stored["wandb"]["id"]

    # --resume from the checkpoint of step 2: step 2 is caught up from metrics.jsonl, 3 and 4 are run again
    writer = MetricsWriter(run_dir, open_trackers(spec, run_dir, spec_to_yaml(spec), resume_after=2), resume_after=2)
    for step in (3, 4):
        writer.write(step, step_metrics(step, attempt=1))
        writer.durable(step)
    health = {"status": "warned", "conditions": [{"condition": "collapse", "first_step": 3}]}
    writer.close({"run": "test", "student_accuracy_after": 0.5, "health": health}, succeeded=True)

    expected = {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(expected) == [1, 2, 3, 4] and expected[3] == pytest.approx(1 / 3 + 1)

    runs, history = mlflow_history(f"sqlite:///{tmp_path / 'mlflow.db'}", "opd-ray-unit-resume")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "test"
    assert history["loss"] == [(step, pytest.approx(loss)) for step, loss in sorted(expected.items())]
    assert runs[0].data.params["learner.lr"] == "0.003" and "unit" in runs[0].data.tags
    artifacts = Path(runs[0].info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "mlartifacts")  # beside the store, not where the test ran from
    assert (artifacts / "spec.yaml").read_text() == spec_to_yaml(spec)
    assert history["summary/student_accuracy_after"] == [(4, 0.5)]
    assert runs[0].data.tags["summary/health/status"] == "warned"
    assert json.loads(runs[0].data.tags["summary/health/conditions"])[0]["condition"] == "collapse"

    ids, rows = wandb_history(run_dir)
    assert ids == {stored["wandb"]["id"]}  # both attempts are one W&B run (two offline files to sync)
    steps = [row["_step"] for row in rows if "loss" in row]
    assert steps == [1, 2, 3, 4]
    assert [row["loss"] for row in rows if "loss" in row] == [pytest.approx(expected[s]) for s in steps]
    assert wandb_config(run_dir)["learner"]["lr"] == 0.003

    names, logs = trackio_history("opd-ray-unit-resume", stored["trackio"]["id"])
    assert names == [stored["trackio"]["id"]] and names[0].startswith("test-")  # one run, its own name
    logged = [(row["step"], row["loss"]) for row in logs if "loss" in row]
    assert logged == [(step, pytest.approx(loss)) for step, loss in sorted(expected.items())]


def test_tensorboard_follows_every_step_and_a_resume_purges_the_re_run_ones(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_spec_dict(tmp_path / "models", tmp_path / "run")
    raw["trainer"].update(checkpoint_every=2)
    spec, run_dir = ExperimentSpec.model_validate(raw), tmp_path / "run"
    writer = MetricsWriter(run_dir, open_trackers(spec, run_dir, spec_to_yaml(spec), resume_after=None))
    for step in (1, 2, 3):
        writer.write(step, step_metrics(step, attempt=0))
    writer.close(None)
    writer = MetricsWriter(run_dir, open_trackers(spec, run_dir, spec_to_yaml(spec), resume_after=2), resume_after=2)
    writer.write(3, step_metrics(3, attempt=1))
    writer.close({"steps": 3, "gap_recovery": 0.25}, succeeded=True)
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    losses = [(e.step, round(e.value, 4)) for e in events.Scalars("loss")]
    assert losses == [(1, 1.0), (2, 0.5), (3, round(1 / 3 + 1, 4))]
    assert [e.value for e in events.Scalars("summary/gap_recovery")] == [0.25]


def test_a_tracker_whose_library_is_missing_is_one_line_at_validate(tmp_path: Path, monkeypatch) -> None:
    from opd_ray.spec import tracking

    monkeypatch.setattr(tracking, "module_installed", lambda module: module != "wandb")
    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["logging"] = {"trackers": ["tensorboard", "wandb"]}
    missing = r"wandb: its library \(wandb\) is not installed: pip install 'opd-ray\[wandb\]'"
    with pytest.raises(ValueError, match=missing):
        ExperimentSpec.model_validate(raw)


def test_a_tracker_that_cannot_start_names_itself_before_the_roles_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknown-scheme://nowhere")
    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["logging"] = {"trackers": ["mlflow"]}
    with pytest.raises(UserError, match=r"logging\.trackers: mlflow could not start"):
        open_trackers(ExperimentSpec.model_validate(raw), tmp_path / "run", "{}", resume_after=None)


# --8<-- [start:toy_tracker]
class ListTracker:
    """A tracker that keeps what it is handed in lists: the smallest complete Tracker (opd_ray/tracking/base.py)."""

    name = "list"
    durable_only = True  # handed only the steps a checkpoint made durable

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.succeeded: bool | None = None

    def start(self, identity, resume_after):
        return f"{identity.project}/{identity.name}"  # the id trackers.json stores for a resume

    def log(self, step, metrics):
        self.steps.append((step, metrics))

    def log_summary(self, summary, step):
        self.summary = summary  # after `step`, the run's last

    def finish(self, succeeded):
        self.succeeded = succeeded


# --8<-- [end:toy_tracker]


def test_a_new_tracker_is_one_class_behind_the_interface(tmp_path: Path) -> None:
    from opd_ray.tracking import Trackers

    toy = ListTracker()
    trackers = Trackers(tmp_path, [toy], {"list": {"id": "p/n"}}, every_step_durable=False)
    writer = MetricsWriter(tmp_path, trackers)
    for step in (1, 2, 3):
        writer.write(step, step_metrics(step, attempt=0))
    writer.durable(2)  # a checkpoint of step 2
    trackers.settle(timeout_s=10)  # each tracker runs on a thread of its own
    assert [step for step, _ in toy.steps] == [1, 2]
    writer.close({"gap_recovery": 0.5}, succeeded=True)  # a finished run: step 3 is final too
    assert [step for step, _ in toy.steps] == [1, 2, 3]
    assert toy.steps[0][1] == {"loss": 1.0, "eval/student_accuracy": pytest.approx(0.1)}  # numbers only
    assert toy.summary == {"gap_recovery": 0.5} and toy.succeeded is True
    assert json.loads((tmp_path / "trackers.json").read_text())["list"]["last_step"] == 3


class HangingTracker(ListTracker):
    """A tracker whose server never answers: its calls after start block forever."""

    name = "hanging"
    durable_only = False

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.never = threading.Event()

    def log(self, step, metrics):
        self.calls += 1
        self.never.wait()

    finish = log_summary = log  # type: ignore[assignment]


class RaisingTracker(ListTracker):
    """A tracker that raises at every call after start."""

    name = "raising"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def log(self, step, metrics):
        self.calls += 1
        raise ConnectionError("server unreachable")

    def log_summary(self, summary, step):
        self.log(step, summary)

    def finish(self, succeeded):
        self.log(0, {})


def test_a_tracker_that_hangs_or_raises_is_dropped_once_and_the_run_ends_on_time(tmp_path: Path, capsys) -> None:
    from opd_ray.tracking import Trackers
    from opd_ray.tracking.lanes import TrackerLane

    hanging, raising, toy = HangingTracker(), RaisingTracker(), ListTracker()
    state = {name: {"id": name} for name in ("hanging", "raising", "list")}
    trackers = Trackers(tmp_path, [], state, every_step_durable=True)
    for tracker in (hanging, raising, toy):
        trackers.add(TrackerLane(tracker, deadline_s=0.5 if tracker is not toy else 30))
    writer = MetricsWriter(tmp_path, trackers)
    started = time.monotonic()
    for step in range(1, 41):
        writer.write(step, step_metrics(step, attempt=0))
        if step == 20:
            time.sleep(0.6)  # the hanging tracker's first call is now past its deadline
    writing = time.monotonic() - started
    writer.close({"gap_recovery": 0.5}, succeeded=True)
    closing = time.monotonic() - started - writing

    assert writing < 1.5 and closing < 1.5  # the training thread never waited on a tracker
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 41))
    assert hanging.calls == 1 and raising.calls == 1  # dropped at the first failure, never called again
    assert [step for step, _ in toy.steps] == list(range(1, 41)) and toy.succeeded is True
    warnings = capsys.readouterr().err.splitlines()
    assert sum("hanging: log did not return within 0.5 s" in line for line in warnings) == 1, warnings
    assert sum("raising: failed in log (ConnectionError: server unreachable)" in line for line in warnings) == 1
    assert json.loads((tmp_path / "trackers.json").read_text())["list"]["last_step"] == 40


def test_a_tracker_that_hangs_at_start_or_a_second_that_cannot_start_ends_the_ones_started(
    tmp_path: Path, monkeypatch
) -> None:
    from opd_ray.tracking import run as tracking_run

    started: list[ListTracker] = []

    class Recorded(ListTracker):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    class NeverStarts(ListTracker):
        name = "never-starts"

        def start(self, identity, resume_after):
            threading.Event().wait()

    monkeypatch.setitem(tracking_run.TRACKER_TYPES, "tensorboard", Recorded)
    monkeypatch.setitem(tracking_run.TRACKER_TYPES, "mlflow", NeverStarts)
    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["logging"] = {"trackers": ["tensorboard", "mlflow"], "tracker_timeout_s": 0.5}
    (tmp_path / "run").mkdir()
    begun = time.monotonic()
    refused = r"logging\.trackers: never-starts could not start: start did not return within 0\.5 s"
    with pytest.raises(UserError, match=refused):
        open_trackers(ExperimentSpec.model_validate(raw), tmp_path / "run", "{}", resume_after=None)
    assert time.monotonic() - begun < 3
    assert [tracker.succeeded for tracker in started] == [False]  # the first tracked run is ended, as failed


def test_the_roles_shut_down_whatever_the_trackers_do(tmp_path: Path) -> None:
    from opd_ray.driver.loop import Run

    class Roles:
        stopped = False

        def shutdown(self) -> None:
            Roles.stopped = True

    class BrokenWriter:
        def close(self, summary, succeeded) -> None:
            raise OSError("disk full")

    run = Run.__new__(Run)
    run.roles, run.writer, run.summary, run.finished = Roles(), BrokenWriter(), {}, False
    with pytest.raises(OSError):
        run.close()
    assert Roles.stopped


def test_two_runs_starting_at_once_into_one_mlflow_store_share_its_experiment(tmp_path: Path, monkeypatch) -> None:
    """The race: both runs find the experiment missing, both create it. The loser's create fails in the store; it
    must take the winner's experiment instead of stopping with 'mlflow could not start'."""
    from mlflow.tracking import MlflowClient

    from opd_ray.tracking.base import RunIdentity
    from opd_ray.tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    identities = [
        RunIdentity(tmp_path / name, name, "opd-ray-unit-race", (), {}, settings={"tracking_uri": uri})
        for name in ("seed-0", "seed-1")
    ]
    winner = MlflowTracker()
    winner.start(identities[0], resume_after=None)
    looked_up = MlflowClient.get_experiment_by_name
    calls: list[str] = []

    def before_the_winner_created_it(client, name):
        calls.append(name)
        return None if len(calls) == 1 else looked_up(client, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", before_the_winner_created_it)
    loser = MlflowTracker()
    loser.start(identities[1], resume_after=None)
    monkeypatch.undo()
    for tracker in (winner, loser):
        tracker.finish(succeeded=True)
    runs, _ = mlflow_history(uri, "opd-ray-unit-race")
    assert sorted(run.info.run_name for run in runs) == ["seed-0", "seed-1"] and len(calls) == 2


def test_trackio_resumes_its_own_run_when_another_shares_its_name_and_publishes_nowhere_unasked(
    tmp_path: Path, monkeypatch
) -> None:
    from opd_ray.tracking.base import RunIdentity
    from opd_ray.tracking.trackio_tracker import TrackioTracker

    project = "opd-ray-unit-one-name"
    identity = RunIdentity(tmp_path, "same-name", project, (), {})
    first, second = TrackioTracker(), TrackioTracker()
    first_id = first.start(identity, resume_after=None)
    first.log(1, {"loss": 1.0})
    first.finish(succeeded=False)
    second_id = second.start(identity, resume_after=None)  # another run, the same run.name, started later
    second.log(1, {"loss": 9.0})
    second.finish(succeeded=True)
    resumed = TrackioTracker()
    assert resumed.start(replace(identity, resume_id=first_id), resume_after=1) == first_id
    resumed.log(2, {"loss": 0.5})
    resumed.finish(succeeded=True)
    assert first_id != second_id
    assert [(row["step"], row["loss"]) for row in trackio_history(project, first_id)[1]] == [(1, 1.0), (2, 0.5)]
    assert [(row["step"], row["loss"]) for row in trackio_history(project, second_id)[1]] == [(1, 9.0)]

    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/public-space")
    with pytest.raises(UserError, match=r"TRACKIO_SPACE_ID is set in the environment .* logging.trackio_space_id"):
        TrackioTracker().start(identity, resume_after=None)


def test_a_new_tracker_is_picked_up_from_its_record_by_a_spec_that_names_it(tmp_path: Path) -> None:
    from opd_ray.spec import TRACKER_RECORDS, TrackerRecord, add_tracker
    from opd_ray.tracking import run as tracking_run

    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["logging"] = {"trackers": ["list"]}
    with pytest.raises(ValueError, match=r"'list' is not a tracker; the trackers are tensorboard, wandb, mlflow"):
        ExperimentSpec.model_validate(raw)
    add_tracker(TrackerRecord("list", "json", "opd-ray", "tests.unit.tracking.test_trackers:ListTracker"))
    try:
        spec = ExperimentSpec.model_validate(raw)
        (tmp_path / "run").mkdir()
        trackers = open_trackers(spec, tmp_path / "run", "{}", resume_after=None)
        trackers.log(1, {"loss": 0.5})
        (lane,) = trackers.lanes
        trackers.finish({"gap_recovery": 1.0}, succeeded=True)
        assert isinstance(lane.tracker, ListTracker) and lane.tracker.steps == [(1, {"loss": 0.5})]
        assert lane.tracker.succeeded is True
    finally:
        TRACKER_RECORDS.pop("list")
        tracking_run.TRACKER_TYPES.pop("list", None)
