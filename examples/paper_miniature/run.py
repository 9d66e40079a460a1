"""The paper's miniature: OPD from a compatible and an incompatible teacher, and the cold start that rescues it.

    python examples/paper_miniature/run.py [--output-dir runs/paper_miniature] [key=value ...]

Runs `opd-ray probe` against each teacher, then three trainings through `opd-ray train` on
miniature.yaml: OPD from the compatible teacher, OPD from the incompatible one, and
teacher_generate -> sft -> opd from the incompatible one. Each is a subprocess, as a user
would run it, and is skipped when its results exist, so an interrupted run picks up where it
stopped. Writes PNG plots (overlap ratio, top-1 agreement, entropy gap, accuracy; the runs on one figure) and
report.md with the measured numbers into the output directory. Extra key=value overrides go
to every run (e.g. trainer.steps=100 for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

from opd_ray.driver.evaluation import gap_recovery
from opd_ray.plots import plot_runs
from opd_ray.report import read_run, window_mean

SPEC = Path(__file__).with_name("miniature.yaml")
FORWARD_TEACHER = [  # most significant digit first is harder to learn: more steps to reach a similar accuracy
    "models.build_tiny.teacher_digits=forward",
    "models.build_tiny.teacher_sft_steps=2000",
    "models.teacher.path=${models.build_tiny.directory}/teacher-forward",
]
RUNS = {  # name -> overrides of miniature.yaml
    "compatible": [],
    "incompatible": FORWARD_TEACHER,
    "cold_start": [*FORWARD_TEACHER, "stages=[teacher_generate,sft,opd]"],
}
PROBES = {"compatible": [], "incompatible": FORWARD_TEACHER}
WINDOW = 20  # steps averaged for "initial" and "final" diagnostics
TRENDS = {"overlap": "diag/overlap_ratio", "top1": "diag/top1_agreement", "entropy_gap": "diag/entropy_gap"}


def opd_ray(command: str, name: str, output_dir: Path, overrides: list[str]) -> None:
    """One `opd-ray` command in its own process (its own local Ray); a training replaces what an earlier
    run of this script left in its directory (the script owns them)."""
    args = [f"run.name={name}", f"run.output_dir={output_dir / name}", *overrides]
    flags = ["--overwrite"] if command == "train" else []
    subprocess.run([sys.executable, "-m", "opd_ray.cli", command, str(SPEC), *flags, *args], check=True)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_row(name: str, run_dir: Path, original_student: float) -> dict:
    summary, metrics = read_run(run_dir)
    teacher, after = summary["teacher_accuracy"], summary["student_accuracy_after"]
    row = {
        "run": name,
        "teacher": teacher,
        "student_start": original_student,
        "after_cold_start": summary["student_accuracy_before"] if name == "cold_start" else None,
        "after_opd": after,
        "gap_recovery": gap_recovery(original_student, after, teacher),
        "steps": len(metrics),
        "wall_s": summary.get("wall_seconds"),
    }
    for trend, key in TRENDS.items():
        row[f"{trend}_first"] = window_mean(key, metrics[:WINDOW])
        row[f"{trend}_last"] = window_mean(key, metrics[-WINDOW:])
    return row


def trend(row: dict, name: str) -> str:
    return f"{fmt(row[f'{name}_first'])} -> {fmt(row[f'{name}_last'])}"


def render_report(rows: list[dict], probes: dict[str, dict], k: int) -> str:
    lines = [
        "# The paper's miniature: measured",
        "",
        f"Written by `python examples/paper_miniature/run.py` on {date.today()}, {platform.machine()} with "
        f"{os.cpu_count()} CPU cores ({platform.system()}, Python {platform.python_version()}, no GPU). "
        "Accuracies are greedy, on the 500 held-out sums, either digit order accepted. Gap recovery = "
        "(student after - original student) / (teacher - original student), the original student being "
        f"the same for all three runs. Overlap and entropy gap: means of the first and last {WINDOW} steps.",
        "",
        "## Before training: `opd-ray probe`",
        "",
        f"| teacher | overlap ratio@{k} | top-1 agreement | shared mass (student / teacher) | entropy gap | "
        "teacher acc. | student acc. | verdict | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, probe in probes.items():
        s = probe["signals"]
        verdict = "likely to help" if probe["verdict"]["likely_to_help"] else "unlikely to help"
        lines.append(
            f"| {name} | {fmt(s['diag/overlap_ratio'])} | {fmt(s['diag/top1_agreement'])} | "
            f"{fmt(s['diag/overlap_mass_student'])} / "
            f"{fmt(s['diag/overlap_mass_teacher'])} | {fmt(s['diag/entropy_gap'])} | "
            f"{fmt(probe['teacher_accuracy'])} | {fmt(probe['student_accuracy'])} | {verdict} | "
            f"{fmt(probe['wall_seconds'], 0)} |"
        )
    lines += [
        "",
        "## Training",
        "",
        f"| run | teacher acc. | student at start | after cold start | after OPD | gap recovery | "
        f"overlap@{k} first -> last | top-1 agreement | entropy gap | steps | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {fmt(r['teacher'])} | {fmt(r['student_start'])} | {fmt(r['after_cold_start'])} | "
            f"{fmt(r['after_opd'])} | {fmt(r['gap_recovery'])} | {trend(r, 'overlap')} | {trend(r, 'top1')} | "
            f"{trend(r, 'entropy_gap')} | {r['steps']} | {fmt(r['wall_s'], 0)} |"
        )
    lines += [
        "",
        "![overlap ratio](overlap_ratio.png)",
        "![top-1 agreement](top1_agreement.png)",
        "![entropy gap](entropy_gap.png)",
        "![accuracy](accuracy.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/paper_miniature"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    out: Path = args.output_dir
    probes: dict[str, dict] = {}
    for teacher, overrides in PROBES.items():
        name = f"probe_{teacher}"
        if not (out / name / "probe.json").is_file():
            opd_ray("probe", name, out, [*overrides, *args.overrides])
        probes[teacher] = json.loads((out / name / "probe.json").read_text())
    for name, overrides in RUNS.items():
        if not (out / name / "summary.json").is_file():
            opd_ray("train", name, out, [*overrides, *args.overrides])
    original_student = read_run(out / "compatible")[0]["student_accuracy_before"]
    rows = [run_row(name, out / name, original_student) for name in RUNS]
    plot_runs([out / name for name in RUNS], out, labels=list(RUNS))
    k = probes["compatible"]["k"]
    (out / "report.md").write_text(render_report(rows, probes, k))
    (out / "report.json").write_text(json.dumps({"runs": rows, "probes": probes}, indent=2))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
