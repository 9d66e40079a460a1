"""logging: where a run's metrics go besides metrics.jsonl (always written), and what the tracked run is called."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from pydantic import Field, field_validator

from opd_ray.spec.base import Registry, Section


@dataclass(frozen=True)
class TrackerRecord:
    """One tracker: its name in `logging.trackers`, the library it needs (checked at validate, without importing
    it) and the extra that installs it, and its class (`module:Class`, imported only by a run that uses it)."""

    name: str
    library: str
    extra: str
    implementation: str


TRACKER_RECORDS = Registry("tracker")
add_tracker = TRACKER_RECORDS.add


for _record in (
    TrackerRecord(
        "tensorboard", "torch.utils.tensorboard", "opd-ray", "opd_ray.tracking.tensorboard:TensorBoardTracker"
    ),
    TrackerRecord("wandb", "wandb", "opd-ray[wandb]", "opd_ray.tracking.wandb_tracker:WandbTracker"),
    TrackerRecord("mlflow", "mlflow", "opd-ray[mlflow]", "opd_ray.tracking.mlflow_tracker:MlflowTracker"),
    TrackerRecord("trackio", "trackio", "opd-ray[trackio]", "opd_ray.tracking.trackio_tracker:TrackioTracker"),
):
    add_tracker(_record)


class LoggingSpec(Section):
    """The trackers a run logs to (opd_ray/tracking/). TensorBoard and metrics.jsonl follow every step; W&B,
    MLflow and trackio receive the steps a checkpoint has made durable (every step when checkpoints are off),
    so a resumed run continues its tracked run without logging the re-run steps twice."""

    trackers: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="tensorboard (run_dir/tensorboard), wandb (WANDB_MODE=offline writes run_dir/wandb for "
        "`wandb sync`), mlflow (MLFLOW_TRACKING_URI, else an SQLite store beside the run directory), trackio (its "
        "local store, TRACKIO_DIR); [] = metrics.jsonl only",
    )
    project: str = Field(
        "opd-ray", min_length=1, description="the W&B project, MLflow experiment and trackio project of the run"
    )
    tags: list[str] = Field(default_factory=list, description="tags of the tracked run (W&B tags, MLflow tags)")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="null = $MLFLOW_TRACKING_URI, else sqlite:///<run.output_dir>/../mlflow.db (one store for "
        "the runs beside each other)",
    )
    trackio_space_id: str | None = Field(
        None,
        description="a Hugging Face Space (user/space) trackio publishes the run to, created private if new; null = "
        "trackio's local store only (TRACKIO_SPACE_ID or TRACKIO_SERVER_URL in the environment is then refused)",
    )
    tracker_timeout_s: float = Field(
        120.0,
        gt=0,
        allow_inf_nan=False,
        description="the longest a tracker may take over one call (start, a step, finish; they run on a thread of "
        "their own): past it the tracker is dropped with a warning and the run goes on (metrics.jsonl holds every "
        "step); also how long the run's end waits for the trackers",
    )

    @field_validator("trackers")
    @classmethod
    def _libraries_installed(cls, trackers: list[str]) -> list[str]:
        """A tracker whose library is missing is one line here, not an ImportError after the roles started."""
        if len(set(trackers)) < len(trackers):
            raise ValueError(f"{trackers}: name each tracker once")
        for name in trackers:
            record = TRACKER_RECORDS.get(name)
            if record is None:
                raise ValueError(f"{name!r} is not a tracker; the trackers are {', '.join(TRACKER_RECORDS)}")
            if not module_installed(record.library):
                raise ValueError(
                    f"{name}: its library ({record.library}) is not installed: pip install '{record.extra}'"
                )
        return trackers


def module_installed(module: str) -> bool:
    """Whether `import module` would find it, without importing it (W&B's import alone takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False
