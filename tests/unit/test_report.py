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


def test_a_run_with_named_teachers_reports_each(tmp_path) -> None:
    import json

    from opd_ray.report import render

    run = tmp_path / "two"
    run.mkdir()
    rows = [
        {"step": s, "teacher/sums/sampled_reverse_kl": 2.0 / s, "teacher/three/diag/overlap_ratio": 0.1 * s}
        for s in range(1, 5)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    own = {"teacher_accuracy": 1.0, "student_accuracy_before": 0.2, "student_accuracy_after": 0.6, "gap_recovery": 0.5}
    (run / "summary.json").write_text(json.dumps({"teachers": {"sums": own, "three": {**own, "gap_recovery": None}}}))
    table = render([run], window=2)
    assert (
        "| teacher sums: teacher / student before -> after (gap recovery) | 1.000 / 0.200 -> 0.600 (0.500) |" in table
    )
    assert "| teacher sums: sampled_reverse_kl (first -> last 2 steps) | 1.500 -> 0.583 |" in table
    assert "| teacher three: diag/overlap_ratio (first -> last 2 steps) | 0.150 -> 0.350 |" in table
    assert "(-) |" in table  # no gap recovery: shown as missing, not as a number
