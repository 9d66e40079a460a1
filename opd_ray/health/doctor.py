"""The OPD doctor: health signals every step, named conditions when they hold, and stop_on.

The loop hands it each step's metrics (`observe`); it adds the `health/...` signals to them,
and the first time a condition holds it returns a Diagnosis (evidence and advice) that the
loop prints, and that stops the run when `trainer.stop_on` names it. `summary()` is what
summary.json records (`health: ok | warned | stopped` and the conditions); `replay` runs the
same rules over a finished run's metrics.jsonl (`opd-ray report`, and a resumed run catching up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from opd_ray.health.conditions import CONDITIONS
from opd_ray.health.signals import Row, compute_signals
from opd_ray.spec import HealthSpec


@dataclass
class Diagnosis:
    condition: str
    first_step: int
    last_step: int
    evidence: str  # at the first step it held
    advice: str
    rule: str

    def line(self) -> str:
        return f"{self.condition} at step {self.first_step}: {self.evidence}. {self.advice}"


def on_student_samples(row: Row) -> bool:
    """Steps the signals are about: trained on the student's own samples (not GKD's dataset batches)."""
    return not row.get("dataset_batch") and "sequences" in row


class Doctor:
    def __init__(self, settings: HealthSpec, vocab_size: int | None = None, stop_on: list[str] | tuple = ()) -> None:
        self.settings, self.vocab_size, self.stop_on = settings, vocab_size, set(stop_on)
        self.rows: list[Row] = []
        self.found: dict[str, Diagnosis] = {}
        self.held_for: dict[str, int] = {}  # steps in a row each condition's rule has held
        self.stopped_by: Diagnosis | None = None

    def observe(self, step: int, metrics: Row) -> list[Diagnosis]:
        """Adds the step's `health/...` signals to `metrics`; returns the conditions that hold for the first time."""
        if not self.settings.enabled or not on_student_samples(metrics):
            return []
        self.rows.append(metrics)
        signals = compute_signals(self.rows, self.settings.window, self.vocab_size)
        metrics.update(signals.logged())
        new = []
        for name, condition in CONDITIONS.items():
            evidence = condition.check(signals, self.settings)
            self.held_for[name] = 0 if evidence is None else self.held_for.get(name, 0) + 1
            if evidence is None or self.held_for[name] < condition.sustained(self.settings):
                continue
            if name in self.found:
                self.found[name].last_step = step
                continue
            self.found[name] = Diagnosis(name, step, step, evidence, condition.advice, condition.rule)
            new.append(self.found[name])
        return new

    def must_stop(self, diagnoses: list[Diagnosis]) -> Diagnosis | None:
        """The first of `diagnoses` that trainer.stop_on names (and remembers it)."""
        for diagnosis in diagnoses:
            if diagnosis.condition in self.stop_on:
                self.stopped_by = diagnosis
                return diagnosis
        return None

    def replay(self, rows: list[Row]) -> Doctor:
        for row in rows:
            self.observe(row.get("step", 0), dict(row))
        return self

    @property
    def status(self) -> str:
        return "stopped" if self.stopped_by else "warned" if self.found else "ok"

    def active(self, step: int) -> list[str]:
        """Conditions that held at `step` (for the progress line)."""
        return [name for name, d in self.found.items() if d.last_step == step]

    def summary(self) -> dict:
        conditions = [asdict(d) for d in sorted(self.found.values(), key=lambda d: d.first_step)]
        summary: dict = {"status": self.status, "conditions": conditions}
        if self.stopped_by is not None:
            summary["stopped_by"] = self.stopped_by.condition
        return summary
