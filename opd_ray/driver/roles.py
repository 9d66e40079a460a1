"""The actors of a run and the calls the driver makes on them, surviving dead rollout workers and teachers.

Rollout workers and teacher replicas are Ray actors with `max_restarts`: when one's process
dies, Ray starts it again from its constructor. The calls below notice the death (the
failed call raises `RayActorError`), wait for the restart, give a rollout worker the current
student weights again, and re-issue exactly the lost shard with the same arguments — the
same prompts and sampling seed — so no prompt of a step is dropped or trained twice. A dead
learner rank cannot be rebuilt this way (its optimizer state is gone); the driver stops and
points at --resume.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from opd_ray.actors.learner_group import LearnerGroup
from opd_ray.actors.rollout import RolloutWorker
from opd_ray.actors.runtime import actor_env, count_start, get_or_raise_first
from opd_ray.actors.teacher import TeacherScorer
from opd_ray.actors.vllm_engine import ENGINE_ENV
from opd_ray.console import console
from opd_ray.driver.placement import Placement, reserve, teacher_role
from opd_ray.driver.weight_paths import SYNCING, WEIGHT_SYNC_PATHS, ObjectStorePath, Receiver, WeightSyncPath
from opd_ray.errors import Stuck
from opd_ray.files import write_json
from opd_ray.spec import ExperimentSpec, ModelSpec, ResourcesSpec, TimeoutsSpec

STEP_LIMIT = "trainer.timeouts.step_s"


@dataclass
class Roles:
    rollout_workers: list[ray.actor.ActorHandle]
    teacher_pools: dict[str, list[ray.actor.ActorHandle]]  # teacher name -> its replicas
    learners: LearnerGroup
    placement: Placement
    weight_sync: WeightSyncPath = field(default_factory=ObjectStorePath)  # how new weights reach the engines
    max_restarts: int = 3
    weight_version: int = 0  # what every rollout engine holds
    restarts: Counter = field(default_factory=Counter)
    timeouts: TimeoutsSpec = field(default_factory=TimeoutsSpec)  # how long each kind of wait may take
    synced_teachers: list[str] = field(default_factory=list)  # `self` teachers with weights: current

    @property
    def teachers(self) -> list[ray.actor.ActorHandle]:
        """Every teacher replica, of every teacher."""
        return [actor for pool in self.teacher_pools.values() for actor in pool]

    @property
    def weight_receivers(self) -> list[Receiver]:
        """(role kind, actor) of every actor that holds the student's current weights: the rollout engines, then
        the synced `self` teachers."""
        synced = [actor for name in self.synced_teachers for actor in self.teacher_pools[name]]
        return [("rollout", actor) for actor in self.rollout_workers] + [("teacher", actor) for actor in synced]

    def shutdown(self) -> None:
        self.learners.shutdown()
        for actor in self.rollout_workers + self.teachers:
            ray.kill(actor, no_restart=True)
        self.placement.remove()

    def locations(self) -> dict[str, list[dict]]:
        """Node (and GPUs) of every actor, by role: what a run records in placement.json."""
        actors = {"rollout": self.rollout_workers, "learner": self.learners.workers}
        actors.update({teacher_role(name, len(self.teacher_pools)): pool for name, pool in self.teacher_pools.items()})
        return {
            role: get_or_raise_first([actor.location.remote() for actor in handles], self.timeouts.start_s, role)
            for role, handles in actors.items()
        }


def start_roles(spec: ExperimentSpec, schedule_steps: int | None = None) -> Roles:
    """Reserves the placement groups, then starts every actor in its bundle; nothing is left behind on failure.
    `schedule_steps`: the learning-rate schedule's horizon (default trainer.steps; a resume keeps its run's)."""
    count_start("role set")
    placement = reserve(spec)
    try:
        return _start_in(placement, spec, schedule_steps or spec.trainer.steps)
    except BaseException:
        placement.remove()  # its actors die with their placement group
        raise


def roles_env(spec: ExperimentSpec) -> dict:
    """Every role's actor environment; OpenMP waits passively when several actors compute at once."""
    teacher_replicas = sum(teacher.num_replicas for teacher in spec.teachers.values())
    overlap = spec.trainer.max_staleness > 0 or spec.rollout.num_workers > 1 or teacher_replicas > 1
    return actor_env(roles_overlap=overlap)


def engine_actor_options(spec: ExperimentSpec, resources: ResourcesSpec) -> dict:
    """Resources, environment and restarts of a rollout worker or teacher replica."""
    env = roles_env(spec)
    restartable = {"max_restarts": spec.trainer.max_actor_restarts, "max_task_retries": 0}
    return {**resources.actor_options(), "runtime_env": {"env_vars": {**env["env_vars"], **ENGINE_ENV}}, **restartable}


def start_teacher(
    spec: ExperimentSpec, name: str, replica: int, bundle: dict, model: ModelSpec | None = None
) -> ray.actor.ActorHandle:
    """Replica `replica` of teacher `name` in its placement-group bundle; `model` replaces the teacher's own
    (`opd-ray probe` starts other candidates in the same bundle)."""
    settings = spec.teachers[name]
    options = engine_actor_options(spec, settings.resources)
    index = list(spec.teachers).index(name)  # what its batches are marked with
    model = model or spec.teacher_model(name)
    seed = spec.run.seed + 1000 * index + replica
    student = spec.models.student if settings.cross_tokenizer else None  # whose tokens the scores go back to
    return ray.remote(TeacherScorer).options(**options, **bundle).remote(model, settings, seed, index, student)


def start_teachers(spec: ExperimentSpec, placement: Placement) -> dict[str, list[ray.actor.ActorHandle]]:
    """Every teacher's replicas, each in its bundle."""
    return {
        name: [
            start_teacher(spec, name, i, bundle)
            for i, bundle in enumerate(placement.actor_options[teacher_role(name, len(spec.teachers))])
        ]
        for name in spec.teachers
    }


def _start_in(placement: Placement, spec: ExperimentSpec, schedule_steps: int) -> Roles:
    rollout_options = engine_actor_options(spec, spec.rollout.resources)
    algorithm = spec.algorithm
    student_top_k = (algorithm.top_k or spec.teacher_top_k) if algorithm.needs_student_topk else 0
    rollout_workers = [
        ray.remote(RolloutWorker)
        .options(**rollout_options, **bundle)
        .remote(
            spec.models.student,
            spec.rollout.engine,
            spec.rollout,
            spec.run.seed + i,
            student_top_k,
            spec.data.verifier,
            spec.data.verifier_errors,
        )
        for i, bundle in enumerate(placement.actor_options["rollout"])
    ]
    teacher_pools = start_teachers(spec, placement)
    sequences = spec.trainer.prompts_per_step * spec.rollout.samples_per_prompt
    learner_teacher = spec.teacher_model(next(iter(teacher_pools))) if algorithm.record.learner_teacher else None
    timeouts = spec.trainer.timeouts
    learners = LearnerGroup(
        spec.models.student,
        spec.learner,
        sequences // spec.learner.num_ranks,
        schedule_steps,
        roles_env(spec),
        learner_teacher,
        placement.actor_options["learner"],
        timeouts.start_s,
        spec.rollout.temperature,
    )
    engines = rollout_workers + [actor for pool in teacher_pools.values() for actor in pool]
    starting = "rollout workers and teachers starting (trainer.timeouts.start_s)"
    get_or_raise_first([engine.ready.remote() for engine in engines], timeouts.start_s, starting)
    weight_sync = WEIGHT_SYNC_PATHS[spec.weight_sync.method](spec, learners, rollout_workers)
    synced = [name for name, teacher in spec.teachers.items() if teacher.weights == "current"]
    return Roles(
        rollout_workers,
        teacher_pools,
        learners,
        placement,
        weight_sync,
        spec.trainer.max_actor_restarts,
        timeouts=timeouts,
        synced_teachers=synced,
    )


def record_placement(roles: Roles, run_dir: Path) -> None:
    """placement.json: the node (and GPUs) of every actor, and one line per role on the console."""
    locations = roles.locations()
    write_json(run_dir / "placement.json", locations)
    for role, actors in locations.items():
        nodes = Counter(actor["node_id"][:8] + "@" + actor["node_ip"] for actor in actors)
        console.print(f"  {role}: " + ", ".join(f"{count} on node {node}" for node, count in nodes.items()))
    warn_if_deprioritised(locations)


def warn_if_deprioritised(locations: dict[str, list[dict]]) -> None:
    """One line when actors run at a lower CPU priority than the driver (a cluster started without
    RAY_worker_niceness=0 gives them Ray's 15): anything else busy on their nodes then slows the run."""
    driver = os.getpriority(os.PRIO_PROCESS, 0)
    every = [actor["niceness"] for actors in locations.values() for actor in actors]
    nicer = sorted({niceness for niceness in every if niceness > driver})
    if nicer:
        console.print(
            f"[yellow]the actors run at niceness {', '.join(map(str, nicer))}, the driver at {driver}: any other "
            "process on their nodes takes the CPU first. Start the nodes with RAY_worker_niceness=0 "
            "(docs/operations/protections.md, CPU priority)[/]"
        )


def learner_parameters(roles: Roles, timeout_s: float) -> dict[str, int]:
    """Parameters of the student and those that train (fewer with LoRA); printed at the start and kept in
    summary.json. (AdamW's state does not exist yet: it is made at the first step.)"""
    per_rank = roles.learners.parameter_counts(timeout_s)
    counts = {"total": per_rank[0]["total"], "trainable": per_rank[0]["trainable"]}
    console.print(f"  student: {counts['trainable']:,} of {counts['total']:,} parameters train")
    return counts


def split(items: list[int], parts: int) -> list[list[int]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def await_restart(roles: Roles, kind: str, actor: ray.actor.ActorHandle) -> None:
    """Blocks until Ray has restarted `actor`; a rollout worker gets the current weights back."""
    roles.restarts[kind] += 1
    if roles.restarts[kind] > roles.max_restarts * max(1, len(roles.rollout_workers + roles.teachers)):
        raise Stuck(f"{kind} actors died {roles.restarts[kind]} times; giving up (trainer.max_actor_restarts)")
    console.print(f"[yellow]a {kind} actor died; waiting for Ray to restart it[/]")
    limit = roles.timeouts.start_s
    deadline = time.monotonic() + limit
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            break
        except (ActorUnavailableError, GetTimeoutError):  # still restarting, or not yet placed
            if time.monotonic() > deadline:
                raise Stuck(
                    f"a restarted {kind} actor did not come back within {limit:g} s (trainer.timeouts.start_s); "
                    "is there room in the cluster for it?"
                ) from None
            time.sleep(1.0)
        except ActorDiedError as exc:  # restarts used up
            raise Stuck(f"a {kind} actor died and cannot be restarted: {exc}") from None
    roles.weight_sync.engine_restarted(kind)
    if roles.weight_version > 0 and any(actor == receiver for _, receiver in roles.weight_receivers):
        weights = roles.learners.export_weights(roles.timeouts.sync_s)
        get_or_raise_first([actor.load_weights.remote(weights, roles.weight_version)], roles.timeouts.sync_s, SYNCING)


def sync_weights(roles: Roles, version: int, wait: bool = True) -> None:
    """New weights to every rollout engine (and synced `self` teacher), by the spec's path (weight_paths.py).
    `wait=False` (asynchronous mode) only queues the reload: each engine applies it after the rollouts already
    launched on it, and every rollout launched later sees it, which is what the version tag of a launched step
    assumes. A receiver that died meanwhile is restarted and gets these weights through the object store."""
    dead = roles.weight_sync.send(roles.learners, roles.weight_receivers, version, wait, roles.timeouts.sync_s)
    roles.weight_version = version
    for kind, actor in dead:
        await_restart(roles, kind, actor)


def call_restarting(roles: Roles, kind: str, actors: list, method: str, args: list[tuple]) -> list:
    """Values of actors[i].method(*args[i]), each re-issued with the same arguments if its actor died
    (evaluation): all calls run at once, and a restart only repeats the lost one. An actor's whole share
    may take trainer.timeouts.eval_s (not step_s: a share is a whole evaluation's part, not one shard);
    past it the actor is killed, restarted and its share repeated, at most trainer.max_actor_restarts
    times before the run stops naming it."""
    limit = roles.timeouts.eval_s
    refs = [getattr(actor, method).remote(*call_args) for actor, call_args in zip(actors, args, strict=True)]
    values = []
    for i, actor in enumerate(actors):
        reissued = 0
        while True:
            try:
                values.append(ray.get(refs[i], timeout=limit))
                break
            except GetTimeoutError:
                if reissued >= roles.max_restarts:
                    raise Stuck(
                        f"{kind} actor {i}: its {method} share did not finish within {limit:g} s "
                        f"(trainer.timeouts.eval_s), {reissued + 1} times"
                    ) from None
                kill_stuck(kind, i, actor, f"{method} call", limit, "trainer.timeouts.eval_s")
            except RayActorError:
                await_restart(roles, kind, actor)
                reissued += 1
                refs[i] = getattr(actor, method).remote(*args[i])
    return values


def kill_stuck(
    kind: str,
    index: int,
    actor: ray.actor.ActorHandle,
    work: str,
    limit: float,
    setting: str = STEP_LIMIT,
) -> None:
    """A rollout worker or teacher that has held one piece of work past its limit (`setting`) is killed;
    Ray restarts it (trainer.max_actor_restarts) and the caller's restart path re-issues the work."""
    console.print(
        f"[red]{kind} actor {index} has held a {work} for more than {limit:g} s ({setting}): "
        "killing it so that it is restarted and the work re-issued[/]"
    )
    ray.kill(actor, no_restart=False)
