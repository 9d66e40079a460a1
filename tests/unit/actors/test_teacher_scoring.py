"""The transformers teacher's scoring, on the tiny shipped teacher (no Ray, no engine): samples of one prompt
scored on top of the prompt's KV cache give what scoring each whole sequence gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_ray.actors.teacher_backends import score_with_transformers
from opd_ray.losses.batch import ResponseRow, batch_from_rows
from opd_ray.losses.hidden import prompt_groups
from opd_ray.recipe.tiny_models import SHIPPED


def sampled_batch(samples: int):
    """Three prompts of different lengths, `samples` responses of different lengths each, rows interleaved
    (row order is the rollout's, not grouped by prompt)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 15, (4 + p,), generator=generator).tolist() for p in range(3)]
    rows = []
    for s in range(samples):
        for p, prompt in enumerate(prompts):
            response = torch.randint(3, 15, (2 + (s + p) % 4,), generator=generator).tolist()
            rows.append(ResponseRow(prompt, response, p, True, [-1.0] * len(response)))
    return batch_from_rows(rows)


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(SHIPPED / "teacher").eval()


def test_rows_are_grouped_by_their_prompt() -> None:
    assert prompt_groups(sampled_batch(samples=3)) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_scoring_each_prompt_once_gives_the_whole_sequence_scores(teacher) -> None:
    batch = sampled_batch(samples=3)
    batch.student_topk_ids_BLK = torch.randint(0, 15, (*batch.input_ids_BL.shape, 4))
    shared = score_with_transformers(teacher, batch, top_k=8, chunk_tokens=5, share_prompts=True)
    whole = score_with_transformers(teacher, batch, top_k=8, chunk_tokens=5, share_prompts=False)
    for name in ("teacher_logprobs_BL", "teacher_topk_logprobs_BLK", "teacher_logprobs_at_student_topk_BLK"):
        torch.testing.assert_close(getattr(shared, name), getattr(whole, name), rtol=1e-4, atol=1e-4, msg=name)
    same_ids = shared.teacher_topk_ids_BLK == whole.teacher_topk_ids_BLK
    assert same_ids[..., :4].float().mean() > 0.99  # ranks can swap only between near-equal candidates
    assert float(shared.teacher_logprobs_BL.abs().sum()) > 0  # real scores, on response positions
    assert not bool((shared.teacher_logprobs_BL * (1 - batch.response_mask_BL)).any())


def transformers_logprobs(model, sequence: list[int]) -> torch.Tensor:
    """log p(token_i | tokens_<i) for i >= 1: a plain forward, the reference every scorer is checked against."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


def scorer(backend_model_path, **settings):
    from opd_ray.actors.teacher import TeacherScorer
    from opd_ray.spec import ModelSpec, NamedTeacherSpec

    teacher = NamedTeacherSpec(model=ModelSpec(path=str(backend_model_path)), backend="transformers", **settings)
    return TeacherScorer(ModelSpec(path=str(backend_model_path)), teacher, seed=0, index=2)


def test_a_teacher_with_its_own_prompts_scores_the_same_responses_after_them() -> None:
    """The teacher reads longer prompts of its own (e.g. the reference answer shown); the scores land on the
    student's response positions and equal a transformers forward over teacher prompt + response."""
    batch = sampled_batch(samples=2)
    own_prompts = {p: [*range(5, 5 + 3 + 2 * p), 13] for p in range(3)}
    scored, report = scorer(SHIPPED / "teacher", top_k=4).score(batch, own_prompts)
    reference = AutoModelForCausalLM.from_pretrained(SHIPPED / "teacher").eval()
    assert scored.input_ids_BL.equal(batch.input_ids_BL)  # the student's layout is kept
    assert scored.teacher_id_B.tolist() == [2] * batch.num_sequences and report["seconds"] >= 0
    for b in range(batch.num_sequences):
        response_L = batch.response_mask_BL[b].bool()
        response = batch.input_ids_BL[b][response_L].tolist()
        prompt = own_prompts[int(batch.prompt_index_B[b])]
        expected = transformers_logprobs(reference, prompt + response)[len(prompt) - 1 :]
        torch.testing.assert_close(scored.teacher_logprobs_BL[b][response_L], expected, rtol=1e-4, atol=1e-4)
        assert not scored.teacher_logprobs_BL[b][~response_L].any()  # prompt positions are never scored


def test_a_teacher_given_new_weights_scores_with_them() -> None:
    """`weights: current`: what a `self` teacher receives at each sync replaces its weights (the tied head
    follows the embedding)."""
    from opd_ray.actors.weight_sync import pack_state_dict

    teacher = scorer(SHIPPED / "student", top_k=4)
    changed = AutoModelForCausalLM.from_pretrained(SHIPPED / "student").eval()
    with torch.no_grad():  # a training step's worth of change
        for parameter in changed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = sampled_batch(samples=1)
    before, _ = teacher.score(batch)
    teacher.load_weights(pack_state_dict(dict(changed.named_parameters())), 7)
    after, _ = teacher.score(batch)
    assert teacher.weight_version() == 7
    expected = score_with_transformers(changed, batch, top_k=4, chunk_tokens=64, share_prompts=False)
    torch.testing.assert_close(after.teacher_logprobs_BL, expected.teacher_logprobs_BL, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before.teacher_logprobs_BL, after.teacher_logprobs_BL)
    with pytest.raises(RuntimeError, match="do not fit"):  # another architecture is refused, not half-loaded
        bigger = AutoModelForCausalLM.from_pretrained(SHIPPED / "teacher")
        teacher.load_weights(pack_state_dict(dict(bigger.named_parameters())), 8)
