"""Progress in job logs: a line each time a long loop passes a twentieth of its work, however it advances."""

from __future__ import annotations

import math

import pytest

from opd_ray import console as console_module
from opd_ray.console import StepProgress


def test_a_loop_that_advances_in_chunks_prints_every_twentieth(monkeypatch: pytest.MonkeyPatch) -> None:
    printed: list[str] = []
    monkeypatch.setattr(console_module.console, "print", lambda text, **_: printed.append(text))
    progress = StepProgress(None, None, 1500, "sft student")  # a twentieth: 75 steps
    for done in range(50, 1501, 50):  # SFT's chunks of 50 steps
        progress.advance(done)
    steps = [int(line.split()[2].split("/")[0]) for line in printed]
    # one line per twentieth (75 steps), at the first chunk boundary that reaches it: 100, 150, 250, 300, ...
    assert steps == [math.ceil(75 * i / 50) * 50 for i in range(1, 21)]
