"""A LoRA student on real Ray, DeepSpeed (ZeRO-2, two gloo ranks) and a vLLM rollout engine: only the adapters
train and hold optimizer state, the rollout engine gets the merged weights exactly, and a checkpoint holds the
adapters beside a merged Hugging Face student that resume and `from_pretrained` both reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lora_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, local_ray):
    """Two LoRA learner ranks and one rollout engine (no teacher: the updates are supervised steps)."""
    from opd_ray.actors.learner_group import LearnerGroup
    from opd_ray.actors.rollout import RolloutWorker
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.roles import engine_actor_options, roles_env

    raw = tiny_spec_dict(tiny_dir, tmp_path_factory.mktemp("run"))
    raw["learner"].update(lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}, lr=3e-2)
    spec = ExperimentSpec.model_validate(raw)
    inputs = load_run_inputs(spec)
    tokenizer = inputs.tokenizer
    sequence = inputs.train.prompt_ids[0] + tokenizer("4321").input_ids + [tokenizer.eos_token_id]
    learners = LearnerGroup(spec.models.student, spec.learner, 8, 10, roles_env(spec))
    options = engine_actor_options(spec, spec.rollout.resources)  # the engine's environment, as a run starts it
    engine = (
        local_ray.remote(RolloutWorker)
        .options(**options)
        .remote(spec.models.student, spec.rollout.engine, spec.rollout, 0)
    )
    examples = [
        (ids, [*tokenizer(answer).input_ids, tokenizer.eos_token_id])
        for ids, answer in zip(inputs.train.prompt_ids, inputs.train.answers, strict=True)
    ]
    try:
        yield SimpleNamespace(spec=spec, learners=learners, engine=engine, sequence=sequence, examples=examples)
    finally:
        learners.shutdown()
        local_ray.kill(engine)


def train(setup: SimpleNamespace, steps: int, ray) -> None:
    """Supervised steps on reference answers: the learner path of every objective (forward, loss, update)."""
    setup.learners.supervised_steps(setup.examples, steps, 16, steps, timeout_s=None)


def learner_logprobs(setup: SimpleNamespace, ray) -> list[float]:
    ranks = setup.learners.sequence_logprobs(setup.sequence)
    assert max(abs(a - b) for a, b in zip(*ranks, strict=True)) < 1e-6  # the ranks agree
    return ranks[0]


def test_only_the_adapters_train_and_the_engine_gets_the_merged_weights(lora_run, local_ray) -> None:
    counts = lora_run.learners.parameter_counts(timeout_s=None)
    total, trainable = counts[0]["total"], counts[0]["trainable"]
    # rank 4 on q, v and up of one layer: (128 + 128) x 4 x 2 + (128 + 512) x 4
    assert trainable == 2 * (128 + 128) * 4 + (128 + 512) * 4 < total / 20
    train(lora_run, 2, local_ray)
    counts = lora_run.learners.parameter_counts(timeout_s=None)
    state = sum(c["optimizer_state"] for c in counts)  # Adam's two moments, split across the ZeRO ranks
    assert 2 * trainable <= state < 2 * trainable + 64
    worker = lora_run.engine
    before = local_ray.get(worker.sequence_logprobs.remote(lora_run.sequence))
    local_ray.get(worker.load_weights.remote(lora_run.learners.export_weights(), 1))
    engine = local_ray.get(worker.sequence_logprobs.remote(lora_run.sequence))
    learner = learner_logprobs(lora_run, local_ray)
    assert max(abs(a - b) for a, b in zip(engine, before, strict=True)) > 1e-3, "training did not move the model"
    assert max(abs(a - b) for a, b in zip(engine, learner, strict=True)) < 1e-5


def test_a_checkpoint_holds_the_adapters_and_a_merged_student_and_resumes(lora_run, local_ray, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from opd_ray.files import write_manifest
    from opd_ray.losses.objectives import token_logprobs

    saved = learner_logprobs(lora_run, local_ray)
    student_path = lora_run.spec.models.student.path
    lora_run.learners.save_checkpoint(str(tmp_path), student_path, timeout_s=None)
    write_manifest(tmp_path)  # as write_checkpoint does: each rank checks what it loads against it
    adapter = json.loads((tmp_path / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    with safe_open(tmp_path / "student" / "model.safetensors", "pt") as merged:
        assert not [k for k in merged.keys() if "lora" in k or "base_layer" in k]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.tensor([lora_run.sequence])
    with torch.no_grad():
        plain = token_logprobs(exported(input_ids=ids).logits[0, :-1], ids[0, 1:]).tolist()
    assert max(abs(a - b) for a, b in zip(plain, saved, strict=True)) < 1e-5  # the export is the trained student
    train(lora_run, 1, local_ray)
    assert max(abs(a - b) for a, b in zip(learner_logprobs(lora_run, local_ray), saved, strict=True)) > 1e-3
    lora_run.learners.load_checkpoint(str(tmp_path), timeout_s=None)
    resumed = learner_logprobs(lora_run, local_ray)
    assert max(abs(a - b) for a, b in zip(resumed, saved, strict=True)) < 1e-6
