"""A run directory holds one run: a second run is refused (or deletes on request), one process at a time,
and --resume continues only the run its checkpoints and stages were written by."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from opd_ray.driver.checkpoint import TrainerState, resume_point, write_checkpoint
from opd_ray.driver.fingerprint import run_fingerprint
from opd_ray.driver.metrics import MetricsWriter, read_metrics, training_trend
from opd_ray.driver.run_dir import LOCK_FILE, claimed, run_directory_lock
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def previous_run(run_dir: Path) -> dict[Path, bytes]:
    """What a finished run leaves; returns its files' bytes."""
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "student" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "spec.yaml").write_text("run: {}\n")
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_second_run_is_refused_and_leaves_the_first_byte_identical(tmp_path: Path) -> None:
    files = previous_run(tmp_path)
    with pytest.raises(UserError, match=r"holds a previous run's results \(summary.json, metrics.jsonl, student\)"):
        with claimed(tmp_path, "new"):
            pass
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK_FILE} == files
    with claimed(tmp_path, "resume"):  # continuing it is allowed
        pass


def test_overwrite_deletes_the_previous_results_and_records(tmp_path: Path) -> None:
    previous_run(tmp_path)
    with claimed(tmp_path, "overwrite") as run_dir:
        assert run_dir == tmp_path.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_an_empty_or_half_started_directory_is_not_a_previous_run(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").touch()  # a run that died before its first step
    (tmp_path / "checkpoints").mkdir()
    with claimed(tmp_path, "new"):
        pass


HOLDER = """
import sys, time
from pathlib import Path
from opd_ray.driver.run_dir import run_directory_lock
with run_directory_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_directory_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match=rf"is in use by .*\"pid\": {holder.pid}"):
            with run_directory_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file still names it
        holder.wait()
    assert str(holder.pid) in (tmp_path / LOCK_FILE).read_text()
    with run_directory_lock(tmp_path):  # the kernel released its lock
        pass


def checkpointed(tiny_dir: Path, run_dir: Path, **changes: dict) -> ExperimentSpec:
    raw = tiny_spec_dict(tiny_dir, run_dir)
    for section, values in changes.items():
        raw[section].update(values)
    return ExperimentSpec.model_validate(raw)


def test_resume_refuses_another_teacher_or_data_and_allows_more_steps(tiny_dir: Path, tmp_path: Path) -> None:
    spec = checkpointed(tiny_dir, tmp_path)
    state = TrainerState(2, 2, 0, 32, fingerprint=run_fingerprint(spec))
    write_checkpoint(tmp_path, state, lambda d: (d / "weights.bin").write_bytes(b"w"), keep=2)

    more_steps = checkpointed(tiny_dir, tmp_path, trainer={"steps": 50, "eval_every": 5})
    assert resume_point(more_steps, tmp_path, resume=True)[1].step == 2

    other_teacher = checkpointed(tiny_dir, tmp_path, models={"teacher": {"path": str(tiny_dir / "student")}})
    with pytest.raises(
        UserError, match=r"\(teachers.teacher.model \(contents\), teachers.teacher.model.path differ\); pass"
    ):
        resume_point(other_teacher, tmp_path, resume=True)
    assert resume_point(other_teacher, tmp_path, resume=True, force=True)[1].step == 2

    edited = tmp_path / "train.jsonl"
    edited.write_text((tiny_dir / "train.jsonl").read_text().replace("1", "2", 1))
    other_data = checkpointed(tiny_dir, tmp_path, data={"train": {"path": str(edited)}})
    with pytest.raises(UserError, match=r"data.train \(contents\), data.train.path differ"):
        resume_point(other_data, tmp_path, resume=True)
    with pytest.raises(UserError, match=r"algorithm.objective differ"):
        resume_point(checkpointed(tiny_dir, tmp_path, algorithm={"objective": "full_vocab"}), tmp_path, resume=True)


def test_resume_refuses_fewer_steps_than_the_checkpoint_and_an_extension_keeps_the_learning_rate_down(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from opd_ray.actors.learner_config import warmup_cosine
    from opd_ray.driver.checkpoint import schedule_horizon

    spec = checkpointed(tiny_dir, tmp_path, trainer={"steps": 10, "eval_every": 5})
    state = TrainerState(8, 8, 0, 32, fingerprint=run_fingerprint(spec), schedule_steps=10)
    write_checkpoint(tmp_path, state, lambda d: (d / "weights.bin").write_bytes(b"w"), keep=2)
    fewer = checkpointed(tiny_dir, tmp_path, trainer={"steps": 5, "eval_every": 5})
    with pytest.raises(UserError, match=r"trainer.steps is 5 but checkpoint .* is at step 8: set trainer.steps to 8"):
        resume_point(fewer, tmp_path, resume=True)

    longer = checkpointed(tiny_dir, tmp_path, trainer={"steps": 30, "eval_every": 5})
    assert schedule_horizon(longer, resume_point(longer, tmp_path, resume=True)[1]) == 10
    assert schedule_horizon(longer, None) == 30  # a new run's schedule spans its own steps
    factor = warmup_cosine(longer.learner.model_copy(update={"lr_schedule": "cosine", "warmup_steps": 2}), 10)
    rates = [factor(step) for step in range(2, 30)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))  # never back up
    assert rates[-1] == pytest.approx(longer.learner.min_lr_ratio)


def fingerprint_of_an_older_build(current: dict[str, str]) -> dict[str, str]:
    """The keys a build before teachers.teacher wrote for a shorthand run: teacher.*, models.teacher*, and no
    named-teacher settings."""
    older = {}
    for key, value in current.items():
        if key.startswith("teachers.teacher.model"):
            older[key.replace("teachers.teacher.model", "models.teacher", 1)] = value
        elif key.startswith("teachers.teacher."):
            if key.rsplit(".", 1)[1] not in ("weights", "coef", "prompt_template"):
                older[key.replace("teachers.teacher.", "teacher.", 1)] = value
        else:
            older[key] = value
    return older


def test_a_checkpoint_of_an_older_build_resumes_and_still_refuses_another_teacher(
    tiny_dir: Path, tmp_path: Path
) -> None:
    spec = checkpointed(tiny_dir, tmp_path)
    older = fingerprint_of_an_older_build(run_fingerprint(spec))
    assert "models.teacher (contents)" in older and "teacher.top_k" in older
    write_checkpoint(tmp_path, TrainerState(2, 2, 0, 32, fingerprint=older), lambda d: None, keep=2)
    assert resume_point(spec, tmp_path, resume=True)[1].step == 2
    other_teacher = checkpointed(tiny_dir, tmp_path, teacher={"top_k": 8})
    with pytest.raises(UserError, match=r"\(teachers.teacher.top_k differ\)"):
        resume_point(other_teacher, tmp_path, resume=True)


def test_resume_without_a_checkpoint_is_refused_and_leaves_a_finished_run_whole(tmp_path: Path) -> None:
    """Checkpoints are off by default: `--resume trainer.steps=200` on a finished run used to start over and
    truncate its metrics, TensorBoard, summary and student."""
    files = previous_run(tmp_path)
    spec = checkpointed_spec_free()
    with claimed(tmp_path, "resume"):
        with pytest.raises(UserError, match=r"no checkpoint to continue from .*replace its metrics.jsonl, summary"):
            resume_point(spec, tmp_path, resume=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK_FILE} == files
    never_ran = tmp_path / "never-ran"
    with pytest.raises(UserError, match="holds no run to continue"):
        with claimed(never_ran, "resume"):
            pass


def test_a_finished_stage_is_reused_only_by_the_run_that_finished_it(tiny_dir: Path, tmp_path: Path) -> None:
    from opd_ray.recipe.stages import finished, mark_done

    spec = checkpointed(tiny_dir, tmp_path)
    mark_done(spec, "teacher_generate", {"kept": 3})
    assert finished(checkpointed(tiny_dir, tmp_path, trainer={"steps": 9}), "teacher_generate")["kept"] == 3
    other_teacher = checkpointed(tiny_dir, tmp_path, models={"teacher": {"path": str(tiny_dir / "student")}})
    with pytest.raises(UserError, match=r"finished stage teacher_generate .* teachers.teacher.model"):
        finished(other_teacher, "teacher_generate")


def test_a_checkpoint_missing_a_file_is_skipped_for_the_one_before(tmp_path: Path) -> None:
    for step in (2, 4):
        state = TrainerState(step, step, 0, step)
        write_checkpoint(tmp_path, state, lambda d: (d / "weights.bin").write_bytes(b"w" * 100), keep=2)
    (tmp_path / "checkpoints" / "step_00000004" / "weights.bin").unlink()  # lost in a host crash
    checkpoint, state = resume_point(checkpointed_spec_free(), tmp_path, resume=True)
    assert (checkpoint.name, state.step) == ("step_00000002", 2)
    truncated = tmp_path / "checkpoints" / "step_00000002" / "weights.bin"
    truncated.write_bytes(b"w" * 10)
    assert resume_point(checkpointed_spec_free(), tmp_path, resume=True) == (None, None)


def checkpointed_spec_free() -> ExperimentSpec:
    """A spec for checkpoints written without a fingerprint (nothing to compare)."""
    return ExperimentSpec.model_validate(
        {"models": {"student": {"path": "s"}, "teacher": {"path": "t"}}, "data": {"train": {"path": "d"}}}
    )


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    assert f"{path}:3 is not a whole JSON line" in capsys.readouterr().err
    assert training_trend(path, window=1)["loss"] == [0.5, 0.4]
    writer = MetricsWriter(tmp_path, resume_after=2)  # a resume rewrites the file whole
    writer.write(3, {"loss": 0.3})
    writer.close()
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3]


def test_report_reads_a_run_with_a_torn_line(tmp_path: Path) -> None:
    from opd_ray.report import render

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert "| steps | 1 |" in render([tmp_path], window=1)  # the torn step 2 is not counted


def test_a_checkpoint_whose_contents_changed_is_not_loaded(tmp_path: Path) -> None:
    """Its DeepSpeed files are pickles: a file changed since it was written (same size) is refused before
    anything is unpickled."""
    state = TrainerState(2, 2, 0, 2)
    write_checkpoint(tmp_path, state, lambda d: (d / "state.pt").write_bytes(b"pickle-a"), keep=2)
    checkpoint, _ = resume_point(checkpointed_spec_free(), tmp_path, resume=True)
    (checkpoint / "state.pt").write_bytes(b"pickle-b")
    with pytest.raises(UserError, match=r"state.pt \(changed\): not as written"):
        resume_point(checkpointed_spec_free(), tmp_path, resume=True)
