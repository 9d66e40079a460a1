"""Progress for long loops: a live bar on a terminal, periodic plain lines in job logs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class StepProgress:
    def __init__(self, progress: Progress | None, task_id: int | None, total: int, label: str) -> None:
        self._progress, self._task_id, self.total, self.label = progress, task_id, total, label
        self._every = max(1, total // 20)
        self._printed = 0  # the last `done` printed

    def advance(self, done: int, note: str = "") -> None:
        """In a log (no terminal), a line each time `done` passes a twentieth of the total, however far it
        jumps (SFT advances 50 steps a call: exact multiples of total // 20 were rare)."""
        if self._progress is not None:
            self._progress.update(self._task_id, completed=done, note=note)
        elif done // self._every > self._printed // self._every or done == self.total:
            console.print(f"{self.label} {done}/{self.total} {note}", highlight=False)
            self._printed = done


@contextmanager
def step_progress(label: str, total: int, done: int = 0) -> Iterator[StepProgress]:
    """`done` > 0 when a resumed run starts part-way."""
    if not console.is_terminal:
        yield StepProgress(None, None, total, label)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console) as progress:
        task_id = progress.add_task(label, total=total, completed=done, note="")
        yield StepProgress(progress, task_id, total, label)
