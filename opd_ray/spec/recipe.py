"""The recipe around OPD: the cold-start stages (teacher generation, SFT) and the probe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opd_ray.spec.base import Section
from opd_ray.spec.trainer import MAX_NGRAM_REPEATS, REPEAT_NGRAM


class TeacherGenerationSpec(Section):
    """Stage teacher_generate: the teacher answers some training prompts, through a rollout engine."""

    prompts: int = Field(..., ge=1, description="training prompts the teacher answers; OPD trains on the rest")
    samples_per_prompt: int = Field(1, ge=1)
    """the teacher's answers per prompt"""
    temperature: float = Field(0.7, gt=0)
    """the teacher's sampling temperature for its answers"""
    top_p: float = Field(1.0, gt=0, le=1)
    """nucleus sampling of the teacher's answers"""
    max_new_tokens: int | None = Field(None, ge=1, description="null = rollout.max_new_tokens")
    drop_truncated: bool = Field(True, description="drop answers cut off by max_new_tokens")
    repeat_ngram: int = Field(REPEAT_NGRAM, ge=1, description="n of the repetition filter")
    max_ngram_repeats: int = Field(
        MAX_NGRAM_REPEATS, ge=1, description="drop an answer in which a repeat_ngram-gram occurs more often than this"
    )
    require_correct: bool = Field(False, description="drop answers the task verifier marks wrong (needs answers)")
    max_teacher_tokens: int | None = Field(
        None,
        ge=1,
        description="stop generating once the teacher has written this many tokens (kept or dropped): a "
        "sequence-level KD baseline at the teacher budget an OPD run used; null = answer every prompt",
    )


class SftStageSpec(Section):
    """Stage sft: cross-entropy on the kept teacher answers' tokens, with the learner ranks of the run."""

    steps: int = Field(200, ge=1)
    """supervised steps on the teacher's answers"""
    batch_size: int = Field(64, ge=1)
    """sequences per supervised step"""
    lr: float = Field(1e-5, gt=0)
    """the supervised stage's peak learning rate"""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """constant, or cosine decay over the stage's steps"""
    warmup_steps: int = Field(10, ge=0)
    """linear warm-up steps of the stage"""


class ColdStartSpec(Section):
    """The off-policy cold start before OPD: teacher answers, then SFT of the student on them."""

    teacher_generate: TeacherGenerationSpec
    sft: SftStageSpec = SftStageSpec()


class ProbeSpec(Section):
    """`opd-ray probe`: how much to sample before training, and the thresholds of its verdict."""

    prompts: int = Field(256, ge=1, description="training prompts the student samples and the teacher scores")
    eval_prompts: int = Field(
        200, ge=1, description="eval prompts (evenly spaced over data.eval) for both models' greedy accuracy"
    )
    min_overlap: float = Field(
        0.6,
        ge=0,
        le=1,
        description="overlap ratio@k below this: the two think differently (the paper's successful runs start ~0.7)",
    )
    min_accuracy_gap: float = Field(
        0.05, ge=-1, le=1, description="teacher minus student accuracy below this: little left to teach"
    )
