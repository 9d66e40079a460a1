"""Asynchronous mode and replicas on the real pipeline: rollouts of later steps run while the
learners train, shards go to whichever replica is free, nothing is lost or trained twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
import torch

from opd_ray.actors.teacher import TeacherScorer
from opd_ray.spec import ExperimentSpec
from tests.conftest import start_teacher_actor, tiny_spec_dict


class SlowTeacherScorer(TeacherScorer):
    """A deliberately slow replica (a fake for what is not under test: why a replica is slow)."""

    DELAY_PER_SEQUENCE_S = 0.5

    @ray.method(num_returns=2)
    def score(self, batch, teacher_prompts_P=None):
        scored, report = super().score(batch, teacher_prompts_P)
        time.sleep(self.DELAY_PER_SEQUENCE_S * batch.num_sequences)
        report["seconds"] += self.DELAY_PER_SEQUENCE_S * batch.num_sequences  # what the replica measures
        return scored, report


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_of_each(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, local_ray):
    """Two rollout workers and two teacher replicas, the second of them deliberately slow."""
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.roles import start_roles

    raw = tiny_spec_dict(tiny_dir, tmp_path_factory.mktemp("replicas") / "run")
    raw["rollout"]["num_workers"] = 2
    raw["learner"]["num_ranks"] = 1  # the learners are not what these tests are about
    spec = ExperimentSpec.model_validate(raw)
    slow = start_teacher_actor(
        SlowTeacherScorer, spec.teacher_model("teacher"), spec.teachers["teacher"], 7
    )  # starts beside the roles
    roles = start_roles(spec)
    local_ray.get(slow.ready.remote())
    roles.teacher_pools["teacher"].append(slow)
    try:
        yield roles, load_run_inputs(spec)
    finally:
        roles.shutdown()


@pytest.mark.integration
def test_slow_teacher_replica_takes_fewer_shards_and_no_prompt_is_lost(two_of_each, local_ray) -> None:
    """Shards go to the free, faster replica, so the slow one scores far fewer of them, and every step's
    batches hold exactly its prompts, once each."""
    from opd_ray.driver.pipeline import Pipeline

    roles, inputs = two_of_each
    pipeline = Pipeline(roles, inputs.train, run_seed=0, prompts_per_shard=2)
    steps = {step: list(range(16 * step, 16 * step + 16)) for step in (1, 2, 3)}
    launched = {step: pipeline.launch_rollouts(step, indices, 1) for step, indices in steps.items()}
    for step, shards in launched.items():
        batches = local_ray.get(pipeline.wait_step(shards))
        rows = [i for b in batches for i in b.prompt_index_B.tolist()]
        assert rows == steps[step]  # every prompt of the step once, in order, whoever scored it
        assert all(b.teacher_logprobs_BL is not None for b in batches)
    fast_shards, slow_shards = pipeline.teachers["teacher"].shards_done
    assert fast_shards + slow_shards == 24
    assert slow_shards <= 24 / 4, pipeline.teachers["teacher"].shards_done  # round-robin would give it 12
    assert (
        pipeline.teachers["teacher"].seconds_per_sequence[1] > 3 * pipeline.teachers["teacher"].seconds_per_sequence[0]
    )


@pytest.mark.integration
def test_which_actors_sample_and_score_a_shard_changes_nothing(two_of_each, local_ray) -> None:
    """The same steps through one rollout worker and one teacher, and through two of each (dispatched by
    load): a shard's seed comes from the run, step and shard, so every batch is the same to the bit, and
    a synchronous run trains on the same samples whatever the number of replicas."""
    from dataclasses import replace

    from opd_ray.driver.pipeline import Pipeline
    from opd_ray.losses.batch import RolloutBatch

    roles, inputs = two_of_each
    one = replace(roles, rollout_workers=roles.rollout_workers[:1], teacher_pools={"teacher": roles.teachers[:1]})
    batches = {}
    for name, subset in (("one of each", one), ("two of each", roles)):
        pipeline = Pipeline(subset, inputs.train, run_seed=3, prompts_per_shard=4)
        batches[name] = [
            RolloutBatch.concat(local_ray.get(pipeline.wait_step(pipeline.launch_rollouts(step, indices, 1))))
            for step, indices in ((1, list(range(16))), (2, list(range(16, 32))))
        ]
    for a, b in zip(batches["one of each"], batches["two of each"], strict=True):
        for name in ("input_ids_BL", "rollout_logprobs_BL", "teacher_logprobs_BL", "teacher_topk_ids_BLK"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.integration
def test_async_respects_staleness_and_trains_every_prompt_once(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """max_staleness=2 with two rollout workers and two teacher replicas: no step's samples are more
    than 2 versions older than the learner, samples did run ahead, and each step trains its own
    prompts exactly once. The weights go by collective broadcast, which queues behind rollouts and must not
    deadlock with them; the object-store path runs asynchronously in benchmarks/stages.py's tiny run
    (tests/integration/test_benchmarks.py), and the staleness rules above do not depend on the path."""
    from opd_ray.data.order import PromptSampler
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.steps import prompts_digest
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["rollout"]["num_workers"] = 2
    raw["teacher"]["num_replicas"] = 2
    raw["trainer"].update(steps=6, max_staleness=2, prompts_per_shard=4, save_final=False)
    raw["algorithm"]["importance_cap"] = 2.0
    raw["weight_sync"] = {"method": "collective"}
    spec = ExperimentSpec.model_validate(raw)
    run_stages(spec)

    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert [m["weight_version"] for m in metrics] == list(range(1, 7))
    for t, m in enumerate(metrics, start=1):
        # launched once the learner held version t-3 (steps 1-3: the initial weights); a shard queued
        # until after a later sync samples with newer weights, never older
        assert max(0, t - 3) <= m["rollout_weight_version"] <= t - 1
        assert 0 <= m["staleness"] <= 2
    assert max(m["staleness"] for m in metrics) == 2  # the rollouts did run ahead of the learner
    sampler = PromptSampler(len(load_run_inputs(spec).train), spec.run.seed)
    assert [m["prompts_digest"] for m in metrics] == [
        prompts_digest(sampler.next(spec.trainer.prompts_per_step)) for _ in range(6)
    ]
    assert all(m["sequences"] == spec.trainer.prompts_per_step for m in metrics)
    assert all(m["loss"] is not None and m["loss"] > 0 for m in metrics)
    for m in metrics:  # per-stage utilisation is logged every step
        for stage in ("rollout", "teacher", "learner"):
            assert 0.0 <= m[f"busy/{stage}"] <= 1.0 and m[f"idle_s/{stage}"] >= 0.0
