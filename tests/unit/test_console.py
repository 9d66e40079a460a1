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


def test_rays_token_auth_on_notice_is_quiet_and_the_off_warning_is_not() -> None:
    import logging

    from opd_ray.recipe.cluster import quiet_token_auth_notice

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    quiet_token_auth_notice()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    kept = Kept()
    logger.addHandler(kept)
    try:
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    finally:
        logger.removeHandler(kept)
    assert [message[:33] for message in kept.messages] == ["Token authentication is disabled "]
