"""What a spec asks of the Ray cluster, checked before any actor starts.

Ray queues an actor whose resources no node can provide and waits for them forever, so a
spec asking for GPUs on a CPU cluster, or for a custom resource no node advertises, would
hang at start-up. `check_cluster_fits` turns that into one message naming the role, the
resource, what is needed and what the cluster has.
"""

from __future__ import annotations

from collections import defaultdict

import ray

from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec, ResourcesSpec


def role_demands(spec: ExperimentSpec) -> list[tuple[str, int, ResourcesSpec]]:
    """(role, number of actors, resources of one actor) for every role of a run."""
    return [
        ("rollout", spec.rollout.num_workers, spec.rollout.resources),
        ("teacher", spec.teacher.num_replicas, spec.teacher.resources),
        ("learner", spec.learner.num_ranks, spec.learner.resources),
    ]


def missing_resources(
    demands: list[tuple[str, int, ResourcesSpec]], cluster_total: dict[str, float], nodes: list[dict[str, float]]
) -> list[str]:
    """Problems, each a sentence: totals the cluster lacks, and single actors no one node can hold."""
    problems = []
    needed: dict[str, float] = defaultdict(float)
    shares: dict[str, list[str]] = defaultdict(list)
    for role, count, resources in demands:
        for name, amount in resources.demand().items():
            if amount > 0:
                needed[name] += count * amount
                shares[name].append(f"{role} {count} x {amount:g}")
    short = [name for name, amount in needed.items() if amount > cluster_total.get(name, 0.0) + 1e-9]
    for name in short:
        roles, have = ", ".join(shares[name]), cluster_total.get(name, 0.0)
        problems.append(f"{name}: the spec needs {needed[name]:g} ({roles}), the cluster has {have:g}")
    for role, _, resources in demands:
        one_actor = {name: amount for name, amount in resources.demand().items() if amount > 0}
        fits = any(all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in one_actor.items()) for node in nodes)
        if nodes and not fits and not set(short) & one_actor.keys():  # a short total is named already
            wanted = ", ".join(f"{name} {amount:g}" for name, amount in one_actor.items())
            problems.append(f"{role}: no single node has {wanted} for one {role} actor")
    return problems


def check_cluster_fits(spec: ExperimentSpec) -> None:
    """Raises a UserError naming what is missing; call after connecting, before starting roles."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problems = missing_resources(role_demands(spec), ray.cluster_resources(), nodes)
    if problems:
        raise UserError(
            "the Ray cluster cannot hold this run's actors (they would wait forever): "
            + "; ".join(problems)
            + ". Lower the roles' resources in the spec or add nodes."
        )
