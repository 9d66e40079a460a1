"""A LoRA student on real Ray, DeepSpeed (ZeRO-2, two gloo ranks) and vLLM: only the adapters train and hold
optimizer state, the rollout engine gets the merged weights exactly, and a checkpoint holds the adapters beside
a merged Hugging Face student that resume and `from_pretrained` both reproduce."""

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
    from opd_ray.data.preflight import prepare
    from opd_ray.driver.roles import start_roles

    raw = tiny_spec_dict(tiny_dir, tmp_path_factory.mktemp("run"))
    raw["learner"].update(lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}, lr=3e-2)
    spec = ExperimentSpec.model_validate(raw)
    prepared = prepare(spec)
    tokenizer = prepared.tokenizer
    sequence = prepared.train.prompt_ids[0] + tokenizer("4321").input_ids + [tokenizer.eos_token_id]
    roles = start_roles(spec)
    try:
        yield SimpleNamespace(spec=spec, prepared=prepared, roles=roles, sequence=sequence, version=0)
    finally:
        roles.shutdown()


def train(setup: SimpleNamespace, steps: int) -> None:
    from opd_ray.driver.pipeline import rollout_and_score

    for _ in range(steps):
        setup.version += 1
        indices = list(range(16 * setup.version, 16 * setup.version + 16))
        refs = rollout_and_score(setup.roles, setup.prepared.train, indices, setup.version)
        setup.roles.learners.train_step(refs, setup.spec.algorithm)


def learner_logprobs(setup: SimpleNamespace, ray) -> list[float]:
    ranks = ray.get(setup.roles.learners.call("sequence_logprobs", setup.sequence))
    assert max(abs(a - b) for a, b in zip(*ranks, strict=True)) < 1e-6  # the ranks agree
    return ranks[0]


def test_only_the_adapters_train_and_the_engine_gets_the_merged_weights(lora_run, local_ray) -> None:
    counts = local_ray.get(lora_run.roles.learners.call("parameter_counts"))
    total, trainable = counts[0]["total"], counts[0]["trainable"]
    # rank 4 on q, v and up of one layer: (128 + 128) x 4 x 2 + (128 + 512) x 4
    assert trainable == 2 * (128 + 128) * 4 + (128 + 512) * 4 < total / 20
    train(lora_run, 2)
    counts = local_ray.get(lora_run.roles.learners.call("parameter_counts"))
    state = sum(c["optimizer_state"] for c in counts)  # Adam's two moments, split across the ZeRO ranks
    assert 2 * trainable <= state < 2 * trainable + 64
    before = local_ray.get(lora_run.roles.rollout_workers[0].sequence_logprobs.remote(lora_run.sequence))
    weights = lora_run.roles.learners.export_weights()
    worker = lora_run.roles.rollout_workers[0]
    local_ray.get(worker.load_weights.remote(weights, lora_run.version))
    engine = local_ray.get(worker.sequence_logprobs.remote(lora_run.sequence))
    learner = learner_logprobs(lora_run, local_ray)
    assert max(abs(a - b) for a, b in zip(engine, before, strict=True)) > 1e-3, "training did not move the model"
    assert max(abs(a - b) for a, b in zip(engine, learner, strict=True)) < 1e-5


def test_a_checkpoint_holds_the_adapters_and_a_merged_student_and_resumes(lora_run, local_ray, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from opd_ray.losses.objectives import token_logprobs

    saved = learner_logprobs(lora_run, local_ray)
    student_path = lora_run.spec.models.student.path
    local_ray.get(lora_run.roles.learners.call("save_checkpoint", str(tmp_path), student_path))
    adapter = json.loads((tmp_path / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    with safe_open(tmp_path / "student" / "model.safetensors", "pt") as merged:
        assert not [k for k in merged.keys() if "lora" in k or "base_layer" in k]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.tensor([lora_run.sequence])
    with torch.no_grad():
        plain = token_logprobs(exported(input_ids=ids).logits[0, :-1], ids[0, 1:]).tolist()
    assert max(abs(a - b) for a, b in zip(plain, saved, strict=True)) < 1e-5  # the export is the trained student
    train(lora_run, 1)
    assert max(abs(a - b) for a, b in zip(learner_logprobs(lora_run, local_ray), saved, strict=True)) > 1e-3
    local_ray.get(lora_run.roles.learners.call("load_checkpoint", str(tmp_path)))
    resumed = learner_logprobs(lora_run, local_ray)
    assert max(abs(a - b) for a, b in zip(resumed, saved, strict=True)) < 1e-6
