"""LoRA students (peft): low-rank adapters train, the base weights stay frozen, everyone else sees merged weights.

Only the adapters have gradients, so only they reach the optimizer and hold its state; DeepSpeed's
checkpoint leaves the frozen base out (it is the run's initial student, loaded again on resume). Rollout
engines, `self` teachers and the exported student folder get W + (alpha / rank) B A under the plain
model's parameter names: nothing downstream knows the student was trained through adapters.
"""

from __future__ import annotations

import torch

from opd_ray.spec import LoraSpec

ADAPTER_DIR = "adapter"  # beside the merged student in a checkpoint or a run's student folder


def with_lora(module: torch.nn.Module, lora: LoraSpec) -> torch.nn.Module:
    """The model wrapped with fresh adapters (B = 0: the merged model starts as the base one)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(module, config)


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights with each adapter's delta added, under the plain model's names; the base
    parameters themselves are not touched (merging in place and back would drift in bf16)."""
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    deltas = {
        f"{name}.base_layer.weight": layer.get_delta_weight("default")
        for name, layer in base.named_modules()
        if isinstance(layer, LoraLayer)
    }
    merged = {}
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if ".lora_" in name:
                continue
            value = parameter.detach()
            if name in deltas:
                value = value + deltas[name].to(value.dtype)
            merged[name.replace(".base_layer.", ".")] = value
    return merged


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
