"""Where a run's actors go: one Ray placement group per pool of roles, checked before anything starts.

Each role gets a pool of its own (bundle i = actor i's resources, spread by the role's
strategy) unless `placement.colocate` puts several roles in one pool, where bundle i holds
actor i of each: with `num_gpus: 0.5` for rollout and learner, each bundle is one GPU the
two share. Reserving bundles first makes a run all-or-nothing: it either gets every
actor's resources at once or stops with the missing ones named.

Ray queues an actor whose resources no node can provide and waits for them forever, so a
spec asking for GPUs on a CPU cluster, or for a custom resource no node advertises, would
hang at start-up. `check_cluster_fits` turns that into one message naming the role, the
resource, what is needed and what the cluster has; `reserve` does the same for what the
cluster has in total but not free (another job holds it) after `placement.timeout_s`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd_ray.console import console
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec, ResourcesSpec

NODE_POLL_S = 2.0

RoleDemand = tuple[str, int, ResourcesSpec]  # (role, number of actors, resources of one actor)


def teacher_role(name: str, teachers: int) -> str:
    """A teacher's role name: "teacher" when the run has one (of `teachers`), "teacher.<name>" for each of several."""
    return f"teacher.{name}" if teachers > 1 else "teacher"


def role_kind(role: str) -> str:
    """rollout, teacher or learner: what `placement.colocate` names."""
    return role.split(".", 1)[0]


def role_demands(spec: ExperimentSpec) -> list[RoleDemand]:
    """(role, number of actors, resources of one actor) for every role of a run; each teacher is a role."""
    teachers = [
        (teacher_role(name, len(spec.teachers)), teacher.num_replicas, teacher.resources)
        for name, teacher in spec.teachers.items()
    ]
    return [
        ("rollout", spec.rollout.num_workers, spec.rollout.resources),
        *teachers,
        ("learner", spec.learner.num_ranks, spec.learner.resources),
    ]


@dataclass(frozen=True)
class Pool:
    """One placement group: bundle i holds actor i of every role in the pool."""

    roles: tuple[RoleDemand, ...]
    strategy: str

    @property
    def name(self) -> str:
        return "+".join(role for role, _, _ in self.roles)

    def bundles(self) -> list[dict[str, float]]:
        bundles: list[dict[str, float]] = [defaultdict(float) for _ in range(max(c for _, c, _ in self.roles))]
        for _, count, resources in self.roles:
            for i in range(count):
                for name, amount in resources.demand().items():
                    if amount > 0:
                        bundles[i][name] += amount
        return [dict(bundle) for bundle in bundles]


def plan_pools(spec: ExperimentSpec) -> list[Pool]:
    shared = [demand for demand in role_demands(spec) if role_kind(demand[0]) in spec.placement.colocate]
    pools = [Pool(tuple(shared), spec.placement.colocated_strategy)] if shared else []
    pools += [Pool((demand,), demand[2].strategy) for demand in role_demands(spec) if demand not in shared]
    return pools


def _fits(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in bundle.items())


def missing_resources(pools: list[Pool], cluster_total: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """Problems, each a sentence: totals the cluster lacks, bundles no one node can hold, strict strategies
    the nodes cannot satisfy."""
    problems = []
    needed: dict[str, float] = defaultdict(float)
    shares: dict[str, list[str]] = defaultdict(list)
    for pool in pools:
        for role, count, resources in pool.roles:
            for name, amount in resources.demand().items():
                if amount > 0:
                    needed[name] += count * amount
                    shares[name].append(f"{role} {count} x {amount:g}")
    short = [name for name, amount in needed.items() if amount > cluster_total.get(name, 0.0) + 1e-9]
    for name in short:
        roles, have = ", ".join(shares[name]), cluster_total.get(name, 0.0)
        problems.append(f"{name}: the spec needs {needed[name]:g} ({roles}), the cluster has {have:g}")
    if not nodes:
        return problems
    for pool in pools:
        bundles = pool.bundles()
        unit = " + ".join(f"one {role} actor" for role, _, _ in pool.roles)
        for bundle in sorted({tuple(sorted(b.items())) for b in bundles}):
            if not any(_fits(node, dict(bundle)) for node in nodes) and not set(short) & dict(bundle).keys():
                wanted = ", ".join(f"{name} {amount:g}" for name, amount in bundle)
                problems.append(f"{pool.name}: no single node has {wanted} for {unit}")
        if pool.strategy == "STRICT_PACK":
            total: dict[str, float] = defaultdict(float)
            for bundle in bundles:
                for name, amount in bundle.items():
                    total[name] += amount
            if not any(_fits(node, total) for node in nodes):
                wanted = ", ".join(f"{name} {amount:g}" for name, amount in total.items())
                problems.append(f"{pool.name}: strategy STRICT_PACK needs one node with {wanted}")
        if pool.strategy == "STRICT_SPREAD":
            hosts = sum(1 for node in nodes if any(_fits(node, bundle) for bundle in bundles))
            if hosts < len(bundles):
                problems.append(
                    f"{pool.name}: strategy STRICT_SPREAD needs {len(bundles)} nodes that each hold one bundle, "
                    f"the cluster has {hosts}"
                )
    return problems


def check_cluster_fits(spec: ExperimentSpec) -> None:
    """Raises a UserError naming what is missing; call after connecting, before starting roles. Nodes still
    joining are waited for up to `placement.wait_for_nodes_s` (bounded; a Slurm start-up brings its
    workers up after the head)."""
    pools, deadline, announced = plan_pools(spec), time.monotonic() + spec.placement.wait_for_nodes_s, False
    while True:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        problems = missing_resources(pools, ray.cluster_resources(), nodes)
        if not problems:
            return
        if time.monotonic() >= deadline:
            break
        if not announced:
            console.print(f"waiting up to {spec.placement.wait_for_nodes_s:g} s for nodes to join: {problems[0]}")
            announced = True
        time.sleep(NODE_POLL_S)
    raise UserError(
        "the Ray cluster cannot hold this run's actors (they would wait forever): "
        + "; ".join(problems)
        + ". Lower the roles' resources in the spec or add nodes"
        + (
            f" (waited {spec.placement.wait_for_nodes_s:g} s for them: placement.wait_for_nodes_s)."
            if announced
            else "."
        )
    )


@dataclass
class Placement:
    """Reserved placement groups and, per role, the scheduling option of each of its actors."""

    groups: list[PlacementGroup] = field(default_factory=list)
    actor_options: dict[str, list[dict]] = field(default_factory=dict)

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)
        self.groups.clear()


def reserve(spec: ExperimentSpec) -> Placement:
    """Checks that the cluster can hold the run at all (`check_cluster_fits`), then creates every pool's
    placement group and waits until all are placed, or stops after `placement.timeout_s` naming the
    pools still waiting and what the cluster has free."""
    check_cluster_fits(spec)
    pools = plan_pools(spec)
    placement = Placement()
    for pool in pools:
        group = placement_group(pool.bundles(), strategy=pool.strategy)
        placement.groups.append(group)
        for role, count, _ in pool.roles:
            placement.actor_options[role] = [
                {
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=i, placement_group_capture_child_tasks=False
                    )
                }
                for i in range(count)
            ]
    ready_refs = [group.ready() for group in placement.groups]
    ready, _ = ray.wait(ready_refs, num_returns=len(ready_refs), timeout=spec.placement.timeout_s)
    if len(ready) < len(ready_refs):
        waiting = [
            f"{pool.name} ({pool.strategy}, bundles {pool.bundles()})"
            for pool, ref in zip(pools, ready_refs, strict=True)
            if ref not in ready
        ]
        free = {name: round(amount, 3) for name, amount in ray.available_resources().items() if "node:" not in name}
        placement.remove()
        raise UserError(
            f"placement groups not placed within placement.timeout_s = {spec.placement.timeout_s:g} s: "
            + "; ".join(waiting)
            + f". The cluster has free: {free} (other jobs may hold the rest)."
        )
    return placement
