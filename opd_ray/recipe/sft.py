"""Supervised fine-tuning through the same DeepSpeed learner ranks that distil.

Used to build the tiny models and for the off-policy cold start (SFT of the student on
teacher-generated answers before OPD). The result is written aside and renamed into place,
so an interrupted SFT never leaves a half-written model where a later stage would load it.
"""

from __future__ import annotations

from pathlib import Path

import ray

from opd_ray.actors.learner import LearnerGroup
from opd_ray.actors.runtime import actor_env
from opd_ray.console import step_progress
from opd_ray.files import written_aside
from opd_ray.spec import LearnerSpec, ModelSpec

SFT_CHUNK = 50  # steps per call to the learner ranks: progress and a loss every 50 steps
Example = tuple[list[int], list[int]]  # (prompt ids, answer ids ending with end-of-sequence)


def train_sft(
    init: ModelSpec,
    output_dir: Path,
    examples: list[Example],
    learner: LearnerSpec,
    steps: int,
    batch_size: int,
    seed: int,
    label: str,
) -> list[float]:
    """`steps` optimizer steps of `batch_size` rows drawn from `examples`; returns the loss at the end of
    every chunk of `SFT_CHUNK` steps (the last one last)."""
    group = LearnerGroup(init, learner, batch_size // learner.num_ranks, steps, actor_env())
    examples_ref = ray.put(examples)
    chunk_losses: list[float] = []
    try:
        with step_progress(f"sft {label}", steps) as progress:
            done = 0
            while done < steps:
                count = min(SFT_CHUNK, steps - done)
                losses = ray.get(group.call("sft", examples_ref, count, batch_size, seed + done))
                chunk_losses.append(sum(per_rank[-1] for per_rank in losses))  # ranks' shares of the mean
                done += count
                progress.advance(done, f"loss {chunk_losses[-1]:.3f}")
        with written_aside(output_dir) as staging:
            ray.get(group.call("save_pretrained", str(staging), init.path))
    finally:
        group.shutdown()
    return chunk_losses
