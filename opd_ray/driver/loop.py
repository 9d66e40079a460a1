"""The on-policy distillation loop. It wires the roles together and owns nothing heavy.

    for each step:
        prompts  <- next prompts of the shuffled training set
        rollout  <- student samples responses (vLLM, current weights)       [rollout.py]
        scored   <- teacher log-prob + top-k of every response token        [teacher.py]
        update   <- learners minimise per-token reverse KL on `scored`      [learner.py]
        sync     <- new student weights reach every rollout engine          [weight_sync.py]

Batches move as ObjectRefs through a bounded buffer [buffer.py]; the driver sees refs and
per-step metrics only. Dead rollout workers and teachers are restarted and their lost work
re-issued [roles.py]; checkpoints and --resume [checkpoint.py].
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from opd_ray.actors.learner import get_or_raise_first
from opd_ray.actors.runtime import connect
from opd_ray.console import console, step_progress
from opd_ray.data.preflight import Prepared, prepare
from opd_ray.data.prompts import PromptSet
from opd_ray.driver.alignment import select_aligned
from opd_ray.driver.buffer import BufferEntry, RolloutBuffer
from opd_ray.driver.checkpoint import TrainerState, latest_checkpoint, write_checkpoint
from opd_ray.driver.metrics import MetricsWriter, timed
from opd_ray.driver.pipeline import Pipeline, StepShards
from opd_ray.driver.roles import Roles, call_restarting, split, start_roles, sync_weights
from opd_ray.errors import RunStopped, UserError
from opd_ray.losses.batch import supervised_batch
from opd_ray.recipe.tiny_models import ensure_tiny_models
from opd_ray.spec import ExperimentSpec, spec_to_yaml


class PromptSampler:
    """Reshuffles the training prompts every epoch with a seeded RNG: a reproducible data order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def restore(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._order = self._shuffled()

    def next(self, count: int) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            take = min(count - len(chosen), self.size - self.position)
            chosen += self._order[self.position : self.position + take]
            self.position += take
        return chosen


def evaluate(roles: Roles, kind: str, prompts: PromptSet, verifier, max_new_tokens: int) -> float:
    """Greedy accuracy on the `kind` actors ("rollout" = the student, "teacher"); a response cut off
    by the length limit counts as wrong."""
    workers = roles.rollout_workers if kind == "rollout" else roles.teachers
    shards = split(list(range(len(prompts))), len(workers))
    args = [(prompts.subset(shard), max_new_tokens) for shard in shards]
    results = call_restarting(roles, kind, workers[: len(shards)], "greedy", args)
    completions = [c for shard in results for c in shard]
    correct = sum(c.finished and verifier(c.text, prompts.answers[c.prompt_index]) for c in completions)
    return correct / len(completions)


def gap_recovery(before: float, after: float, teacher: float) -> float | None:
    """Share of the teacher-student accuracy gap that distillation closed."""
    gap = teacher - before
    return (after - before) / gap if abs(gap) > 1e-9 else None


def on_student_samples(spec: ExperimentSpec, step: int) -> bool:
    """GKD's lambda: whether this step trains on student samples (else on dataset answers); seeded per step."""
    fraction = spec.algorithm.student_data_fraction
    return fraction >= 1 or random.Random(spec.run.seed * 1_000_003 + step).random() < fraction


def supervised_refs(prepared: Prepared, indices: list[int]) -> list[ray.ObjectRef]:
    """The control arm: the same prompts with the dataset's reference answers, no student samples."""
    eos = [prepared.tokenizer.eos_token_id]
    rows = [
        (
            prepared.train.prompt_ids[i],
            prepared.tokenizer(prepared.train.answers[i], add_special_tokens=False).input_ids + eos,
        )
        for i in indices
    ]
    return [ray.put(supervised_batch(rows, indices))]


@dataclass
class StepWork:
    """A launched step: its prompts, where the data order stands after it (what a checkpoint of
    this step records), and its data: shards moving through the pipeline, or ready batches."""

    step: int
    indices: tuple[int, ...]
    sampler_after: tuple[int, int]
    launch_version: int  # the weights the rollout engines held when the step was launched
    shards: StepShards | None = None
    ready_refs: list[ray.ObjectRef] | None = None  # sft: the dataset's answers, nothing to score
    dataset: bool = False

    def resolve(self, pipeline: Pipeline, metrics: dict) -> tuple[list[ray.ObjectRef], int]:
        """Waits for the step's data; returns its batch refs and the oldest policy version in it."""
        if self.shards is None:
            return self.ready_refs, self.launch_version
        with timed("wait_for_data", metrics):
            refs = pipeline.wait_step(self.shards)
        for stage in ("rollout", "teacher"):  # compute time, summed over the step's shards
            if (seconds := self.shards.stage_seconds(stage)) is not None:
                metrics[f"time/{stage}"] = seconds
        version = self.shards.policy_version
        return refs, version if version >= 0 else self.launch_version


def launch_step(
    spec: ExperimentSpec, pipeline: Pipeline, prepared: Prepared, sampler: PromptSampler, step: int
) -> StepWork:
    """Draws the step's prompts and queues its work: student rollouts that flow on into the teacher,
    or (sft, GKD's dataset share) the dataset's answers."""
    indices = sampler.next(spec.trainer.prompts_per_step)
    work = StepWork(step, tuple(indices), (sampler.epoch, sampler.position), pipeline.roles.weight_version)
    if spec.algorithm.objective == "sft":
        work.ready_refs, work.dataset = supervised_refs(prepared, indices), True
    elif on_student_samples(spec, step):
        work.shards = pipeline.launch_rollouts(step, indices, spec.rollout.samples_per_prompt)
    else:
        work.shards, work.dataset = (
            pipeline.launch_scoring(step, supervised_refs(prepared, indices), [len(indices)]),
            True,
        )
    return work


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


def save_checkpoint(spec: ExperimentSpec, roles: Roles, run_dir: Path, state: TrainerState) -> Path:
    """Only finite weights are checkpointed: a poisoned model must never replace a good checkpoint."""
    if not all(ray.get(roles.learners.call("parameters_finite"))):
        raise RunStopped(f"the student's weights are not finite at step {state.step}; no checkpoint written")

    def learners_write(directory: Path) -> None:
        get_or_raise_first(roles.learners.call("save_checkpoint", str(directory), spec.models.student.path))

    return write_checkpoint(run_dir, state, learners_write, spec.trainer.keep_checkpoints)


@contextmanager
def learner_death_stops_run(run_dir: Path) -> Iterator[None]:
    """A learner rank's optimizer state dies with it: stop cleanly and point at the last checkpoint."""
    try:
        yield
    except RayActorError as exc:
        last = latest_checkpoint(run_dir)
        resume = f"resume from {last} with --resume" if last else "no checkpoint yet: set trainer.checkpoint_every"
        raise RunStopped(f"a learner rank died ({type(exc).__name__}); {resume}") from None


def stage_utilisation(metrics: dict, pipeline: Pipeline, busy_before: dict[str, float]) -> dict[str, float]:
    """Share of the step each stage's actors spent computing (compute finished during the step,
    over step time x actors) and the idle seconds that leaves: where the pipeline waits."""
    step_s = metrics["time/step"]
    out = {}
    for pool in (pipeline.rollout, pipeline.teacher):
        capacity = step_s * len(pool.actors)
        busy = pool.busy_seconds - busy_before[pool.kind]
        out[f"busy/{pool.kind}"] = min(1.0, busy / capacity)  # shards may span steps
        out[f"idle_s/{pool.kind}"] = max(0.0, capacity - busy)
    out["busy/learner"] = metrics.get("time/learn", 0.0) / step_s
    out["idle_s/learner"] = step_s - metrics.get("time/learn", 0.0)
    return out


def keep_aligned_prompts(
    spec: ExperimentSpec, roles: Roles, train: PromptSet, run_dir: Path, resume: bool
) -> PromptSet:
    """data.selection.keep_top_fraction: the prompts the teacher agrees with most (alignment.py). Scored
    once with the initial student; a resumed run reuses the recorded choice, so its data order holds."""
    record = run_dir / "alignment.json"
    if resume and record.is_file():
        dropped = set(json.loads(record.read_text())["dropped_rows"])
    else:
        dropped, stats = select_aligned(roles, train, spec)
        console.print(f"alignment selection: {stats}")
        record.write_text(json.dumps({**stats, "dropped_rows": sorted(dropped)}, indent=2))
    return train.without(dropped)


def record_placement(roles: Roles, run_dir: Path) -> None:
    """placement.json: the node (and GPUs) of every actor, and one line per role on the console."""
    locations = roles.locations()
    (run_dir / "placement.json").write_text(json.dumps(locations, indent=2))
    for role, actors in locations.items():
        nodes = Counter(actor["node_id"][:8] + "@" + actor["node_ip"] for actor in actors)
        console.print(f"  {role}: " + ", ".join(f"{count} on node {node}" for node, count in nodes.items()))


def prompts_digest(indices: list[int]) -> str:
    """A short fingerprint of a step's prompts: equal data order across runs is equal digests."""
    return hashlib.sha1(json.dumps(indices).encode()).hexdigest()[:12]


def distill(spec: ExperimentSpec, resume: bool = False, exclude_train: set[int] | frozenset[int] = frozenset()) -> dict:
    """`exclude_train`: training rows left out (those the cold start answered)."""
    started = time.perf_counter()
    run_dir = Path(spec.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, state = resume_point(run_dir, resume)
    spec_yaml = spec_to_yaml(spec)
    if state is not None and (run_dir / "spec.yaml").is_file() and (run_dir / "spec.yaml").read_text() != spec_yaml:
        console.print("[yellow]warning:[/] the spec differs from the one this run started with; resuming anyway")
    (run_dir / "spec.yaml").write_text(spec_yaml)
    if spec.models.build_tiny is not None:
        ensure_tiny_models(spec)
    prepared = prepare(spec)
    if prepared.selection is not None:
        console.print(f"prompt selection: {prepared.selection}")
        (run_dir / "selection.json").write_text(json.dumps(prepared.selection, indent=2))
    if exclude_train:
        prepared.train = prepared.train.without(set(exclude_train))
    eval_prompts = prepared.eval  # `data.eval.limit` already caps how many are read

    def accuracy(kind: str) -> float | None:
        if eval_prompts is None:
            return None
        return evaluate(roles, kind, eval_prompts, prepared.verifier, spec.rollout.max_new_tokens)

    connect(spec.ray)
    console.print(
        f"[bold]opd-ray[/] {spec.run.name}: starting roles ({spec.rollout.num_workers} rollout, "
        f"{spec.teacher.num_replicas} teacher, {spec.learner.num_ranks} learner ranks)"
    )
    roles = start_roles(spec)
    record_placement(roles, run_dir)
    if spec.data.selection is not None and spec.data.selection.keep_top_fraction is not None:
        prepared.train = keep_aligned_prompts(spec, roles, prepared.train, run_dir, resume=state is not None)
    writer = MetricsWriter(run_dir, resume_after=state.step if state is not None else 0)
    summary: dict = {"run": spec.run.name, "objective": spec.algorithm.objective}
    if prepared.selection is not None:
        summary["prompt_selection"] = prepared.selection
    sampler = PromptSampler(len(prepared.train), spec.run.seed)
    version, first_step = 0, 1
    try:
        if state is not None:
            ray.get(roles.learners.call("load_checkpoint", str(checkpoint)))
            version, first_step = state.weight_version, state.step + 1
            sampler.restore(state.sampler_epoch, state.sampler_position)
            sync_weights(roles, version)
            summary.update(state.summary)
            console.print(f"resumed from {checkpoint} (step {state.step}, weight version {version})")
        else:
            summary["teacher_accuracy"] = accuracy("teacher")
            summary["student_accuracy_before"] = accuracy("rollout")
        console.print(f"teacher accuracy {summary['teacher_accuracy']}, student {summary['student_accuracy_before']}")

        staleness_limit = spec.trainer.max_staleness + spec.trainer.weight_sync_interval - 1
        buffer = RolloutBuffer(spec.trainer.buffer_capacity, max_staleness=staleness_limit)
        pipeline = Pipeline(roles, prepared.train, spec.run.seed, spec.trainer.shard_size(spec.rollout.num_workers))
        in_flight: deque[StepWork] = deque()  # launched steps, oldest first
        next_launch = first_step
        bad_steps = 0
        with step_progress("distill", spec.trainer.steps, first_step - 1) as progress:
            for step in range(first_step, spec.trainer.steps + 1):
                metrics: dict = {}
                step_start, busy_before = time.perf_counter(), pipeline.busy_seconds
                while next_launch <= min(spec.trainer.steps, step + spec.trainer.max_staleness):
                    in_flight.append(launch_step(spec, pipeline, prepared, sampler, next_launch))
                    next_launch += 1
                work = in_flight.popleft()
                metrics["prompts_digest"] = prompts_digest(list(work.indices))
                if work.dataset:
                    metrics["dataset_batch"] = 1
                refs, policy_version = work.resolve(pipeline, metrics)
                buffer.put(BufferEntry(tuple(refs), policy_version, work.indices))
                entry = buffer.take(version)
                metrics["staleness"] = version - entry.policy_version
                with timed("learn", metrics), learner_death_stops_run(run_dir):
                    diagnostics_k = spec.diagnostics.top_k if spec.diagnostics.enabled else None
                    metrics.update(
                        roles.learners.train_step(list(entry.refs), spec.algorithm, diagnostics_k, step, pipeline.get)
                    )
                if metrics.get("skipped_update"):
                    bad_steps += 1
                    console.print(f"[red]step {step}: non-finite loss, update skipped ({bad_steps} in a row)[/]")
                else:
                    bad_steps = 0
                    version += 1
                    if version % spec.trainer.weight_sync_interval == 0:
                        with timed("weight_sync", metrics):  # async: queued behind in-flight rollouts
                            sync_weights(roles, version, wait=spec.trainer.max_staleness == 0)
                metrics.update(rollout_policy_version=entry.policy_version, weight_version=version)
                metrics.update({f"restarts/{kind}": count for kind, count in roles.restarts.items()})
                if spec.trainer.eval_every and step % spec.trainer.eval_every == 0 and step < spec.trainer.steps:
                    with timed("eval", metrics):
                        metrics["eval/student_accuracy"] = accuracy("rollout")
                        if summary["teacher_accuracy"] is not None:
                            metrics["eval/gap_recovery"] = gap_recovery(
                                summary["student_accuracy_before"],
                                metrics["eval/student_accuracy"],
                                summary["teacher_accuracy"],
                            )
                metrics["time/step"] = time.perf_counter() - step_start
                metrics.update(stage_utilisation(metrics, pipeline, busy_before))
                writer.write(step, metrics)
                loss = metrics["loss"]
                progress.advance(step, "update skipped" if loss is None else f"loss {loss:.3f}")
                if bad_steps >= spec.trainer.max_bad_steps:
                    last = latest_checkpoint(run_dir)
                    raise RunStopped(
                        f"{bad_steps} consecutive steps with a non-finite loss (last: step {step}); "
                        f"last good checkpoint: {last or 'none'}. Lower learner.lr or check the data, then --resume"
                    )
                if spec.trainer.checkpoint_every and step % spec.trainer.checkpoint_every == 0:
                    with timed("checkpoint", metrics), learner_death_stops_run(run_dir):
                        epoch, position = work.sampler_after  # not the sampler's own: it has run ahead
                        before = {k: summary[k] for k in BEFORE_TRAINING}
                        trainer_state = TrainerState(step, version, epoch, position, before)
                        save_checkpoint(spec, roles, run_dir, trainer_state)

        if version % spec.trainer.weight_sync_interval:
            sync_weights(roles, version)
        summary["student_accuracy_after"] = accuracy("rollout")
        if summary["teacher_accuracy"] is not None:
            summary["gap_recovery"] = gap_recovery(
                summary["student_accuracy_before"], summary["student_accuracy_after"], summary["teacher_accuracy"]
            )
        if spec.trainer.save_final:
            final_dir = run_dir / "student"
            ray.get(roles.learners.call("save_pretrained", str(final_dir), spec.models.student.path))
            summary["student_path"] = str(final_dir)
        summary["steps"] = spec.trainer.steps
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        writer.close()
        roles.shutdown()


BEFORE_TRAINING = ("teacher_accuracy", "student_accuracy_before")
