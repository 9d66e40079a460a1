"""Packed forwards: the rows of a batch run end to end in fewer rows, with the same hidden states and gradients as
the padded forward, on Qwen2 and Llama (rotary positions, grouped attention) and on Gemma 3 (sliding windows)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from opd_ray.losses.hidden import final_hidden_states, pack_rows, packed_hidden_states, packed_width

SHAPE = {"vocab_size": 50, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    layers = ["sliding_attention", "full_attention"]
    gemma = Gemma3TextConfig(**SHAPE, **HEADS, head_dim=16, sliding_window=4, layer_types=layers)
    built = [
        Qwen2ForCausalLM(Qwen2Config(**SHAPE, **HEADS)),
        LlamaForCausalLM(LlamaConfig(**SHAPE, **HEADS)),
        Gemma3ForCausalLM(gemma),
    ]
    return [model.float().eval() for model in built]


def right_padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_first_fit_decreasing_fills_bins_and_keeps_every_row_once() -> None:
    bins = pack_rows([20, 3, 12, 5, 20, 8], capacity=20)
    assert sorted(row for b in bins for row in b) == list(range(6))
    assert bins == [[0], [4], [2, 5], [3, 1]]


@pytest.mark.parametrize("model", models(), ids=["qwen2", "llama", "gemma3"])
def test_packed_hidden_states_and_gradients_equal_the_padded_forwards(model: torch.nn.Module) -> None:
    lengths = [19, 4, 11, 7, 2, 16, 5]  # 7 rows in 2 of width 38
    ids, mask = right_padded(lengths, 19)
    real = mask.bool()
    padded = final_hidden_states(model, ids, mask)[real]
    packed = packed_hidden_states(model, ids, mask)[real]
    assert len(pack_rows(lengths, packed_width(19))) == 2
    assert torch.allclose(packed, padded, atol=1e-5), float((packed - padded).abs().max())
    weights = torch.randn_like(padded)
    gradients = []
    for forward in (final_hidden_states, packed_hidden_states):
        model.zero_grad()
        ((forward(model, ids, mask)[real] * weights).sum()).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(gradients[1], gradients[0], atol=1e-5 * float(gradients[0].abs().max()))


def test_short_batches_pack_into_rows_twice_as_wide_and_long_ones_into_their_own_width() -> None:
    """A chat prompt beside a long answer: no two rows fit the longest's width, two fit twice it."""
    assert packed_width(98) == 196 and packed_width(256) == 512 and packed_width(300) == 300
    assert len(pack_rows([98, 60, 55, 70], 98)) == 4 and len(pack_rows([98, 60, 55, 70], 196)) == 2


def test_rows_that_cannot_share_a_row_run_padded_as_before() -> None:
    model = models()[0]
    ids, mask = right_padded([300, 290, 280], 300)  # wider than PAIRED_WIDTH / 2: packed rows keep width 300
    assert torch.equal(packed_hidden_states(model, ids, mask), final_hidden_states(model, ids, mask))


def test_padding_shares_count_the_padded_and_the_packed_layouts() -> None:
    from opd_ray.losses.step import padding_shares

    _, mask = right_padded([19, 4, 11, 7, 2, 16, 5], 19)  # 64 real of 7 x 19 = 133 padded, 2 x 38 = 76 packed
    assert padding_shares(mask) == {"padding_share/padded": (69.0, 133.0), "padding_share/packed": (12.0, 76.0)}
