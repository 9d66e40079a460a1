"""The teacher-payload benchmark's arithmetic (no Ray): top-k is far smaller than the full distribution."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def run_benchmark(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=BENCHMARKS.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_teacher_payload_top_k_is_smaller_than_the_full_distribution() -> None:
    output = run_benchmark("teacher_payload")
    rows = table_rows(output)
    assert [row[0].split(",")[0] for row in rows] == ["full distribution", "opd-ray top-k"]
    assert float(rows[1][3]) < 0.1  # k = 4 of 1000: a few percent with the batch's other tensors
