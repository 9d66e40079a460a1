"""A spec the cluster cannot hold stops with a message naming the missing resource, instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


@pytest.mark.integration
def test_gpu_spec_on_a_cpu_cluster_stops_before_any_actor(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    import time

    from opd_ray.errors import UserError
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["teacher"]["resources"] = {"num_cpus": 1, "num_gpus": 1}
    started = time.time()
    with pytest.raises(UserError, match=r"GPU: the spec needs 1 \(teacher 1 x 1\), the cluster has 0"):
        run_stages(ExperimentSpec.model_validate(raw))
    assert time.time() - started < 60  # no actor was started, nothing waited
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_resources_held_by_someone_else_stop_after_the_timeout(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """The cluster has the CPUs in total, but another placement group holds them: the run waits
    `placement.timeout_s`, then names the pool still waiting and removes what it reserved."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from opd_ray.errors import UserError
    from opd_ray.recipe.stages import run_stages

    squatter = placement_group([{"CPU": 7.5}])
    local_ray.get(squatter.ready())
    try:
        raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
        raw["placement"] = {"timeout_s": 3}
        with pytest.raises(UserError, match=r"not placed within placement.timeout_s = 3 s: .*learner \(PACK"):
            run_stages(ExperimentSpec.model_validate(raw))
        states = [group["state"] for group in placement_group_table().values()]
        assert states.count("CREATED") == 1  # the squatter; the run's own groups were removed
    finally:
        remove_placement_group(squatter)


@pytest.mark.integration
def test_nodes_still_joining_are_waited_for_a_bounded_time(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """A Slurm start-up brings its worker nodes up after the head: `placement.wait_for_nodes_s` waits for the
    resource they bring (here one that never comes), then names it and the setting."""
    import time

    from opd_ray.driver.placement import check_cluster_fits
    from opd_ray.errors import UserError

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["learner"]["resources"] = {"num_cpus": 1, "custom": {"worker_node": 1}}
    raw["placement"] = {"wait_for_nodes_s": 3}
    started = time.monotonic()
    with pytest.raises(UserError, match=r"worker_node.*waited 3 s for them: placement.wait_for_nodes_s"):
        check_cluster_fits(ExperimentSpec.model_validate(raw))
    assert 3 <= time.monotonic() - started < 30
