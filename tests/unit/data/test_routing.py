"""Routing rows to teachers and rendering each teacher's own prompt, at pre-flight (no Ray, no engines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.data.run_inputs import load_run_inputs
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict
from tests.unit.spec.test_teachers import two_teachers


def routed_rows(tiny_dir: Path, tmp_path: Path, tasks: list[str]) -> Path:
    """The tiny task's first rows with a `task` column."""
    rows = [json.loads(line) for line in (tiny_dir / "train.jsonl").read_text().splitlines()[: len(tasks)]]
    path = tmp_path / "routed.jsonl"
    path.write_text("".join(json.dumps({**row, "task": task}) + "\n" for row, task in zip(rows, tasks, strict=True)))
    return path


def test_each_row_goes_to_its_teacher_with_that_teachers_prompt(tiny_dir: Path, tmp_path: Path) -> None:
    raw = two_teachers(tiny_spec_dict(tiny_dir, tmp_path / "run"))
    raw["data"]["train"] = {"path": str(routed_rows(tiny_dir, tmp_path, ["add", "hint", "add", "other"]))}
    with pytest.raises(UserError, match=r"eval\.jsonl row 1: data\.route\.field 'task' is not a column"):
        load_run_inputs(ExperimentSpec.model_validate(raw))  # eval rows are routed too: each teacher's own rows
    raw["data"]["eval"] = raw["data"]["train"]
    inputs = load_run_inputs(ExperimentSpec.model_validate(raw))
    assert inputs.eval.teachers == inputs.train.teachers
    train, tokenizer = inputs.train, inputs.tokenizer
    assert train.teachers == ["sums", "hinted", "sums", "hinted"]  # "hint" and "other": the route's default
    rows = [json.loads(line) for line in Path(raw["data"]["train"]["path"]).read_text().splitlines()]
    for i, row in enumerate(rows):
        assert train.prompt_ids[i] == tokenizer(row["prompt"], add_special_tokens=False).input_ids
        if train.teachers[i] == "hinted":  # "{prompt}{answer}=": the student shown the reference answer
            expected = tokenizer(row["prompt"] + row["answer"] + "=", add_special_tokens=False).input_ids
            assert train.teacher_prompt_ids[i] == expected
        else:
            assert train.teacher_prompt_ids[i] is None  # reads the student's prompt
    assert train.teacher_prompts([0, 1]) == {0: train.prompt_ids[0], 1: train.teacher_prompt_ids[1]}
    assert train.teacher_prompts([0, 2]) is None


def test_a_row_no_teacher_takes_stops_preflight_naming_row_and_value(tiny_dir: Path, tmp_path: Path) -> None:
    raw = two_teachers(tiny_spec_dict(tiny_dir, tmp_path / "run"))
    raw["data"]["route"].pop("default")
    raw["data"]["train"] = {"path": str(routed_rows(tiny_dir, tmp_path, ["add", "add", "poetry"]))}
    raw["data"].pop("eval")
    with pytest.raises(UserError, match=r"routed\.jsonl row 3: data\.route\.field 'task' = 'poetry' names no teacher"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_template_field_the_data_lacks_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    raw = two_teachers(tiny_spec_dict(tiny_dir, tmp_path / "run"))
    raw["teachers"]["hinted"]["prompt_template"] = "{prompt}{solution}"
    raw["data"]["train"] = {"path": str(routed_rows(tiny_dir, tmp_path, ["add", "hint"]))}
    raw["data"].pop("eval")
    with pytest.raises(UserError, match=r"teachers\.hinted\.prompt_template: \{solution\} is not a column of"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_teacher_prompt_too_long_for_its_engine_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    raw = two_teachers(tiny_spec_dict(tiny_dir, tmp_path / "run"))
    raw["teachers"]["hinted"]["prompt_template"] = "{prompt}" * 3 + "{answer}"
    raw["data"]["train"] = {"path": str(routed_rows(tiny_dir, tmp_path, ["add", "hint"]))}
    raw["data"].pop("eval")
    with pytest.raises(UserError, match=r"teachers\.hinted\.engine\.max_model_len \(32\) is shorter than"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_float_route_column_is_refused_instead_of_never_matching(tiny_dir: Path, tmp_path: Path) -> None:
    """JSON's 1.0 would route as "1.0", never as the "1" a spec names, and fall to the default silently."""
    raw = two_teachers(tiny_spec_dict(tiny_dir, tmp_path / "run"))
    raw["data"]["route"]["teachers"] = {"1": "sums", "2": "hinted"}
    raw["data"]["train"] = {"path": str(routed_rows(tiny_dir, tmp_path, [1.0, 2.0]))}
    raw["data"].pop("eval")
    with pytest.raises(UserError, match=r"routed\.jsonl row 1: data\.route\.field 'task' = 1.0 is a float"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_teacher_can_read_its_own_prompt_without_the_chat_template() -> None:
    """A base-model teacher (no chat template) reads a few-shot prompt in plain text while the student's
    prompt goes through the student's chat template."""
    from opd_ray.data.routing import Routing
    from opd_ray.spec import DatasetSpec, DataSpec

    data = DataSpec(train=DatasetSpec(path="unused.jsonl"), use_chat_template=True, system_prompt="Be brief.")
    routing = Routing({"base": "Q: {prompt}\nA:", "chat": None}, chat_templates={"base": False})
    own = routing.teacher_data("base", data)
    assert (own.use_chat_template, own.system_prompt) == (False, None)
    assert routing.teacher_data("chat", data) is data
