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


def deepspeed_like(directory: Path) -> None:
    """The files a two-rank ZeRO checkpoint holds (DeepSpeed's names), and the HF student beside them."""
    state = directory / "deepspeed" / "state"
    state.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))):
        (state / name).write_bytes(name.encode())
    (directory / "student").mkdir()
    (directory / "student" / "model.safetensors").write_bytes(b"weights")


def test_the_manifest_covers_every_file_and_an_empty_or_unlisted_one_is_refused(tmp_path: Path) -> None:
    import json

    import pytest

    from opd_ray.driver.checkpoint import STATE_FILE, check_contents
    from opd_ray.errors import UserError
    from opd_ray.files import MANIFEST_FILE

    checkpoint = write_checkpoint(tmp_path, TrainerState(1, 1, 0, 0), deepspeed_like, keep=2)
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert STATE_FILE in listed and "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt" in listed
    check_contents(checkpoint)

    (checkpoint / STATE_FILE).write_text((checkpoint / STATE_FILE).read_text().replace('"step": 1', '"step": 9'))
    with pytest.raises(UserError, match=r"trainer_state.json \(changed\)"):
        check_contents(checkpoint)

    checkpoint = write_checkpoint(tmp_path, TrainerState(2, 2, 0, 0), deepspeed_like, keep=2)
    (checkpoint / "deepspeed" / "state" / "extra.pt").write_bytes(b"pickled code")
    with pytest.raises(UserError, match=r"extra.pt \(not in the manifest\)"):
        check_contents(checkpoint)
    (checkpoint / MANIFEST_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) != checkpoint  # a manifest of nothing vouches for nothing
    with pytest.raises(UserError, match=r"manifest.json is empty"):
        check_contents(checkpoint)


def test_each_learner_rank_checks_the_files_it_loads(tmp_path: Path) -> None:
    from functools import partial

    from opd_ray.actors.learner_state import read_by_rank
    from opd_ray.files import manifest_faults

    checkpoint = write_checkpoint(tmp_path, TrainerState(1, 1, 0, 0), deepspeed_like, keep=2)
    shard = checkpoint / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"corrupted on the node of rank 1")
    assert manifest_faults(checkpoint, partial(read_by_rank, rank=0)) == []  # not rank 0's to read
    assert manifest_faults(checkpoint, partial(read_by_rank, rank=1)) == [
        "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt (changed)"
    ]
    (checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt").unlink()
    assert manifest_faults(checkpoint, partial(read_by_rank, rank=0)) == [
        "deepspeed/state/mp_rank_00_model_states.pt (missing)"
    ]
