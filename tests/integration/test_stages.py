"""The recipe's stages end to end: cold start -> OPD in one spec, finished stages skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

COLD_START = {"teacher_generate": {"prompts": 64, "drop_truncated": False, "max_ngram_repeats": 6}}


@pytest.mark.integration
def test_cold_start_then_opd_in_one_spec_and_finished_stages_are_skipped(
    tiny_dir: Path, tmp_path: Path, local_ray
) -> None:
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.recipe.stages import cold_start_rows, run_cold_start, run_stages, stage_dir

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["stages"] = ["teacher_generate", "sft", "opd"]
    raw["cold_start"] = {**COLD_START, "sft": {"steps": 20, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2}}
    raw["trainer"].update(steps=2, save_final=False)
    spec = ExperimentSpec.model_validate(raw)
    summary = run_stages(spec)

    generated = json.loads((stage_dir(spec, "teacher_generate") / "done.json").read_text())
    rows = [json.loads(line) for line in (stage_dir(spec, "teacher_generate") / "data.jsonl").read_text().splitlines()]
    assert generated["generated"] == 64 and generated["kept"] == len(rows) > 0
    assert generated["kept"] + sum(generated["dropped"].values()) == 64
    train = load_run_inputs(spec).train
    used = cold_start_rows(spec, len(train))
    assert {row["row"] for row in rows} <= set(used) and len(used) == 64
    assert all(row["prompt_ids"] == train.prompt_ids[row["row"]] for row in rows)
    sft_student = stage_dir(spec, "sft") / "student"
    assert (sft_student / "config.json").is_file() and any(sft_student.glob("*.safetensors"))
    assert summary["cold_start"]["sft"]["examples"] == len(rows)
    assert summary["cold_start"]["teacher_generate"]["kept"] == len(rows)
    # the original student's accuracy, measured before the cold start replaced it (random models: low)
    original = summary["student_accuracy_before_cold_start"]
    assert (
        0.0 <= original <= 1.0
        and summary["cold_start"]["teacher_generate"]["student_accuracy_before_cold_start"] == original
    )
    run_spec = (tmp_path / "run" / "spec.yaml").read_text()
    assert str(sft_student) in run_spec  # OPD started from the cold-started student
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]

    # the same command again: the finished stages are skipped (the OPD stage would need --resume)
    stamps = {p: p.stat().st_mtime_ns for p in (stage_dir(spec, "teacher_generate") / "data.jsonl", sft_student)}
    again = run_cold_start(spec, load_run_inputs(spec))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # neither finished stage ran again
    assert {k: v for k, v in again["sft"].items() if k != "fingerprint"} == summary["cold_start"]["sft"]
    assert again["sft"]["fingerprint"]["teachers.teacher.model (contents)"]  # what --resume checks before reusing it
    assert again["teacher_generate"]["rows"] == used
