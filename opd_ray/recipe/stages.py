"""The paper's recipe as stages of one run: teacher_generate -> sft -> opd.

An off-policy cold start raises the student's initial overlap with the teacher, and OPD
from there goes further (the paper's recipe; docs/methods/recipe.md). Each stage writes
its output under `<run.output_dir>/stages/<stage>/` and a `done.json` last; a stage whose
`done.json` exists is skipped, so re-running the same command after a crash redoes only
the unfinished stage (and the OPD stage resumes from its checkpoints with --resume).

- teacher_generate: the teacher, loaded in a rollout engine, answers `prompts` training
  prompts; truncated, repetitive and (optionally) wrong answers are dropped, the rest are
  written as jsonl (ids and text), with the drop counts.
- sft: the student is fine-tuned on those answers' tokens by the run's learner ranks.
- opd: distillation from the SFT student (when sft ran) on the training prompts the cold
  start did not use.

Without opd the stages are sequence-level KD, the baseline beside OPD: the SFT student and the
teacher are evaluated as an OPD run's are, and `max_teacher_tokens` holds the teacher to the budget
an OPD run's teacher scored. A teacher of another vocabulary answers its own prompts; its text (up
to its `answer_stop`) is re-tokenized for the student.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import ray

from opd_ray.actors.rollout import RolloutWorker
from opd_ray.actors.runtime import actor_env, get_or_raise_first
from opd_ray.actors.vllm_engine import ENGINE_ENV, Completion
from opd_ray.console import console, step_progress
from opd_ray.data.repetition import is_repetitive
from opd_ray.data.run_inputs import RunInputs
from opd_ray.data.verifiers import GuardedVerifier
from opd_ray.driver.evaluation import accuracy_of, ended_at, gap_recovery
from opd_ray.driver.fingerprint import check_same_run, run_fingerprint
from opd_ray.driver.interrupts import stop_between_steps
from opd_ray.driver.loop import distill
from opd_ray.driver.outputs_apart import check_outputs_apart
from opd_ray.driver.run_dir import claimed
from opd_ray.errors import UserError
from opd_ray.files import write_json, written_aside
from opd_ray.recipe.startup import start
from opd_ray.recipe.supervised import train_supervised
from opd_ray.spec import ExperimentSpec, ModelSpec, ResourcesSpec, TeacherGenerationSpec
from opd_ray.spec.stages import StageRecord, add_stage

GENERATION_CHUNK = 256  # prompts per generate call: progress and bounded memory
BUDGET_CHUNK = 16  # with max_teacher_tokens: small calls, so that little is generated past the budget
GENERATING = "the teacher generating a chunk of answers (trainer.timeouts.step_s)"


def stage_dir(spec: ExperimentSpec, stage: str) -> Path:
    return Path(spec.run.output_dir) / "stages" / stage


def finished(spec: ExperimentSpec, stage: str, force: bool = False) -> dict | None:
    """The stage's done.json, or None if it has not finished; refused when a spec that defines another
    run (another teacher, other data) finished it."""
    marker = stage_dir(spec, stage) / "done.json"
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    check_same_run(record.get("fingerprint"), spec, f"the finished stage {stage} ({marker})", force)
    return record


def mark_done(spec: ExperimentSpec, stage: str, record: dict) -> None:
    write_json(stage_dir(spec, stage) / "done.json", {**record, "fingerprint": run_fingerprint(spec)})


def drop_reason(
    completion: Completion, answer: str | None, verifier: GuardedVerifier, settings: TeacherGenerationSpec
) -> str | None:
    """Why a teacher answer is left out of the SFT data, or None to keep it (checked in this order)."""
    if settings.drop_truncated and not completion.finished:
        return "truncated"
    if is_repetitive(completion.token_ids, settings.repeat_ngram, settings.max_ngram_repeats):
        return "repetitive"
    if settings.require_correct and not (
        answer is not None and verifier(completion.text, answer, completion.prompt_index)
    ):
        return "wrong"
    return None


def cold_start_rows(spec: ExperimentSpec, train_size: int) -> list[int]:
    """Which training rows the cold start uses: a seeded draw, so every re-run agrees."""
    count = spec.cold_start.teacher_generate.prompts
    return sorted(random.Random(spec.run.seed).sample(range(train_size), min(count, train_size)))


def teacher_engine(spec: ExperimentSpec) -> ray.actor.ActorHandle:
    """The teacher in a rollout engine, sampling with the stage's settings instead of the rollout's."""
    settings = spec.cold_start.teacher_generate
    rollout = spec.rollout.model_copy(
        update={
            "samples_per_prompt": settings.samples_per_prompt,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens or spec.rollout.max_new_tokens,
        }
    )
    name, teacher = next(iter(spec.teachers.items()))  # the spec allows one teacher with this stage
    options = stage_engine_options(teacher.resources)
    return (
        ray.remote(RolloutWorker)
        .options(**options)
        .remote(spec.teacher_model(name), teacher.engine, rollout, spec.run.seed)
    )


def stage_engine_options(resources: ResourcesSpec) -> dict:
    """A cold-start stage's one-off engine: the role's resources and the engines' environment, no restarts."""
    return {**resources.actor_options(), "runtime_env": {"env_vars": {**actor_env()["env_vars"], **ENGINE_ENV}}}


def start_greedy_eval(spec: ExperimentSpec, inputs: RunInputs, model: ModelSpec) -> tuple | None:
    """Starts a greedy evaluation of `model` on the eval prompts in an engine of its own (with the rollout's
    resources); None without eval prompts. `greedy_accuracy` collects it."""
    if inputs.eval is None:
        return None
    options = stage_engine_options(spec.rollout.resources)
    worker = ray.remote(RolloutWorker).options(**options).remote(model, spec.rollout.engine, spec.rollout, 0)
    prompts = inputs.eval.subset(list(range(len(inputs.eval))))
    return worker, worker.greedy.remote(prompts, spec.rollout.max_new_tokens)


def greedy_accuracy(spec: ExperimentSpec, inputs: RunInputs, started: tuple | None, what: str) -> float | None:
    if started is None:
        return None
    worker, ref = started
    try:
        (completions,) = get_or_raise_first([ref], spec.trainer.timeouts.step_s, what)
    finally:
        ray.kill(worker)
    return accuracy_of(completions, inputs.eval, inputs.verifier)


def teacher_accuracy(spec: ExperimentSpec, inputs: RunInputs, engine: ray.actor.ActorHandle) -> float | None:
    """The teacher's greedy accuracy on the eval prompts, in the engine that generated its answers."""
    if inputs.eval is None:
        return None
    rows = list(range(len(inputs.eval)))
    prompts = inputs.eval.teacher_prompts(rows) or inputs.eval.subset(rows)  # its own, as OPD evaluates it
    ref = engine.greedy.remote(prompts, spec.rollout.max_new_tokens)
    (completions,) = get_or_raise_first([ref], spec.trainer.timeouts.step_s, "the teacher's evaluation")
    stops = next(iter(spec.teachers.values())).answer_stop
    return accuracy_of([ended_at(c, stops) for c in completions], inputs.eval, inputs.verifier)


def within_budget(completions: list[Completion], spent: int, budget: int | None) -> list[Completion]:
    """The completions, in order, while fewer than `budget` teacher tokens were spent before each: the
    answer that crosses the budget is kept whole (a cut answer would be a truncation this stage made)."""
    if budget is None:
        return completions
    kept = []
    for completion in completions:
        if spent >= budget:
            break
        kept.append(completion)
        spent += len(completion.token_ids)
    return kept


def in_student_tokens(completion: Completion, spec: ExperimentSpec, inputs: RunInputs) -> Completion:
    """A cross-tokenizer teacher's answer as the student trains on it: its text up to its `answer_stop` (a
    few-shot base model goes on to the next question), stripped, in the student's tokens, with the student's
    end of sequence when the answer ended. A teacher of the student's vocabulary answers in its tokens."""
    teacher = next(iter(spec.teachers.values()))
    if not teacher.cross_tokenizer:
        return completion
    ended = ended_at(completion, teacher.answer_stop)
    text = ended.text.strip()
    ids = inputs.tokenizer(text, add_special_tokens=False).input_ids
    return replace(ended, token_ids=[*ids, inputs.tokenizer.eos_token_id] if ended.finished else ids, text=text)


def write_teacher_answers(
    spec: ExperimentSpec, inputs: RunInputs, engine: ray.actor.ActorHandle, rows: list[int], out: TextIO
) -> Counter:
    """Generates answers for `rows` chunk by chunk and writes the kept ones as jsonl, until the rows or
    `max_teacher_tokens` run out; returns the counts of kept (`kept`), of each drop reason, and of the
    teacher's tokens (`teacher_tokens`, every answer's, kept or not)."""
    settings, counts = spec.cold_start.teacher_generate, Counter()
    budget = settings.max_teacher_tokens
    size = GENERATION_CHUNK if budget is None else BUDGET_CHUNK
    with step_progress("teacher_generate", len(rows)) as progress:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            own_prompts = inputs.train.teacher_prompts(chunk) or inputs.train.subset(chunk)
            ref = engine.complete.remote(own_prompts, spec.run.seed + start)
            (completions,) = get_or_raise_first([ref], spec.trainer.timeouts.step_s, GENERATING)
            for completion in within_budget(completions, counts["teacher_tokens"], budget):
                counts["teacher_tokens"] += len(completion.token_ids)
                completion = in_student_tokens(completion, spec, inputs)
                row = completion.prompt_index
                reason = drop_reason(completion, inputs.train.answers[row], inputs.verifier, settings)
                counts[reason or "kept"] += 1
                if reason is None:
                    record = {
                        "row": row,
                        "prompt_ids": inputs.train.prompt_ids[row],
                        "response_ids": completion.token_ids,
                        "response": completion.text,
                    }
                    out.write(json.dumps(record) + "\n")
            progress.advance(start + len(chunk), f"kept {counts['kept']}")
            if budget is not None and counts["teacher_tokens"] >= budget:
                break
    return counts


def teacher_generate(spec: ExperimentSpec, inputs: RunInputs) -> dict:
    rows = cold_start_rows(spec, len(inputs.train))
    engine = teacher_engine(spec)
    original = start_greedy_eval(spec, inputs, spec.models.student)
    teacher = None
    try:
        with written_aside(stage_dir(spec, "teacher_generate") / "data.jsonl") as partial, partial.open("w") as out:
            counts = write_teacher_answers(spec, inputs, engine, rows, out)
            teacher_tokens = counts.pop("teacher_tokens", 0)
            kept = counts.pop("kept", 0)
            if kept == 0:
                raise UserError(
                    f"teacher_generate: all {sum(counts.values())} teacher answers were dropped ({dict(counts)}); "
                    "raise cold_start.teacher_generate.max_new_tokens or relax its filters"
                )
        if "opd" not in spec.stages:  # no OPD stage measures the teacher: this engine does
            teacher = teacher_accuracy(spec, inputs, engine)
    finally:
        ray.kill(engine)
        student_accuracy = greedy_accuracy(spec, inputs, original, "the original student's evaluation")
    generated = kept + sum(counts.values())
    record = {"rows": rows, "generated": generated, "kept": kept, "dropped": dict(counts)}
    record.update(teacher_tokens=teacher_tokens, student_accuracy_before_cold_start=student_accuracy)
    if teacher is not None:
        record["teacher_accuracy"] = teacher
    console.print(f"teacher_generate: kept {kept} of {record['generated']} answers; dropped {dict(counts) or 'none'}")
    return record


def sft(spec: ExperimentSpec, inputs: RunInputs) -> dict:
    settings = spec.cold_start.sft
    data = stage_dir(spec, "teacher_generate") / "data.jsonl"
    examples = [(row["prompt_ids"], row["response_ids"]) for row in map(json.loads, data.read_text().splitlines())]
    learner = spec.learner.model_copy(
        update={"lr": settings.lr, "lr_schedule": settings.lr_schedule, "warmup_steps": settings.warmup_steps}
    )
    output = stage_dir(spec, "sft") / "student"
    losses = train_supervised(
        spec.models.student,
        output,
        examples,
        learner,
        settings.steps,
        settings.batch_size,
        spec.run.seed,
        "student",
        spec.trainer.timeouts,
    )
    record = {"examples": len(examples), "steps": settings.steps, "final_loss": losses[-1], "student_path": str(output)}
    record["student_tokens_trained"] = sft_tokens_trained(examples, settings.steps, settings.batch_size)
    if "opd" not in spec.stages:  # the SFT student is the result: measure it as OPD's would be
        student = spec.models.student.model_copy(update={"path": str(output)})
        started = start_greedy_eval(spec, inputs, student)
        record["student_accuracy_after"] = greedy_accuracy(spec, inputs, started, "the SFT student's evaluation")
    return record


def sft_tokens_trained(examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int) -> int:
    """Answer tokens the SFT steps train on: steps x batch_size rows drawn uniformly, at the answers' mean
    length (the expected count; the draws themselves happen on the learner ranks)."""
    mean_length = sum(len(response) for _, response in examples) / len(examples)
    return round(steps * batch_size * mean_length)


def opd_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The spec the OPD stage runs: the cold-started student when the sft stage ran."""
    if "sft" not in spec.stages:
        return spec
    student = spec.models.student.model_copy(update={"path": str(stage_dir(spec, "sft") / "student")})
    models = spec.models.model_copy(update={"student": student, "build_tiny": None})  # built before the stages
    return spec.model_copy(update={"models": models})


def run_stages(
    spec: ExperimentSpec,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    spec_file: Path | None = None,
) -> dict:
    """`opd-ray train`: the spec's stages in order, in a run directory this process holds (refused if it
    holds another run's results, unless resume or overwrite, or if it overlaps anything the run reads,
    `spec_file` included); the summary is OPD's, with what the cold start did. `force` resumes checkpoints
    and stages whose fingerprint differs from the spec's."""
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    check_outputs_apart(spec, spec_file, resume)
    with stop_between_steps(), claimed(Path(spec.run.output_dir), mode) as run_dir:  # a signal before OPD: stop now
        spec = spec.model_copy(update={"run": spec.run.model_copy(update={"output_dir": str(run_dir)})})
        inputs = start(spec)
        records = run_cold_start(spec, inputs, force)
        if "opd" not in spec.stages:
            return cold_start_summary(spec, records, run_dir)
        if "teacher_generate" in records:  # OPD trains on the prompts the cold start did not answer
            inputs = replace(inputs, train=inputs.train.without(set(records["teacher_generate"]["rows"])))
        summary = distill(opd_spec(spec), inputs, resume=resume, force=force)
    if records:
        summary["cold_start"] = {
            stage: {k: v for k, v in record.items() if k not in ("rows", "fingerprint")}
            for stage, record in records.items()
        }
        summarise_from_original_student(summary, records)
    return summary


def cold_start_summary(spec: ExperimentSpec, records: dict[str, dict], run_dir: Path) -> dict:
    """A run without OPD (sequence-level KD: teacher answers, then SFT): the same accuracy and budget fields
    an OPD summary has, written as its summary.json."""
    generated, trained = records.get("teacher_generate", {}), records.get("sft", {})
    summary = {"run": spec.run.name, "objective": "cold start only (sequence-level KD)"}
    summary["teacher_accuracy"] = generated.get("teacher_accuracy")
    summary["student_accuracy_before"] = generated.get("student_accuracy_before_cold_start")
    summary["student_accuracy_after"] = trained.get("student_accuracy_after")
    summary["teacher_tokens"] = generated.get("teacher_tokens")
    summary["student_tokens_trained"] = trained.get("student_tokens_trained")
    before, after, teacher = (
        summary[key] for key in ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy")
    )
    if None not in (before, after, teacher):
        summary["gap_recovery"] = gap_recovery(before, after, teacher)
    summary["stages"] = {
        stage: {k: v for k, v in r.items() if k not in ("rows", "fingerprint")} for stage, r in records.items()
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def summarise_from_original_student(summary: dict, records: dict[str, dict]) -> None:
    """The student's accuracy before the cold start, and the gap the whole recipe closed from there."""
    original = records.get("teacher_generate", {}).get("student_accuracy_before_cold_start")
    summary["student_accuracy_before_cold_start"] = original
    after, teacher = summary.get("student_accuracy_after"), summary.get("teacher_accuracy")
    if None not in (original, after, teacher):
        summary["gap_recovery_from_original_student"] = gap_recovery(original, after, teacher)


StageRunner = Callable[[ExperimentSpec, RunInputs], dict]
# The stages before OPD by name (spec/stages.py holds their records; OPD itself is driver/loop.py's distill):
# each writes its output under stages/<name>/ (stage_dir) and returns the record its done.json keeps.
STAGE_RUNNERS: dict[str, StageRunner] = {"teacher_generate": teacher_generate, "sft": sft}


def register_stage(record: StageRecord, runner: StageRunner, before: str = "opd") -> None:
    """A new stage: its record (what it needs, spec/stages.py) and the function that runs it, before `before`."""
    add_stage(record, before)
    STAGE_RUNNERS[record.name] = runner


def run_cold_start(spec: ExperimentSpec, inputs: RunInputs, force: bool = False) -> dict[str, dict]:
    """The stages before OPD, each skipped when its done.json exists; their records by stage."""
    records: dict[str, dict] = {}
    for stage in spec.stages:
        if stage == "opd":
            break
        done = finished(spec, stage, force)
        if done is not None:
            console.print(f"stage {stage}: done already ({stage_dir(spec, stage)}); skipped")
            records[stage] = done
            continue
        console.print(f"[bold]stage {stage}[/]")
        records[stage] = STAGE_RUNNERS[stage](spec, inputs)
        mark_done(spec, stage, records[stage])  # last: a stage killed before this runs again
    return records
