"""What a learner rank is built with: its threads, its DeepSpeed config, its learning-rate schedule, its
attention implementation, and the process-group port; read by LearnerWorker.setup (learner.py)."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from typing import Any

from opd_ray.actors.hf_model import dtype_name
from opd_ray.spec import LearnerSpec, ModelSpec


def learner_threads(num_ranks: int) -> int:
    """Ranks on one CPU machine split its cores: oversubscribed ranks were ~2x slower here."""
    return max(1, (os.cpu_count() or 1) // num_ranks)


def deepspeed_config(learner: LearnerSpec, model: ModelSpec, micro_batch: int) -> dict[str, Any]:
    """The spec's settings with learner.deepspeed deep-merged on top: an override of one key of a section
    (zero_optimization.offload_optimizer) keeps the section's other keys (its stage)."""
    from omegaconf import OmegaConf

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": learner.grad_clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": learner.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": dtype_name(model) == "bfloat16"},
        "fp16": {"enabled": dtype_name(model) == "float16"},
        "wall_clock_breakdown": False,
    }
    return OmegaConf.to_container(OmegaConf.merge(config, learner.deepspeed))


def warmup_cosine(learner: LearnerSpec, total_steps: int) -> Any:
    """Linear warmup, then constant or cosine decay to min_lr_ratio: warmup mattered on the tiny task."""

    def factor(step: int) -> float:
        if step < learner.warmup_steps:
            return (step + 1) / learner.warmup_steps
        if learner.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - learner.warmup_steps) / max(1, total_steps - learner.warmup_steps))
        return learner.min_lr_ratio + (1 - learner.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def attention_implementation(choice: str, on_gpu: bool) -> str:
    """`auto`: flash-attention where it can run (CUDA, package installed), else PyTorch's sdpa."""
    if choice != "auto":
        return choice
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def prepare_for_training(module: Any, gradient_checkpointing: bool) -> None:
    """No KV cache in training forwards (nothing reads it; it only holds memory), and optionally
    activation checkpointing of every decoder layer (non-reentrant: works with ZeRO-3 and frozen inputs)."""
    module.config.use_cache = False
    if gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def skip_inference_comm_op() -> None:
    """On a CPU, DeepSpeed compiles its shared-memory all-reduce (`deepspeed_shm_comm`) at the first
    `init_distributed`: 66-74 s on a fresh 2-core machine, under a lock file that a killed build leaves behind
    for every later start to wait on. It serves only DeepSpeed-inference's tensor-parallel all-reduce; training
    reduces through torch.distributed (gloo), so it is marked unavailable (DeepSpeed keeps that dict for the
    process, edits included) and never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
