"""Every objective family's loss and gradient, as opd-ray's learner computes them (losses/step.py, chunk by
chunk), against the independent reference in tests/reference/ on a committed batch of real vLLM samples
of the shipped quickstart student, scored by the shipped teacher. No Ray, no DeepSpeed here:
tests/integration/test_reference_learner.py repeats the check through the real learner ranks."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from opd_ray.losses.batch import RolloutBatch
from opd_ray.losses.step import StepModels, step_loss
from opd_ray.spec import AlgorithmSpec
from tests.reference import objectives as reference
from tests.reference.batch import gradients, reference_batch

TOP_K = 4  # of the 6 ids each side sent: a support smaller than the vocabulary, so the tail bucket matters

# name -> (the spec's algorithm section, the same objective in the reference's words)
FAMILIES = {
    "sampled_token": (
        {"objective": "sampled_token", "clip_eps": None, "baseline": "none"},
        partial(reference.sampled_token_loss),
    ),
    "sampled_token clipped, stale samples": (
        {"objective": "sampled_token", "clip_eps": 0.2, "baseline": "none"},
        partial(reference.sampled_token_loss, clip_eps=0.2),
    ),
    "sampled_token returns, standardised": (
        {"objective": "sampled_token", "discount": 0.9, "standardize_rewards": True},
        partial(reference.sampled_token_loss, clip_eps=0.2, discount=0.9, standardize=True),
    ),
    "sampled_token vOPD": (
        {"objective": "sampled_token", "baseline": "vopd"},
        partial(reference.sampled_token_loss, clip_eps=0.2, vopd=True, k=None),
    ),
    "sampled_token sequence mean": (
        {"objective": "sampled_token", "baseline": "none", "aggregation": "sequence_mean"},
        partial(reference.sampled_token_loss, clip_eps=0.2, aggregation="sequence_mean"),
    ),
    **{
        f"topk {support}{' + tail' if tail else ''}": (
            {"objective": "topk", "topk_support": support, "top_k": TOP_K, "topk_tail": tail},
            partial(reference.topk_loss, support=support, k=TOP_K, tail=tail),
        )
        for support in ("teacher", "student", "union")
        for tail in (False, True)
    },
    "topk forward KL": (
        {"objective": "topk", "top_k": TOP_K, "divergence": "forward_kl"},
        partial(reference.topk_loss, support="teacher", k=TOP_K, tail=False, name="forward_kl"),
    ),
    "topk JSD(0.3)": (
        {"objective": "topk", "top_k": TOP_K, "divergence": "jsd", "jsd_beta": 0.3},
        partial(reference.topk_loss, support="teacher", k=TOP_K, tail=False, name="jsd", beta=0.3),
    ),
    "full_vocab reverse KL": ({"objective": "full_vocab"}, partial(reference.full_vocab_loss, name="reverse_kl")),
    "full_vocab forward KL": (
        {"objective": "full_vocab", "divergence": "forward_kl"},
        partial(reference.full_vocab_loss, name="forward_kl"),
    ),
    "full_vocab JSD(0.5)": (
        {"objective": "full_vocab", "divergence": "jsd", "jsd_beta": 0.5},
        partial(reference.full_vocab_loss, name="jsd", beta=0.5),
    ),
    "sft": ({"objective": "sft"}, partial(reference.sft_loss)),
}


def rollout_batch(tensors: dict[str, torch.Tensor], source: str) -> RolloutBatch:
    rows = tensors["input_ids_BL"].shape[0]
    return RolloutBatch(
        **tensors,
        prompt_index_B=torch.arange(rows),
        finished_B=torch.ones(rows, dtype=torch.bool),
        weight_version=0,
        source=source,
    )


def batch_source(algorithm: AlgorithmSpec) -> str:
    """What the batch's rows are to the learner: the supervised control trains on them as a dataset's answers."""
    record = algorithm.record
    return "dataset" if record.trains_on_answers and not record.needs_teacher else "student"


def stale(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sampling log-probs as an older student's would be: ratios off 1, so the PPO clip acts on some tokens."""
    noise = torch.randn(tensors["rollout_logprobs_BL"].shape, generator=torch.Generator().manual_seed(0)) * 0.4
    return {**tensors, "rollout_logprobs_BL": tensors["rollout_logprobs_BL"] + noise * tensors["response_mask_BL"]}


def learner_loss(
    model, teacher, tensors, algorithm: AlgorithmSpec, chunk_tokens=4096, rank=0, world_size=1, head=None
) -> torch.Tensor:
    """This rank's share of the loss as a learner rank computes it (losses/step.py), with grad; the teacher
    copy only for an objective that keeps one on the learner, and the supervised control on dataset answers."""
    record = algorithm.record
    models = StepModels(
        model,
        head or model.get_output_embeddings(),
        "cpu",
        chunk_tokens,
        teacher if record.learner_teacher else None,
        teacher.get_output_embeddings() if record.learner_teacher else None,
    )
    loss, _ = step_loss(models, rollout_batch(tensors, batch_source(algorithm)), algorithm, rank, world_size)
    return loss


# one chunk for every family; chunks of 7 tokens (recomputed in the backward) for one of each kind of loss
CASES = [(name, 4096) for name in FAMILIES] + [
    (name, 7) for name in ("sampled_token vOPD", "topk union + tail", "full_vocab reverse KL", "sft")
]


@pytest.mark.parametrize(("name", "chunk_tokens"), CASES)
def test_the_learners_gradient_is_the_references(name: str, chunk_tokens: int, shipped) -> None:
    tensors, teacher, student = shipped
    if "stale" in name:
        tensors = stale(tensors)
    settings, reference_loss = FAMILIES[name]
    algorithm = AlgorithmSpec(**settings)
    ours, theirs = copy.deepcopy(student), copy.deepcopy(student)
    loss = learner_loss(ours, teacher, tensors, algorithm, chunk_tokens)
    loss.backward()
    batch = reference_batch(tensors)
    expected = reference_loss(theirs, teacher, batch) if "full_vocab" in name else reference_loss(theirs, batch)
    expected.backward()
    ours_g, theirs_g = gradients(ours), gradients(theirs)
    assert ours_g.keys() == theirs_g.keys()
    difference = max(float((ours_g[k] - theirs_g[k]).abs().max()) for k in ours_g)
    scale = max(float(g.abs().max()) for g in theirs_g.values())
    print(f"{name}, chunks of {chunk_tokens}: loss {float(loss):.6f} vs {float(expected):.6f}, "
          f"max |grad difference| {difference:.2e} of max |grad| {scale:.2e}")  # fmt: skip
    assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert scale > 0 and difference <= 1e-4 * scale


def test_the_clip_acts_on_the_stale_batch(shipped) -> None:
    """The clipped check above is only a check of the clip if some ratios leave [0.8, 1.2]."""
    tensors = stale(shipped[0])
    logp = reference.next_token_logprobs(shipped[2], reference_batch(tensors))
    sampled = logp.gather(-1, tensors["input_ids_BL"][..., None])[..., 0]
    ratio = torch.exp(sampled - tensors["rollout_logprobs_BL"].double())[tensors["response_mask_BL"].bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).float().mean() > 0.2


def test_the_batch_has_what_the_checks_need(shipped) -> None:
    """Responses of several lengths, and student and teacher top-k ids that differ."""
    tensors = shipped[0]
    lengths = tensors["response_mask_BL"].sum(-1)
    assert len(set(lengths.tolist())) > 1
    response = tensors["response_mask_BL"].bool()
    student, teacher = tensors["student_topk_ids_BLK"][response], tensors["teacher_topk_ids_BLK"][response]
    assert (student[:, :TOP_K] != teacher[:, :TOP_K]).any()


def test_the_reference_shares_no_code_with_opd_ray() -> None:
    """The reference and its batch loader import torch, safetensors and transformers only."""
    import ast
    from pathlib import Path

    folder = Path(reference.__file__).parent
    for module in ("objectives.py", "batch.py"):
        tree = ast.parse((folder / module).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if name.split(".")[0] == "opd_ray"}, module
