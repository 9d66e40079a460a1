"""TensorBoard scalars in run_dir/tensorboard: every step as it happens (a resume purges the re-run steps)."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_ray.tracking.base import RunIdentity, summary_entries


class TensorBoardTracker:
    name: ClassVar[str] = "tensorboard"
    durable_only: ClassVar[bool] = False  # purge_step drops the events a resumed run writes again

    def __init__(self) -> None:
        self._writer = None

    def start(self, identity: RunIdentity, resume_after: int | None) -> str | None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_after is None else resume_after + 1
        self._writer = SummaryWriter(log_dir=str(identity.run_dir / "tensorboard"), purge_step=purge)
        return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        numbers, _ = summary_entries(summary)
        for key, value in numbers.items():
            self._writer.add_scalar(key, value, step)

    def finish(self, succeeded: bool) -> None:
        self._writer.close()
