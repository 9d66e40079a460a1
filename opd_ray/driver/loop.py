"""The on-policy distillation loop. It wires the roles together and owns nothing heavy.

    start the run: its directory, the roles, the accuracies before training (or a checkpoint)
    for each step:
        launch     <- the prompts of the steps the run may be ahead by      [steps.py, buffer.py]
        resolve    <- student samples (vLLM) scored by the teacher          [pipeline.py]
        learn      <- the learners minimise the objective on the batch      [actors/learner.py]
        sync       <- new student weights reach every rollout engine        [roles.py]
        evaluate   <- greedy accuracy every trainer.eval_every steps        [evaluation.py]
        checkpoint <- every trainer.checkpoint_every steps                  [checkpoint.py]
    finish: the last weights synced, accuracy after training, the student saved, summary.json

Batches move as ObjectRefs; the driver sees refs and per-step metrics only. Dead rollout
workers and teachers are restarted and their lost work re-issued [roles.py].
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import ray

from opd_ray.console import console, step_progress
from opd_ray.data.order import PromptSampler
from opd_ray.data.run_inputs import RunInputs
from opd_ray.driver.accuracy_cache import cache_entry, cached_teacher_accuracy, store_teacher_accuracy
from opd_ray.driver.buffer import RolloutBuffer
from opd_ray.driver.checkpoint import (
    BEFORE_TRAINING,
    TrainerState,
    check_shared_storage,
    latest_checkpoint,
    learner_death_stops_run,
    resume_point,
    save_checkpoint,
    schedule_horizon,
)
from opd_ray.driver.evaluation import Accuracy, evaluate_by_teacher, gap_recovery
from opd_ray.driver.fingerprint import run_fingerprint
from opd_ray.driver.interrupts import StopRequest, stop_between_steps, stop_if_signalled
from opd_ray.driver.metrics import MetricsWriter, read_metrics, timed, token_totals, training_trend
from opd_ray.driver.pipeline import Pipeline
from opd_ray.driver.roles import Roles, learner_parameters, record_placement, start_roles, sync_weights
from opd_ray.driver.steps import StepWork, launch_step, prompts_digest
from opd_ray.driver.teacher_agreement import keep_prompts_the_teacher_agrees_on
from opd_ray.errors import Interrupted, RunStopped, Stuck
from opd_ray.files import write_json, write_text_durably, written_aside
from opd_ray.health.doctor import Diagnosis, Doctor
from opd_ray.spec import ExperimentSpec, spec_to_yaml
from opd_ray.tracking import open_trackers


@dataclass
class Run:
    """What one distillation run carries from step to step."""

    spec: ExperimentSpec
    inputs: RunInputs
    run_dir: Path
    roles: Roles
    pipeline: Pipeline
    buffer: RolloutBuffer[StepWork]
    writer: MetricsWriter
    sampler: PromptSampler
    summary: dict
    weight_version: int = 0  # updates the learners have applied: the student's weight version
    next_launch: int = 1  # the next step to launch; before the loop, the first step to train
    bad_steps: int = 0  # consecutive steps whose update was skipped
    fingerprint: dict = field(default_factory=dict)  # what defines the run, stored with each checkpoint
    doctor: Doctor | None = None  # health signals and named conditions, every step
    stop: StopRequest = field(default_factory=StopRequest)  # SIGTERM/SIGINT: stop after this step
    finished_work: StepWork | None = None  # the last step trained (what a checkpoint of it records)
    saved_step: int = 0  # the last step checkpointed
    startup: dict = field(default_factory=dict)  # seconds of each phase before step 1 (summary.json)
    finished: bool = False  # every step trained and the summary written
    schedule_steps: int = 0  # the learning-rate schedule's horizon (checkpoint.schedule_steps)

    def close(self) -> None:
        """The roles first (their GPUs are not held while a tracker uploads), then the trackers, which get the
        summary when one was written (a finished run, or one stop_on ended)."""
        try:
            self.roles.shutdown()
        finally:
            self.writer.close(self.summary if "steps" in self.summary else None, succeeded=self.finished)


def distill(spec: ExperimentSpec, inputs: RunInputs, resume: bool = False, force: bool = False) -> dict:
    """Start the run; for each step: launch, resolve, learn, sync, evaluate, checkpoint; finish.

    `inputs` is what `recipe.startup.start` checked and tokenized; `force` resumes a checkpoint
    whose fingerprint differs from the spec's. Returns the run's summary."""
    started = time.perf_counter()
    with stop_between_steps() as stop:  # before the loop a signal stops at once (interrupts.py)
        run = start_run(spec, inputs, resume, force)
        run.stop, stop.training = stop, True
        try:
            first_step = run.next_launch
            with step_progress("distill", spec.trainer.steps, first_step - 1) as progress:
                for step in range(first_step, spec.trainer.steps + 1):
                    loss = run_step(run, step)["loss"]
                    note = "update skipped" if loss is None else f"loss {loss:.3f}"
                    warnings = run.doctor.active(step)
                    progress.advance(step, note + (f" [health: {', '.join(warnings)}]" if warnings else ""))
                    if run.stop.requested and step < spec.trainer.steps:
                        # the signal may have come after this step's own checkpoint decision
                        checkpoint_now(run, step, run.finished_work)
                        raise Interrupted(stopped_message(run, step), run.stop.exit_code)
            summary = finish_run(run, started)
            run.finished = True
            return summary
        except Stuck as exc:
            raise Stuck(f"{exc}; last checkpoint: {latest_checkpoint(run.run_dir) or 'none'}") from None
        finally:
            run.close()


def stopped_message(run: Run, step: int) -> str:
    """What a run stopped by a signal says: where it stopped and what to resume from."""
    last = latest_checkpoint(run.run_dir)
    if run.spec.trainer.checkpoint_every and last is not None:
        resume = f"checkpoint {last}; continue with --resume"
    else:
        resume = "checkpoints are off (trainer.checkpoint_every: 0), so a re-run starts over (--overwrite)"
    return f"stopped by {run.stop.name} after step {step} of {run.spec.trainer.steps}; {resume}"


# ---- start and finish ----


def start_run(spec: ExperimentSpec, inputs: RunInputs, resume: bool, force: bool = False) -> Run:
    """The run directory, every role, and where training starts: a checkpoint, or the accuracies before it."""
    run_dir = Path(spec.run.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, state = resume_point(spec, run_dir, resume, force)
    spec_yaml = record_spec(spec, run_dir, state)
    summary: dict = {"run": spec.run.name, "objective": spec.algorithm.objective, "vocab_size": len(inputs.tokenizer)}
    if inputs.selection is not None:
        console.print(f"prompt selection: {inputs.selection}")
        write_json(run_dir / "selection.json", inputs.selection)
        summary["prompt_selection"] = inputs.selection
    teachers = ", ".join(f"{t.num_replicas} {name}" for name, t in spec.teachers.items())
    console.print(
        f"[bold]opd-ray[/] {spec.run.name}: starting roles ({spec.rollout.num_workers} rollout, "
        f"teachers: {teachers}, {spec.learner.num_ranks} learner ranks)"
    )
    roles_started, roles, trackers = time.time(), None, None
    try:
        trackers = open_trackers(spec, run_dir, spec_yaml, resume_after=state.step if state else None)
        stop_if_signalled()  # the trackers' imports are where a signal's exception can be swallowed
        horizon = schedule_horizon(spec, state)
        roles = start_roles(spec, horizon)
        stop_if_signalled()
        record_placement(roles, run_dir)
        check_shared_storage(roles.learners, run_dir, spec.trainer.timeouts.start_s)
        summary["learner_parameters"] = learner_parameters(roles, spec.trainer.timeouts.start_s)
        if spec.data.selection is not None and spec.data.selection.keep_top_fraction is not None:
            train = keep_prompts_the_teacher_agrees_on(spec, roles, inputs.train, run_dir, resume=state is not None)
            inputs = replace(inputs, train=train)
        writer = MetricsWriter(run_dir, trackers, resume_after=state.step if state else 0)
        run = new_run(spec, inputs, run_dir, roles, summary, writer)
        run.schedule_steps = horizon
        run.startup.update(before_roles=roles_started - process_started(), roles=time.time() - roles_started)
        if state is not None:
            restore(run, checkpoint, state)
        else:
            measure_before_training(run)
    except BaseException:
        try:
            if roles is not None:
                roles.shutdown()
        finally:
            if trackers is not None:
                trackers.finish(None, succeeded=False)
        raise
    teacher, student = summary.get("teacher_accuracy"), summary.get("student_accuracy_before")
    if teacher is not None:
        console.print(f"teacher accuracy {teacher:.3f}, student {student:.3f}")
    report_startup(run)
    return run


def process_started() -> float:
    """When this command's process started (wall clock): the time before step 1 counts Python's imports too."""
    return psutil.Process().create_time()


def report_startup(run: Run) -> None:
    """Where the time before step 1 went, on the console and in summary.json's `startup_seconds`."""
    phases = {name: round(seconds, 1) for name, seconds in run.startup.items()}
    phases["before_first_step"] = round(time.time() - process_started(), 1)
    run.summary["startup_seconds"] = phases
    parts = [f"{phases['before_roles']:.0f} s to the roles (imports, models, data, Ray)"]
    parts.append(f"roles {phases['roles']:.0f} s")
    if "accuracy_before" in phases:
        parts.append(f"accuracy before training {phases['accuracy_before']:.0f} s")
    console.print(f"step 1 starts {phases['before_first_step']:.0f} s after the command: " + ", ".join(parts))


def new_run(
    spec: ExperimentSpec, inputs: RunInputs, run_dir: Path, roles: Roles, summary: dict, writer: MetricsWriter
) -> Run:
    """A run at step 1; the buffer's bound lets asynchronous mode launch max_staleness steps ahead."""
    trainer = spec.trainer
    staleness_limit = trainer.max_staleness + trainer.weight_sync_interval - 1
    run = Run(
        spec=spec,
        inputs=inputs,
        run_dir=run_dir,
        roles=roles,
        pipeline=Pipeline(roles, inputs.train, spec.run.seed, trainer.shard_size(spec.rollout.num_workers)),
        buffer=RolloutBuffer(capacity=trainer.max_staleness + 1, max_staleness=staleness_limit),
        writer=writer,
        sampler=PromptSampler(len(inputs.train), spec.run.seed),
        summary=summary,
        fingerprint=run_fingerprint(spec),
        doctor=Doctor(spec.health, len(inputs.tokenizer), spec.trainer.stop_on),
    )
    earlier = read_metrics(writer.path)  # a resume's steps before its checkpoint: the doctor catches up on them
    if earlier:
        run.doctor.replay(earlier)
    return run


def measure_before_training(run: Run) -> None:
    """The teachers' and the student's accuracy before training (at once when their engines have GPUs of their
    own); the teachers' comes from the cache when this teacher, eval set and decoding were measured before
    (accuracy_cache.py). Per teacher too when the spec names them."""
    spec, eval_prompts = run.spec, run.inputs.eval
    if eval_prompts is None:
        run.summary.update(teacher_accuracy=None, student_accuracy_before=None)
        return
    started = time.perf_counter()
    entry = cache_entry(spec, eval_prompts)
    cached = cached_teacher_accuracy(entry) if spec.trainer.reuse_teacher_accuracy else None
    who = "the student" if cached else "the teachers and the student"
    console.print(
        f"accuracy before training: {who} answering {len(eval_prompts)} eval prompts greedily "
        f"(<= {spec.rollout.max_new_tokens} new tokens)"
    )
    if cached or not engines_on_own_devices(spec):
        teacher = cached[0] if cached else accuracies(run, "teacher")
        student = accuracies(run, "rollout")
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:  # the student's engines answer while the teachers do
            student_answers = pool.submit(accuracies, run, "rollout")
            teacher = accuracies(run, "teacher")
            student = student_answers.result()
    if cached:
        console.print(
            f"  teacher accuracy from the cache (measured {cached[1]}: same teacher, eval prompts and decoding; "
            "trainer.reuse_teacher_accuracy: false measures it again)"
        )
    else:
        store_teacher_accuracy(entry, spec, teacher)
    run.summary.update(
        teacher_accuracy=teacher.overall,
        teacher_accuracy_cached=cached is not None,
        student_accuracy_before=student.overall,
    )
    run.startup["accuracy_before"] = time.perf_counter() - started
    if spec.several_teachers:
        run.summary["teachers"] = {
            name: {"teacher_accuracy": teacher.by_teacher[name], "student_accuracy_before": student.by_teacher[name]}
            for name in teacher.by_teacher
        }


def engines_on_own_devices(spec: ExperimentSpec) -> bool:
    """Rollout engines and teachers on GPUs of their own evaluate at once. On CPUs they share the cores, and
    two evaluations at once were slower than one after the other (SmolLM2 on 2 cores: 33 s against 21 s)."""
    return spec.rollout.resources.num_gpus > 0 and all(t.resources.num_gpus > 0 for t in spec.teachers.values())


def record_spec(spec: ExperimentSpec, run_dir: Path, resumed: TrainerState | None) -> str:
    """spec.yaml: the resolved spec the run started with. A resumed run whose spec changed (in keys that
    may change, or with --force) keeps it and writes its own beside it. Returns this run's spec as YAML."""
    path, spec_yaml = run_dir / "spec.yaml", spec_to_yaml(spec)
    if resumed is not None and path.is_file() and path.read_text() != spec_yaml:
        path = run_dir / f"spec.resumed-at-step-{resumed.step}.yaml"
        console.print(f"the spec differs from the one this run started with (spec.yaml); this one is in {path.name}")
    write_text_durably(path, spec_yaml)
    return spec_yaml


def restore(run: Run, checkpoint: Path, state: TrainerState) -> None:
    """The learners' state, the data order and the engines' weights as they were at the checkpoint."""
    run.roles.learners.load_checkpoint(str(checkpoint), run.spec.trainer.timeouts.checkpoint_s)
    run.weight_version, run.next_launch = state.weight_version, state.step + 1
    run.sampler.restore(state.sampler_epoch, state.sampler_position)
    sync_weights(run.roles, run.weight_version)
    run.summary.update(state.summary)
    console.print(f"resumed from {checkpoint} (step {state.step}, weight version {run.weight_version})")


def finish_run(run: Run, started: float) -> dict:
    """The last weights to the engines, accuracy after training, the student saved, summary.json."""
    spec, summary = run.spec, run.summary
    if run.weight_version % spec.trainer.weight_sync_interval:
        sync_weights(run.roles, run.weight_version)
    student = accuracies(run, "rollout")
    summary["student_accuracy_after"] = None if student is None else student.overall
    if summary["teacher_accuracy"] is not None:
        summary["gap_recovery"] = gap_recovery(
            summary["student_accuracy_before"], summary["student_accuracy_after"], summary["teacher_accuracy"]
        )
    for name, own in summary.get("teachers", {}).items():
        own["student_accuracy_after"] = student.by_teacher.get(name)
        own["gap_recovery"] = gap_recovery(
            own["student_accuracy_before"], own["student_accuracy_after"], own["teacher_accuracy"]
        )
    if spec.trainer.save_final:
        summary["student_path"] = str(save_student(run))
    return write_summary(run, spec.trainer.steps, wall_seconds=round(time.perf_counter() - started, 1))


def save_student(run: Run) -> Path:
    """The trained student in `student/`, written aside and renamed: a kill mid-save leaves the previous
    one (or none), never a torn folder."""
    final_dir = run.run_dir / "student"
    with written_aside(final_dir) as staging:
        run.roles.learners.save_pretrained(
            str(staging), run.spec.models.student.path, run.spec.trainer.timeouts.checkpoint_s
        )
    return final_dir


def write_summary(run: Run, steps: int, **extra: float) -> dict:
    """summary.json after `steps` steps (a finished run's, or one stop_on ended): what the run measured, its
    first-vs-last trend and its health."""
    trained, scored = token_totals(run.writer.path)
    trend = training_trend(run.writer.path)
    run.summary.update(steps=steps, teacher_tokens=scored, student_tokens_trained=trained)
    run.summary.update(first_vs_last_steps=trend, health=run.doctor.summary(), **extra)
    write_json(run.run_dir / "summary.json", run.summary)
    return run.summary


def accuracies(run: Run, kind: str) -> Accuracy | None:
    """Greedy accuracy of the student ("rollout") or the teachers on the eval prompts, if the spec has them:
    overall and per teacher's rows."""
    if run.inputs.eval is None:
        return None
    inputs = run.inputs
    spec = run.spec
    return evaluate_by_teacher(
        run.roles, kind, inputs.eval, inputs.verifier, spec.rollout.max_new_tokens, spec.answer_stops
    )


# ---- one step ----


def run_step(run: Run, step: int) -> dict:
    """launch, resolve, learn, sync, evaluate, record, checkpoint; returns the step's metrics."""
    metrics: dict = {}
    started, busy_before = time.perf_counter(), run.pipeline.busy_seconds
    launch_ahead(run)
    work = run.buffer.take()
    refs, sampled_version = resolve(run, work, metrics)
    learn(run, step, refs, metrics)
    sync(run, metrics)
    metrics.update(rollout_weight_version=sampled_version, weight_version=run.weight_version)
    metrics.update({f"restarts/{kind}": count for kind, count in run.roles.restarts.items()})
    evaluate_now(run, step, metrics)
    metrics["time/step"] = time.perf_counter() - started
    metrics.update(run.pipeline.utilisation(metrics["time/step"], busy_before, metrics.get("time/learn", 0.0)))
    diagnoses = examine(run, step, metrics)
    run.writer.write(step, metrics)
    stop_if_unhealthy(run, step, diagnoses)
    stop_if_diverging(run, step)
    run.finished_work = work
    checkpoint_now(run, step, work)
    return metrics


def launch_ahead(run: Run) -> None:
    """Launches steps while the buffer has room: the current step, and in asynchronous mode up to
    max_staleness later ones, whose rollouts then run while the learners train."""
    while not run.buffer.full() and run.next_launch <= run.spec.trainer.steps:
        run.buffer.put(launch_step(run.spec, run.pipeline, run.inputs, run.sampler, run.next_launch))
        run.next_launch += 1


def resolve(run: Run, work: StepWork, metrics: dict) -> tuple[list[ray.ObjectRef], int]:
    """Waits for the step's scored batches; returns their refs and the oldest weight version that sampled them."""
    metrics["prompts_digest"] = prompts_digest(list(work.indices))
    if work.dataset:
        metrics["dataset_batch"] = 1
    refs, sampled_version = work.resolve(run.pipeline, metrics)
    metrics["staleness"] = run.buffer.check_fresh(sampled_version, run.weight_version)
    return refs, sampled_version


def learn(run: Run, step: int, refs: list[ray.ObjectRef], metrics: dict) -> None:
    """One update on the step's batches; a skipped (non-finite) one leaves the weight version as it was."""
    spec = run.spec
    diagnostics_k = spec.diagnostics.top_k if spec.diagnostics.enabled else None
    names = tuple(spec.teachers) if spec.several_teachers else ()
    with timed("learn", metrics), learner_death_stops_run(run.run_dir):
        learners = run.roles.learners
        metrics.update(learners.train_step(refs, spec.algorithm, diagnostics_k, step, run.pipeline.get, names))
    if metrics.get("skipped_update"):
        run.bad_steps += 1
        console.print(f"[red]step {step}: non-finite loss, update skipped ({run.bad_steps} in a row)[/]")
    else:
        run.bad_steps = 0
        run.weight_version += 1


def sync(run: Run, metrics: dict) -> None:
    """New weights to the engines every weight_sync_interval updates; in asynchronous mode the reload is
    queued behind the rollouts already in flight."""
    if metrics.get("skipped_update") or run.weight_version % run.spec.trainer.weight_sync_interval:
        return
    with timed("weight_sync", metrics):
        sync_weights(run.roles, run.weight_version, wait=run.spec.trainer.max_staleness == 0)


def evaluate_now(run: Run, step: int, metrics: dict) -> None:
    """Accuracy and gap recovery every trainer.eval_every steps (the last step is evaluated by finish_run)."""
    every = run.spec.trainer.eval_every
    if not every or step % every or step >= run.spec.trainer.steps:
        return
    with timed("eval", metrics):
        student = accuracies(run, "rollout")
        metrics["eval/student_accuracy"] = None if student is None else student.overall
        before, teacher = run.summary["student_accuracy_before"], run.summary["teacher_accuracy"]
        if teacher is not None:
            metrics["eval/gap_recovery"] = gap_recovery(before, metrics["eval/student_accuracy"], teacher)
        for name, own in run.summary.get("teachers", {}).items():
            now = student.by_teacher.get(name)
            metrics[f"teacher/{name}/eval/student_accuracy"] = now
            if now is not None:
                recovered = gap_recovery(own["student_accuracy_before"], now, own["teacher_accuracy"])
                metrics[f"teacher/{name}/eval/gap_recovery"] = recovered


def examine(run: Run, step: int, metrics: dict) -> list[Diagnosis]:
    """The doctor's signals join the step's metrics; a condition holding for the first time is printed."""
    diagnoses = run.doctor.observe(step, metrics)
    for diagnosis in diagnoses:
        console.print(f"[yellow]health: {diagnosis.line()}[/]")
    return diagnoses


def stop_if_unhealthy(run: Run, step: int, diagnoses: list[Diagnosis]) -> None:
    """trainer.stop_on: a named condition ends the run here (no checkpoint of the sick student); the
    summary records why."""
    diagnosis = run.doctor.must_stop(diagnoses)
    if diagnosis is None:
        return
    write_summary(run, step)
    last = latest_checkpoint(run.run_dir)
    raise RunStopped(f"stopped at step {step} by trainer.stop_on: {diagnosis.line()} Last checkpoint: {last or 'none'}")


def stop_if_diverging(run: Run, step: int) -> None:
    """trainer.max_bad_steps skipped updates in a row: stop before anything is checkpointed."""
    if run.bad_steps >= run.spec.trainer.max_bad_steps:
        last = latest_checkpoint(run.run_dir)
        raise RunStopped(
            f"{run.bad_steps} consecutive steps with a non-finite loss (last: step {step}); "
            f"last good checkpoint: {last or 'none'}. Lower learner.lr or check the data, then --resume"
        )


def checkpoint_now(run: Run, step: int, work: StepWork) -> None:
    """Every trainer.checkpoint_every steps, at the last step, and before a run stopped by a signal ends; the
    data order recorded is the one after this step's prompts (the sampler itself has run ahead in asynchronous
    mode). The last step's checkpoint lets a finished run be extended (`--resume trainer.steps=<more>`) from
    where it ended, so no step the trackers already hold is run again."""
    every = run.spec.trainer.checkpoint_every
    if not every or run.saved_step == step:
        return
    if step % every and step != run.spec.trainer.steps and not run.stop.requested:
        return
    epoch, position = work.sampler_after
    before = {key: run.summary[key] for key in BEFORE_TRAINING if key in run.summary}
    state = TrainerState(step, run.weight_version, epoch, position, before, run.fingerprint, run.schedule_steps)
    with learner_death_stops_run(run.run_dir):
        save_checkpoint(run.spec, run.roles, run.run_dir, state)
    run.saved_step = step
    run.writer.durable(step)
