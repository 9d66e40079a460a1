"""Prompt datasets: a user's jsonl/parquet (read with HF `datasets`) or the synthetic task's files.

Rows are checked and tokenized on the driver before any worker starts, so an empty file,
a missing field or a prompt too long for the engine is reported against the file and row.
"""

from __future__ import annotations

import random
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
    outside_rows: frozenset[int] = frozenset()  # rows mixed in from data.selection.outside

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: list[int]) -> dict[int, list[int]]:
        return {i: self.prompt_ids[i] for i in indices}

    def without(self, rows: set[int]) -> PromptSet:
        """The other rows, renumbered: e.g. the prompts the cold start did not use, for OPD."""
        keep = [i for i in range(len(self)) if i not in rows]
        outside = frozenset(new for new, old in enumerate(keep) if old in self.outside_rows)
        return PromptSet([self.prompt_ids[i] for i in keep], [self.answers[i] for i in keep], self.source, outside)


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
        # Rendered to text, then tokenized: what apply_chat_template returns when it tokenizes
        # changed between transformers versions (ids, then a dict of ids and mask).
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": rendered}], add_generation_prompt=True, tokenize=False
        )
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    bos = leading_bos(tokenizer)
    return ids if ids[: len(bos)] == bos else bos + ids


def leading_bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer starts every text with one (Llama's do), else [].

    Prompts are tokenized without special tokens so that a chat template that writes its own
    BOS does not get a second one; a model trained with a BOS then gets exactly one either way."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    by_default = tokenizer("a").input_ids
    return [bos] if by_default[:1] == [bos] else []


def prompt_texts(rows: list[dict], dataset: DatasetSpec) -> list[str]:
    texts = []
    for number, row in enumerate(rows, start=1):
        text = row[dataset.prompt_field]
        if not isinstance(text, str) or not text:
            raise UserError(f"{dataset.path} row {number}: {dataset.prompt_field!r} is empty or not text")
        texts.append(text)
    return texts


def tokenize_rows(rows: list[tuple[int, dict]], dataset: DatasetSpec, data: DataSpec, tokenizer) -> PromptSet:
    """(row number, row) pairs of one file -> PromptSet; a prompt too long is reported by file and row."""
    prompts, answers = [], []
    for number, row in rows:
        ids = render_prompt(row[dataset.prompt_field], data, tokenizer)
        if len(ids) > data.max_prompt_tokens:
            raise UserError(
                f"{dataset.path} row {number}: prompt has {len(ids)} tokens > data.max_prompt_tokens "
                f"({data.max_prompt_tokens})"
            )
        prompts.append(ids)
        answer = row.get(dataset.answer_field) if dataset.answer_field else None
        answers.append(None if answer is None else str(answer))
    return PromptSet(prompts, answers, str(dataset.path))


def load_prompts(dataset: DatasetSpec, data: DataSpec, tokenizer, section: str) -> PromptSet:
    rows = read_rows(dataset, section)
    prompt_texts(rows, dataset)
    return tokenize_rows(list(enumerate(rows, start=1)), dataset, data, tokenizer)


def load_selected_prompts(data: DataSpec, tokenizer, seed: int) -> tuple[PromptSet, dict]:
    """The training prompts after `data.selection`: duplicates of reference/eval prompts and repeats
    dropped, outside prompts mixed in at `outside_fraction` in a seeded order; with the counts."""
    from opd_ray.data.selection import deduplicate, mix_order, outside_count

    selection = data.selection
    rows = read_rows(data.train, "data.train")
    texts = prompt_texts(rows, data.train)
    reference: list[str] = []
    for i, dataset in enumerate([*selection.reference, *([data.eval] if data.eval else [])]):
        reference += prompt_texts(read_rows(dataset, f"data.selection.reference.{i}"), dataset)
    kept = deduplicate(texts, reference, selection.near_duplicate_jaccard)
    if not kept.kept:
        raise UserError(f"data.selection: every prompt of {data.train.path} was dropped ({dict(kept.dropped)})")
    aligned = tokenize_rows([(i + 1, rows[i]) for i in kept.kept], data.train, data, tokenizer)
    stats: dict = {"pool": len(rows), "kept": len(kept.kept), "dropped": dict(kept.dropped), "outside": 0}
    if selection.outside is None or selection.outside_fraction == 0:
        return aligned, stats
    outside_rows = read_rows(selection.outside, "data.selection.outside")
    outside_kept = deduplicate(prompt_texts(outside_rows, selection.outside), reference + texts, None)
    count = outside_count(len(aligned), selection.outside_fraction, len(outside_kept.kept))
    chosen = sorted(random.Random(seed).sample(outside_kept.kept, count))
    outside = tokenize_rows([(i + 1, outside_rows[i]) for i in chosen], selection.outside, data, tokenizer)
    order = mix_order(len(aligned), len(outside), seed)
    parts = {"aligned": aligned, "outside": outside}
    mixed = PromptSet(
        [parts[part].prompt_ids[i] for part, i in order],
        [parts[part].answers[i] for part, i in order],
        aligned.source,
        frozenset(row for row, (part, _) in enumerate(order) if part == "outside"),
    )
    stats.update(outside=len(outside), outside_dropped=dict(outside_kept.dropped))
    return mixed, stats
