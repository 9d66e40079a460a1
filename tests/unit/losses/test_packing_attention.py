"""Packing under each attention implementation: what the kernel is handed, and the start-up check that refuses a
packed forward that differs from the padded one.

flash-attn's kernels need CUDA, so the flash-attention tests run transformers' own flash path
(`_flash_attention_forward`, its argument handling and varlen dispatch) over a CPU stand-in for the two kernels
(`StandInFlashKernels`, a fake for what the test is not about: the kernels' arithmetic). It records every call,
so the tests see whether the kernel got each packed sequence's boundaries or one row of several sequences.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from opd_ray.actors.hf_model import check_packing_exact
from opd_ray.errors import UserError
from opd_ray.losses.hidden import final_hidden_states, pack_rows, packed_hidden_states, packed_width
from tests.unit.losses.test_packing import HEADS, SHAPE

LENGTHS = [19, 4, 11, 7, 2, 16, 5]  # 7 rows in 2 packed rows of width 38


def causal_attention(q_LHD: torch.Tensor, k_LHD: torch.Tensor, v_LHD: torch.Tensor, scale: float | None):
    """Causal attention over one sequence in flash-attn's [tokens, heads, dim] layout (grouped heads repeated)."""
    q, k, v = (x.transpose(0, 1) for x in (q_LHD, k_LHD, v_LHD))
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)


class StandInFlashKernels:
    """CPU stand-ins for flash-attn's `flash_attn_func` (each batch row is one sequence) and
    `flash_attn_varlen_func` (sequences given by cu_seqlens over the flattened tokens), recording their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), **_):
        self.calls.append(("dense", [q.shape[1]] * q.shape[0]))
        return torch.stack([causal_attention(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, **kwargs):
        starts = cu_seqlens_q.tolist()
        self.calls.append(("varlen", [end - start for start, end in itertools.pairwise(starts)]))
        scale = kwargs.get("softmax_scale")
        pieces = [causal_attention(q[s:e], k[s:e], v[s:e], scale) for s, e in itertools.pairwise(starts)]
        return torch.cat(pieces)


@pytest.fixture
def stand_in_flash(monkeypatch: pytest.MonkeyPatch) -> StandInFlashKernels:
    kernels = StandInFlashKernels()
    loaded = (kernels.dense, kernels.varlen, None, flash_utils._pad_input, flash_utils._unpad_input)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)  # transformers caches the kernels it loaded
    return kernels


def model_under(architecture: str, implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model_type, config_type = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "llama": (LlamaForCausalLM, LlamaConfig)}[
        architecture
    ]
    model = model_type(config_type(**SHAPE, **HEADS)).float().eval()
    model.config._attn_implementation = implementation  # flash-attn is not installed here: no load-time check
    return model


def right_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.randint(3, 50, (len(lengths), width), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_flash_attention_gets_each_packed_sequence_as_a_varlen_sequence(
    stand_in_flash: StandInFlashKernels, architecture: str
) -> None:
    model = model_under(architecture, "flash_attention_2")
    ids, mask = right_padded(LENGTHS)
    real = mask.bool()
    with torch.no_grad():
        padded = final_hidden_states(model, ids, mask)[real]
        stand_in_flash.calls.clear()
        packed = packed_hidden_states(model, ids, mask)[real]
    width = packed_width(max(LENGTHS))
    bins = pack_rows(LENGTHS, width)
    assert len(bins) == 2  # two packed rows: transformers' own position-id detection needs one
    kinds = {kind for kind, _ in stand_in_flash.calls}
    assert kinds == {"varlen"}, stand_in_flash.calls
    tails = [width - sum(LENGTHS[row] for row in rows) for rows in bins]  # each bin's unused tail: a sequence
    assert sorted(stand_in_flash.calls[0][1]) == sorted(LENGTHS + tails)
    assert torch.allclose(packed, padded, atol=1e-5), float((packed - padded).abs().max())


def test_sdpa_gets_a_block_diagonal_mask_for_packed_rows() -> None:
    masks: list[torch.Tensor | None] = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("opd_recording_sdpa", recording_sdpa)
    AttentionMaskInterface.register("opd_recording_sdpa", sdpa_mask)  # the mask sdpa is given
    model = model_under("qwen2", "sdpa")
    model.set_attn_implementation("opd_recording_sdpa")
    ids, mask = right_padded([6, 3])
    with torch.no_grad():
        packed_hidden_states(model, ids, mask)
    allowed = masks[0][0, 0]  # one packed row of 12: the 6-token row, the 3-token row, a 3-token tail
    assert allowed.shape == (12, 12)
    assert allowed[5, :6].all() and not allowed[6, :6].any() and allowed[8, 6:9].all() and not allowed[9, :9].any()


def test_the_start_up_check_passes_under_sdpa_and_flash_attention(stand_in_flash: StandInFlashKernels) -> None:
    for implementation in ("sdpa", "eager", "flash_attention_2"):
        check_packing_exact(model_under("qwen2", implementation), 50, "cpu", "learner.pack_sequences")
    assert any(kind == "varlen" for kind, _ in stand_in_flash.calls)


def test_the_start_up_check_refuses_an_attention_that_lets_packed_sequences_see_each_other() -> None:
    def causal_over_the_whole_row(module, query, key, value, attention_mask, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("opd_row_causal", causal_over_the_whole_row)
    model = model_under("qwen2", "sdpa")
    model.set_attn_implementation("opd_row_causal")
    with pytest.raises(UserError, match=r"learner.pack_sequences: packed rows .* 'opd_row_causal'.*false"):
        check_packing_exact(model, 50, "cpu", "learner.pack_sequences")
    model.train()
    with pytest.raises(UserError):
        check_packing_exact(model, 50, "cpu", "learner.pack_sequences")
    assert model.training  # the check leaves the model's mode as it found it


def test_the_start_up_check_leaves_weights_that_hold_a_nan_to_the_loops_own_checks() -> None:
    model = model_under("qwen2", "sdpa")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    check_packing_exact(model, 50, "cpu", "learner.pack_sequences")  # no packing verdict on NaN hidden states
