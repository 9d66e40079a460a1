"""What the doctor needs to judge each named condition: one record a condition, in the spec layer.

`trainer.stop_on` names conditions; the spec refuses one that can never fire in its run (health off,
diagnostics off for a condition judged from them, or judged only after the last step). The rule itself,
its evidence and advice live in opd_ray/health/conditions.py; `register_condition` there adds both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opd_ray.spec.base import Registry


def _from_the_first_step(health: Any) -> int:
    return 1


def _windows_apart(health: Any) -> int:
    return 2 * health.window


@dataclass(frozen=True)
class ConditionRecord:
    name: str
    from_diagnostics: bool = False  # judged from the diagnostics' signals (diagnostics.enabled)
    first_step: Callable[[Any], int] = _from_the_first_step  # (health settings) -> the first step it can hold


CONDITION_RECORDS = Registry("condition")
add_condition_record = CONDITION_RECORDS.add


for _record in (
    ConditionRecord("collapse", first_step=_windows_apart),
    ConditionRecord("never_ends", first_step=lambda health: health.window),
    ConditionRecord("entropy_explosion", from_diagnostics=True, first_step=_windows_apart),
    ConditionRecord("no_alignment", from_diagnostics=True, first_step=lambda health: health.alignment_steps),
    ConditionRecord("teacher_broken"),
    ConditionRecord("reward_divergence", first_step=_windows_apart),
    # held for a window after the two windows are apart
    ConditionRecord("objective_not_falling", first_step=lambda health: 3 * health.window - 1),
    ConditionRecord("grad_spike"),
):
    add_condition_record(_record)
