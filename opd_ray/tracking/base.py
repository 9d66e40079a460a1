"""The interface every tracker implements, and what a tracked run is told about itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class RunIdentity:
    """What a tracked run is called and configured with, from the spec."""

    run_dir: Path
    name: str  # run.name
    project: str  # logging.project
    tags: tuple[str, ...]
    config: dict[str, Any]  # the spec as resolved (spec.yaml)
    resume_id: str | None = None  # the tracked run to continue (trackers.json), None = a new one
    settings: dict[str, Any] = field(default_factory=dict)  # the tracker's own settings (an MLflow URI)


class Tracker(Protocol):
    """One experiment tracker. `durable_only` trackers are handed a step once a checkpoint (or the run's
    end) has made it final: their libraries cannot take a step back, and a resumed run re-runs the steps
    after its checkpoint. The others (TensorBoard) follow every step and purge the re-run ones themselves."""

    name: ClassVar[str]
    durable_only: ClassVar[bool]

    def start(self, identity: RunIdentity, resume_after: int | None) -> str | None:
        """Opens (or with identity.resume_id reopens) the tracked run; returns its id to store, if it has one."""
        ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        """The run's summary.json (accuracies, gap recovery, health, token totals) after its last step."""
        ...

    def finish(self, succeeded: bool) -> None: ...


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a step's metrics (None, text and flags are metrics.jsonl's alone)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_entries(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The summary as `summary/...` entries: (its numbers, its text values)."""
    flat = flatten(summary, "summary")
    return scalars(flat), {key: value for key, value in flat.items() if isinstance(value, str)}


def flatten(tree: dict[str, Any], prefix: str = "", separator: str = "/") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}; a list becomes its JSON text (a run config's list is one value, and the
    doctor's conditions reach a tracker as one text entry, summary/health/conditions)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, separator))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat
