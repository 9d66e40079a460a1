"""Weight sync from the learners to the rollout engines through the Ray object store.

Learner rank 0 gathers the full weights (ZeRO-3 shards included) and returns them as a
dict of plain numpy arrays. Ray writes those arrays straight into the object store (one
copy, out of band) and every rollout worker receives the same ObjectRef, so the weights
never pass through the driver; on the worker `ray.get` maps them read-only without a copy.
Inside the in-process engine a vLLM worker extension wraps them as tensors and reloads the
weights in place (that copy into the engine's parameters is the only one on this side).
Plain arrays carry no code, and vLLM's in-process RPC passes them through untouched.
A serialized blob (safetensors bytes) cost two more copies: 0.38 GB/s for a 100M model
against 1.7 GB/s for the object store alone (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from opd_ray.actors.collective_sync import BucketPlan, join_group, receive_buckets

# numpy has no bfloat16: such tensors travel as int16 bit patterns and are viewed back.
_BIT_VIEWS = {torch.bfloat16: torch.int16}


def pack_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype name, array) sharing memory with the tensors (Ray copies them into the store).

    A tensor that shares storage with one already packed (tied embeddings: the output head)
    is left out: vLLM ignores the head's weight when embeddings are tied.
    """
    packed, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        packed[name] = (dtype_name, tensor.view(_BIT_VIEWS.get(tensor.dtype, tensor.dtype)).numpy())
    return packed


def unpack_state_dict(packed: dict[str, tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Tensors over the arrays' memory, without a copy (read-only arrays from the object store)."""
    state_dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (dtype_name, array) in packed.items():
            dtype = getattr(torch, dtype_name)
            state_dict[name] = torch.from_numpy(array).view(dtype)
    return state_dict


class VllmWeightReceiver:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine."""

    def load_packed_weights(self, packed: dict[str, tuple[str, np.ndarray]]) -> None:
        self._reload(iter(unpack_state_dict(packed).items()))

    def _reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """In place; the tied output head is re-derived afterwards (see refresh_tied_lm_head)."""
        self.model_runner.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        refresh_tied_lm_head(self.model_runner.get_model())  # type: ignore[attr-defined]

    def join_weight_group(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Collective path (collective_sync.py): the group lives in the worker, where the weights are."""
        self.weight_group = join_group(address, rank, world_size, backend, timeout_s)

    def receive_weight_buckets(self, plan: BucketPlan) -> None:
        device = next(self.model_runner.get_model().parameters()).device  # type: ignore[attr-defined]
        self._reload(receive_buckets(self.weight_group, plan, device))


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
