"""One step's data: which prompts it trains on, where its batches come from, and waiting for them.

A step trains on student samples scored by the teacher (the pipeline moves them), or, for
the SFT control and GKD's dataset share, on the dataset's reference answers. A launched
step sits in the rollout buffer until the learners are ready for it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import ray

from opd_ray.data.order import PromptSampler, mix_seed
from opd_ray.data.run_inputs import RunInputs
from opd_ray.driver.metrics import timed
from opd_ray.driver.pipeline import Pipeline, StepShards
from opd_ray.losses.batch import supervised_batch
from opd_ray.spec import ExperimentSpec


def on_student_samples(spec: ExperimentSpec, step: int) -> bool:
    """GKD's lambda: whether this step trains on student samples (else on dataset answers); seeded per step."""
    fraction = spec.algorithm.student_data_fraction
    return fraction >= 1 or random.Random(mix_seed(spec.run.seed, step)).random() < fraction


def supervised_refs(inputs: RunInputs, indices: list[int]) -> list[ray.ObjectRef]:
    """The control arm: the same prompts with the dataset's reference answers, no student samples."""
    eos = [inputs.tokenizer.eos_token_id]
    rows = [
        (
            inputs.train.prompt_ids[i],
            inputs.tokenizer(inputs.train.answers[i], add_special_tokens=False).input_ids + eos,
        )
        for i in indices
    ]
    return [ray.put(supervised_batch(rows, indices))]


def prompts_digest(indices: list[int]) -> str:
    """A short fingerprint of a step's prompts: equal data order across runs is equal digests."""
    return hashlib.sha1(json.dumps(indices).encode()).hexdigest()[:12]


@dataclass
class StepWork:
    """A launched step: its prompts, where the data order stands after it (what a checkpoint of
    this step records), and its data: shards moving through the pipeline, or ready batches."""

    step: int
    indices: tuple[int, ...]
    sampler_after: tuple[int, int]
    launch_weight_version: int  # the weights the rollout engines held when the step was launched
    shards: StepShards | None = None
    ready_refs: list[ray.ObjectRef] | None = None  # sft: the dataset's answers, nothing to score
    dataset: bool = False

    def resolve(self, pipeline: Pipeline, metrics: dict) -> tuple[list[ray.ObjectRef], int]:
        """Waits for the step's data; returns its batch refs and the oldest weight version in it."""
        if self.shards is None:
            return self.ready_refs, self.launch_weight_version
        with timed("wait_for_data", metrics):
            refs = pipeline.wait_step(self.shards)
        for role in ("rollout", "teacher"):  # compute time, summed over the step's shards
            if (seconds := self.shards.role_seconds(role)) is not None:
                metrics[f"time/{role}"] = seconds
        version = self.shards.weight_version
        return refs, version if version >= 0 else self.launch_weight_version


def launch_step(
    spec: ExperimentSpec, pipeline: Pipeline, inputs: RunInputs, sampler: PromptSampler, step: int
) -> StepWork:
    """Draws the step's prompts and queues its work: student rollouts that flow on into the teacher,
    or (sft, GKD's dataset share) the dataset's answers."""
    indices = sampler.next(spec.trainer.prompts_per_step)
    work = StepWork(step, tuple(indices), (sampler.epoch, sampler.position), pipeline.roles.weight_version)
    if spec.algorithm.record.trains_on_answers:
        work.ready_refs, work.dataset = supervised_refs(inputs, indices), True
    elif on_student_samples(spec, step):
        work.shards = pipeline.launch_rollouts(step, indices, spec.rollout.samples_per_prompt)
    else:
        groups = pipeline.by_teacher(indices)
        refs = [ref for rows in groups.values() for ref in supervised_refs(inputs, rows)]
        sequences = [len(rows) for rows in groups.values()]
        work.shards, work.dataset = pipeline.launch_scoring(step, refs, sequences, list(groups)), True
    return work
