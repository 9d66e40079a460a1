"""The rollout -> teacher pipeline: shards of every step go to whichever actor is free.

A step's prompts are cut into shards of `trainer.prompts_per_shard` prompts. A shard is
sampled by a rollout worker and then scored by a teacher replica. The driver gives an actor
a shard only when it has nothing in flight, and among free actors picks the one that has
been fastest per sequence, so a slow or busy replica takes fewer shards instead of holding
a step back (work spread by load, not round-robin). The driver `pump`s the pipeline while it
waits on anything, the learners included, so in asynchronous mode the shards of later steps
are sampled and scored while the learners train.

A shard's sampling seed derives from the run seed, the step and the shard index, never from
the worker: which worker samples a shard does not change what it samples. A shard whose
actor died is re-issued with the same prompts and seed once Ray has restarted the actor
(`roles.await_restart`), so no prompt is dropped or trained twice.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from opd_ray.data.order import mix_seed
from opd_ray.data.prompts import PromptSet
from opd_ray.driver.roles import Roles, await_restart, kill_stuck
from opd_ray.errors import RunStopped, Stuck

SPEED_MEMORY = 0.5  # weight of the newest measurement in an actor's seconds-per-sequence estimate


@dataclass
class Shard:
    """One shard of one step on its way through the roles: sampled, then scored."""

    step: int
    index: int
    sequences: int
    teacher: str  # the teacher (by its name under teachers:) that scores every row of the shard: their route
    prompts_P: dict[int, list[int]] | None = None  # None: a dataset batch that only needs scoring
    answers_P: dict[int, str | None] | None = None
    teacher_prompts_P: dict[int, list[int]] | None = None  # that teacher's own prompts; None = the student's
    seed: int = 0
    batch_ref: ray.ObjectRef | None = None  # the rollout's output, the teacher's input
    scored_ref: ray.ObjectRef | None = None
    reports: dict[str, dict] = field(default_factory=dict)  # "rollout"/"teacher" -> the actor's report

    @property
    def scored(self) -> bool:
        return "teacher" in self.reports


class ActorPool:
    """One role's actors (the rollout workers, or one teacher's replicas), each with at most one shard in
    flight, and what they have done."""

    def __init__(self, kind: str, actors: list[ray.actor.ActorHandle]) -> None:
        self.kind = kind  # "rollout" or "teacher"
        self.actors = actors
        self.queue: deque[Shard] = deque()
        self.running: list[Shard | None] = [None] * len(actors)
        self.seconds_per_sequence: list[float | None] = [None] * len(actors)
        self.busy_seconds = 0.0  # compute time the actors reported, summed over finished shards
        self.shards_done = [0] * len(actors)

    def free_actor(self) -> int | None:
        """The free actor expected to finish soonest; one never measured is tried first."""
        free = [i for i, shard in enumerate(self.running) if shard is None]
        if not free:
            return None
        return min(free, key=lambda i: -1.0 if self.seconds_per_sequence[i] is None else self.seconds_per_sequence[i])

    def record(self, actor: int, shard: Shard, info: dict) -> None:
        self.running[actor] = None
        self.busy_seconds += info["seconds"]
        self.shards_done[actor] += 1
        measured = info["seconds"] / max(1, shard.sequences)
        previous = self.seconds_per_sequence[actor]
        self.seconds_per_sequence[actor] = (
            measured if previous is None else SPEED_MEMORY * measured + (1 - SPEED_MEMORY) * previous
        )


class StepShards:
    """The shards of one launched step; done when every shard is scored."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = shards

    @property
    def done(self) -> bool:
        return all(s.scored for s in self.shards)

    @property
    def weight_version(self) -> int:
        """The oldest weights any shard was sampled with (what the staleness bound is about)."""
        versions = [s.reports["rollout"]["weight_version"] for s in self.shards if "rollout" in s.reports]
        return min(versions) if versions else -1

    def role_seconds(self, kind: str) -> float | None:
        """Compute time the `kind` actors spent on this step; None when no shard went through that role."""
        seconds = [s.reports[kind]["seconds"] for s in self.shards if kind in s.reports]
        return sum(seconds) if seconds else None

    @property
    def scored_refs(self) -> list[ray.ObjectRef]:
        return [s.scored_ref for s in self.shards]


class Pipeline:
    def __init__(self, roles: Roles, prompts: PromptSet, run_seed: int, prompts_per_shard: int) -> None:
        self.roles, self.prompts, self.run_seed = roles, prompts, run_seed
        self.prompts_per_shard = prompts_per_shard
        self.rollout = ActorPool("rollout", roles.rollout_workers)
        self.teachers = {name: ActorPool("teacher", actors) for name, actors in roles.teacher_pools.items()}
        self.in_flight: dict[ray.ObjectRef, tuple[ActorPool, int, Shard]] = {}  # info ref -> where it runs
        self.issued_at: dict[ray.ObjectRef, float] = {}  # info ref -> when its shard was handed out
        self.shard_timeout_s = roles.timeouts.step_s

    # ---- launching ----

    def launch_rollouts(self, step: int, indices: list[int], samples_per_prompt: int) -> StepShards:
        """Queues the step's shards for sampling; they flow on to their teacher by themselves. A shard holds
        rows of one teacher (their route), so it goes to that teacher's replicas as soon as it is sampled."""
        shards = []
        for teacher, rows_of_teacher in self.by_teacher(indices).items():
            for start in range(0, len(rows_of_teacher), self.prompts_per_shard):
                rows = rows_of_teacher[start : start + self.prompts_per_shard]
                index = len(shards)
                shards.append(
                    Shard(
                        step,
                        index,
                        len(rows) * samples_per_prompt,
                        teacher,
                        prompts_P=self.prompts.subset(rows),
                        answers_P={i: self.prompts.answers[i] for i in rows},
                        teacher_prompts_P=self.prompts.teacher_prompts(rows),
                        seed=mix_seed(self.run_seed, step, index),
                    )
                )
        self.rollout.queue.extend(shards)
        self._dispatch()
        return StepShards(shards)

    def by_teacher(self, indices: list[int]) -> dict[str, list[int]]:
        """The rows of each teacher, in the order given (one teacher: all of them, unchanged)."""
        return self.prompts.rows_by_teacher(indices, default=next(iter(self.teachers)))

    def launch_scoring(
        self, step: int, batch_refs: list[ray.ObjectRef], sequences: list[int], teachers: list[str]
    ) -> StepShards:
        """Batches that already exist (the dataset's answers, one batch per teacher) go straight to their teacher."""
        shards = []
        for i, (ref, n, teacher) in enumerate(zip(batch_refs, sequences, teachers, strict=True)):
            shards.append(Shard(step, i, n, teacher, batch_ref=ref))
            self.teachers[teacher].queue.append(shards[-1])
        self._dispatch()
        return StepShards(shards)

    # ---- running ----

    def _issue(self, pool: ActorPool, actor: int, shard: Shard) -> None:
        handle = pool.actors[actor]
        if pool.kind == "rollout":
            shard.batch_ref, info_ref = handle.sample.remote(shard.prompts_P, shard.seed, shard.answers_P)
        elif shard.teacher_prompts_P is None:  # the teacher reads the student's prompt
            shard.scored_ref, info_ref = handle.score.remote(shard.batch_ref)
        else:
            shard.scored_ref, info_ref = handle.score.remote(shard.batch_ref, shard.teacher_prompts_P)
        pool.running[actor] = shard
        self.in_flight[info_ref] = (pool, actor, shard)
        self.issued_at[info_ref] = time.monotonic()

    def _dispatch(self) -> None:
        for pool in (self.rollout, *self.teachers.values()):
            while pool.queue and (actor := pool.free_actor()) is not None:
                self._issue(pool, actor, pool.queue.popleft())

    def _finish(self, info_ref: ray.ObjectRef) -> None:
        pool, actor, shard = self.in_flight.pop(info_ref)
        self.issued_at.pop(info_ref, None)
        try:
            info = ray.get(info_ref)
        except RayActorError:
            pool.running[actor] = None
            await_restart(self.roles, pool.kind, pool.actors[actor])
            pool.queue.appendleft(shard)  # the same prompts and seed, first in line
            return
        except RayTaskError as exc:  # the call raised: repeating it would raise again
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise RunStopped(f"{pool.kind} actor {actor} failed on a shard: {first_line}") from None
        pool.record(actor, shard, info)
        shard.reports[pool.kind] = info
        if pool.kind == "rollout":
            self.teachers[shard.teacher].queue.append(shard)

    def pump(self, watch: list[ray.ObjectRef] = (), timeout: float | None = None) -> list[ray.ObjectRef]:
        """Moves shards along until one of `watch` (or, with nothing to watch, one shard) is ready or
        `timeout` passes; returns the ready refs of `watch`."""
        self._dispatch()
        candidates = list(watch) + list(self.in_flight)
        if not candidates:
            return []
        ready, rest = ray.wait(candidates, num_returns=1, timeout=self._until_next_deadline(timeout))
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            if ref in self.in_flight:
                self._finish(ref)
        self._kill_overdue()
        self._dispatch()
        watched = set(watch)
        return [ref for ref in ready if ref in watched]

    def _until_next_deadline(self, timeout: float | None) -> float | None:
        """How long `pump` may block: until `timeout`, or until the oldest shard in flight is overdue."""
        if not self.issued_at:
            return timeout
        overdue_in = max(0.0, min(self.issued_at.values()) + self.shard_timeout_s - time.monotonic())
        return overdue_in if timeout is None else min(timeout, overdue_in)

    def _kill_overdue(self) -> None:
        """An actor that has held a shard past trainer.timeouts.step_s is stuck (a hung engine, a lost
        node): it is killed, and its shard comes back through the restart path like any dead actor's."""
        now = time.monotonic()
        for info_ref, issued in list(self.issued_at.items()):
            if now - issued > self.shard_timeout_s:
                pool, actor, shard = self.in_flight[info_ref]
                del self.issued_at[info_ref]  # killed once; its failure arrives through ray.wait
                kill_stuck(
                    pool.kind,
                    actor,
                    pool.actors[actor],
                    f"shard (step {shard.step}, shard {shard.index})",
                    self.shard_timeout_s,
                )

    def wait_step(self, step_shards: StepShards) -> list[ray.ObjectRef]:
        """Pumps until every shard of the step is scored; the scored batches' refs, in shard order."""
        while not step_shards.done:
            self.pump()
        return step_shards.scored_refs

    def get(self, refs: list[ray.ObjectRef], what: str = "learner ranks") -> list[Any]:
        """ray.get that keeps the pipeline moving meanwhile, and raises the first failure at once
        (a dead learner rank leaves the others waiting in a collective). Calls still running after
        trainer.timeouts.step_s stop the run, named (`what`)."""
        pending, values = list(refs), {}
        deadline = time.monotonic() + self.shard_timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stuck = [i for i, ref in enumerate(refs) if ref in pending]
                raise Stuck(
                    f"{what} {stuck} did not finish within {self.shard_timeout_s:g} s (trainer.timeouts.step_s)"
                )
            for ref in self.pump(watch=pending, timeout=remaining):
                values[ref] = ray.get(ref)
                pending.remove(ref)
        return [values[ref] for ref in refs]

    @property
    def busy_seconds(self) -> dict[str, float]:
        return {"rollout": self.rollout.busy_seconds, "teacher": sum(p.busy_seconds for p in self.teachers.values())}

    def utilisation(self, step_s: float, busy_before: dict[str, float], learn_s: float) -> dict[str, float]:
        """Share of the step each role's actors spent computing (compute finished during the step, over
        step time x actors) and the idle seconds that leaves: where the pipeline waits."""
        out = {}
        busy_now = self.busy_seconds
        actors = {"rollout": len(self.rollout.actors), "teacher": sum(len(p.actors) for p in self.teachers.values())}
        for kind, count in actors.items():
            capacity = step_s * count
            busy = busy_now[kind] - busy_before[kind]
            out[f"busy/{kind}"] = min(1.0, busy / capacity)  # shards may span steps
            out[f"idle_s/{kind}"] = max(0.0, capacity - busy)
        out["busy/learner"] = learn_s / step_s
        out["idle_s/learner"] = step_s - learn_s
        return out


def rollout_and_score(roles: Roles, prompts: PromptSet, indices: list[int], step: int, seed: int = 0) -> list:
    """One step's student samples scored by the teacher, as refs: the pipeline without a driver loop."""
    pipeline = Pipeline(roles, prompts, seed, max(1, -(-len(indices) // len(roles.rollout_workers))))
    return pipeline.wait_step(pipeline.launch_rollouts(step, indices, samples_per_prompt=1))
