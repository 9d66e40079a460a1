"""The committed batch (tests/reference/make_batch.py wrote it) and the shipped models it was sampled from."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.reference.objectives import Batch

REPO = Path(__file__).resolve().parents[2]
BATCH = REPO / "tests" / "data" / "reference" / "batch.safetensors"
SHIPPED = REPO / "opd_ray" / "recipe" / "shipped"  # the quickstart's trained teacher and student


def load_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(BATCH)


def reference_batch(tensors: dict[str, torch.Tensor]) -> Batch:
    return Batch(
        input_ids=tensors["input_ids_BL"],
        attention=tensors["attention_mask_BL"],
        response=tensors["response_mask_BL"],
        rollout_logprobs=tensors["rollout_logprobs_BL"],
        teacher_logprobs=tensors["teacher_logprobs_BL"],
        teacher_topk_ids=tensors["teacher_topk_ids_BLK"],
        teacher_topk_logprobs=tensors["teacher_topk_logprobs_BLK"],
        student_topk_ids=tensors["student_topk_ids_BLK"],
        teacher_at_student_topk=tensors["teacher_logprobs_at_student_topk_BLK"],
    )


def load_model(role: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SHIPPED / role, dtype=torch.float32)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
