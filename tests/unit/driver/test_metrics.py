"""What a summary says of the training itself: first steps against last, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from opd_ray.driver.metrics import training_trend


def test_trend_compares_the_first_and_last_trained_steps(tmp_path: Path) -> None:
    rows = [{"step": 0, "eval/student_accuracy": 0.1}]  # evaluation before training: not a trained step
    rows += [{"step": s, "loss": 1.0 / s, "cut_off_share": 0.5 if s <= 2 else 0.0} for s in range(1, 11)]
    rows[3]["diag/student_entropy"] = 3.0  # logged on some steps only
    rows[10]["diag/student_entropy"] = 1.0
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trend = training_trend(path, window=5)
    assert trend["cut_off_share"] == [0.2, 0.0]
    assert trend["loss"] == [
        round((1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5, 4),
        round(sum(1 / s for s in range(6, 11)) / 5, 4),
    ]
    assert trend["diag/student_entropy"] == [3.0, 1.0]
    assert "diag/overlap_ratio" not in trend  # not logged: left out, not made up


def test_a_short_run_splits_its_steps_and_no_file_gives_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3)))
    assert training_trend(path, window=5)["loss"] == [1.0, 3.0]
    assert training_trend(tmp_path / "absent.jsonl") == {}


def test_token_totals_count_trained_steps_and_the_teachers_scored_ones(tmp_path: Path) -> None:
    """The budget a KD baseline is matched to: tokens the teacher scored (a supervised step on the dataset's
    answers, logged without teacher_logprob, is trained on but not scored)."""
    from opd_ray.driver.metrics import token_totals

    rows = [{"step": 0, "response_tokens": 99}]  # evaluation before training
    rows += [{"step": 1, "loss": 1.0, "response_tokens": 10, "teacher_logprob": -1.0}]
    rows += [{"step": 2, "loss": 1.0, "response_tokens": 7}]  # a supervised step
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert token_totals(path) == (17, 10)
    assert token_totals(tmp_path / "absent.jsonl") == (0, 0)
