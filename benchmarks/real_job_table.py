"""`vs_trl.py --size smollm2`: TRL's GKDTrainer and `opd-ray train` on the SmolLM2 example, one after the other in
child processes, each watched for its process tree's peak memory, each trained student evaluated the same way."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import markdown_table, report, target
from real_job import EXAMPLE

HERE = Path(__file__).resolve().parent


def tree_memory(process: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants (for opd-ray: Ray's GCS, raylet and every
    actor): a page shared by n processes counts 1/n in each, so torch's libraries, mapped by every Ray worker,
    and the object store's shared memory count once, as they take the machine's memory once."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_full_info().pss
        except psutil.Error:  # ended between the listing and the read
            pass
    return total


def run_watched(command: list[str], log: Path) -> dict:
    """Runs `command` to its end, sampling its process tree's memory twice a second; wall seconds and peak GiB."""
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)
        peak, watched = 0, psutil.Process(child.pid)
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.wait(0.5):
                peak = max(peak, tree_memory(watched))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = child.wait()
        done.set()
        watcher.join()
    if code != 0:
        raise SystemExit(f"{command[1:3]} failed with exit code {code}; its output: {log}")
    return {"wall_s": time.perf_counter() - started, "peak_gib": peak / 2**30}


def run_trl(scratch: Path, steps: int, variant: str) -> dict:
    result = scratch / f"trl-{variant}.json"
    watched = run_watched(
        [sys.executable, str(HERE / "real_job.py"), "trl", str(result), str(steps), variant], result.with_suffix(".log")
    )
    return {**json.loads(result.read_text()), **watched}


def run_opd_ray(scratch: Path, steps: int) -> dict:
    """`opd-ray train` on the example with evaluation only after training (as TRL's run has none inside)."""
    run_dir = scratch / "opd-ray"
    overrides = [f"trainer.steps={steps}", f"run.output_dir={run_dir}", "trainer.eval_every=0"]
    command = [sys.executable, "-m", "opd_ray.cli", "train", str(EXAMPLE), *overrides]
    watched = run_watched(command, scratch / "opd-ray.log")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = {
        name: sum(m.get(f"time/{name}", 0.0) for m in metrics)
        for name in ("rollout", "teacher", "learn", "weight_sync")
    }
    return {
        **watched,
        "tokens": sum(m["response_tokens"] for m in metrics),
        "loop_s": sum(m["time/step"] for m in metrics),
        "steps": steps,
        "phases": phases,
        "before_loop_s": summary["startup_seconds"]["before_first_step"],
        "student": summary["student_path"],
        "own_accuracy": summary["student_accuracy_after"],
    }


def accuracy_after(scratch: Path, name: str, student: str) -> float:
    result = scratch / f"eval-{name}.json"
    command = [sys.executable, str(HERE / "real_job.py"), "evaluate", str(result), student]
    run_watched(command, result.with_suffix(".log"))
    return json.loads(result.read_text())["accuracy"]


def phase_note(record: dict) -> str:
    steps = record["steps"]
    return ", ".join(f"{name} {seconds / steps:.1f}" for name, seconds in record["phases"].items())


def trl_phases(record: dict) -> dict:
    """GKDTrainer's phases per step: generation, the teacher's forward, the student's forward and loss, and the
    rest of its training step (backward); the optimizer step is in the loop time, outside training_step."""
    seconds = record["phases"]
    backward = seconds["training_step"] - seconds["generate"] - seconds["student_forward_loss"]
    student = seconds["student_forward_loss"] - seconds["teacher_forward"]
    return {
        "generate": seconds["generate"],
        "teacher forward": seconds["teacher_forward"],
        "student forward+loss": student,
        "backward": backward,
    }


def compare_on_the_real_job(steps: int, defaults_steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        runs = {
            "TRL GKDTrainer, bf16 and gradient checkpointing off": run_trl(scratch, steps, "fair"),
            f"TRL GKDTrainer, its defaults (bf16, gradient checkpointing; {defaults_steps} steps, speed only)": run_trl(
                scratch, defaults_steps, "defaults"
            ),
            "opd-ray train (the example's spec)": run_opd_ray(scratch, steps),
        }
        for name, record in runs.items():
            if record["steps"] == steps:
                record["accuracy"] = accuracy_after(scratch, name.split()[0].lower(), record["student"])
            if name.startswith("TRL"):
                record["phases"] = trl_phases(record)
    print_table(runs, steps)


def print_table(runs: dict, steps: int) -> None:
    fair = next(iter(runs.values()))
    fair_loop, fair_e2e = fair["tokens"] / fair["loop_s"], fair["tokens"] / fair["wall_s"]
    rows = []
    for name, r in runs.items():
        loop_rate = r["tokens"] / r["loop_s"]
        rows.append(
            [
                name,
                r["loop_s"] / r["steps"],
                phase_note(r),
                r["before_loop_s"],
                loop_rate,
                loop_rate / fair_loop,
                r["wall_s"],
                (r["tokens"] / r["wall_s"]) / fair_e2e if r["steps"] == steps else "—",
                r["peak_gib"],
                r.get("accuracy", "—"),
            ]
        )
    table = markdown_table(
        [
            "run",
            "s/step",
            "phases (s/step)",
            "s before step 1",
            "trained tokens/s (loop)",
            "vs TRL fair (loop)",
            "end-to-end s",
            "vs TRL fair (end to end)",
            "peak GiB (process tree, PSS)",
            "accuracy after",
        ],
        rows,
    )
    opd = runs["opd-ray train (the example's spec)"]
    config = (
        f"examples/smollm2_distill.yaml: SmolLM2-135M-Instruct (30 layers) teaching its 24-layer pruned copy, "
        f"{steps} steps x 16 prompts in opd-ray's order, <= 48 new tokens, temperature 1, AdamW lr 2e-5 with 3 warmup "
        "steps, float32 both; opd-ray: top-k reverse KL (teacher's top-16 + tail), 1 rollout worker (vLLM), 1 teacher "
        "(transformers), 1 learner rank (DeepSpeed ZeRO-2); TRL: GKDTrainer lmbda 1, beta 1 (reverse KL over the "
        "full vocabulary), one process. Accuracy: every trained student answering the 48 eval prompts greedily on "
        f"one vLLM engine (opd-ray's own evaluation of its student said {opd['own_accuracy']:.3f})"
    )
    verdicts = [
        target(rows[-1][5] >= 2.0, "opd-ray >= 2x TRL's trained tokens/s in the loop"),
        target(isinstance(rows[-1][7], float) and rows[-1][7] >= 1.5, "opd-ray >= 1.5x TRL end to end"),
        target(opd["peak_gib"] <= fair["peak_gib"], "peak memory no higher than TRL's"),
    ]
    report("vs_trl (real job: SmolLM2)", config, table, verdicts, record=True, extra_packages=("trl",))
