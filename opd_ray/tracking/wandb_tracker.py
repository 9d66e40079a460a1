"""Weights & Biases: one W&B run per opd-ray run, its files in run_dir/wandb.

WANDB_MODE=offline (or `wandb offline`) keeps everything on disk for a later `wandb sync
run_dir/wandb/offline-run-*`; a resumed run reopens the same run id (resume="allow"), so the synced
history is one run. The console is left alone (the driver's progress bar stays as it is)."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_ray.tracking.base import RunIdentity, summary_entries


class WandbTracker:
    name: ClassVar[str] = "wandb"
    durable_only: ClassVar[bool] = True  # W&B drops a step lower than one it has

    def __init__(self) -> None:
        self._run = None

    def start(self, identity: RunIdentity, resume_after: int | None) -> str | None:
        import wandb

        self._run = wandb.init(
            project=identity.project,
            name=identity.name,
            tags=list(identity.tags),
            config=identity.config,
            dir=str(identity.run_dir),
            id=identity.resume_id,
            resume="allow" if identity.resume_id else None,
            reinit="create_new",
            settings=wandb.Settings(console="off"),
        )
        return self._run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        numbers, texts = summary_entries(summary)
        self._run.summary.update({**numbers, **texts})

    def finish(self, succeeded: bool) -> None:
        self._run.finish(exit_code=0 if succeeded else 1)
