"""transformers models outside vLLM: loading a frozen one, and refusing one whose head cannot be applied in chunks.

Every learner loss and the transformers teacher backend apply the output head to a few
thousand response tokens at a time (losses/hidden.py), so no B x T x |V| logits tensor is
ever built; that is only right when the logits are the head of the last hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opd_ray.errors import UserError
from opd_ray.losses.hidden import final_hidden_states
from opd_ray.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(model: ModelSpec) -> str:
    """The spec's dtype, with `auto` resolved for this process's device: bfloat16 on a GPU that supports it,
    float32 on CPUs (the 2-core machines here have no bf16 units: bf16 matmuls ran several times slower)."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def load_causal_lm(model: ModelSpec, device: torch.device | str = "cpu") -> Any:
    """A frozen model in eval mode (teachers), from safetensors only."""
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(
        model.path, dtype=DTYPES[dtype_name(model)], trust_remote_code=model.trust_remote_code, use_safetensors=True
    )
    module.to(device).eval().requires_grad_(False)
    return module


def check_head_reproduces_logits(model: Callable[..., Any], head: Callable, vocab_size: int, device) -> None:
    """Chunked losses apply the output head to final hidden states; a model that post-processes its
    logits (soft-capping, scaling) would silently train on different numbers, so refuse it up front."""
    ids = torch.arange(4, device=device).remainder(vocab_size).unsqueeze(0)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits.float()
        via_head = head(final_hidden_states(model, ids, mask)).float()
    if not torch.allclose(full, via_head, atol=1e-3, rtol=1e-3):
        raise UserError(
            "the model's logits are not its output head applied to its last hidden states "
            "(soft-capping or logit scaling?); chunked losses do not support this architecture yet"
        )
