"""Each tracker on a thread of its own, so that no tracker's library can hold up or stop the training loop.

W&B, MLflow and trackio talk to servers: MLflow's client retries a failed request 7 times at 120 s each,
and a library can hang outright. On the driver's thread that would stall the run while its GPUs wait.
Here every call to a tracker (start, log, log_summary, finish) is queued to the tracker's own thread and
the driver goes on. A tracker is dropped, with one warning, and never called again when a call raises,
when one runs past `deadline_s`, or when its queue of waiting calls is full (it is slower than the run);
metrics.jsonl holds every step whatever the trackers do.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from opd_ray.tracking.base import Tracker

WAITING_CALLS = 1000  # a tracker this many calls behind the run is dropped rather than let memory grow


class TrackerDropped(Exception):
    """The call was not made: the tracker had been dropped before it."""


class TrackerLane:
    """One tracker and the thread that calls it, in the order the calls were queued."""

    def __init__(self, tracker: Tracker, deadline_s: float, capacity: int = WAITING_CALLS) -> None:
        self.tracker, self.deadline_s = tracker, deadline_s
        self.name = tracker.name
        self.dropped: str | None = None  # why, once dropped
        self._calls: queue.Queue = queue.Queue(capacity)
        self._running: tuple[str, float] | None = None  # the call in progress and when it began
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"opd-ray-tracker-{self.name}", daemon=True)
        self._thread.start()

    def call(self, method: str | None, *args: Any, on_done: Callable[[], None] | None = None) -> Future:
        """Queues `tracker.method(*args)` (None: nothing, a marker whose future is done once the calls queued
        before it are); `on_done` runs on the tracker's thread once it returned. The future holds the call's
        result, or TrackerDropped / the exception it raised."""
        future: Future = Future()
        self.check_deadline()
        if self.dropped:
            future.set_exception(TrackerDropped(self.dropped))
            return future
        try:
            self._calls.put_nowait((method, args, on_done, future))
        except queue.Full:
            self.drop(f"{self._calls.maxsize} calls waiting: it is slower than the run")
            future.set_exception(TrackerDropped(self.dropped))
        return future

    def check_deadline(self, warn: bool = True) -> None:
        """A call running past the deadline drops the tracker (its thread is left to finish or hang alone)."""
        running = self._running
        if running is not None and time.monotonic() - running[1] > self.deadline_s:
            why = f"{running[0]} did not return within {self.deadline_s:g} s (logging.tracker_timeout_s)"
            self.drop(why, warn)

    def drop(self, why: str, warn: bool = True) -> None:
        with self._lock:
            if self.dropped:
                return
            self.dropped = why
        if warn:
            print(f"opd-ray: warning: logging.trackers: {self.name}: {why}; dropped", file=sys.stderr)

    def wait(self, future: Future, deadline_s: float | None = None, warn: bool = True) -> Any:
        """The call's result within the deadline; a call still running then drops the tracker (`warn`: with a
        warning, unless the caller reports it)."""
        try:
            return future.result(timeout=self.deadline_s if deadline_s is None else deadline_s)
        except TimeoutError:
            self.check_deadline(warn)
            self.drop(f"did not answer within {self.deadline_s:g} s (logging.tracker_timeout_s)", warn)
            raise TrackerDropped(self.dropped) from None

    def close(self) -> None:
        """No more calls: the thread ends once the queued ones are done (or at once if dropped)."""
        try:
            self._calls.put_nowait(None)
        except queue.Full:
            self.drop("had calls waiting at the run's end")

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.drop(f"did not finish within {self.deadline_s:g} s of the run's end (logging.tracker_timeout_s)")

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            method, args, on_done, future = item
            if self.dropped:
                future.set_exception(TrackerDropped(self.dropped))
                continue
            if method is None:
                future.set_result(None)
                continue
            self._running = (method, time.monotonic())
            try:
                result = getattr(self.tracker, method)(*args)
            except BaseException as exc:  # a tracker's failure, whatever it is, ends only that tracker
                # a failed start is reported by the one waiting for it (open_trackers), in one line
                self.drop(f"failed in {method} ({type(exc).__name__}: {exc})", warn=method != "start")
                future.set_exception(exc)
            else:
                if on_done is not None and not self.dropped:
                    on_done()
                future.set_result(result)
            finally:
                self._running = None
