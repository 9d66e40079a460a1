"""The shipped tiny student is what its recipe builds: a rebuild retraces its first 50 SFT steps.

A full rebuild of both models takes ~8 minutes on 2 cores (`opd-ray build-tiny --from-scratch`,
see opd_ray/recipe/shipped/README.md); the first 50 steps of the student, through the same
learner ranks, seed and schedule, must give the loss its build logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.spec import load_spec
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_a_rebuild_retraces_the_shipped_students_first_50_steps(tmp_path: Path, local_ray) -> None:
    from opd_ray.actors.learner_group import LearnerGroup
    from opd_ray.actors.runtime import actor_env
    from opd_ray.data.arithmetic import ALPHABET, write_task_files
    from opd_ray.recipe import tiny_models
    from opd_ray.recipe.supervised import SUPERVISED_CHUNK
    from opd_ray.spec import ModelSpec

    spec = load_spec(REPO / "examples" / "quickstart.yaml", [f"models.build_tiny.directory={tmp_path}"])
    build, seed = spec.models.build_tiny, spec.run.seed
    recipe = tiny_models.model_recipe(spec, "student")
    assert tiny_models.shipped_model("student", recipe) is not None, "the shipped student is not the quickstart's"
    logged = json.loads((tiny_models.SHIPPED / "student" / "build_log.json").read_text())["loss_every_50_steps"]

    tokenizer = tiny_models.build_char_tokenizer(ALPHABET, tmp_path / "tokenizer")
    train_path, _ = write_task_files(tmp_path, seed, build.train_size, build.eval_size)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    init = tiny_models.save_random_model(tokenizer, recipe["layers"], tmp_path / "init-student", seed=seed)
    learner = tiny_models.sft_learner(spec, recipe["steps"], recipe["lr"])
    group = LearnerGroup(
        ModelSpec(path=str(init)), learner, build.sft_batch_size // learner.num_ranks, recipe["steps"], actor_env()
    )
    try:
        examples = tiny_models.sft_examples(tokenizer, rows, recipe["digits"])
        examples_ref = local_ray.put(examples)
        per_rank = group.supervised_steps(examples_ref, SUPERVISED_CHUNK, build.sft_batch_size, seed, timeout_s=None)
    finally:
        group.shutdown()
    assert sum(losses[-1] for losses in per_rank) == pytest.approx(logged[0], rel=1e-4)
