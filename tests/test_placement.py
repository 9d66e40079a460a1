"""A spec the cluster cannot hold stops with a message naming the missing resource, instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.placement import missing_resources, role_demands
from opd_ray.spec import ExperimentSpec, ResourcesSpec
from tests.conftest import tiny_spec_dict


def test_totals_name_the_resource_and_each_roles_share() -> None:
    demands = [("rollout", 2, ResourcesSpec(num_cpus=1, num_gpus=1)), ("learner", 4, ResourcesSpec(num_gpus=1))]
    problems = missing_resources(demands, {"CPU": 16, "GPU": 4}, [{"CPU": 16, "GPU": 4}])
    assert problems == ["GPU: the spec needs 6 (rollout 2 x 1, learner 4 x 1), the cluster has 4"]


def test_an_actor_larger_than_any_node_is_named_even_when_the_total_suffices() -> None:
    demands = [("teacher", 1, ResourcesSpec(num_cpus=1, num_gpus=2))]
    nodes = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]
    assert missing_resources(demands, {"CPU": 16, "GPU": 2}, nodes) == [
        "teacher: no single node has CPU 1, GPU 2 for one teacher actor"
    ]


def test_custom_resources_count_and_a_fitting_spec_passes() -> None:
    pinned = ResourcesSpec(num_cpus=1, custom={"teacher_node": 1})
    assert missing_resources([("teacher", 2, pinned)], {"CPU": 4}, [{"CPU": 4}]) == [
        "teacher_node: the spec needs 2 (teacher 2 x 1), the cluster has 0"
    ]
    cluster = {"CPU": 4, "teacher_node": 2}
    assert missing_resources([("teacher", 2, pinned)], cluster, [cluster]) == []


def test_role_demands_cover_every_role(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["rollout"]["num_workers"] = 3
    demands = role_demands(ExperimentSpec.model_validate(raw))
    assert [(role, count) for role, count, _ in demands] == [("rollout", 3), ("teacher", 1), ("learner", 2)]


@pytest.mark.integration
def test_gpu_spec_on_a_cpu_cluster_stops_before_any_actor(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    import time

    from opd_ray.driver import distill
    from opd_ray.errors import UserError

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["teacher"]["resources"] = {"num_cpus": 1, "num_gpus": 1}
    started = time.time()
    with pytest.raises(UserError, match=r"GPU: the spec needs 1 \(teacher 1 x 1\), the cluster has 0"):
        distill(ExperimentSpec.model_validate(raw))
    assert time.time() - started < 60  # no actor was started, nothing waited
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
