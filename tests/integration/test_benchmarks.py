"""Every benchmark runs once at its tiny size, so the scripts keep working (CI); speed is not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


@pytest.mark.integration
@pytest.mark.parametrize("name", ["weight_sync", "stages", "overhead", "vs_trl"])
def test_benchmark_runs_at_tiny_size_and_reports_against_its_target(name: str) -> None:
    results = BENCHMARKS / "RESULTS.md"
    recorded_before = results.read_text() if results.is_file() else None
    output = run_benchmark(name)
    assert f"### `{name}`" in output and "Machine: " in output
    assert table_rows(output), output
    assert "target" in output or "does not apply" in output
    assert (results.read_text() if results.is_file() else None) == recorded_before  # tiny runs record nothing
