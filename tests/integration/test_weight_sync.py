"""Weight sync on one ZeRO-3 start: after every path, each rollout engine gives the learner ranks' log-probs.

Two engines colocated with the two learner ranks (a shared placement group), the collective
method (broadcast bucket by bucket, each bucket gathered alone from the ZeRO-3 shards, ~40
buckets of 48 kB over gloo), and the full-vocabulary objective, so a frozen teacher copy is
loaded beside the partitioned student (it must not be partitioned itself). The tests share
the started roles and run in order; each trains the student further before it syncs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from opd_ray.spec import AlgorithmSpec, ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration

COLLECTIVE = {
    "weight_sync": {"method": "collective", "bucket_mb": 0.05},
    "placement": {"colocate": ["rollout", "learner"]},
    "rollout": {"num_workers": 2},
}


@pytest.fixture(scope="module")
def zero3(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, local_ray):
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.roles import start_roles

    raw = tiny_spec_dict(tiny_dir, tmp_path_factory.mktemp("run"))
    raw["learner"].update(zero_stage=3, chunk_tokens=7)  # full-vocabulary logits in chunks of 7 tokens
    raw["algorithm"] = {"objective": "full_vocab", "divergence": "jsd"}
    for section, values in COLLECTIVE.items():
        raw[section] = {**raw.get(section, {}), **values}
    spec = ExperimentSpec.model_validate(raw)
    inputs = load_run_inputs(spec)
    tokenizer = inputs.tokenizer
    sequence = inputs.train.prompt_ids[0] + tokenizer("4321").input_ids + [tokenizer.eos_token_id]
    roles = start_roles(spec)
    try:
        yield SimpleNamespace(spec=spec, inputs=inputs, roles=roles, sequence=sequence, version=0)
    finally:
        roles.shutdown()


def train(setup: SimpleNamespace, steps: int) -> None:
    from opd_ray.driver.pipeline import rollout_and_score

    for _ in range(steps):
        setup.version += 1
        indices = list(range(16 * setup.version, 16 * setup.version + 16))
        refs = rollout_and_score(setup.roles, setup.inputs.train, indices, setup.version)
        setup.roles.learners.train_step(refs, setup.spec.algorithm)


def engine_logprobs(setup: SimpleNamespace, ray) -> list[list[float]]:
    return ray.get([worker.sequence_logprobs.remote(setup.sequence) for worker in setup.roles.rollout_workers])


def assert_engines_hold_the_learners_weights(setup: SimpleNamespace, ray, before: list[list[float]]) -> None:
    learner_ranks = setup.roles.learners.sequence_logprobs(setup.sequence)
    for engine, engine_before in zip(engine_logprobs(setup, ray), before, strict=True):
        assert max(abs(a - b) for a, b in zip(engine, engine_before, strict=True)) > 1e-3, "the engine did not move"
        for rank in learner_ranks:  # ZeRO-3 ranks agree with each other and with every engine
            assert max(abs(a - b) for a, b in zip(engine, rank, strict=True)) < 1e-5
    assert ray.get([w.weight_version.remote() for w in setup.roles.rollout_workers]) == [setup.version] * 2


def test_full_vocab_on_learners_equals_topk_over_the_whole_vocabulary(zero3) -> None:
    """The learner-side teacher copy + chunked full-vocabulary divergence (ZeRO-3, 2 ranks) == the scored teacher's
    top-15 (all 15 ids) divergence, on one student (`loss`: no update)."""
    from opd_ray.driver.pipeline import rollout_and_score

    refs = rollout_and_score(zero3.roles, zero3.inputs.train, list(range(32)), 1)
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        full = zero3.roles.learners.loss(refs, AlgorithmSpec(objective="full_vocab", divergence=divergence))
        topk = zero3.roles.learners.loss(refs, AlgorithmSpec(objective="topk", divergence=divergence))
        assert full > 1e-3
        assert full == pytest.approx(topk, rel=1e-4), divergence


def test_engines_start_with_the_learners_weights_in_a_shared_placement_group(zero3, local_ray) -> None:
    from ray.util.placement_group import placement_group_table

    bundles = sorted(len(placement_group_table(group)["bundles"]) for group in zero3.roles.placement.groups)
    assert bundles == [1, 2]  # rollout+learner share a pool; the teacher has its own
    learner = zero3.roles.learners.sequence_logprobs(zero3.sequence)[0]
    for engine in engine_logprobs(zero3, local_ray):
        assert max(abs(a - b) for a, b in zip(engine, learner, strict=True)) < 1e-5


def test_a_broadcast_in_buckets_reaches_every_engine_exactly(zero3, local_ray) -> None:
    from opd_ray.driver.roles import sync_weights

    before = engine_logprobs(zero3, local_ray)
    train(zero3, 3)
    sync_weights(zero3.roles, zero3.version)
    assert len(zero3.roles.weight_sync.broadcast.plan) > 10  # the student really went in many buckets
    assert_engines_hold_the_learners_weights(zero3, local_ray, before)


def test_the_object_store_path_reaches_every_engine_exactly(zero3, local_ray) -> None:
    before = engine_logprobs(zero3, local_ray)
    train(zero3, 2)
    weights = zero3.roles.learners.export_weights()
    local_ray.get([worker.load_weights.remote(weights, zero3.version) for worker in zero3.roles.rollout_workers])
    assert_engines_hold_the_learners_weights(zero3, local_ray, before)


def test_an_engine_restarted_between_calls_rejoins_a_re_formed_group(zero3, local_ray) -> None:
    """SIGKILL one (idle) engine; the next rollout finds it dead and Ray restarts it; after training, the
    broadcast gives it exactly the learners' weights (an engine left out of the group would make the
    broadcast fail). The kill lands between calls on purpose: an engine dying during a broadcast stops
    the run instead (its peers wait out the group's timeout), see roles.sync_weights."""
    from opd_ray.driver.roles import sync_weights

    before = engine_logprobs(zero3, local_ray)
    pids = [location["pid"] for location in local_ray.get([w.location.remote() for w in zero3.roles.rollout_workers])]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)  # this test's own engine, by the pid it reports
    train(zero3, 1)
    assert zero3.roles.restarts["rollout"] == 1
    sync_weights(zero3.roles, zero3.version)
    assert_engines_hold_the_learners_weights(zero3, local_ray, before)
