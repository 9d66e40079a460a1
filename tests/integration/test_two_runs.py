"""Two opd-ray runs on one machine at once, as a user training while the tests run: each starts its own local Ray
(its own ports and namespace), both read the same model folders, and neither touches the other's run directory or
processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_spec_dict


@pytest.mark.integration
def test_two_runs_on_one_machine_do_not_interfere(tiny_dir: Path, tmp_path: Path) -> None:
    commands = []
    for name in ("first", "second"):
        raw = tiny_spec_dict(tiny_dir, tmp_path / name)
        raw["run"]["name"] = name
        raw["learner"]["num_ranks"] = 1
        raw["ray"] = {"num_cpus": 4}  # a local Ray of its own, as `opd-ray train` starts on a laptop
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(raw))
        commands.append([sys.executable, "-m", "opd_ray.cli", "train", str(spec)])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the tests' Ray: each starts its own
    logs = [(tmp_path / f"{name}.log").open("w+") for name in ("first", "second")]
    runs = [
        subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env)
        for c, log in zip(commands, logs, strict=True)
    ]
    for run, log in zip(runs, logs, strict=True):
        run.wait(timeout=600)
        log.seek(0)
        assert run.returncode == 0, log.read()[-3000:]
        log.close()
    pids = []
    for name in ("first", "second"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["run"] == name and summary["steps"] == 3
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3]
        placed = json.loads((tmp_path / name / "placement.json").read_text())
        pids.append({actor["pid"] for actors in placed.values() for actor in actors})
    assert not pids[0] & pids[1], "the two runs shared an actor process"
