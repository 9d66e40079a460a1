"""Placement: pools, bundles and a spec the cluster cannot hold, named before any actor starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.driver.placement import Pool, missing_resources, plan_pools, role_demands
from opd_ray.errors import SpecError
from opd_ray.spec import ExperimentSpec, ResourcesSpec
from tests.conftest import tiny_spec_dict


def separate(*demands: tuple[str, int, ResourcesSpec]) -> list[Pool]:
    """One pool per role, as a spec without `placement.colocate` gets."""
    return [Pool((demand,), demand[2].strategy) for demand in demands]


def test_totals_name_the_resource_and_each_roles_share() -> None:
    pools = separate(("rollout", 2, ResourcesSpec(num_cpus=1, num_gpus=1)), ("learner", 4, ResourcesSpec(num_gpus=1)))
    problems = missing_resources(pools, {"CPU": 16, "GPU": 4}, [{"CPU": 16, "GPU": 4}])
    assert problems == ["GPU: the spec needs 6 (rollout 2 x 1, learner 4 x 1), the cluster has 4"]


def test_an_actor_larger_than_any_node_is_named_even_when_the_total_suffices() -> None:
    pools = separate(("teacher", 1, ResourcesSpec(num_cpus=1, num_gpus=2)))
    nodes = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]
    assert missing_resources(pools, {"CPU": 16, "GPU": 2}, nodes) == [
        "teacher: no single node has CPU 1, GPU 2 for one teacher actor"
    ]


def test_custom_resources_count_and_a_fitting_spec_passes() -> None:
    pinned = ResourcesSpec(num_cpus=1, custom={"teacher_node": 1})
    assert missing_resources(separate(("teacher", 2, pinned)), {"CPU": 4}, [{"CPU": 4}]) == [
        "teacher_node: the spec needs 2 (teacher 2 x 1), the cluster has 0"
    ]
    cluster = {"CPU": 4, "teacher_node": 2}
    assert missing_resources(separate(("teacher", 2, pinned)), cluster, [cluster]) == []


def test_role_demands_cover_every_role(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["rollout"]["num_workers"] = 3
    demands = role_demands(ExperimentSpec.model_validate(raw))
    assert [(role, count) for role, count, _ in demands] == [("rollout", 3), ("teacher", 1), ("learner", 2)]


def test_colocated_roles_share_bundles_that_sum_their_actors(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["rollout"].update(num_workers=2, resources={"num_cpus": 1, "num_gpus": 0.5})
    raw["learner"].update(num_ranks=4, resources={"num_cpus": 2, "num_gpus": 0.5})
    raw["teacher"]["resources"] = {"num_cpus": 1, "num_gpus": 1, "strategy": "SPREAD"}
    raw["placement"] = {"colocate": ["rollout", "learner"]}
    pools = plan_pools(ExperimentSpec.model_validate(raw))
    assert [(pool.name, pool.strategy) for pool in pools] == [("rollout+learner", "PACK"), ("teacher", "SPREAD")]
    assert pools[0].bundles() == [{"CPU": 3, "GPU": 1}] * 2 + [{"CPU": 2, "GPU": 0.5}] * 2
    # four GPUs in all: the shared pool needs 3, the teacher 1; one 4-GPU node holds it, a 1-GPU node holds no bundle
    assert missing_resources(pools, {"CPU": 64, "GPU": 4}, [{"CPU": 64, "GPU": 4}]) == []
    assert missing_resources(pools, {"CPU": 64, "GPU": 4}, [{"CPU": 32, "GPU": 0.5}] * 8) == [
        "rollout+learner: no single node has CPU 3, GPU 1 for one rollout actor + one learner actor",
        "teacher: no single node has CPU 1, GPU 1 for one teacher actor",
    ]


def test_strict_strategies_name_the_nodes_they_need() -> None:
    packed = ResourcesSpec(num_gpus=1, strategy="STRICT_PACK")
    spread = ResourcesSpec(num_gpus=1, strategy="STRICT_SPREAD")
    nodes = [{"CPU": 8, "GPU": 2}] * 2
    assert missing_resources(separate(("learner", 4, packed)), {"CPU": 16, "GPU": 4}, nodes) == [
        "learner: strategy STRICT_PACK needs one node with CPU 2, GPU 4"
    ]
    assert missing_resources(separate(("rollout", 3, spread)), {"CPU": 16, "GPU": 4}, nodes) == [
        "rollout: strategy STRICT_SPREAD needs 3 nodes that each hold one bundle, the cluster has 2"
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"placement": {"colocate": ["rollout"]}}, "name two or three different roles"),
        ({"placement": {"colocate": ["rollout", "critic"]}}, "placement.colocate.1"),
        ({"teacher": {"resources": {"num_cpus": 0}}}, "teacher.resources: an actor must ask for some CPU"),
        (
            {
                "placement": {"colocate": ["rollout", "learner"]},
                "rollout": {"resources": {"num_gpus": 0.5}},
                "weight_sync": {"method": "collective"},
            },
            "cannot run NCCL between a rollout engine and a learner on the same GPU",
        ),
    ],
)
def test_bad_placement_specs_are_refused(tiny_dir: Path, tmp_path: Path, override: dict, message: str) -> None:
    from omegaconf import OmegaConf

    from opd_ray.spec import load_spec

    merged = OmegaConf.merge(OmegaConf.create(tiny_spec_dict(tiny_dir, tmp_path / "run")), OmegaConf.create(override))
    path = tmp_path / "spec.yaml"
    OmegaConf.save(merged, path)
    with pytest.raises(SpecError, match=message):
        load_spec(path)
