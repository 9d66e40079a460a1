"""Supervised fine-tuning through the same DeepSpeed learner ranks that distil.

Used to build the tiny models and for the off-policy cold start (SFT of the student on
teacher-generated answers before OPD). The result is written aside and renamed into place,
so an interrupted SFT never leaves a half-written model where a later stage would load it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import ray

from opd_ray.actors.learner_group import LearnerGroup
from opd_ray.actors.runtime import actor_env
from opd_ray.console import step_progress
from opd_ray.driver.checkpoint import check_shared_storage
from opd_ray.files import written_aside
from opd_ray.spec import LearnerSpec, ModelSpec, TimeoutsSpec

SUPERVISED_CHUNK = 50  # steps per call to the learner ranks: progress and a loss every 50 steps
Example = tuple[list[int], list[int]]  # (prompt ids, answer ids ending with end-of-sequence)


def train_supervised(
    init: ModelSpec,
    output_dir: Path,
    examples: list[Example],
    learner: LearnerSpec,
    steps: int,
    batch_size: int,
    seed: int,
    label: str,
    timeouts: TimeoutsSpec | None = None,
    records: Callable[[list[float]], dict[str, object]] | None = None,
) -> list[float]:
    """`steps` optimizer steps of `batch_size` rows drawn from `examples`; returns the loss at the end of
    every chunk of `SUPERVISED_CHUNK` steps (the last one last). `records(losses)` names JSON files to write into
    the folder before it takes its name (what built it). The learner ranks must see `output_dir`'s folder
    as the driver does: checked before training, not after it."""
    timeouts = timeouts or TimeoutsSpec()
    micro_batch = batch_size // learner.num_ranks
    group = LearnerGroup(init, learner, micro_batch, steps, actor_env(), start_timeout_s=timeouts.start_s)
    examples_ref = ray.put(examples)
    chunk_losses: list[float] = []
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        check_shared_storage(group, output_dir.parent, timeouts.start_s, field=f"the SFT output {output_dir}")
        with step_progress(f"sft {label}", steps) as progress:
            done = 0
            while done < steps:
                count = min(SUPERVISED_CHUNK, steps - done)
                losses = group.supervised_steps(examples_ref, count, batch_size, seed + done, timeouts.step_s)
                chunk_losses.append(sum(per_rank[-1] for per_rank in losses))  # ranks' shares of the mean
                done += count
                progress.advance(done, f"loss {chunk_losses[-1]:.3f}")
        with written_aside(output_dir) as staging:
            group.save_pretrained(str(staging), init.path, timeouts.checkpoint_s)
            for name, value in (records(chunk_losses) if records else {}).items():
                (staging / name).write_text(json.dumps(value, indent=2))
    finally:
        group.shutdown()
    return chunk_losses
