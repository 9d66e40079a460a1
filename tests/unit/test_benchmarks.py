"""The teacher-payload benchmark's arithmetic (no Ray): top-k is far smaller than the full distribution."""

from __future__ import annotations

from tests.conftest import run_benchmark, table_rows


def test_teacher_payload_top_k_is_smaller_than_the_full_distribution() -> None:
    output = run_benchmark("teacher_payload")
    rows = table_rows(output)
    assert [row[0].split(",")[0] for row in rows] == ["full distribution", "opd-ray top-k"]
    assert float(rows[1][3]) < 0.1  # k = 4 of 1000: a few percent with the batch's other tensors
