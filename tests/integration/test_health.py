"""The OPD doctor in a real run: a tiny run made to collapse (learner.lr 0.05) is stopped by trainer.stop_on,
with the condition named, and summary.json says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.errors import RunStopped
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration


def test_stop_on_collapse_stops_a_collapsing_run_and_names_it(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["learner"].update(lr=0.05, num_ranks=1)  # 17x the tests' usual lr: every response runs into the length limit
    raw["trainer"].update(steps=30, save_final=False, stop_on=["collapse"])
    raw["health"] = {"window": 3}
    with pytest.raises(RunStopped, match=r"stopped at step \d+ by trainer.stop_on: collapse at step \d+: .* cut off"):
        run_stages(ExperimentSpec.model_validate(raw))

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    health = summary["health"]
    assert health["status"] == "stopped" and health["stopped_by"] == "collapse"
    collapse = next(c for c in health["conditions"] if c["condition"] == "collapse")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == summary["steps"] == collapse["first_step"] < 30  # stopped at the step it was found
    assert metrics[-1]["health/cut_off_share"] >= 0.9 and metrics[-1]["health/entropy_vs_start"] <= 0.5
    assert "student_accuracy_after" not in summary  # not a finished run
