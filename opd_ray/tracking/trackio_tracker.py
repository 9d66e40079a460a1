"""trackio: one run per opd-ray run in its local store ($TRACKIO_DIR, else ~/.cache/huggingface/trackio);
`trackio show --project <logging.project>` opens it. A resumed run reopens the run of the same name
(resume="must"). trackio's own CPU/GPU sampling is off: the run logs what opd-ray measures."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_ray.tracking.base import RunIdentity, summary_entries


class TrackioTracker:
    name: ClassVar[str] = "trackio"
    durable_only: ClassVar[bool] = True

    def __init__(self) -> None:
        self._run = None

    def start(self, identity: RunIdentity, resume_after: int | None) -> str | None:
        import trackio

        self._run = trackio.init(
            project=identity.project,
            name=identity.name,
            config=identity.config,
            resume="must" if identity.resume_id else "never",
            auto_log_cpu=False,
            auto_log_gpu=False,
            embed=False,
        )
        return self._run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        numbers, _ = summary_entries(summary)
        self._run.log(numbers, step=step)

    def finish(self, succeeded: bool) -> None:
        self._run.finish()
