"""The two ways new student weights reach the engines, behind one interface; `weight_sync.method` picks one.

object_store: the learners export the student once into Ray's object store and every receiver
(rollout engines, `self` teachers with `weights: current`) loads it. collective: learner rank 0
broadcasts it bucket by bucket over a process group to every rollout engine
(actors/collective_sync.py). A new path is one class and one entry in `WEIGHT_SYNC_PATHS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import ray
from ray.exceptions import RayActorError

from opd_ray.actors.collective_sync import WeightBroadcast, group_backend
from opd_ray.actors.runtime import get_or_raise_first
from opd_ray.errors import RunStopped
from opd_ray.spec import ExperimentSpec

if TYPE_CHECKING:
    from opd_ray.actors.learner_group import LearnerGroup

SYNCING = "a rollout engine loading new weights (trainer.timeouts.sync_s)"
Receiver = tuple[str, ray.actor.ActorHandle]  # (role kind, actor)


class WeightSyncPath(Protocol):
    def send(
        self, learners: LearnerGroup, receivers: list[Receiver], version: int, wait: bool, timeout_s: float
    ) -> list[Receiver]:
        """Sends weight version `version` to every receiver (rollout engines first, then synced `self` teachers);
        `wait=False` (asynchronous mode) only queues it. Returns the receivers that died meanwhile: the caller
        restarts them, and a restart gets the current weights through the object store."""
        ...

    def engine_restarted(self, kind: str) -> None:
        """An engine of role `kind` came back from a restart (a collective group must be formed again)."""
        ...


class ObjectStorePath:
    def send(
        self, learners: LearnerGroup, receivers: list[Receiver], version: int, wait: bool, timeout_s: float
    ) -> list[Receiver]:
        limit = timeout_s
        weights_ref = learners.export_weights(limit)
        loads = [(kind, actor, actor.load_weights.remote(weights_ref, version)) for kind, actor in receivers]
        if not wait:
            return []
        dead = []
        for kind, actor, load in loads:
            try:
                get_or_raise_first([load], limit, SYNCING)
            except RayActorError:
                dead.append((kind, actor))
        return dead

    def engine_restarted(self, kind: str) -> None:
        pass


class CollectivePath:
    """Asynchronously, learner rank 0 waits in the broadcast until every engine has finished the rollouts
    queued before it; the previous broadcast's failure surfaces at the next send."""

    def __init__(self, broadcast: WeightBroadcast) -> None:
        self.broadcast = broadcast
        self.unfinished: list[ray.ObjectRef] = []  # an asynchronous broadcast in flight

    def send(
        self, learners: LearnerGroup, receivers: list[Receiver], version: int, wait: bool, timeout_s: float
    ) -> list[Receiver]:
        """The broadcast goes to the group formed at start (learner rank 0 and the rollout engines)."""
        limit = timeout_s
        try:
            get_or_raise_first(self.unfinished, limit, "the previous weight broadcast (trainer.timeouts.sync_s)")
            refs = self.broadcast.launch(version)
            self.unfinished = [] if wait else refs
            if wait:
                get_or_raise_first(refs, limit, "weight broadcast members (trainer.timeouts.sync_s)")
        except RayActorError as exc:
            raise RunStopped(
                "an actor died during a collective weight broadcast (weight_sync.method=collective); the "
                f"other members cannot finish it. Resume from the last checkpoint with --resume. ({exc})"
            ) from None
        return []

    def engine_restarted(self, kind: str) -> None:
        if kind == "rollout":
            self.broadcast.regroup()  # the restarted engine is not in the old group


def object_store_path(spec: ExperimentSpec, learners: LearnerGroup, rollout_workers: list) -> WeightSyncPath:
    return ObjectStorePath()


def collective_path(spec: ExperimentSpec, learners: LearnerGroup, rollout_workers: list) -> WeightSyncPath:
    return CollectivePath(WeightBroadcast(spec.weight_sync, group_backend(spec), learners.workers, rollout_workers))


WEIGHT_SYNC_PATHS = {"object_store": object_store_path, "collective": collective_path}
