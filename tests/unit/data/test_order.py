"""The data order and the seeds derived from the run seed."""

from __future__ import annotations

from opd_ray.data.order import PromptSampler, mix_seed


def test_prompt_sampler_visits_every_prompt_once_per_epoch() -> None:
    sampler = PromptSampler(size=10, seed=3)
    first_epoch = sampler.next(4) + sampler.next(4) + sampler.next(2)
    assert sorted(first_epoch) == list(range(10))
    again = PromptSampler(size=10, seed=3)
    assert again.next(10) == first_epoch  # same seed, same order
    assert sorted(sampler.next(10)) == list(range(10))


def test_mixed_seeds_depend_on_run_step_and_shard_only() -> None:
    seeds = {mix_seed(run, step, shard) for run in range(3) for step in range(1, 50) for shard in range(8)}
    assert len(seeds) == 3 * 49 * 8
    assert mix_seed(0, 5, 2) == mix_seed(0, 5, 2)


def test_mixed_seeds_keep_the_formulas_earlier_runs_sampled_with() -> None:
    """Runs recorded before the mixer was shared (the quickstart's numbers) used these two formulas."""
    for run, step, shard in ((0, 1, 0), (7, 600, 3), (12345, 99999, 63)):
        assert mix_seed(run, step, shard) == ((run * 1_000_003 + step) * 10_007 + shard) % 2**62
        assert mix_seed(run, step) == run * 1_000_003 + step
