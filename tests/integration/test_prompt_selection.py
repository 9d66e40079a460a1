"""Training on the prompts the teacher agrees with most, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


@pytest.mark.integration
def test_training_on_the_prompts_the_teacher_agrees_with_most(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """keep_top_fraction 0.25 of 64 scored prompts, with outside prompts kept at a fifth of what remains:
    the kept prompts score higher on average than the pool, the choice is recorded, and training runs."""
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["data"]["train"]["limit"] = 64
    raw["data"]["eval"] = None  # accuracy is not what this test is about
    raw["data"]["selection"] = {
        "near_duplicate_jaccard": None,
        "outside": {"path": str(write_jsonl(tmp_path / "outside.jsonl", [f"{a}+{a}=" for a in range(10, 40)]))},
        "outside_fraction": 0.2,
        "keep_top_fraction": 0.25,
    }
    raw["trainer"].update(steps=2, prompts_per_step=8, save_final=False)
    summary = run_stages(ExperimentSpec.model_validate(raw))

    record = json.loads((tmp_path / "run" / "teacher_agreement.json").read_text())
    assert summary["prompt_selection"]["outside"] == 16  # 16 of 80 = 20%, before scoring
    assert record["scored"] == 64 and record["kept"] == 16 and record["outside_kept"] == 4  # 4 of 20
    assert len(record["dropped_rows"]) == 80 - 16 - 4
    assert record["teacher_logprob_mean_kept"] > record["teacher_logprob_mean_all"]
    assert record["teacher_logprob_threshold"] <= record["teacher_logprob_mean_kept"]
    assert summary["steps"] == 2
