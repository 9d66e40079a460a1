"""How a learner rank prepares the student for training, on the tiny student (no DeepSpeed, no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from opd_ray.actors.learner_config import attention_implementation, prepare_for_training


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_forwards_keep_no_kv_cache_and_checkpoint_layers_when_asked(tiny_dir: Path, checkpointing) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "student")
    assert model.config.use_cache  # as saved
    prepare_for_training(model, checkpointing)
    assert model.config.use_cache is False
    assert model.is_gradient_checkpointing is checkpointing


@pytest.mark.parametrize(
    ("choice", "on_gpu", "expected"),
    [("auto", False, "sdpa"), ("eager", False, "eager"), ("sdpa", True, "sdpa")],
)
def test_attention_implementation(choice: str, on_gpu: bool, expected: str) -> None:
    assert attention_implementation(choice, on_gpu) == expected


def test_auto_dtype_is_float32_without_a_gpu_and_an_explicit_one_is_kept() -> None:
    import torch

    from opd_ray.actors.hf_model import dtype_name
    from opd_ray.spec import ModelSpec

    assert ModelSpec(path="m").dtype == "auto"
    expected = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert dtype_name(ModelSpec(path="m")) == expected
    assert dtype_name(ModelSpec(path="m", dtype="float16")) == "float16"
