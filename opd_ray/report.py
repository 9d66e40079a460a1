"""`opd-ray report RUN_DIR...`: whether a run worked, read off its metrics the way the paper reads them.

Successful OPD shows at the token level: overlap ratio and shared mass rise, the overlap-token
advantage moves towards 0, the entropy gap narrows. This compares the mean of each diagnostic
over the first and the last `window` steps, next to the accuracies, for one or more runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd_ray.driver.metrics import read_metrics
from opd_ray.errors import UserError
from opd_ray.health.doctor import Doctor
from opd_ray.health.signals import window_mean
from opd_ray.spec import HealthSpec

DIAGNOSTICS = (
    "cut_off_share",
    "sampled_reverse_kl",
    "diag/overlap_ratio",
    "diag/top1_agreement",
    "diag/overlap_mass_student",
    "diag/overlap_mass_teacher",
    "diag/overlap_advantage",
    "diag/student_entropy",
    "diag/teacher_entropy",
    "diag/entropy_gap",
    "diag/teacher_minus_student_logprob",
)


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    metrics_path, summary_path = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics_path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}")
    metrics = read_metrics(metrics_path)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return summary, metrics


def health_of(summary: dict, metrics: list[dict]) -> dict:
    """What the doctor said during the run (summary.json), or its rules replayed over the metrics of a run
    that ended before writing a summary, with the default thresholds."""
    if "health" in summary:
        return summary["health"]
    return Doctor(HealthSpec(), summary.get("vocab_size")).replay(metrics).summary()


def report_rows(run_dir: Path, window: int) -> list[tuple[str, str]]:
    """(label, value) pairs for one run: accuracies, health, then each diagnostic as 'first -> last'. The
    window shrinks to half the run for runs shorter than two windows."""
    summary, metrics = read_run(run_dir)
    window = max(1, min(window, len(metrics) // 2))
    first, last = metrics[:window], metrics[-window:]
    rows = [("objective", str(summary.get("objective", "?"))), ("steps", str(len(metrics)))]
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "gap_recovery"):
        value = summary.get(key)
        rows.append((key, f"{value:.3f}" if isinstance(value, float) else "-"))
    evals = [f"{row['eval/student_accuracy']:.2f}@{row['step']}" for row in metrics if "eval/student_accuracy" in row]
    rows.append(("eval during training", ", ".join(evals) or "-"))
    health = health_of(summary, metrics)
    found = ", ".join(f"{c['condition']} @ step {c['first_step']}" for c in health["conditions"])
    rows.append(("health", health["status"] + (f": {found}" if found else "")))
    for key in DIAGNOSTICS:
        start, end = window_mean(key, first), window_mean(key, last)
        if start is not None and end is not None:
            rows.append((f"{key} (first -> last {window} steps)", f"{start:.3f} -> {end:.3f}"))
    for name, own in summary.get("teachers", {}).items():
        rows += teacher_rows(name, own, first, last, window)
    return rows


PER_TEACHER = ("sampled_reverse_kl", "diag/overlap_ratio", "diag/entropy_gap")


def teacher_rows(name: str, own: dict, first: list[dict], last: list[dict], window: int) -> list[tuple[str, str]]:
    """One named teacher's rows: accuracies on its eval rows, then its main signals, first -> last."""

    def number(key: str) -> str:
        value = own.get(key)
        return f"{value:.3f}" if isinstance(value, float) else "-"

    accuracies = (
        f"{number('teacher_accuracy')} / {number('student_accuracy_before')} -> "
        f"{number('student_accuracy_after')} ({number('gap_recovery')})"
    )
    rows = [(f"teacher {name}: teacher / student before -> after (gap recovery)", accuracies)]
    for key in PER_TEACHER:
        start, end = window_mean(f"teacher/{name}/{key}", first), window_mean(f"teacher/{name}/{key}", last)
        if start is not None and end is not None:
            rows.append((f"teacher {name}: {key} (first -> last {window} steps)", f"{start:.3f} -> {end:.3f}"))
    return rows


def render(run_dirs: list[Path], window: int) -> str:
    """A markdown table, one column a run."""
    columns = [dict(report_rows(run_dir, window)) for run_dir in run_dirs]
    labels = list(dict.fromkeys(label for column in columns for label in column))
    lines = ["| | " + " | ".join(d.name for d in run_dirs) + " |", "|---" * (len(run_dirs) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(c.get(label, "-") for c in columns) + " |" for label in labels]
    return "\n".join(lines)
