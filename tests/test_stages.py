"""The recipe's stages: spec rules, the teacher-answer filters, and cold start -> OPD end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.actors.vllm_engine import Completion
from opd_ray.data.prompts import PromptSet
from opd_ray.data.verifiers import resolve_verifier
from opd_ray.errors import SpecError
from opd_ray.recipe.stages import drop_reason, most_repeated_ngram, opd_spec
from opd_ray.spec import ExperimentSpec, TeacherGenerationSpec
from tests.conftest import tiny_spec_dict

COLD_START = {"teacher_generate": {"prompts": 64, "drop_truncated": False, "max_ngram_repeats": 6}}


def completion(ids: list[int], text: str, finished: bool = True) -> Completion:
    return Completion(0, ids, [], None, finished=finished, text=text)


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
    assert spec.models.teacher.path == raw["models"]["teacher"]["path"]


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


@pytest.mark.integration
def test_cold_start_then_opd_in_one_spec_and_finished_stages_are_skipped(
    tiny_dir: Path, tmp_path: Path, local_ray
) -> None:
    from opd_ray.data.preflight import prepare
    from opd_ray.recipe.stages import cold_start_rows, run_stages, stage_dir

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["stages"] = ["teacher_generate", "sft", "opd"]
    raw["cold_start"] = {**COLD_START, "sft": {"steps": 20, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2}}
    raw["trainer"].update(steps=2, save_final=False)
    spec = ExperimentSpec.model_validate(raw)
    summary = run_stages(spec)

    generated = json.loads((stage_dir(spec, "teacher_generate") / "done.json").read_text())
    rows = [json.loads(line) for line in (stage_dir(spec, "teacher_generate") / "data.jsonl").read_text().splitlines()]
    assert generated["generated"] == 64 and generated["kept"] == len(rows) > 0
    assert generated["kept"] + sum(generated["dropped"].values()) == 64
    train = prepare(spec).train
    used = cold_start_rows(spec, len(train))
    assert {row["row"] for row in rows} <= set(used) and len(used) == 64
    assert all(row["prompt_ids"] == train.prompt_ids[row["row"]] for row in rows)
    sft_student = stage_dir(spec, "sft") / "student"
    assert (sft_student / "config.json").is_file() and any(sft_student.glob("*.safetensors"))
    assert summary["cold_start"]["sft"]["examples"] == len(rows)
    assert summary["cold_start"]["teacher_generate"]["kept"] == len(rows)
    run_spec = (tmp_path / "run" / "spec.yaml").read_text()
    assert str(sft_student) in run_spec  # OPD started from the cold-started student
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]

    stamps = {p: p.stat().st_mtime_ns for p in (stage_dir(spec, "teacher_generate") / "data.jsonl", sft_student)}
    second = run_stages(spec)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # neither finished stage ran again
    assert second["cold_start"]["sft"] == summary["cold_start"]["sft"]
