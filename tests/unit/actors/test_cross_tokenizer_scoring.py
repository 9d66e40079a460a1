"""A teacher with another tokenizer (the shipped character-level teacher) scoring a digit-pair student's samples:
its numbers, brought back to the student's tokens, against a plain transformers forward over its own tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_ray.actors.cross_tokenizer import CrossTokenizer
from opd_ray.actors.teacher import TeacherScorer
from opd_ray.actors.teacher_backends import score_with_transformers
from opd_ray.data.arithmetic import ALPHABET
from opd_ray.losses.batch import ResponseRow, batch_from_rows
from opd_ray.recipe.tiny_models import SHIPPED, build_digit_pair_tokenizer, save_random_model
from opd_ray.spec import ModelSpec, NamedTeacherSpec

PROMPTS = ["12+34=", "5+7=", "40+60="]
RESPONSES = [("64", True), ("21", False), ("001", True)]  # text, finished


def transformers_logprobs(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


def samples(tokenizer) -> tuple:
    """The student's batch (its own ids, made-up sampling log-probs) and the teacher's prompts."""
    rows = []
    for p, (prompt, (text, finished)) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        response = tokenizer(text).input_ids + ([tokenizer.eos_token_id] if finished else [])
        logprobs = [-0.3 - 0.1 * i for i in range(len(response))]
        rows.append(ResponseRow(tokenizer(prompt).input_ids, response, p, finished, logprobs))
    return batch_from_rows(rows)


def cross_scorer(student_dir) -> TeacherScorer:
    teacher = ModelSpec(path=str(SHIPPED / "teacher"))
    settings = NamedTeacherSpec(model=teacher, backend="transformers", top_k=8, cross_tokenizer=True)
    return TeacherScorer(teacher, settings, seed=0, index=0, student=ModelSpec(path=str(student_dir)))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A digit-pair student's folder (random weights: only its tokenizer and head size matter here)."""
    directory = tmp_path_factory.mktemp("digit-pairs")
    tokenizer = build_digit_pair_tokenizer(ALPHABET, directory)
    return save_random_model(tokenizer, 1, directory, seed=0, architecture="llama"), tokenizer


def test_chunk_values_and_aligned_top_k_match_the_teachers_own_forward(pairs) -> None:
    directory, pair_tokenizer = pairs
    chars = AutoTokenizer.from_pretrained(SHIPPED / "teacher")
    reference = AutoModelForCausalLM.from_pretrained(SHIPPED / "teacher").eval()
    batch = samples(pair_tokenizer)
    scorer = cross_scorer(directory)
    assert scorer.cross is not None and scorer.cross.shared_tokens == len(chars)  # every character is a pair-token too
    own_prompts = {p: chars(prompt).input_ids for p, prompt in enumerate(PROMPTS)}
    scored, _ = scorer.score(batch, own_prompts)
    for b, (text, finished) in enumerate(RESPONSES):
        teacher_response = chars(text).input_ids + ([chars.eos_token_id] if finished else [])
        prompt = own_prompts[b]
        q_T = transformers_logprobs(reference, prompt + teacher_response)[len(prompt) - 1 :]
        at = batch.response_mask_BL[b].nonzero()[:, 0]
        values = scored.teacher_logprobs_BL[b, at]
        if text == "64":  # "64" <eos> against "6" "4" <eos>: one merged chunk, then the end alone
            torch.testing.assert_close(values, torch.stack([q_T[0] + q_T[1], q_T[2]]), rtol=1e-5, atol=1e-5)
            assert scored.aligned_BL[b, at].tolist() == [0.0, 1.0]
            # the pair-token spans two teacher tokens: its own teacher probability, the product along the span,
            # as a top-k of one id (the student's token); nothing else is known there
            span_ids, span_logprobs = scored.teacher_topk_ids_BLK[b, at[0]], scored.teacher_topk_logprobs_BLK[b, at[0]]
            assert span_ids[0] == batch.input_ids_BL[b, at[0]] and span_ids[1:].eq(-1).all()
            torch.testing.assert_close(span_logprobs[0], q_T[0] + q_T[1], rtol=1e-5, atol=1e-5)
            eos_top = scored.teacher_topk_ids_BLK[b, at[1]]
            assert eos_top[0] == pair_tokenizer.eos_token_id  # the teacher's best guess, in the student's ids
        if text == "21":  # not finished: "21" against "2" "1", no end token
            torch.testing.assert_close(values, (q_T[0] + q_T[1]).reshape(1), rtol=1e-5, atol=1e-5)
        if text == "001":  # "00" "1" <eos> against "0" "0" "1" <eos>: the single digit and the end are aligned
            torch.testing.assert_close(values, torch.stack([q_T[0] + q_T[1], q_T[2], q_T[3]]), rtol=1e-5, atol=1e-5)
            assert scored.aligned_BL[b, at].tolist() == [0.0, 1.0, 1.0]
        assert not scored.teacher_logprobs_BL[b][~batch.response_mask_BL[b].bool()].any()


def test_cross_tokenizer_scoring_with_one_tokenizer_gives_the_plain_scores() -> None:
    """Forced through the alignment with the student's own tokenizer, every chunk is one token: the values and
    the top-k are what scoring the ids directly gives."""
    chars = AutoTokenizer.from_pretrained(SHIPPED / "teacher")
    scorer = cross_scorer(SHIPPED / "teacher")
    assert scorer.cross is None  # identical vocabularies keep the fast path
    batch = samples(chars)
    plain, _ = scorer.score(batch)
    scorer.cross = CrossTokenizer(chars, chars)
    prompts = {p: chars(prompt).input_ids for p, prompt in enumerate(PROMPTS)}
    aligned, _ = scorer.score(batch, prompts)
    torch.testing.assert_close(aligned.teacher_logprobs_BL, plain.teacher_logprobs_BL, rtol=1e-5, atol=1e-5)
    response_BL = batch.response_mask_BL.bool()
    assert aligned.teacher_topk_ids_BLK[response_BL].equal(plain.teacher_topk_ids_BLK[response_BL])
    assert aligned.aligned_BL.equal(batch.response_mask_BL)


def test_a_teacher_with_padding_rows_is_scored_through_the_alignment_and_its_extra_ids_dropped(tmp_path) -> None:
    """Two sizes of one family: the same tokenizer, a teacher head of 64 rows against the student's 15."""
    from transformers import Qwen2ForCausalLM

    from opd_ray.recipe.tiny_models import tiny_qwen2_config

    chars = AutoTokenizer.from_pretrained(SHIPPED / "student")
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config(64, 1, chars.eos_token_id, chars.pad_token_id)).save_pretrained(tmp_path)
    chars.save_pretrained(tmp_path)
    teacher = ModelSpec(path=str(tmp_path))
    settings = NamedTeacherSpec(model=teacher, backend="transformers", top_k=30, cross_tokenizer=True)
    scorer = TeacherScorer(teacher, settings, seed=0, student=ModelSpec(path=str(SHIPPED / "student")))
    assert scorer.cross is not None and scorer.cross.same_vocabulary
    batch = samples(chars)
    scored, _ = scorer.score(batch)  # no prompts of its own: the student's ids are its ids
    response_BL = batch.response_mask_BL.bool()
    ids = scored.teacher_topk_ids_BLK[response_BL]
    assert ids.max() < len(chars) and (ids == -1).any()  # 30 of 64 rows ranked: padding ids among them, dropped
    assert scored.aligned_BL.equal(batch.response_mask_BL)
    expected = score_with_transformers(scorer.backend.model, batch, top_k=30, chunk_tokens=64, share_prompts=False)
    torch.testing.assert_close(scored.teacher_logprobs_BL, expected.teacher_logprobs_BL, rtol=1e-5, atol=1e-5)
