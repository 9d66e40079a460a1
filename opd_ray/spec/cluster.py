"""Where a run goes: placement of the roles, weight sync, the Ray cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opd_ray.spec.base import Section
from opd_ray.spec.roles import RoleName, Strategy


class PlacementSpec(Section):
    """Which roles share bundles, and how long to wait for the cluster to hold them."""

    colocate: list[RoleName] = Field(
        default_factory=list,
        description="roles that share one placement group: actor i of each lands in bundle i, which holds their "
        "summed resources (e.g. [rollout, learner] with num_gpus 0.5 each: one GPU per bundle, shared)",
    )
    colocated_strategy: Strategy = "PACK"
    """the placement strategy of the colocated roles' shared bundles"""
    timeout_s: float = Field(
        120, gt=0, description="seconds to wait for the placement groups before stopping with what is missing"
    )
    wait_for_nodes_s: float = Field(
        0,
        ge=0,
        description="seconds to wait for nodes still joining the cluster (a Slurm or autoscaled start) before the "
        "cluster is judged too small for the run; 0 = judge at once",
    )

    @model_validator(mode="after")
    def _colocate_at_least_two_roles(self) -> PlacementSpec:
        if self.colocate and len(set(self.colocate)) < 2:
            raise ValueError("placement.colocate lists the roles that share bundles: name two or three different roles")
        return self


class WeightSyncSpec(Section):
    """How new student weights reach the rollout engines."""

    method: Literal["object_store", "collective"] = Field(
        "object_store",
        description="object_store: learner rank 0 puts the weights into Ray's object store once and every engine "
        "maps them; collective: a process group of learner rank 0 and every engine, weights broadcast in buckets",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="collective: auto = nccl on GPU, else gloo")
    bucket_mb: float = Field(256, gt=0, description="collective: size of one broadcast; bounds the extra memory")
    timeout_s: float = Field(600, gt=0, description="collective: seconds a broadcast may wait for its peers")


class RaySpec(Section):
    address: str | None = Field(None, description="None starts a local Ray; 'auto' joins a running cluster")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray")
    dashboard_host: str = "127.0.0.1"
    """the address a local Ray's dashboard binds (loopback by default)"""
    include_dashboard: bool = False
    """start a local Ray's dashboard"""
