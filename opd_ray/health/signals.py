"""Health signals: what the doctor reads off each step's metrics, logged as `health/...`.

Every signal compares "now" (the mean of the last `window` steps on student samples) with "the
start" (the mean of the first `window` such steps), so that it reads the same on any task and
model: a ratio or a difference to where the run began, not an absolute number.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Row = dict  # one step's metrics, as metrics.jsonl holds them


def window_mean(key: str, rows: list[Row]) -> float | None:
    """Mean of `key` over the rows that logged it as a finite number; None if none did (the doctor's windows,
    a summary's first-vs-last trend, `opd-ray report`)."""
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return sum(values) / len(values) if values else None


def difference(now: float | None, start: float | None) -> float | None:
    return now - start if now is not None and start is not None else None


def ratio(now: float | None, start: float | None) -> float | None:
    return now / start if now is not None and start is not None and abs(start) > 1e-12 else None


@dataclass
class Signals:
    """One step's health signals; None where the run does not log what a signal needs."""

    steps: int  # student-sample steps seen so far
    cut_off_share: float | None
    repetitive_share: float | None
    repetitive_share_start: float | None
    entropy_vs_start: float | None  # student entropy now / at the start
    overlap_start: float | None  # overlap@k over the first window: the paper's proxy for compatible thinking
    overlap_rise: float | None  # overlap@k now - at the start
    advantage_rise: float | None  # overlap-token advantage now - at the start (> 0: towards 0, as in success)
    entropy_gap_change: float | None  # (gap now - gap at the start) / gap at the start; < 0 = narrowing
    teacher_vs_uniform: float | None  # mean teacher log-prob / -ln|V|: 1 = a uniform teacher (a confident
    # teacher that disagrees with the student's samples sits far beyond 1, a helpful one below)
    teacher_logprob_std: float | None  # spread of the teacher's log-probs over this step's tokens
    teacher_std_vs_uniform: float | None  # that spread / ln|V|
    kl_vs_start: float | None  # sampled reverse KL now / at the start
    reward_drop: float | None  # the sample reward at the start - now (> 0: the student solves less than it did)
    reward_drop_error: float | None  # the standard error of that difference, from the windows' sample counts
    grad_norm_vs_median: float | None  # this step's gradient norm / the median of the window before it

    def logged(self) -> dict[str, float]:
        """The `health/...` metrics of the step (the ones that exist)."""
        values = {name: value for name, value in vars(self).items() if name != "steps"}
        return {f"health/{name}": value for name, value in values.items() if value is not None}


def teacher_spread(row: Row) -> float | None:
    """Standard deviation of the teacher's log-probs over the step's tokens, from their mean and mean square."""
    mean, square = row.get("teacher_logprob"), row.get("teacher_logprob_sq")
    if not isinstance(mean, (int, float)) or not isinstance(square, (int, float)):
        return None
    return math.sqrt(max(0.0, square - mean * mean))


def difference_error(start: list[Row], now: list[Row]) -> float | None:
    """Standard error of (start - now) of the mean sample reward, a 0/1 verifier score, from the samples each
    window holds (`sequences`); None when a window does not say how many."""
    counts, rewards = [], []
    for window in (start, now):
        rows = [r for r in window if isinstance(r.get("sample_reward"), (int, float)) and r.get("sequences")]
        counts.append(sum(r["sequences"] for r in rows))
        rewards.append(sum(r["sample_reward"] * r["sequences"] for r in rows))
    if not all(counts):
        return None
    pooled = sum(rewards) / sum(counts)
    return math.sqrt(pooled * (1 - pooled) * (1 / counts[0] + 1 / counts[1]))


def compute_signals(rows: list[Row], window: int, vocab_size: int | None) -> Signals:
    """The signals after the last of `rows` (the student-sample steps so far, oldest first)."""
    start, now, last = rows[:window], rows[-window:], rows[-1]
    gap_now, gap_start = window_mean("diag/entropy_gap", now), window_mean("diag/entropy_gap", start)
    overlap_now, overlap_start = window_mean("diag/overlap_ratio", now), window_mean("diag/overlap_ratio", start)
    uniform = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
    teacher_now, spread = window_mean("teacher_logprob", now), teacher_spread(last)
    previous_norms = [r["grad_norm"] for r in rows[-window - 1 : -1] if isinstance(r.get("grad_norm"), (int, float))]
    norm = last.get("grad_norm")
    reward_now, reward_start = window_mean("sample_reward", now), window_mean("sample_reward", start)
    return Signals(
        steps=len(rows),
        cut_off_share=window_mean("cut_off_share", now),
        repetitive_share=window_mean("repetitive_share", now),
        repetitive_share_start=window_mean("repetitive_share", start),
        entropy_vs_start=ratio(window_mean("diag/student_entropy", now), window_mean("diag/student_entropy", start)),
        overlap_start=overlap_start,
        overlap_rise=difference(overlap_now, overlap_start),
        advantage_rise=difference(
            window_mean("diag/overlap_advantage", now), window_mean("diag/overlap_advantage", start)
        ),
        entropy_gap_change=ratio(gap_now - gap_start, gap_start) if gap_now is not None and gap_start else None,
        teacher_vs_uniform=-teacher_now / uniform if teacher_now is not None and uniform else None,
        teacher_logprob_std=spread,
        teacher_std_vs_uniform=spread / uniform if uniform and spread is not None else None,
        kl_vs_start=ratio(window_mean("sampled_reverse_kl", now), window_mean("sampled_reverse_kl", start)),
        reward_drop=reward_start - reward_now if reward_start is not None and reward_now is not None else None,
        reward_drop_error=difference_error(start, now),
        grad_norm_vs_median=ratio(norm, statistics.median(previous_norms))
        if isinstance(norm, (int, float)) and len(previous_norms) >= 3
        else None,
    )
