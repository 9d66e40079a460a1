"""The recipe's stages: spec rules, the teacher-answer filters, what the OPD stage trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.actors.vllm_engine import Completion
from opd_ray.data.prompts import PromptSet
from opd_ray.data.repetition import most_repeated_ngram
from opd_ray.data.verifiers import resolve_verifier
from opd_ray.errors import SpecError
from opd_ray.recipe.stages import drop_reason, opd_spec
from opd_ray.spec import ExperimentSpec, TeacherGenerationSpec
from tests.conftest import tiny_spec_dict


def completion(ids: list[int], text: str, finished: bool = True) -> Completion:
    return Completion(0, ids, [], None, finished=finished, text=text)


COLD_START = {"teacher_generate": {"prompts": 64, "drop_truncated": False, "max_ngram_repeats": 6}}


def test_most_repeated_ngram_counts_overlapping_occurrences() -> None:
    assert most_repeated_ngram([1, 2, 3, 4], 2) == 1
    assert most_repeated_ngram([7, 7, 7, 7, 7], 2) == 4
    assert most_repeated_ngram([1, 2, 1, 2, 1, 2], 2) == 3
    assert most_repeated_ngram([1, 2], 4) == 0


def test_teacher_answers_are_dropped_for_the_first_rule_they_break() -> None:
    exact = resolve_verifier("exact")
    rules = TeacherGenerationSpec(prompts=1, repeat_ngram=2, max_ngram_repeats=2, require_correct=True)
    assert drop_reason(completion([5, 6, 1], "12"), "12", exact, rules) is None
    assert drop_reason(completion([5, 6], "12", finished=False), "12", exact, rules) == "truncated"
    assert drop_reason(completion([5, 6, 5, 6, 5, 6, 1], "121212"), "121212", exact, rules) == "repetitive"
    assert drop_reason(completion([5, 7, 1], "13"), "12", exact, rules) == "wrong"
    assert drop_reason(completion([5, 7, 1], "13"), None, exact, rules) == "wrong"  # nothing to check against
    lenient = rules.model_copy(update={"drop_truncated": False, "require_correct": False})
    assert drop_reason(completion([5, 7], "13", finished=False), "12", exact, lenient) is None


def test_opd_stage_distils_the_cold_started_student_and_builds_nothing(tmp_path: Path) -> None:
    """The tiny-model build runs once before the stages; were it to see the OPD stage's student path it
    would write a fresh tiny student over the cold-started one."""
    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["models"]["build_tiny"] = {"directory": str(tmp_path)}
    raw.update(stages=["teacher_generate", "sft", "opd"], cold_start=COLD_START)
    spec = opd_spec(ExperimentSpec.model_validate(raw))
    assert spec.models.student.path == str(tmp_path / "run" / "stages" / "sft" / "student")
    assert spec.models.build_tiny is None
    assert spec.teacher_model("teacher").path == raw["models"]["teacher"]["path"]


def test_prompt_set_without_rows_keeps_the_rest_in_order() -> None:
    prompts = PromptSet([[1], [2], [3], [4]], ["a", "b", "c", "d"], "x")
    rest = prompts.without({0, 2})
    assert rest.prompt_ids == [[2], [4]] and rest.answers == ["b", "d"]


@pytest.mark.parametrize(
    ("stages", "cold_start", "message"),
    [
        (["opd", "sft"], COLD_START, "in the order teacher_generate -> sft -> opd"),
        (["opd", "opd"], None, "at most once"),
        (["sft", "opd"], COLD_START, "sft trains on teacher_generate's answers"),
        (["teacher_generate", "sft", "opd"], None, "needs cold_start.teacher_generate"),
    ],
)
def test_stage_lists_that_cannot_run_are_refused(
    tiny_dir: Path, tmp_path: Path, stages: list[str], cold_start: dict | None, message: str
) -> None:
    from omegaconf import OmegaConf

    from opd_ray.spec import load_spec

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["stages"] = stages
    if cold_start is not None:
        raw["cold_start"] = cold_start
    path = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(raw), path)
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_the_teacher_budget_stops_generation_after_the_answer_that_crosses_it() -> None:
    from opd_ray.recipe.stages import within_budget

    answers = [completion([1] * 5, "a"), completion([1] * 5, "b"), completion([1] * 5, "c")]
    assert within_budget(answers, 0, None) == answers
    assert [c.text for c in within_budget(answers, 0, 7)] == ["a", "b"]  # b crosses 7: kept whole
    assert [c.text for c in within_budget(answers, 0, 5)] == ["a"]
    assert within_budget(answers, 9, 9) == []  # an earlier chunk spent it all


def test_sft_tokens_trained_is_steps_times_batch_at_the_mean_answer_length() -> None:
    from opd_ray.recipe.stages import sft_tokens_trained

    assert sft_tokens_trained([([1], [2, 3]), ([1], [2, 3, 4, 5])], steps=10, batch_size=4) == 120


def test_a_cross_tokenizer_teachers_answer_is_cut_at_its_stop_and_retokenized_for_the_student(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A few-shot base model (Gemma 3) as the cold start's teacher: its answer runs on to the next question
    in its own tokens; the student trains on the text before answer_stop, in its tokens, ending with its EOS."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from opd_ray.recipe.stages import in_student_tokens

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["teacher"] = {**raw.get("teacher", {}), "cross_tokenizer": True, "answer_stop": ["\n"]}
    raw["algorithm"] = {**raw.get("algorithm", {}), "objective": "topk", "topk_support": "teacher"}
    raw.update(stages=["teacher_generate", "sft", "opd"], cold_start=COLD_START)
    spec = ExperimentSpec.model_validate(raw)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "student")
    inputs = SimpleNamespace(tokenizer=tokenizer)  # stands in for RunInputs: only its tokenizer is read
    teachers_own = completion([901, 902, 903, 904], " 12\nQ: 3+4=", finished=False)
    answer = in_student_tokens(teachers_own, spec, inputs)
    assert answer.text == "12" and answer.finished
    assert answer.token_ids == [*tokenizer("12", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    cut_off = in_student_tokens(completion([901], " 1", finished=False), spec, inputs)
    assert not cut_off.finished and cut_off.token_ids == tokenizer("1", add_special_tokens=False).input_ids


# --8<-- [start:toy_stage]
def count_prompts(spec, inputs) -> dict:
    """A toy stage: writes how many training prompts the run has into its own folder; its record is done.json's."""
    from opd_ray.recipe.stages import stage_dir

    folder = stage_dir(spec, "count_prompts")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "count.txt").write_text(str(len(inputs.train)))
    return {"prompts": len(inputs.train)}


# --8<-- [end:toy_stage]


@pytest.fixture
def toy_stage():
    from opd_ray.recipe.stages import STAGE_RUNNERS, register_stage
    from opd_ray.spec.stages import STAGE_RECORDS, StageRecord

    register_stage(StageRecord("count_prompts", "counts the training prompts"), count_prompts, before="opd")
    yield
    STAGE_RECORDS.pop("count_prompts")
    STAGE_RUNNERS.pop("count_prompts")


def test_a_new_stage_is_one_record_and_one_runner(tiny_dir: Path, tmp_path: Path, toy_stage) -> None:
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.recipe.stages import run_cold_start
    from opd_ray.spec import ExperimentSpec
    from opd_ray.spec.stages import STAGE_RECORDS

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    assert list(STAGE_RECORDS) == ["teacher_generate", "sft", "count_prompts", "opd"]
    with pytest.raises(ValueError, match=r"in the order teacher_generate -> sft -> count_prompts -> opd"):
        ExperimentSpec.model_validate({**raw, "stages": ["opd", "count_prompts"]})
    with pytest.raises(ValueError, match=r"'counting' is not a stage; the stages are teacher_generate, sft, count"):
        ExperimentSpec.model_validate({**raw, "stages": ["counting", "opd"]})
    spec = ExperimentSpec.model_validate({**raw, "stages": ["count_prompts", "opd"]})
    inputs = load_run_inputs(spec)
    records = run_cold_start(spec, inputs)
    folder = tmp_path / "run" / "stages" / "count_prompts"
    assert records == {"count_prompts": {"prompts": len(inputs.train)}}
    assert (folder / "count.txt").read_text() == str(len(inputs.train)) and (folder / "done.json").is_file()
    (folder / "count.txt").unlink()
    assert run_cold_start(spec, inputs)["count_prompts"]["prompts"] == len(inputs.train)  # done: skipped
    assert not (folder / "count.txt").exists()
