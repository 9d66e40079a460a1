"""`opd-ray report`: early vs late steps of a finished run."""

from __future__ import annotations


def test_report_compares_first_and_last_steps(tmp_path) -> None:
    import json

    from opd_ray.report import render

    run = tmp_path / "run-a"
    run.mkdir()
    rows = [{"step": s, "diag/overlap_ratio": 0.5 + 0.1 * (s > 2), "eval/student_accuracy": 0.7} for s in (1, 2, 3, 4)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (run / "summary.json").write_text(json.dumps({"objective": "topk", "gap_recovery": 0.25}))
    table = render([run], window=2)
    assert "| diag/overlap_ratio (first -> last 2 steps) | 0.500 -> 0.600 |" in table
    assert "| gap_recovery | 0.250 |" in table
    assert "0.70@1" in table


def test_a_short_run_is_split_in_halves_and_its_health_replayed(tmp_path) -> None:
    """A 6-step run with the default 50-step window: first 3 against last 3 (not all 6 twice), and the
    doctor's rules replayed over a run that wrote no summary."""
    import json

    from opd_ray.report import render

    run = tmp_path / "short"
    run.mkdir()
    rows = [{"step": s, "sequences": 4, "diag/overlap_ratio": 0.1 * s} for s in range(1, 7)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = render([run], window=50)
    assert "| diag/overlap_ratio (first -> last 3 steps) | 0.200 -> 0.500 |" in table
    assert "| health | ok |" in table
