"""A signal before training stops the command even where Python swallows the exception its handler raises."""

from __future__ import annotations

import os
import signal

import pytest

from opd_ray.driver.interrupts import stop_between_steps, stop_if_signalled
from opd_ray.errors import Interrupted


def test_a_swallowed_signal_before_training_stops_at_the_next_phase() -> None:
    with stop_between_steps() as request:
        stop_if_signalled()  # nothing signalled: nothing happens
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here...
        except Interrupted:
            pass  # ...and the exception is lost, as in an import's module-lock callback
        assert request.requested
        with pytest.raises(Interrupted, match="SIGTERM before training started") as stopped:
            stop_if_signalled()
        assert stopped.value.exit_code == 143


def test_during_training_a_signal_waits_for_the_step_instead() -> None:
    with stop_between_steps() as request:
        request.training = True
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not raised: the loop checkpoints after the step
        assert request.requested
        stop_if_signalled()  # not a start-up stop
