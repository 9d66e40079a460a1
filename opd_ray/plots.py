"""PNG plots of finished runs over steps, the runs on one figure (`opd-ray report RUN... --plot DIR`).

The paper reads OPD's success off curves: the overlap ratio rising, the entropy gap narrowing,
the student's accuracy climbing towards the teacher's. One figure a signal and one line a run,
so a working and a failing run are told apart at a glance.
"""

from __future__ import annotations

from pathlib import Path

from opd_ray.errors import UserError
from opd_ray.report import read_run

# (file stem, metric key, y-axis label)
STEP_SIGNALS = (
    ("overlap_ratio", "diag/overlap_ratio", "overlap ratio@k (student-visited states)"),
    ("top1_agreement", "diag/top1_agreement", "top-1 agreement (student-visited states)"),
    ("entropy_gap", "diag/entropy_gap", "entropy gap |H(teacher) - H(student)| (nats)"),
)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` steps: one step's diagnostic is noisy (64 prompts)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def accuracy_curve(summary: dict, metrics: list[dict]) -> tuple[list[int], list[float]]:
    """Eval accuracy at step 0 (before training), at each eval during training, and after the last step."""
    points: list[tuple[int, float]] = []
    if isinstance(summary.get("student_accuracy_before"), float):
        points.append((0, summary["student_accuracy_before"]))
    points += [(row["step"], row["eval/student_accuracy"]) for row in metrics if "eval/student_accuracy" in row]
    if isinstance(summary.get("student_accuracy_after"), float) and metrics:
        points.append((metrics[-1]["step"], summary["student_accuracy_after"]))
    return [p[0] for p in points], [p[1] for p in points]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'opd-ray[plots]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: list[Path], output_dir: Path, labels: list[str] | None = None, smooth: int = 10) -> list[Path]:
    """Writes one PNG a step signal (overlap_ratio.png, ...) and accuracy.png into `output_dir`; returns their paths."""
    plt = _pyplot()
    labels = labels or [d.name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_run(d) for d in run_dirs]
    output_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for stem, key, ylabel in STEP_SIGNALS:
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        for label, (_, metrics) in zip(labels, runs, strict=True):
            rows = [row for row in metrics if isinstance(row.get(key), (int, float))]
            if rows:
                axes.plot([r["step"] for r in rows], moving_average([r[key] for r in rows], smooth), label=label)
        axes.set(xlabel="step", ylabel=ylabel, title=f"{ylabel.split(' (')[0]} (mean of {smooth} steps)")
        written.append(_save(plt, figure, axes, output_dir / f"{stem}.png"))
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, (summary, metrics)) in enumerate(zip(labels, runs, strict=True)):
        colour = colours[i % len(colours)]
        steps, accuracy = accuracy_curve(summary, metrics)
        axes.plot(steps, accuracy, marker="o", markersize=3, color=colour, label=f"{label}: student")
        if isinstance(summary.get("teacher_accuracy"), float):
            teacher = summary["teacher_accuracy"]
            axes.axhline(teacher, color=colour, linestyle="--", linewidth=1, label=f"{label}: teacher")
    axes.set(xlabel="step", ylabel="eval accuracy", title="student accuracy (teacher dashed)", ylim=(0, 1.02))
    written.append(_save(plt, figure, axes, output_dir / "accuracy.png"))
    return written


def _save(plt, figure, axes, path: Path) -> Path:
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
