"""The recipe's stages: one record each, in the order they run.

`stages:` in a spec names records from here; the spec checks each listed stage's own needs (`check`),
and the recipe runs each by its name (`opd_ray/recipe/stages.py`, `STAGE_RUNNERS`). A new stage is
one record here (`add_stage`, placed before OPD) and one runner there: `register_stage` adds both.
Like objectives.py this imports no torch: the spec layer validates YAML without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _nothing_to_check(spec: Any) -> None:
    return None


@dataclass(frozen=True)
class StageRecord:
    """One stage: what it is, the stages that must run before it, and what it needs of the spec."""

    name: str
    summary: str
    after: tuple[str, ...] = ()  # stages whose answers it trains on: listed before it, or it is refused
    check: Callable[[Any], None] = _nothing_to_check  # (the spec) -> raises ValueError naming what it lacks


STAGE_RECORDS: dict[str, StageRecord] = {}  # in the order stages run


def add_stage(record: StageRecord, before: str | None = None) -> StageRecord:
    """Registers a stage, run before the stage `before` (None: last)."""
    if record.name in STAGE_RECORDS:
        raise ValueError(f"stage {record.name!r} is already registered")
    unknown = [name for name in (*record.after, *([before] if before else [])) if name not in STAGE_RECORDS]
    if unknown:
        raise ValueError(f"stage {record.name!r}: {unknown} are not stages")
    ordered = list(STAGE_RECORDS.values())
    at = len(ordered) if before is None else [r.name for r in ordered].index(before)
    ordered.insert(at, record)
    STAGE_RECORDS.clear()
    STAGE_RECORDS.update((r.name, r) for r in ordered)
    return record


def check_stages(stages: list[str], spec: Any) -> None:
    """The listed stages exist, each at most once, in the order they run, after the stages they read, with what
    each needs of the spec."""
    unknown = [name for name in stages if name not in STAGE_RECORDS]
    if unknown:
        raise ValueError(f"stages: {unknown[0]!r} is not a stage; the stages are {', '.join(STAGE_RECORDS)}")
    order = list(STAGE_RECORDS)
    if not stages or stages != [s for s in order if s in stages] or len(set(stages)) < len(stages):
        raise ValueError(f"stages {stages}: name each at most once, in the order {' -> '.join(order)}")
    for name in stages:
        record = STAGE_RECORDS[name]
        missing = [needed for needed in record.after if needed not in stages]
        if missing:
            raise ValueError(f"stages: {name} trains on {missing[0]}'s answers; list {missing[0]} before it")
        record.check(spec)


def _teacher_generate_needs(spec: Any) -> None:
    if spec.cold_start is None:
        raise ValueError("stages: teacher_generate needs cold_start.teacher_generate (at least its prompts)")
    if len(spec.teachers) > 1:
        raise ValueError("stages: teacher_generate answers with one teacher; it does not take several yet")


def _sft_needs(spec: Any) -> None:
    batch = spec.cold_start.sft.batch_size if spec.cold_start is not None else None
    if batch is not None and batch % spec.learner.num_ranks:
        raise ValueError(
            f"cold_start.sft.batch_size ({batch}) does not divide across learner.num_ranks = {spec.learner.num_ranks}"
        )


add_stage(
    StageRecord(
        "teacher_generate",
        "the teacher answers cold_start prompts; the verified answers are the cold start's data",
        check=_teacher_generate_needs,
    )
)
add_stage(StageRecord("sft", "supervised steps on teacher_generate's answers", ("teacher_generate",), _sft_needs))
add_stage(StageRecord("opd", "on-policy distillation (driver/loop.py)"))
