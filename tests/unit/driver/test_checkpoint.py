"""A checkpoint write killed midway (a real SIGKILL) leaves the previous one the latest and loadable."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from opd_ray.driver.checkpoint import TrainerState, complete_checkpoints, latest_checkpoint, write_checkpoint

WRITER = """
import sys, time
from pathlib import Path
from opd_ray.driver.checkpoint import TrainerState, write_checkpoint

run_dir, step = Path(sys.argv[1]), int(sys.argv[2])

def slow_contents(directory):
    (directory / "weights.bin").write_bytes(b"x" * 1000)
    (run_dir / "writing").touch()  # tells the test to kill us now, mid-write
    time.sleep(60)

write_checkpoint(run_dir, TrainerState(step, step, 0, 0), slow_contents, keep=2)
"""


def write_quickly(run_dir: Path, step: int) -> Path:
    def contents(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(step.to_bytes(4, "little"))

    return write_checkpoint(run_dir, TrainerState(step, step, 0, step * 10), contents, keep=2)


def test_checkpoint_write_killed_midway_leaves_previous_loadable(tmp_path: Path) -> None:
    write_quickly(tmp_path, 1)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "2"])
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists():
        assert time.time() < deadline and writer.poll() is None, "the writer never started writing"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000001"
    assert TrainerState.read(latest).sampler_position == 10
    assert (latest / "weights.bin").read_bytes() == (1).to_bytes(4, "little")
    torn = list((tmp_path / "checkpoints").glob(".partial-step_00000002.*"))
    assert len(torn) == 1 and torn[0].is_dir() and torn[0].name.endswith(f".{writer.pid}")  # the torn write, ignored

    for step in (2, 3, 4):  # a later write replaces the torn one; only the newest two are kept
        write_quickly(tmp_path, step)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not torn[0].exists()  # its writer is dead: cleared by the next write


def test_a_run_checkpoints_on_schedule_and_at_its_last_step(tmp_path: Path, monkeypatch) -> None:
    """checkpoint_every 4 over 6 steps: steps 4 and 6 (the last, so a finished run extends from its end). The
    learners' save is a fake here (what is not under test: what a checkpoint holds), and the run a stand-in with
    the fields checkpoint_now reads."""
    from types import SimpleNamespace

    from opd_ray.driver import loop
    from opd_ray.spec import ExperimentSpec
    from tests.conftest import tiny_spec_dict

    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["trainer"].update(steps=6, checkpoint_every=4)
    saved: list[tuple[int, int]] = []
    monkeypatch.setattr(
        loop, "save_checkpoint", lambda spec, roles, run_dir, state: saved.append((state.step, state.schedule_steps))
    )
    run = SimpleNamespace(
        spec=ExperimentSpec.model_validate(raw),
        stop=SimpleNamespace(requested=False),
        saved_step=0,
        summary={},
        weight_version=0,
        fingerprint={},
        schedule_steps=6,
        run_dir=tmp_path / "run",
        roles=None,
        writer=SimpleNamespace(durable=lambda step: None),
    )
    for step in range(1, 7):
        loop.checkpoint_now(run, step, SimpleNamespace(sampler_after=(0, step)))
    assert saved == [(4, 6), (6, 6)]  # each records the schedule's horizon, for a resume that extends the run
