"""Weight sync from the learners to the rollout engines through the Ray object store.

Learner rank 0 gathers the full weights (ZeRO-3 shards included), packs them as one
safetensors blob and returns it; Ray keeps the blob in the object store and every rollout
worker receives the same ObjectRef, so the weights never pass through the driver. Inside
the engine a vLLM worker extension unpacks the blob and reloads the weights in place.
Safetensors rather than pickle: tensors passed raw through vLLM's RPC arrive as lists, and
a blob of plain tensors cannot carry code.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def pack_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    # clone(): tied weights share storage, which safetensors refuses to serialise.
    return save_safetensors({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()})


def unpack_state_dict(payload: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(payload)


class VllmWeightReceiver:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine."""

    def load_packed_weights(self, payload: bytes) -> int:
        state_dict = unpack_state_dict(payload)
        self.model_runner.reload_weights(weights_iterator=iter(state_dict.items()))  # type: ignore[attr-defined]
        refresh_tied_lm_head(self.model_runner.get_model())  # type: ignore[attr-defined]
        return len(state_dict)


def refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """Re-derive the output head's kernel from the (tied, just reloaded) embedding.

    vLLM skips `lm_head.*` when embeddings are tied, so its reload leaves the head's kernel
    untouched; on CPU that kernel is a pre-packed copy of the *old* weights. Processing the
    head again packs the new embedding; where nothing is packed this is a cheap no-op.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in model.modules():
        if isinstance(module, ParallelLMHead) and module.weight.numel() > 0:
            module.quant_method.process_weights_after_loading(module)


WORKER_EXTENSION = f"{VllmWeightReceiver.__module__}.{VllmWeightReceiver.__qualname__}"
