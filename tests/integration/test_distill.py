"""Real local Ray, real vLLM engines, real DeepSpeed ranks (2, gloo) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.driver.run_dir import LOCK_FILE
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration


def test_distill_lowers_reverse_kl_and_writes_run_dir(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """Several OPD steps with ZeRO-2 and a vLLM teacher: the exact (k = |V|) reverse KL to the teacher falls."""
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["teacher"]["backend"] = "vllm"  # the other runs of the suite score with transformers (tests/conftest.py)
    raw["trainer"].update(steps=24, prompts_per_step=32)
    raw["learner"].update(lr=3e-3, warmup_steps=2)
    summary = run_stages(ExperimentSpec.model_validate(raw))

    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert [m["weight_version"] for m in metrics] == list(range(1, 25))
    assert all(m["rollout_weight_version"] == m["weight_version"] - 1 for m in metrics)  # fully on-policy
    first, last = metrics[:4], metrics[-4:]
    kl_first = sum(m["loss"] for m in first) / 4
    kl_last = sum(m["loss"] for m in last) / 4
    assert kl_last < 0.7 * kl_first, (kl_first, kl_last)
    for key in ("time/rollout", "time/teacher", "time/learn", "time/weight_sync", "response_tokens"):
        assert key in metrics[0]
    for m in metrics:  # diagnostics at k=4 on every step, overall and by position
        assert 0.0 <= m["diag/overlap_ratio"] <= 1.0
        assert 0.0 <= m["diag/overlap_mass_student"] <= 1.0 + 1e-6
        assert m["diag/overlap_advantage"] <= 1e-6
        assert "diag/entropy_gap/start" in m  # middle/end appear once responses are long enough

    assert {"health/entropy_vs_start", "health/overlap_rise", "health/cut_off_share"} <= set(metrics[-1])
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary
    assert saved["health"]["status"] in ("ok", "warned")  # the doctor examined every step (warnings: random models)
    for key in ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy", "gap_recovery"):
        assert key in saved
    assert (run_dir / "student" / "config.json").is_file()
    assert any((run_dir / "student").glob("*.safetensors"))
    assert (run_dir / "student" / "tokenizer.json").is_file()

    # The same command again: refused before anything starts, the first run's files untouched.
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_FILE}
    with pytest.raises(UserError, match=r"holds a previous run's results .* pass --resume .* --overwrite"):
        run_stages(ExperimentSpec.model_validate(raw))
    after = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_FILE}
    assert after == before


def test_sft_control_raises_likelihood_of_reference_answers(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """The control arm trains on the dataset's answers through the same learner, without a teacher signal."""
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["algorithm"] = {"objective": "sft", "aggregation": "sequence_mean"}
    raw["trainer"].update(steps=16, prompts_per_step=32, save_final=False)
    raw["learner"].update(lr=3e-3, warmup_steps=1)
    run_stages(ExperimentSpec.model_validate(raw))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("sampled_reverse_kl" not in m for m in metrics)  # no teacher was asked
    assert "time/teacher" not in metrics[0]
    assert sum(m["loss"] for m in metrics[-3:]) < 0.9 * sum(m["loss"] for m in metrics[:3])
