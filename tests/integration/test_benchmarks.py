"""Every benchmark runs once at its tiny size, all inside the tests' one Ray, so the scripts keep working;
speed is not asserted here."""

from __future__ import annotations

import pytest

from tests.conftest import BENCHMARKS, run_benchmark, table_rows


@pytest.mark.integration
@pytest.mark.parametrize("name", ["weight_sync", "stages", "overhead", "vs_trl", "learner", "teacher_scoring"])
def test_benchmark_runs_at_tiny_size_and_reports_against_its_target(name: str, local_ray) -> None:
    results = BENCHMARKS / "RESULTS.md"
    recorded_before = results.read_text() if results.is_file() else None
    output = run_benchmark(name)
    assert f"### `{name}`" in output and "Machine: " in output
    assert table_rows(output), output
    assert "target" in output or "does not apply" in output
    assert (results.read_text() if results.is_file() else None) == recorded_before  # tiny runs record nothing
