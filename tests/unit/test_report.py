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
