"""Loss bugs the field shipped and fixed (opd-background.md lists the reports), each as a test of opd-ray's
learner loss on the committed batch of real samples (tests/reference/). The one that needs a real engine,
the temperature, is in tests/integration/test_known_loss_bugs.py."""

from __future__ import annotations

import copy

import pytest
import torch

from opd_ray.spec import AlgorithmSpec
from tests.reference.batch import gradients
from tests.unit.losses.test_reference import learner_loss

OBJECTIVES = {
    "sampled, returns, standardised": {"objective": "sampled_token", "discount": 0.9, "standardize_rewards": True},
    "sampled vOPD, sequence mean": {"objective": "sampled_token", "baseline": "vopd", "aggregation": "sequence_mean"},
    "topk union + tail": {"objective": "topk", "topk_support": "union", "top_k": 4, "topk_tail": True},
    "topk forward KL": {"objective": "topk", "top_k": 4, "divergence": "forward_kl"},
    "full_vocab JSD": {"objective": "full_vocab", "divergence": "jsd", "jsd_beta": 0.5},
}  # fmt: skip


def loss_and_gradients(student, teacher, tensors, algorithm, rank=0, world_size=1, chunk_tokens=4096):
    model = copy.deepcopy(student)
    loss = learner_loss(model, teacher, tensors, algorithm, chunk_tokens, rank, world_size)
    loss.backward()
    return float(loss), gradients(model)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_the_loss_does_not_depend_on_how_the_batch_is_split(name: str, shipped) -> None:
    """verl #7200/#7225: a loss normalised per micro-batch changes with the split. Here the ranks' shares add
    up to the one-rank loss and gradient for 2 and 3 ranks (rows interleaved) and for chunks of 5 tokens."""
    tensors, teacher, student = shipped
    algorithm = AlgorithmSpec(**OBJECTIVES[name])
    whole, expected = loss_and_gradients(student, teacher, tensors, algorithm)
    for world_size in (2, 3):
        shares = [loss_and_gradients(student, teacher, tensors, algorithm, r, world_size) for r in range(world_size)]
        assert sum(loss for loss, _ in shares) == pytest.approx(whole, rel=1e-5, abs=1e-6), world_size
        for key, value in expected.items():
            assert torch.allclose(sum(g[key] for _, g in shares), value, atol=1e-5), (world_size, key)
    chunked, grads = loss_and_gradients(student, teacher, tensors, algorithm, chunk_tokens=5)
    assert chunked == pytest.approx(whole, rel=1e-5, abs=1e-6)
    assert all(torch.allclose(grads[key], value, atol=1e-5) for key, value in expected.items())


def padded(tensors: dict[str, torch.Tensor], columns: int) -> dict[str, torch.Tensor]:
    """Every row `columns` positions longer, the new ones padding (what a longer row elsewhere in a batch
    does to this batch's rows)."""
    out = {}
    for name, value in tensors.items():
        shape = list(value.shape)
        shape[1] = columns
        fill = 0 if value.dtype != torch.bool else False
        out[name] = torch.cat([value, torch.full(shape, fill, dtype=value.dtype)], dim=1)
    return out


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_padding_changes_nothing_and_the_end_of_sequence_token_is_trained(name: str, shipped) -> None:
    """verl #7514: response masks misaligned with padding. Right padding added to every row changes neither
    the loss nor the gradient; the mask covers exactly the sampled tokens, the end-of-sequence one included."""
    tensors, teacher, student = shipped
    algorithm = AlgorithmSpec(**OBJECTIVES[name])
    loss, grads = loss_and_gradients(student, teacher, tensors, algorithm)
    loss_padded, grads_padded = loss_and_gradients(student, teacher, padded(tensors, 5), algorithm)
    assert loss_padded == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert all(torch.allclose(grads_padded[key], value, atol=1e-5) for key, value in grads.items())
    response, attention = tensors["response_mask_BL"].bool(), tensors["attention_mask_BL"].bool()
    assert not (response & ~attention).any()  # no padding position is trained
    ends = response.int().cumsum(1).argmax(1)  # each row's last response position
    eos = student.config.eos_token_id
    last_tokens = tensors["input_ids_BL"][torch.arange(len(ends)), ends]
    assert (last_tokens == eos).any() and response[torch.arange(len(ends)), ends].all()


class RecordingHead(torch.nn.Module):
    """The output head, keeping the hidden states it was given so their gradient can be read."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head, self.seen = head, []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden.retain_grad()
        self.seen.append(hidden)
        return self.head(hidden)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_no_clamp_or_detach_silently_zeroes_a_tokens_gradient(name: str, shipped) -> None:
    """verl #7855: a top-k forward KL clamped at zero gave no gradient on 89% of steps. Here every response
    token's hidden state gets a gradient, and none reaches the teacher (miles #1966: no stop-gradient)."""
    tensors, teacher, student = shipped
    algorithm = AlgorithmSpec(**OBJECTIVES[name])
    model = copy.deepcopy(student)
    head = RecordingHead(model.get_output_embeddings())
    learner_loss(model, teacher, tensors, algorithm, head=head).backward()
    (hidden,) = [h for h in head.seen if h.grad is not None]  # the loss's pass (vOPD's no-grad pass has none)
    per_token = hidden.grad.abs().sum(-1)
    assert per_token.shape[0] == int(tensors["response_mask_BL"].sum())
    assert (per_token > 0).all(), f"{int((per_token == 0).sum())} tokens without gradient"
    assert all(p.grad is None for p in teacher.parameters())
