"""SIGTERM and SIGINT end a run between steps, with a checkpoint, instead of mid-write.

`ray job stop`, a Slurm time limit and a Kubernetes eviction all send SIGTERM (then SIGKILL
after a grace period). During training the first signal asks the loop to stop after the step in
progress: it writes a checkpoint when checkpoints are on, shuts every actor and placement group down
and exits non-zero with a message naming the checkpoint; a second signal abandons the step at once
(the actors are still shut down). Before training (models built, engines started, the accuracies
measured before training, a cold-start stage) there is nothing a checkpoint would keep, so the first
signal stops the command at once, within seconds (stages already finished stay finished).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from opd_ray.console import console
from opd_ray.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopRequest:
    signal_number: int | None = None
    training: bool = False  # set when the loop starts: from then on a signal waits for the step's end

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or 0)  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


ACTIVE: list[tuple[StopRequest, Callable]] = []  # the outermost block's request and handler, shared by nested ones


@contextmanager
def stop_between_steps() -> Iterator[StopRequest]:
    """A StopRequest the loop checks after each step; the previous handlers come back afterwards. A nested
    block shares the outer one's request. Off the main thread (where Python cannot install handlers)
    nothing is installed."""
    if ACTIVE:
        yield ACTIVE[0][0]
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_signal(number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if not request.training:
            request.signal_number = number  # for stop_if_signalled, should this raise be swallowed
            raise Interrupted(before_training(name), 128 + number)
        if request.requested:
            raise Interrupted(f"{name} again: the step in progress was abandoned", 128 + number)
        request.signal_number = number
        console.print(
            f"[yellow]{request.name}: stopping after the step in progress (with a checkpoint when checkpoints "
            "are on); send it again to abandon the step[/]"
        )

    previous = {number: signal.signal(number, on_signal) for number in SIGNALS}
    ACTIVE.append((request, on_signal))
    try:
        yield request
    finally:
        ACTIVE.clear()
        for number, handler in previous.items():
            signal.signal(number, handler)


def before_training(name: str) -> str:
    return f"{name} before training started: stopped (nothing to checkpoint yet)"


def stop_if_signalled() -> None:
    """Before training a signal raises where it lands, but Python ignores an exception raised inside some
    callbacks (an import's module-lock callback: "Exception ignored in ..."), and the command would go on. The
    start-up calls this between its phases, so such a signal still stops it there."""
    if ACTIVE and ACTIVE[0][0].requested and not ACTIVE[0][0].training:
        request = ACTIVE[0][0]
        raise Interrupted(before_training(request.name), request.exit_code)


def reclaim_signals() -> None:
    """`ray.init` installs Ray's own SIGTERM handlers (its C++ one kills the process at once): called after
    it, this puts the active block's handler back in front."""
    if ACTIVE and threading.current_thread() is threading.main_thread():
        for number in SIGNALS:
            signal.signal(number, ACTIVE[0][1])
