"""Prompt datasets: a user's jsonl/parquet (read with HF `datasets`) or the synthetic task's files.

Rows are checked and tokenized on the driver before any worker starts, so an empty file,
a missing field or a prompt too long for the engine is reported against the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opd_ray.errors import UserError
from opd_ray.spec import DatasetSpec, DataSpec


@dataclass
class PromptSet:
    """Tokenized prompts and their reference answers; index i is the dataset row."""

    prompt_ids: list[list[int]]
    answers: list[str | None]
    source: str

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: list[int]) -> dict[int, list[int]]:
        return {i: self.prompt_ids[i] for i in indices}

    def without(self, rows: set[int]) -> PromptSet:
        """The other rows, renumbered: e.g. the prompts the cold start did not use, for OPD."""
        keep = [i for i in range(len(self)) if i not in rows]
        return PromptSet([self.prompt_ids[i] for i in keep], [self.answers[i] for i in keep], self.source)


def read_rows(dataset: DatasetSpec, section: str) -> list[dict]:
    path = Path(dataset.path)
    if not path.is_file():
        raise UserError(f"{section}.path: file not found: {path}")
    suffix = path.suffix.lower()
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise UserError(f"{section}.path: {path} is not .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        raise UserError(f"{section}.path: {path} has no rows")
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{section}.path: cannot read {path}: {reason}") from None
    if len(table) == 0:
        raise UserError(f"{section}.path: {path} has no rows")
    for field in (dataset.prompt_field, dataset.answer_field):
        if field is not None and field not in table.column_names:
            raise UserError(f"{section}: field {field!r} not in {path}; columns are {', '.join(table.column_names)}")
    rows = table.to_list()
    return rows[: dataset.limit] if dataset.limit else rows


def render_prompt(text: str, data: DataSpec, tokenizer) -> list[int]:
    rendered = data.prompt_template.format(prompt=text)
    if data.use_chat_template:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": rendered}], add_generation_prompt=True, tokenize=True
            )
        )
    return tokenizer(rendered, add_special_tokens=False).input_ids


def load_prompts(dataset: DatasetSpec, data: DataSpec, tokenizer, section: str) -> PromptSet:
    prompts, answers = [], []
    for number, row in enumerate(read_rows(dataset, section), start=1):
        text = row[dataset.prompt_field]
        if not isinstance(text, str) or not text:
            raise UserError(f"{dataset.path} row {number}: {dataset.prompt_field!r} is empty or not text")
        ids = render_prompt(text, data, tokenizer)
        if len(ids) > data.max_prompt_tokens:
            raise UserError(
                f"{dataset.path} row {number}: prompt has {len(ids)} tokens > data.max_prompt_tokens "
                f"({data.max_prompt_tokens})"
            )
        prompts.append(ids)
        answer = row.get(dataset.answer_field) if dataset.answer_field else None
        answers.append(None if answer is None else str(answer))
    return PromptSet(prompts, answers, str(dataset.path))
