"""Experiment trackers: where a run's metrics go besides metrics.jsonl.

The driver is the only writer (driver/metrics.py hands every step to `Trackers`); no actor logs.
Each tracker is a small class over its real library (tensorboard.py, wandb_tracker.py,
mlflow_tracker.py, trackio_tracker.py) behind the interface in base.py; run.py fans a step out to
them and records, in run_dir/trackers.json, each tracked run's id and the last step it received, so
a resumed run continues the same tracked run.
"""

from opd_ray.tracking.base import RunIdentity, Tracker
from opd_ray.tracking.run import Trackers, open_trackers

__all__ = ["RunIdentity", "Tracker", "Trackers", "open_trackers"]
