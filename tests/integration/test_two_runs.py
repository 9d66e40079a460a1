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


def user_jsonl_spec(tiny_dir: Path, tmp_path: Path, name: str) -> dict:
    """A user's own prompt file, a template, a named verifier and sampled-token OPD with vOPD + IW-OPD. The eval
    rows are the file's first 8, so prompt selection takes them out of training."""
    prompts = tmp_path / "mine.jsonl"
    rows = [{"question": f"{a}+{a + 1}", "final": str(2 * a + 1)} for a in range(10, 42)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_spec_dict(tiny_dir, tmp_path / name)
    dataset = {"path": str(prompts), "prompt_field": "question", "answer_field": "final"}
    raw["data"] = {
        "train": dataset,
        "eval": {**dataset, "limit": 8},
        "prompt_template": "{prompt}=",
        "verifier": "final_number",
        "selection": {"near_duplicate_jaccard": None},
    }
    raw["trainer"].update(steps=2, prompts_per_step=8)
    raw["algorithm"] = {"objective": "sampled_token", "clip_eps": 0.2, "baseline": "vopd", "position_gamma": 0.5}
    return raw


@pytest.mark.integration
def test_two_runs_on_one_machine_do_not_interfere(tiny_dir: Path, tmp_path: Path) -> None:
    """The first run is the tiny spec; the second, a user's JSONL file with a template and a named verifier. The
    first is started at a lower CPU priority (niceness + 2): each local Ray runs its actors at its own driver's
    priority, not Ray's default 15."""
    commands = []
    specs = {
        "first": tiny_spec_dict(tiny_dir, tmp_path / "first"),
        "second": user_jsonl_spec(tiny_dir, tmp_path, "second"),
    }
    for name, raw in specs.items():
        raw["run"]["name"] = name
        raw["learner"]["num_ranks"] = 1
        raw["ray"] = {"num_cpus": 4}  # a local Ray of its own, as `opd-ray train` starts on a laptop
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(raw))
        commands.append([sys.executable, "-m", "opd_ray.cli", "train", str(spec)])
    # not the tests' Ray (each starts its own), nor a niceness set for it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    env["OPD_RAY_CACHE"] = str(tmp_path / "cache")
    logs = [(tmp_path / f"{name}.log").open("w+") for name in specs]
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    drivers_niceness = [ours + 2, ours]
    runs = [
        subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda n=n: os.nice(n - ours))
        for c, log, n in zip(commands, logs, drivers_niceness, strict=True)
    ]
    printed = []
    for run, log in zip(runs, logs, strict=True):
        run.wait(timeout=600)
        log.seek(0)
        printed.append(log.read())
        assert run.returncode == 0, printed[-1][-3000:]
        log.close()
    pids = []
    for name, raw in specs.items():
        steps = raw["trainer"]["steps"]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["run"] == name and summary["steps"] == steps
        assert 0.0 <= summary["student_accuracy_after"] <= 1.0
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, steps + 1))
        placed = json.loads((tmp_path / name / "placement.json").read_text())
        pids.append({actor["pid"] for actors in placed.values() for actor in actors})
        niceness = {actor["niceness"] for actors in placed.values() for actor in actors}
        assert niceness == {drivers_niceness[len(pids) - 1]}, (name, niceness)
        startup = summary["startup_seconds"]
        assert 0 < startup["roles"] < startup["before_first_step"] and summary["teacher_accuracy_cached"] is False
    assert len(list((tmp_path / "cache" / "teacher_accuracy").iterdir())) == 2  # two eval sets: two entries
    assert not pids[0] & pids[1], "the two runs shared an actor process"
    selection = {"pool": 32, "kept": 24, "dropped": {"exact_reference": 8}, "outside": 0}
    assert json.loads((tmp_path / "second" / "summary.json").read_text())["prompt_selection"] == selection
    assert json.loads((tmp_path / "second" / "selection.json").read_text()) == selection
    assert "student_accuracy_after" in printed[1]
