"""SIGTERM and SIGINT end a run between steps, with a checkpoint, instead of mid-write.

`ray job stop`, a Slurm time limit and a Kubernetes eviction all send SIGTERM (then SIGKILL
after a grace period). The first signal asks the loop to stop after the step in progress: it
writes a checkpoint when checkpoints are on, shuts every actor and placement group down and
exits non-zero with a message naming the checkpoint. A second signal abandons the step at once
(the actors are still shut down). Outside the loop Ray's own handler (SystemExit) applies.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from opd_ray.console import console
from opd_ray.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopRequest:
    signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or 0)  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


@contextmanager
def stop_between_steps() -> Iterator[StopRequest]:
    """A StopRequest the loop checks after each step; the previous handlers come back afterwards.
    Off the main thread (where Python cannot install handlers) nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_signal(number: int, frame: FrameType | None) -> None:
        if request.requested:
            raise Interrupted(f"{signal.Signals(number).name} again: the step in progress was abandoned", 128 + number)
        request.signal_number = number
        console.print(
            f"[yellow]{request.name}: stopping after the step in progress (with a checkpoint when checkpoints "
            "are on); send it again to abandon the step[/]"
        )

    previous = {number: signal.signal(number, on_signal) for number in SIGNALS}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
