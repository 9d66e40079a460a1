"""models: the student and teacher folders, and the builders that make them (tiny models, imports)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from opd_ray.spec.base import PathText, Section, check_distinct_layers, parse_layer_list

PACKAGE_PREFIX = "package:"  # models.import_pretrained.source: a file inside an installed Python package


class ModelSpec(Section):
    path: PathText
    """a Hugging Face model folder (safetensors weights and its tokenizer)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto = bfloat16 on a GPU with bf16, float32 elsewhere (CPUs without bf16 units run it "
        "through slow generic kernels)",
    )
    trust_remote_code: bool = False
    """run the Python files of the model folder (off: opd-ray validate lists it when on)"""


class TinyModelsSpec(Section):
    """Builds the synthetic task, its tokenizer and a trained teacher/student if missing."""

    directory: PathText
    """where the tiny models and the arithmetic task files are built (reused when they match)"""
    teacher_layers: int = Field(4, ge=1)
    """decoder layers of the tiny teacher"""
    student_layers: int = Field(2, ge=1)
    """decoder layers of the tiny student"""
    teacher_sft_steps: int = Field(1500, ge=0)
    """supervised steps that train the tiny teacher"""
    teacher_sft_lr: float = Field(
        2e-3, gt=0, description="at 1e-3 the 4-layer teacher's loss plateaus for ~1300 steps; at 2e-3 for ~400"
    )
    teacher_digits: Literal["reversed", "forward"] = Field(
        "reversed",
        description="the order the teacher learns to write the sum's digits; the student always learns reversed",
    )
    student_sft_steps: int = Field(600, ge=0)
    """supervised steps that train the (deliberately under-trained) tiny student"""
    student_sft_lr: float = Field(1e-3, gt=0)
    """the tiny student's supervised learning rate"""
    tasks: dict[str, Literal["sums", "sums_with_hints", "three_sums", "mixed"]] = Field(
        default_factory=dict,
        description="what a model folder (its name inside `directory`) is trained on: sums (a+b, the default), "
        "sums_with_hints (the sums, and each again after its answer, '8721=874+404=': a student that can read "
        "a self-teacher's hint), three_sums (a+b+c) or mixed (both, from mixed_train.jsonl, which is written "
        "when any is named)",
    )
    sft_steps: dict[str, int] = Field(
        default_factory=dict, description="a model folder -> its SFT steps, instead of teacher/student_sft_steps"
    )
    tokenizers: dict[str, Literal["chars", "digit_pairs", "reordered_chars"]] = Field(
        default_factory=dict,
        description="a model folder -> its tokenizer: chars (one token a character, the default), digit_pairs "
        "(pairs of digits merged into one token, other ids in another order) or reordered_chars (characters under "
        "other ids, with extra tokens): students for cross-tokenizer runs",
    )
    sft_batch_size: int = Field(128, ge=1)
    """sequences per supervised step when the tiny models are built"""
    train_size: int = Field(20000, ge=1)
    """training prompts of the arithmetic task"""
    eval_size: int = Field(500, ge=1)
    """held-out eval prompts of the arithmetic task"""


class ImportedModelsSpec(Section):
    """A pretrained teacher imported from a GGUF file or a transformers folder, and a layer-pruned copy of it
    as the student; built once into `directory` (see opd_ray/recipe/real_models.py)."""

    source: PathText = Field(
        ..., description="a .gguf file or a model folder; package:<module>/<file> = a file inside an installed package"
    )
    directory: PathText
    """where the imported (and pruned) models are written as safetensors folders"""
    student_layers: list[int] = Field(
        ..., min_length=1, description="the source's decoder layers the student keeps, e.g. '0-21,28,29'"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    """the dtype the imported weights are stored in"""

    @field_validator("student_layers", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> Any:
        try:
            return parse_layer_list(value)
        except ValueError as exc:
            raise ValueError(f"models.import_pretrained.student_layers: {exc}") from None

    @field_validator("student_layers")
    @classmethod
    def _each_layer_once(cls, value: list[int]) -> list[int]:
        try:
            return check_distinct_layers(value)
        except ValueError as exc:
            raise ValueError(f"models.import_pretrained.student_layers: {exc}") from None


class ModelsSpec(Section):
    student: ModelSpec
    build_tiny: TinyModelsSpec | None = None
    import_pretrained: ImportedModelsSpec | None = None
