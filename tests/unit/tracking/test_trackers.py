"""Each tracker against its real library in its offline/local mode: the steps a run wrote, read back through
the library's own API, equal metrics.jsonl's; a resume continues the same tracked run with each step once."""

from __future__ import annotations

import json
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

    names, logs = trackio_history("opd-ray-unit-resume", "test")
    assert names == ["test"]
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
    assert [step for step, _ in toy.steps] == [1, 2]
    writer.close({"gap_recovery": 0.5}, succeeded=True)  # a finished run: step 3 is final too
    assert [step for step, _ in toy.steps] == [1, 2, 3]
    assert toy.steps[0][1] == {"loss": 1.0, "eval/student_accuracy": pytest.approx(0.1)}  # numbers only
    assert toy.summary == {"gap_recovery": 0.5} and toy.succeeded is True
    assert json.loads((tmp_path / "trackers.json").read_text())["list"]["last_step"] == 3
