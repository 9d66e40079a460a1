"""The pipeline's actor pools: a shard goes to the free actor expected to finish soonest."""

from __future__ import annotations

import pytest

from opd_ray.driver.pipeline import ActorPool, Shard


def test_pool_tries_unmeasured_actors_first_then_the_fastest_free_one() -> None:
    pool = ActorPool("teacher", ["a", "b", "c"])
    assert pool.free_actor() == 0
    pool.running[0] = Shard(1, 0, 4, "a_teacher")
    assert pool.free_actor() == 1  # never measured beats measured
    pool.record(0, Shard(1, 0, 4, "a_teacher"), {"seconds": 4.0})  # a: 1.0 s / sequence
    pool.running[1] = Shard(1, 1, 4, "a_teacher")
    pool.record(1, Shard(1, 1, 4, "a_teacher"), {"seconds": 0.4})  # b: 0.1 s / sequence
    pool.running[2] = Shard(1, 2, 4, "a_teacher")
    assert pool.free_actor() == 1  # the fastest of the free ones
    pool.running[1] = Shard(1, 3, 4, "a_teacher")
    assert pool.free_actor() == 0  # b busy: the slow one rather than waiting
    pool.running[0] = Shard(1, 4, 4, "a_teacher")
    assert pool.free_actor() is None
    assert pool.busy_seconds == pytest.approx(4.4) and pool.shards_done == [1, 1, 0]


def test_pool_speed_estimate_follows_recent_measurements() -> None:
    pool = ActorPool("rollout", ["a"])
    for seconds in (1.0, 1.0, 0.2, 0.2, 0.2):
        pool.record(0, Shard(1, 0, 1, "a_teacher"), {"seconds": seconds})
    assert 0.2 < pool.seconds_per_sequence[0] < 0.35  # a replica that got faster is trusted again
