"""MLflow: one MLflow run per opd-ray run in the experiment logging.project, through MlflowClient (no
global active run, so nothing else in the process is logged by accident).

The store is logging.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else an SQLite store beside the run
directory (runs/mlflow.db for runs/quickstart: MLflow 3's default backend; its file store refuses new
runs), which `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows. With that default store the
artifacts (spec.yaml) go beside it too, in runs/mlartifacts: MLflow's own default is ./mlruns in whatever
directory the command ran from."""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

from opd_ray.tracking.base import RunIdentity, flatten, summary_entries

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
BATCH = 100  # MLflow's limit on parameters (and a safe number of metrics) in one log_batch


def chosen_uri(identity: RunIdentity) -> str | None:
    """The store the spec or the environment names; None = opd-ray's default beside the run directory."""
    return identity.settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(identity: RunIdentity) -> str:
    return chosen_uri(identity) or f"sqlite:///{(identity.run_dir.parent / 'mlflow.db').resolve()}"


def artifact_location(identity: RunIdentity) -> str | None:
    """Where a new experiment keeps its artifacts: beside the default store, else the store's own choice."""
    return None if chosen_uri(identity) else (identity.run_dir.parent / "mlartifacts").resolve().as_uri()


def experiment_of(client: Any, identity: RunIdentity) -> str:
    """The id of the experiment logging.project, created if missing. Two runs starting at once into one store
    both find it missing and both create it: the loser's create fails, and it takes the winner's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(identity.project)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(identity.project, artifact_location=artifact_location(identity))
    except MlflowException:
        experiment = client.get_experiment_by_name(identity.project)
        if experiment is None:  # not the race: the store refused for a reason of its own
            raise
        return experiment.experiment_id


class MlflowTracker:
    name: ClassVar[str] = "mlflow"
    durable_only: ClassVar[bool] = True  # a metric logged twice at one step is two points in its history

    def __init__(self) -> None:
        self._client = None
        self._run_id = ""

    def start(self, identity: RunIdentity, resume_after: int | None) -> str | None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri(identity))
        if identity.resume_id:
            self._run_id = identity.resume_id
            self._client.update_run(self._run_id, status="RUNNING")
            return self._run_id
        experiment_id = experiment_of(self._client, identity)
        tags = {tag: "" for tag in identity.tags}
        run = self._client.create_run(experiment_id, run_name=identity.name, tags=tags)
        self._run_id = run.info.run_id
        self._log_config(identity)
        return self._run_id

    def _log_config(self, identity: RunIdentity) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(identity.config, separator=".").items()]
        for first in range(0, len(params), BATCH):
            self._client.log_batch(self._run_id, params=params[first : first + BATCH])
        spec_yaml = identity.run_dir / "spec.yaml"
        if spec_yaml.is_file():
            self._client.log_artifact(self._run_id, str(spec_yaml))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key, value, now, step) for key, value in metrics.items()]
        for first in range(0, len(rows), BATCH):
            self._client.log_batch(self._run_id, metrics=rows[first : first + BATCH])

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        numbers, texts = summary_entries(summary)
        self.log(step, numbers)
        for key, value in texts.items():
            self._client.set_tag(self._run_id, key, value[:MAX_PARAM_CHARS])

    def finish(self, succeeded: bool) -> None:
        self._client.set_terminated(self._run_id, status="FINISHED" if succeeded else "FAILED")
