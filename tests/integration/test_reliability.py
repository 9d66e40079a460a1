"""Nothing lost, nothing hung: resume after SIGTERM, a hung teacher, non-finite losses, dead actors of every role."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from opd_ray.actors.teacher import TeacherScorer
from opd_ray.driver.checkpoint import TrainerState, complete_checkpoints, latest_checkpoint
from opd_ray.driver.metric_keys import undocumented
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict
from tests.trackers import mlflow_history, trackio_history, wandb_history


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resumable_spec(tiny_dir: Path, run_dir: Path, trackers: tuple[str, ...] = ()) -> dict:
    """10 synchronous steps, a checkpoint every 2: the run killed and resumed, and the one it must match."""
    raw = tiny_spec_dict(tiny_dir, run_dir)
    raw["trainer"].update(steps=10, checkpoint_every=2, keep_checkpoints=2, save_final=False)
    if trackers:
        raw["logging"] = {"trackers": list(trackers), "project": f"opd-ray-{run_dir.parent.name}"}
    return raw


TRACKED = ("tensorboard", "wandb", "mlflow", "trackio")


def kill_actor_after(run_dir: Path, step: int, role: str) -> list[int]:
    """SIGKILLs every actor of `role` of this run (their pids from the run's placement.json, never a search by
    name: another run on the machine has processes of the same names) once it has logged `step` steps."""
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= step) and time.time() < deadline:
        time.sleep(0.05)
    pids = [actor["pid"] for actor in json.loads((run_dir / "placement.json").read_text())[role]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def hangs_once(marker: Path, on_call: int) -> type:
    """A test-only teacher (a fake for what is not under test: why an engine hangs) whose `on_call`-th
    score call never returns, once per run: `marker` records that it has hung."""

    class HangingTeacherScorer(TeacherScorer):
        calls = 0

        @ray.method(num_returns=2)
        def score(self, batch, teacher_prompts_P=None):
            HangingTeacherScorer.calls += 1
            if HangingTeacherScorer.calls == on_call and not marker.exists():
                marker.touch()
                time.sleep(3600)
            return super().score(batch, teacher_prompts_P)

    return HangingTeacherScorer


HUNG_STEP, STEP_TIMEOUT_S = 5, 10


@pytest.fixture(scope="module")
def run_with_actor_faults(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, local_ray) -> dict:
    """A run whose rollout worker is SIGKILLed after step 2 and whose teacher hangs in step 5 (one shard a
    step: its 5th score call) until trainer.timeouts.step_s; Ray restarts both. It is also the
    uninterrupted reference a resumed run must match step for step."""
    import threading

    from opd_ray.driver import roles
    from opd_ray.recipe.stages import run_stages

    tmp = tmp_path_factory.mktemp("actor-faults")
    run_dir, hung = tmp / "run", tmp / "teacher-hung"
    raw = resumable_spec(tiny_dir, run_dir)
    raw["trainer"]["timeouts"] = {"step_s": STEP_TIMEOUT_S}
    spec = ExperimentSpec.model_validate(raw)
    killed: dict[str, list[int]] = {}

    def kill_rollout_worker() -> None:
        killed["rollout"] = kill_actor_after(run_dir, 2, "rollout")

    killer = threading.Thread(target=kill_rollout_worker)
    killer.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(roles, "TeacherScorer", hangs_once(hung, on_call=HUNG_STEP))
        run_stages(spec)
    killer.join()
    return {"spec": spec, "run_dir": run_dir, "killed": killed, "hung": hung}


@pytest.mark.integration
def test_a_killed_rollout_worker_and_a_hung_teacher_lose_no_prompt(run_with_actor_faults: dict) -> None:
    """The hung teacher is killed at the step timeout; Ray restarts both actors, the rollout worker gets the
    current weights, lost shards are re-issued, and every step trains exactly its own prompts once."""
    from opd_ray.data.order import PromptSampler
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.steps import prompts_digest

    spec, killed = run_with_actor_faults["spec"], run_with_actor_faults["killed"]
    assert len(killed["rollout"]) == 1 and run_with_actor_faults["hung"].exists(), killed
    metrics = read_metrics(run_with_actor_faults["run_dir"])
    sampler = PromptSampler(len(load_run_inputs(spec).train), spec.run.seed)
    expected = [prompts_digest(sampler.next(spec.trainer.prompts_per_step)) for _ in range(10)]
    assert [m["prompts_digest"] for m in metrics] == expected  # each step trained its own prompts...
    assert all(m["sequences"] == spec.trainer.prompts_per_step for m in metrics)  # ...each exactly once
    assert [m["weight_version"] for m in metrics] == list(range(1, 11))
    assert metrics[-1]["restarts/rollout"] >= 1 and metrics[-1]["restarts/teacher"] == 1
    assert all(m["rollout_weight_version"] == m["weight_version"] - 1 for m in metrics)  # weights were reloaded
    hung_step = metrics[HUNG_STEP - 1]["time/step"]
    assert STEP_TIMEOUT_S <= hung_step < STEP_TIMEOUT_S + 120  # waited out the timeout, then a restart only


@pytest.mark.integration
def test_sigterm_checkpoints_the_step_then_resume_matches_the_run_it_continues(
    run_with_actor_faults: dict, tiny_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (ray job stop, a Slurm time limit, an eviction) to the training process mid-run: it finishes
    the step, checkpoints it although it is off the checkpoint_every schedule, shuts down and exits 143;
    --resume then gives the same steps, data order, losses and final weight version as the reference run
    (whose restarted actors, in turn, changed nothing: a re-issued shard samples with its own seed)."""
    from opd_ray.recipe.stages import run_stages

    reference_dir, stopped_dir = run_with_actor_faults["run_dir"], tmp_path / "stopped"
    spec_path = tmp_path / "spec.yaml"
    joined = resumable_spec(tiny_dir, stopped_dir, TRACKED)
    joined["ray"] = {"address": ray.get_runtime_context().gcs_address}  # the tests' Ray, as a job's driver joins one
    spec_path.write_text(yaml.safe_dump(joined))
    command = [sys.executable, "-m", "opd_ray.cli", "train", str(spec_path)]
    run = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not (stopped_dir / "metrics.jsonl").is_file() or len(read_metrics(stopped_dir)) < 3:
        assert time.time() < deadline and run.poll() is None, "the run to be stopped did not reach step 3"
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr
    stopped_at = len(read_metrics(stopped_dir))
    assert 3 <= stopped_at < 10 and not (stopped_dir / "summary.json").exists(), "stopped too late"
    assert f"stopped by SIGTERM after step {stopped_at} of 10" in stderr and "Traceback" not in stderr
    assert TrainerState.read(latest_checkpoint(stopped_dir)).step == stopped_at  # odd steps are off-schedule

    with pytest.raises(Exception, match="pass --resume"):
        run_stages(ExperimentSpec.model_validate(resumable_spec(tiny_dir, stopped_dir)))
    run_stages(ExperimentSpec.model_validate(resumable_spec(tiny_dir, stopped_dir, TRACKED)), resume=True)

    reference, resumed = read_metrics(reference_dir), read_metrics(stopped_dir)
    assert [m["step"] for m in resumed] == list(range(1, 11))  # every step once, the file continued
    assert [m["prompts_digest"] for m in resumed] == [m["prompts_digest"] for m in reference]
    assert [m["weight_version"] for m in resumed] == [m["weight_version"] for m in reference]
    for a, b in zip(resumed, reference, strict=True):  # same weights, optimizer and samples after the resume
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), a["step"]
    assert [p.name for p in complete_checkpoints(stopped_dir)] == ["step_00000008", "step_00000010"]
    summary = json.loads((stopped_dir / "summary.json").read_text())
    reference_summary = json.loads((reference_dir / "summary.json").read_text())
    assert summary["student_accuracy_before"] == reference_summary["student_accuracy_before"]
    assert_tracked_runs_match(stopped_dir, resumed, summary)


def assert_tracked_runs_match(run_dir: Path, rows: list[dict], summary: dict) -> None:
    """W&B (offline), MLflow (its SQLite store) and trackio (its local store), read back through their own
    libraries, hold one run each with every step once and metrics.jsonl's numbers, the summary after them."""
    project, losses = f"opd-ray-{run_dir.parent.name}", [(row["step"], row["loss"]) for row in rows]
    assert not undocumented({key for row in rows for key in row})  # and the metric reference names every key
    runs, history = mlflow_history(f"sqlite:///{run_dir.parent / 'mlflow.db'}", project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert history["loss"] == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in losses]
    assert history["summary/student_accuracy_after"] == [(10, pytest.approx(summary["student_accuracy_after"]))]
    ids, wandb_rows = wandb_history(run_dir)
    assert len(ids) == 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # two attempts, one run
    assert [(r["_step"], r["loss"]) for r in wandb_rows if "loss" in r] == [(s, pytest.approx(v)) for s, v in losses]
    stored = json.loads((run_dir / "trackers.json").read_text())["trackio"]["id"]
    names, logs = trackio_history(project, stored)
    assert names == [stored] and stored.startswith("test-")
    assert [(r["step"], r["loss"]) for r in logs if "loss" in r] == [(s, pytest.approx(v)) for s, v in losses]


@pytest.mark.integration
def test_non_finite_loss_skips_updates_then_stops_without_poisoning(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """A teacher whose weights hold a NaN (a corrupt checkpoint): every loss is NaN, no update is
    applied, the run stops after `max_bad_steps`, and the checkpoints it wrote hold the intact student."""
    import torch
    from safetensors.torch import load_file, save_file

    from opd_ray.errors import RunStopped
    from opd_ray.recipe.stages import run_stages

    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    for f in (tiny_dir / "teacher").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights_file = next(broken.glob("*.safetensors"))
    weights = load_file(weights_file)
    name = next(k for k in weights if k.endswith("norm.weight") and "layers" not in k)
    weights[name][0] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["teacher"]["path"] = str(broken)
    raw["learner"]["num_ranks"] = 1  # every rank sees the NaN teacher: the skip does not depend on how many
    raw["trainer"].update(steps=6, checkpoint_every=1, max_bad_steps=2, save_final=False)
    with pytest.raises(RunStopped, match="2 consecutive steps with a non-finite loss"):
        run_stages(ExperimentSpec.model_validate(raw))

    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["skipped_update"] == 1 and m["loss"] is None and m["weight_version"] == 0 for m in metrics)
    saved = load_file(next((latest_checkpoint(tmp_path / "run") / "student").glob("*.safetensors")))
    original = load_file(next((tiny_dir / "student").glob("*.safetensors")))
    assert all(torch.equal(saved[k], original[k]) for k in original)  # untouched by the skipped updates


@pytest.mark.integration
def test_learner_rank_killed_stops_cleanly_and_points_at_resume(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """A dead learner rank cannot be rebuilt (its optimizer shard is gone): the run must stop
    promptly, not hang in the surviving rank's collective, and name the checkpoint to resume."""
    import threading

    from opd_ray.errors import RunStopped
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["trainer"].update(steps=50, checkpoint_every=1, save_final=False)

    def kill_one_learner_rank_after_step_2() -> None:
        deadline = time.time() + 300
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
            time.sleep(0.05)
        rank_0 = json.loads((tmp_path / "run" / "placement.json").read_text())["learner"][0]["pid"]
        os.kill(rank_0, signal.SIGKILL)  # this run's own rank, by the pid it recorded

    killer = threading.Thread(target=kill_one_learner_rank_after_step_2)
    killer.start()
    started = time.time()
    with pytest.raises(RunStopped, match=r"a learner rank died .*resume from .*step_\d+ with --resume"):
        run_stages(ExperimentSpec.model_validate(raw))
    killer.join()
    assert time.time() - started < 240
    assert len(read_metrics(tmp_path / "run")) < 50
    assert latest_checkpoint(tmp_path / "run") is not None


@ray.remote
class RankOnItsOwnDisk:
    """A fake learner rank (what is not under test: the node it runs on) whose disk is not the driver's:
    it writes the run directory's files under `disk` instead, as a rank on another node would."""

    def __init__(self, rank: int, disk: str | None) -> None:
        self.rank, self.disk = rank, disk

    def write_storage_mark(self, directory: str, token: str) -> str:
        seen_as = Path(directory) / f"{token}-rank{self.rank}"
        real = Path(self.disk) / seen_as.relative_to("/") if self.disk else seen_as
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_text("node")
        return str(seen_as)

    def save_pretrained(self, directory: str, tokenizer_path: str) -> None:
        """Dies half-way through writing the student, as a rank killed mid-save would."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-save")


def fake_learner_group(ranks: list):
    """The real LearnerGroup's methods over fake ranks (what is not under test: how ranks are started)."""
    from opd_ray.actors.learner_group import LearnerGroup

    group = LearnerGroup.__new__(LearnerGroup)
    group.workers = ranks
    return group


@pytest.mark.integration
def test_learner_ranks_that_do_not_share_the_run_directory_stop_the_run(tmp_path: Path, local_ray) -> None:
    from opd_ray.driver.checkpoint import check_shared_storage
    from opd_ray.errors import UserError

    run_dir = tmp_path / "run"
    shared = fake_learner_group([RankOnItsOwnDisk.remote(0, None), RankOnItsOwnDisk.remote(1, None)])
    check_shared_storage(shared, run_dir, timeout_s=60)
    assert not list(run_dir.iterdir())  # the mark files are removed again
    split = fake_learner_group([RankOnItsOwnDisk.remote(0, None), RankOnItsOwnDisk.remote(1, str(tmp_path / "node2"))])
    with pytest.raises(UserError, match=r"learner ranks \[1\] wrote into .* must be on storage every node shares"):
        check_shared_storage(split, run_dir, timeout_s=60)


@pytest.mark.integration
def test_a_save_killed_midway_leaves_the_previous_student_whole(tmp_path: Path, local_ray) -> None:
    from types import SimpleNamespace

    from opd_ray.driver.loop import save_student

    run_dir = tmp_path / "run"
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "student" / "model.safetensors").write_bytes(b"the whole previous student")
    spec = ExperimentSpec.model_validate(
        {"models": {"student": {"path": "s"}, "teacher": {"path": "t"}}, "data": {"train": {"path": "d"}}}
    )
    dying = fake_learner_group([RankOnItsOwnDisk.remote(0, None)])
    run = SimpleNamespace(run_dir=run_dir, spec=spec, roles=SimpleNamespace(learners=dying))
    with pytest.raises(ray.exceptions.RayTaskError, match="killed mid-save"):
        save_student(run)
    assert (run_dir / "student" / "model.safetensors").read_bytes() == b"the whole previous student"


@pytest.mark.integration
def test_sft_without_shared_storage_stops_before_it_trains(tmp_path: Path, local_ray, monkeypatch) -> None:
    from opd_ray.errors import UserError
    from opd_ray.recipe import supervised
    from opd_ray.spec import LearnerSpec, ModelSpec

    split = fake_learner_group([RankOnItsOwnDisk.remote(0, None), RankOnItsOwnDisk.remote(1, str(tmp_path / "node2"))])
    monkeypatch.setattr(supervised, "LearnerGroup", lambda *args, **kwargs: split)  # RankOnItsOwnDisk cannot train
    output = tmp_path / "run" / "stages" / "sft" / "student"
    with pytest.raises(UserError, match=r"learner ranks \[1\] .*the SFT output .* must be on storage every node"):
        supervised.train_supervised(
            ModelSpec(path="s"), output, [([1], [2])], LearnerSpec(num_ranks=2), 10, 2, 0, "student"
        )
    assert not output.exists()


@pytest.mark.integration
def test_sigterm_during_start_up_stops_within_seconds(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """Before training there is nothing to checkpoint: SIGTERM while the engines start (the run's spec.yaml
    is written just before) stops the command at once, exit 143, one line, no step recorded."""
    run_dir, spec_path = tmp_path / "run", tmp_path / "spec.yaml"
    raw = tiny_spec_dict(tiny_dir, run_dir)
    raw["ray"] = {"address": ray.get_runtime_context().gcs_address}
    spec_path.write_text(yaml.safe_dump(raw))
    run = subprocess.Popen(
        [sys.executable, "-m", "opd_ray.cli", "train", str(spec_path)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (run_dir / "spec.yaml").is_file():
        assert time.time() < deadline and run.poll() is None, "the run never reached its start-up"
        time.sleep(0.05)
    signalled = time.monotonic()
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr
    assert time.monotonic() - signalled < 20, "start-up was not interrupted"
    assert "SIGTERM before training started" in stderr and "Traceback" not in stderr
    assert not (run_dir / "metrics.jsonl").exists()


@ray.remote(max_restarts=5)
class EvaluatorThatHangs:
    """A fake rollout worker (what is not under test: why an engine hangs): its greedy share never ends."""

    def ready(self) -> bool:
        return True

    def greedy(self, prompts, max_new_tokens):
        time.sleep(3600)


@pytest.mark.integration
def test_an_evaluation_share_has_its_own_timeout_and_bounded_reissues(local_ray) -> None:
    from opd_ray.driver.roles import Roles, call_restarting
    from opd_ray.errors import Stuck
    from opd_ray.spec import TimeoutsSpec

    worker = EvaluatorThatHangs.remote()
    roles = Roles([worker], {}, learners=None, placement=None, max_restarts=1)
    roles.timeouts = TimeoutsSpec(eval_s=2, step_s=3600)
    started = time.monotonic()
    with pytest.raises(
        Stuck, match=r"rollout actor 0: its greedy share did not finish within 2 s \(trainer.timeouts.eval_s\), 2 times"
    ):
        call_restarting(roles, "rollout", [worker], "greedy", [({0: [1]}, 4)])
    assert time.monotonic() - started < 60  # two shares of 2 s and one restart, not an hour
    ray.kill(worker, no_restart=True)
