"""Cleaning and mixing the training prompts: dedup against reference prompts, outside mixing, the teacher's template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.data.selection import deduplicate, mix_order, outside_count
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def test_exact_duplicates_ignore_case_and_spacing_and_reference_prompts_go_first() -> None:
    selection = deduplicate(["What is 2+2?", "what  is 2+2? ", "Name a prime.", "SOLVE x"], ["solve x"], None)
    assert selection.kept == [0, 2]
    assert selection.dropped == {"exact_repeat": 1, "exact_reference": 1}


def test_near_duplicates_are_caught_only_with_a_threshold() -> None:
    pool = [
        "Compute the sum of seventeen and twenty-five, then explain each step.",
        "Compute the sum of seventeen and twenty-six, then explain each step.",
        "Which planet is the largest in the solar system?",
    ]
    reference = ["Which planet is the largest in our solar system?"]
    assert deduplicate(pool, reference, None).kept == [0, 1, 2]
    near = deduplicate(pool, reference, 0.6)
    assert near.kept == [0]
    assert near.dropped == {"near_repeat": 1, "near_reference": 1}


def test_outside_share_and_a_seeded_interleaving() -> None:
    assert outside_count(30, 0.25, 100) == 10  # 10 of 40 = 25%
    assert outside_count(30, 0.25, 4) == 4  # capped by what exists
    assert outside_count(30, 0.0, 100) == 0
    order = mix_order(6, 2, seed=3)
    assert sorted(order) == sorted([("aligned", i) for i in range(6)] + [("outside", 0), ("outside", 1)])
    assert order == mix_order(6, 2, seed=3) != mix_order(6, 2, seed=4)


def test_selection_in_the_spec_cleans_and_mixes_the_training_prompts(tiny_dir: Path, tmp_path: Path) -> None:
    from opd_ray.data.run_inputs import load_run_inputs

    train = ["12+34=", "12+34=", "56+78=", "90+12=", "11+22=", "33+44="]
    eval_prompts = ["90+12=", "99+1="]
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["train"] = {"path": str(write_jsonl(tmp_path / "train.jsonl", train))}
    raw["data"]["eval"] = {"path": str(write_jsonl(tmp_path / "eval.jsonl", eval_prompts))}
    raw["data"]["selection"] = {
        "reference": [{"path": str(write_jsonl(tmp_path / "bench.jsonl", ["33+44="]))}],
        "near_duplicate_jaccard": None,
        "outside": {"path": str(write_jsonl(tmp_path / "outside.jsonl", ["5+5=", "6+6=", "99+1=", "7+7="]))},
        "outside_fraction": 0.4,
    }
    inputs = load_run_inputs(ExperimentSpec.model_validate(raw))
    assert inputs.selection == {
        "pool": 6,
        "kept": 3,  # 12+34=, 56+78=, 11+22=
        "dropped": {"exact_repeat": 1, "exact_reference": 2},
        "outside": 2,  # 2 of 5 = 40%; 99+1= is an eval prompt and never eligible
        "outside_dropped": {"exact_reference": 1},
    }
    decoded = sorted(inputs.tokenizer.decode(ids) for ids in inputs.train.prompt_ids)
    assert [p for p in decoded if p in train] == ["11+22=", "12+34=", "56+78="]
    assert len([p for p in decoded if p in ("5+5=", "6+6=", "7+7=")]) == 2
    outside = {inputs.tokenizer.decode(inputs.train.prompt_ids[row]) for row in inputs.train.outside_rows}
    assert len(outside) == 2 and outside <= {"5+5=", "6+6=", "7+7="}


def test_prompts_wrapped_in_the_teachers_chat_template(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    from opd_ray.data.run_inputs import load_run_inputs

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dir / "teacher", teacher)
    config_path = teacher / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    config_path.write_text(json.dumps(config))
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["teacher"]["path"] = str(teacher)
    raw["data"].update(use_chat_template=True, template_source="teacher")
    inputs = load_run_inputs(ExperimentSpec.model_validate(raw))
    first = inputs.tokenizer.decode(inputs.train.prompt_ids[0])
    assert first.endswith("==") and first.count("=") == 2  # the task's "a+b=" plus the teacher's "="

    raw["data"]["template_source"] = "student"
    with pytest.raises(UserError, match=r"the tokenizer of models.student .* has no chat template"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_dropping_rows_renumbers_the_outside_rows() -> None:
    from opd_ray.data.prompts import PromptSet

    prompts = PromptSet([[1], [2], [3], [4]], ["a", "b", "c", "d"], "x", frozenset({1, 3}))
    assert prompts.without({0}).outside_rows == frozenset({0, 2})
    assert prompts.without({1}).outside_rows == frozenset({2})
