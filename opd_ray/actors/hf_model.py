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
from opd_ray.losses.hidden import final_hidden_states, packed_hidden_states
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


# Largest difference between the packed and the padded forward, relative to the hidden states' size, that is
# still rounding: float32 agrees to ~1e-6 (tests/unit/losses/test_packing.py); 16-bit kernels that reduce in
# another order differ by ~1e-2. A sequence that sees another one's tokens differs by the hidden states' own size.
PACKING_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def check_packing_exact(model: Any, vocab_size: int, device, setting: str) -> None:
    """Packed rows must give the padded forward's hidden states under the attention implementation actually in
    use (a kernel that ignores packed position ids lets each sequence see the ones packed before it, and the
    loss is silently wrong). Four rows that pack into two are run both ways; `setting` is the spec key that
    turns packing off, named in the error. Every rank runs it (a ZeRO-3 forward needs all of them)."""
    # packed into two rows of 12 (6+5, 3+2): transformers reads packed position ids by itself only in ONE row,
    # and in each row a sequence follows another, whose tokens it would see
    lengths = [6, 5, 3, 2]
    ids_BL = (torch.arange(len(lengths) * max(lengths), device=device) * 7 + 11).remainder(vocab_size)
    ids_BL = ids_BL.view(len(lengths), max(lengths))
    mask_BL = (torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]).long()
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            padded = final_hidden_states(model, ids_BL, mask_BL)[mask_BL.bool()].float()
            packed = packed_hidden_states(model, ids_BL, mask_BL)[mask_BL.bool()].float()
    finally:
        module.train(was_training)
    if not torch.isfinite(padded).all():  # weights that hold a NaN: nothing to compare (the loop's checks stop it)
        return
    difference = float((packed - padded).abs().max() / padded.abs().max().clamp_min(1e-12))
    tolerance = PACKING_TOLERANCE.get(padded_dtype(module), 5e-2)
    if not difference <= tolerance:
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        raise UserError(
            f"{setting}: packed rows give other hidden states than padded ones under attention implementation "
            f"{implementation!r} (relative difference {difference:.3g} > {tolerance:g}): packed sequences would "
            f"see each other; set {setting}: false"
        )


def padded_dtype(module: Any) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter's)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
