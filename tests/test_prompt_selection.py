"""Teacher-aligned prompts: dedup against reference and eval prompts, mixing, the teacher's template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.data.selection import deduplicate, mix_order, outside_count
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


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


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def test_selection_in_the_spec_cleans_and_mixes_the_training_prompts(tiny_dir: Path, tmp_path: Path) -> None:
    from opd_ray.data.preflight import prepare

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
    prepared = prepare(ExperimentSpec.model_validate(raw))
    assert prepared.selection == {
        "pool": 6,
        "kept": 3,  # 12+34=, 56+78=, 11+22=
        "dropped": {"exact_repeat": 1, "exact_reference": 2},
        "outside": 2,  # 2 of 5 = 40%; 99+1= is an eval prompt and never eligible
        "outside_dropped": {"exact_reference": 1},
    }
    decoded = sorted(prepared.tokenizer.decode(ids) for ids in prepared.train.prompt_ids)
    assert [p for p in decoded if p in train] == ["11+22=", "12+34=", "56+78="]
    assert len([p for p in decoded if p in ("5+5=", "6+6=", "7+7=")]) == 2
    outside = {prepared.tokenizer.decode(prepared.train.prompt_ids[row]) for row in prepared.train.outside_rows}
    assert len(outside) == 2 and outside <= {"5+5=", "6+6=", "7+7="}


def test_prompts_wrapped_in_the_teachers_chat_template(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    from opd_ray.data.preflight import prepare

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
    prepared = prepare(ExperimentSpec.model_validate(raw))
    first = prepared.tokenizer.decode(prepared.train.prompt_ids[0])
    assert first.endswith("==") and first.count("=") == 2  # the task's "a+b=" plus the teacher's "="

    raw["data"]["template_source"] = "student"
    with pytest.raises(UserError, match=r"the tokenizer of models.student .* has no chat template"):
        prepare(ExperimentSpec.model_validate(raw))


def test_teacher_confidence_averages_response_tokens_per_sample_and_groups_by_prompt() -> None:
    import torch

    from opd_ray.driver.alignment import teacher_confidence
    from opd_ray.losses.batch import RolloutBatch

    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float32)
    teacher = torch.tensor([[0.0, -1.0, -3.0, 0.0], [0.0, 0.0, -0.5, -0.5], [0.0, -4.0, 0.0, 0.0]]) * mask
    batch = RolloutBatch(
        input_ids_BL=torch.zeros(3, 4, dtype=torch.long),
        attention_mask_BL=torch.ones(3, 4, dtype=torch.long),
        response_mask_BL=mask,
        rollout_logprobs_BL=torch.zeros(3, 4),
        prompt_index_B=torch.tensor([7, 7, 2]),
        finished_B=torch.ones(3, dtype=torch.bool),
        policy_version=0,
        teacher_logprobs_BL=teacher,
    )
    assert teacher_confidence(batch) == {7: [-2.0, -0.5], 2: [-4.0]}


def test_top_fraction_keeps_the_best_rounding_up_and_breaks_ties_by_row() -> None:
    from opd_ray.driver.alignment import top_fraction

    scores = {0: -1.0, 1: -0.2, 2: -0.2, 3: -3.0, 4: -0.1}
    assert top_fraction(scores, 0.4) == [1, 4]
    assert top_fraction(scores, 0.5) == [1, 2, 4]  # ceil(2.5) = 3
    assert top_fraction(scores, 1.0) == [0, 1, 2, 3, 4]


def test_dropping_rows_renumbers_the_outside_rows() -> None:
    from opd_ray.data.prompts import PromptSet

    prompts = PromptSet([[1], [2], [3], [4]], ["a", "b", "c", "d"], "x", frozenset({1, 3}))
    assert prompts.without({0}).outside_rows == frozenset({0, 2})
    assert prompts.without({1}).outside_rows == frozenset({2})


@pytest.mark.integration
def test_training_on_the_prompts_the_teacher_agrees_with_most(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """keep_top_fraction 0.25 of 64 scored prompts, with outside prompts kept at a fifth of what remains:
    the kept prompts score higher on average than the pool, the choice is recorded, and training runs."""
    from opd_ray.driver.loop import distill

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["train"]["limit"] = 64
    raw["data"]["eval"] = None  # accuracy is not what this test is about
    raw["data"]["selection"] = {
        "near_duplicate_jaccard": None,
        "outside": {"path": str(write_jsonl(tmp_path / "outside.jsonl", [f"{a}+{a}=" for a in range(10, 40)]))},
        "outside_fraction": 0.2,
        "keep_top_fraction": 0.25,
    }
    raw["trainer"].update(steps=2, prompts_per_step=8, save_final=False)
    summary = distill(ExperimentSpec.model_validate(raw))

    record = json.loads((tmp_path / "run" / "alignment.json").read_text())
    assert summary["prompt_selection"]["outside"] == 16  # 16 of 80 = 20%, before scoring
    assert record["scored"] == 64 and record["kept"] == 16 and record["outside_kept"] == 4  # 4 of 20
    assert len(record["dropped_rows"]) == 80 - 16 - 4
    assert record["teacher_logprob_mean_kept"] > record["teacher_logprob_mean_all"]
    assert record["teacher_logprob_threshold"] <= record["teacher_logprob_mean_kept"]
    assert summary["steps"] == 2
