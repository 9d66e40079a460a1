"""Teacher-aligned prompt selection: keep the prompts on which the teacher already agrees with the student.

The paper's condition for OPD to work is that student and teacher think alike on the
states the student visits. Scored per prompt, the teacher's confidence in what the student
wrote — its mean log-prob of the student's sampled tokens — says on which prompts the two
are closest; training on the top fraction of a pool keeps OPD where the teacher's signal is
usable. Outside prompts (`data.selection.outside`) are not scored: they are there on
purpose, and their share is kept at `outside_fraction` of what remains.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import ray
import torch

from opd_ray.console import console, step_progress
from opd_ray.data.prompts import PromptSet
from opd_ray.data.selection import outside_count
from opd_ray.driver.pipeline import rollout_and_score
from opd_ray.driver.roles import Roles
from opd_ray.errors import UserError
from opd_ray.files import write_json
from opd_ray.losses.batch import RolloutBatch
from opd_ray.spec import ExperimentSpec


def teacher_confidence(batch: RolloutBatch) -> dict[int, list[float]]:
    """Per prompt row: each sample's mean teacher log-prob over its response tokens."""
    tokens_B = batch.response_mask_BL.sum(-1).clamp(min=1)
    mean_B = (batch.teacher_logprobs_BL * batch.response_mask_BL).sum(-1) / tokens_B
    scores: dict[int, list[float]] = defaultdict(list)
    for row, value in zip(batch.prompt_index_B.tolist(), mean_B.tolist(), strict=True):
        scores[row].append(value)
    return scores


def top_fraction(scores: dict[int, float], fraction: float) -> list[int]:
    """The ceil(fraction * n) best-scored rows (ties: lower row first), in row order."""
    ranked = sorted(scores, key=lambda row: (-scores[row], row))
    return sorted(ranked[: math.ceil(fraction * len(ranked))])


def select_aligned(roles: Roles, train: PromptSet, spec: ExperimentSpec) -> tuple[set[int], dict]:
    """Samples the student once on every non-outside prompt, scores it with the teacher, keeps the top
    `keep_top_fraction`. Returns the rows to drop and the statistics."""
    selection = spec.data.selection
    outside_rows = train.outside_rows
    aligned_rows = [row for row in range(len(train)) if row not in outside_rows]
    samples: dict[int, list[float]] = defaultdict(list)
    chunk = spec.trainer.prompts_per_step
    with step_progress("alignment scoring", len(aligned_rows)) as progress:
        for start in range(0, len(aligned_rows), chunk):
            rows = aligned_rows[start : start + chunk]
            for batch in ray.get(rollout_and_score(roles, train, rows, step=0, seed=spec.run.seed + start)):
                for row, values in teacher_confidence(batch).items():
                    samples[row] += values
            progress.advance(start + len(rows))
    scores = {row: sum(values) / len(values) for row, values in samples.items()}
    kept = top_fraction(scores, selection.keep_top_fraction)
    outside = sorted(outside_rows)[: outside_count(len(kept), selection.outside_fraction, len(outside_rows))]
    dropped = set(range(len(train))) - set(kept) - set(outside)
    all_scores = torch.tensor(list(scores.values()))
    kept_scores = torch.tensor([scores[row] for row in kept])
    stats = {
        "scored": len(scores),
        "kept": len(kept),
        "outside_kept": len(outside),
        "teacher_logprob_mean_all": float(all_scores.mean()),
        "teacher_logprob_mean_kept": float(kept_scores.mean()),
        "teacher_logprob_threshold": float(kept_scores.min()),
    }
    return dropped, stats


def keep_prompts_the_teacher_agrees_on(
    spec: ExperimentSpec, roles: Roles, train: PromptSet, run_dir: Path, resume: bool
) -> PromptSet:
    """data.selection.keep_top_fraction: the prompts the teacher agrees with most. Scored once with the
    initial student; a resumed run reuses the recorded choice (teacher_agreement.json), so its data order holds."""
    record = run_dir / "teacher_agreement.json"
    if resume and record.is_file():
        dropped = set(json.loads(record.read_text())["dropped_rows"])
    else:
        dropped, stats = select_aligned(roles, train, spec)
        check_every_route_kept(spec, train, dropped, default=next(iter(roles.teacher_pools)))
        console.print(f"alignment selection: {stats}")
        write_json(record, {**stats, "dropped_rows": sorted(dropped)})
    return train.without(dropped)


def check_every_route_kept(spec: ExperimentSpec, train: PromptSet, dropped: set[int], default: str) -> None:
    """A teacher whose every prompt the selection dropped would hold its resources and teach nothing."""
    everything = train.rows_by_teacher(list(range(len(train))), default=default)
    kept = train.rows_by_teacher([row for row in range(len(train)) if row not in dropped], default=default)
    emptied = sorted(name for name, rows in everything.items() if rows and not kept.get(name))
    if emptied:
        raise UserError(
            f"data.selection.keep_top_fraction ({spec.data.selection.keep_top_fraction}) keeps no training prompt of "
            f"teachers {emptied}: raise it, or give those teachers prompts the selection does not score"
        )
