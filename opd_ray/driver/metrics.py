"""Step metrics: one JSON object per step in metrics.jsonl, handed on to the run's trackers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opd_ray.files import write_text_durably
from opd_ray.health.signals import window_mean
from opd_ray.tracking import Trackers


@contextmanager
def timed(phase: str, metrics: dict[str, Any]) -> Iterator[None]:
    """Fills `metrics["time/<phase>"]` so timing is part of every phase of a step, not an afterthought."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[f"time/{phase}"] = time.perf_counter() - start


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not JSON (torn by a kill or a full disk mid-write) is
    dropped with a warning instead of making every later resume and report fail."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"opd-ray: warning: {path}:{number} is not a whole JSON line (torn write?); dropped", file=sys.stderr)
    return rows


class MetricsWriter:
    """metrics.jsonl (one line a step), and the spec's trackers (opd_ray/tracking/): the run's only writer.

    `resume_after=N` continues a resumed run in the same files: lines of steps after N (written after
    the checkpoint the run resumes from) are dropped first, and trackers that missed durable steps up
    to N receive them from the lines kept.
    """

    def __init__(self, run_dir: Path, trackers: Trackers | None = None, resume_after: int | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers
        if resume_after is not None and self.path.is_file():
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_after]
            write_text_durably(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            if trackers is not None:
                trackers.catch_up(kept, resume_after)
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def durable(self, step: int) -> None:
        """A checkpoint holds the steps up to `step`: trackers that log only final steps receive them."""
        if self.trackers is not None:
            self.trackers.durable(step)

    def close(self, summary: dict[str, Any] | None = None, succeeded: bool = False) -> None:
        self._file.close()
        if self.trackers is not None:
            self.trackers.finish(summary, succeeded)


# What a summary shows of the training itself, first steps against last: whether the student
# collapsed (cut off at the length limit, entropy), and the paper's signs of progress.
TREND_KEYS = (
    "cut_off_share",
    "diag/student_entropy",
    "diag/teacher_entropy",
    "diag/overlap_ratio",
    "diag/overlap_mass_student",
    "sampled_reverse_kl",
    "loss",
)


def token_totals(metrics_path: Path) -> tuple[int, int]:
    """(student tokens trained, teacher tokens scored) over every trained step, from one reading of the file.
    The teacher scored a step's responses when it logged `teacher_logprob` (a supervised step on the dataset's
    answers has none): the budget a sequence-level KD baseline is matched to."""
    if not metrics_path.is_file():
        return 0, 0
    rows = [row for row in read_metrics(metrics_path) if row.get("step", 0) >= 1 and "loss" in row]
    trained = sum(row.get("response_tokens", 0) for row in rows)
    scored = sum(row.get("response_tokens", 0) for row in rows if "teacher_logprob" in row)
    return int(trained), int(scored)


def training_trend(metrics_path: Path, window: int = 5) -> dict[str, list[float]]:
    """{key: [mean over the first `window` trained steps, mean over the last]} for `TREND_KEYS` a run logged."""
    if not metrics_path.is_file():
        return {}
    rows = read_metrics(metrics_path)
    trained = [row for row in rows if row.get("step", 0) >= 1 and "loss" in row]
    window = max(1, min(window, len(trained) // 2))
    trend = {}
    for key in TREND_KEYS:
        first, last = window_mean(key, trained[:window]), window_mean(key, trained[-window:])
        if first is not None and last is not None:
            trend[key] = [round(first, 4), round(last, 4)]
    return trend
