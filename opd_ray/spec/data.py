"""data: prompt files, routes to teachers, prompt selection, templates and the verifier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opd_ray.spec.base import PathText, Section, template_fields


class DatasetSpec(Section):
    path: PathText
    """a jsonl or parquet file of prompts"""
    prompt_field: str = "prompt"
    """the field holding the prompt"""
    answer_field: str | None = "answer"
    """the field holding the reference answer (the verifier's); null = no answers"""
    limit: int | None = Field(None, ge=1)
    """use the first N rows only; null = all"""
    teacher: str | None = Field(
        None, description="with several teachers: the one that scores every row of this file (wins over data.route)"
    )


class RouteSpec(Section):
    """Which teacher scores a row, by the value of one of its fields (e.g. a `domain` column)."""

    field: str
    """the row field whose value picks the teacher"""
    teachers: dict[str, str] = Field(..., min_length=1, description="field value -> teacher name")
    default: str | None = Field(None, description="the teacher of a value not listed; null = such a row is an error")


class PromptSelectionSpec(Section):
    """Training prompts cleaned and mixed before any is sampled (the paper's teacher-aligned prompts)."""

    reference: list[DatasetSpec] = Field(
        default_factory=list, description="prompts to keep out of training (benchmarks); data.eval is always added"
    )
    near_duplicate_jaccard: float | None = Field(
        0.8,
        gt=0,
        le=1,
        description="drop prompts whose character 5-gram Jaccard to a kept or reference one "
        "reaches this (MinHash estimate); null = exact duplicates only",
    )
    outside: DatasetSpec | None = Field(None, description="prompts from outside the teacher's distribution")
    outside_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the training prompts taken from `outside` (against entropy collapse)"
    )
    keep_top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="score every (non-outside) prompt by the teacher's mean log-prob of a student sample and "
        "train on this best fraction; null = no scoring",
    )

    @model_validator(mode="after")
    def _outside_needs_prompts(self) -> PromptSelectionSpec:
        if self.outside_fraction > 0 and self.outside is None:
            raise ValueError("data.selection.outside_fraction > 0 needs data.selection.outside (a prompt file)")
        return self


class DataSpec(Section):
    train: DatasetSpec | list[DatasetSpec] = Field(
        ..., description="one prompt file, or several (each may name its teacher)"
    )
    eval: DatasetSpec | list[DatasetSpec] | None = None
    """held-out prompts for greedy accuracy before, during and after training; null = no evaluation"""
    route: RouteSpec | None = Field(None, description="several teachers: which one scores a row, by a data field")
    prompt_template: str = "{prompt}"
    """how a row becomes the student's prompt: {prompt} and other row fields"""
    use_chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (an instruct model's turn format)"""
    system_prompt: str | None = Field(
        None,
        description="with use_chat_template: the system turn before each prompt (e.g. the answer format the "
        "teacher is asked for); null = the template's own default",
    )
    template_source: Literal["student", "teacher"] = Field(
        "student", description="whose tokenizer's chat template wraps the prompts; teacher = teacher-aligned prompts"
    )
    selection: PromptSelectionSpec | None = Field(None, description="dedup and mixing of the training prompts")
    verifier: str = Field("exact", description="exact | final_number | boxed | first_line_mentions | module:function")
    max_prompt_tokens: int = Field(256, ge=1)
    """longer prompts are refused at pre-flight (the engines need room for the answer)"""

    verifier_errors: Literal["count_wrong", "raise"] = Field(
        "count_wrong",
        description="a user verifier that raises during a run: count_wrong = report it (verifier, response, row) "
        "and score the sample as wrong; raise = stop the run",
    )

    @property
    def train_files(self) -> list[DatasetSpec]:
        return self.train if isinstance(self.train, list) else [self.train]

    @property
    def eval_files(self) -> list[DatasetSpec]:
        return [] if self.eval is None else self.eval if isinstance(self.eval, list) else [self.eval]

    @model_validator(mode="after")
    def _files_given(self) -> DataSpec:
        if not self.train_files:
            raise ValueError("data.train: name at least one prompt file")
        if isinstance(self.eval, list) and not self.eval:
            raise ValueError("data.eval: name at least one prompt file, or leave data.eval out")
        return self

    @model_validator(mode="after")
    def _system_prompt_needs_chat(self) -> DataSpec:
        if self.system_prompt is not None and not self.use_chat_template:
            raise ValueError(
                "data.system_prompt is a turn of the chat template: set data.use_chat_template: true, "
                "or write the instruction into data.prompt_template"
            )
        return self

    @model_validator(mode="after")
    def _template_has_prompt(self) -> DataSpec:
        fields = template_fields(self.prompt_template, "data.prompt_template")
        if fields != {"prompt"}:
            unknown = sorted(fields - {"prompt"})
            what = f"unknown placeholder {{{unknown[0]}}}" if unknown else "no {prompt} placeholder"
            raise ValueError(
                f"data.prompt_template: {what}; the template may only use {{prompt}} "
                "(write a literal brace as {{ or }})"
            )
        return self
