"""Prompt datasets: a user's jsonl/parquet (read with HF `datasets`) or the synthetic task's files.

Rows are checked and tokenized on the driver before any worker starts, so an empty file,
a missing field or a prompt too long for the engine is reported against the file and row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from opd_ray.data.routing import Routing
from opd_ray.errors import UserError
from opd_ray.spec import DatasetSpec, DataSpec


@dataclass
class PromptSet:
    """Tokenized prompts and their reference answers; index i is the dataset row.

    `teachers[i]` names the teacher that scores row i (data/routing.py); `teacher_prompt_ids[i]` is the
    prompt that teacher reads, or None when it reads the student's."""

    prompt_ids: list[list[int]]
    answers: list[str | None]
    source: str
    outside_rows: frozenset[int] = frozenset()  # rows mixed in from data.selection.outside
    teachers: list[str] | None = None  # None: every row goes to the run's one teacher
    teacher_prompt_ids: list[list[int] | None] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: list[int]) -> dict[int, list[int]]:
        return {i: self.prompt_ids[i] for i in indices}

    def teacher_of(self, index: int, default: str = "teacher") -> str:
        return default if self.teachers is None else self.teachers[index]

    def rows_by_teacher(self, indices: list[int], default: str = "teacher") -> dict[str, list[int]]:
        """These rows grouped by their teacher, each group in the order given."""
        groups: dict[str, list[int]] = {}
        for i in indices:
            groups.setdefault(self.teacher_of(i, default), []).append(i)
        return groups

    def teacher_prompts(self, indices: list[int]) -> dict[int, list[int]] | None:
        """The teacher's own prompts of these rows; None when every one reads the student's prompt."""
        if self.teacher_prompt_ids is None or all(self.teacher_prompt_ids[i] is None for i in indices):
            return None
        return {i: self.teacher_prompt_ids[i] or self.prompt_ids[i] for i in indices}

    def rows(self, keep: list[int]) -> PromptSet:
        """These rows, renumbered 0..len(keep)-1 in this order."""
        position = {old: new for new, old in enumerate(keep)}
        return PromptSet(
            [self.prompt_ids[i] for i in keep],
            [self.answers[i] for i in keep],
            self.source,
            frozenset(position[old] for old in self.outside_rows if old in position),
            None if self.teachers is None else [self.teachers[i] for i in keep],
            None if self.teacher_prompt_ids is None else [self.teacher_prompt_ids[i] for i in keep],
        )

    def without(self, rows: set[int]) -> PromptSet:
        """The other rows, renumbered: e.g. the prompts the cold start did not use, for OPD."""
        return self.rows([i for i in range(len(self)) if i not in rows])

    def spread(self, count: int) -> PromptSet:
        """`count` rows evenly spaced over the set, in order: every file and route of it represented."""
        count = min(count, len(self))
        return self.rows([i * len(self) // count for i in range(count)])

    @staticmethod
    def join(parts: list[PromptSet]) -> PromptSet:
        """Several files' prompts as one set, in order; outside rows keep their mark."""
        joined = PromptSet([], [], ", ".join(p.source for p in parts), frozenset(), [], [])
        for part in parts:
            offset = len(joined)
            joined.prompt_ids += part.prompt_ids
            joined.answers += part.answers
            joined.outside_rows |= {offset + row for row in part.outside_rows}
            joined.teachers += part.teachers or ["teacher"] * len(part)
            joined.teacher_prompt_ids += part.teacher_prompt_ids or [None] * len(part)
        return joined


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


ONE_TEACHER = Routing({"teacher": None})  # every row to one teacher, named as the shorthand names it, own prompt


def render_prompt(text: str, data: DataSpec, tokenizer) -> list[int]:
    """The student's prompt of a row: data.prompt_template, then the chat template if asked for."""
    return tokenize_prompt(data.prompt_template.format(prompt=text), data, tokenizer)


def tokenize_prompt(rendered: str, data: DataSpec, tokenizer) -> list[int]:
    if data.use_chat_template:
        # Rendered to text, then tokenized: what apply_chat_template returns when it tokenizes
        # changed between transformers versions (ids, then a dict of ids and mask).
        rendered = chat_text(rendered, data, tokenizer)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    bos = leading_bos(tokenizer)
    return ids if ids[: len(bos)] == bos else bos + ids


def chat_text(prompt: str, data: DataSpec, tokenizer) -> str:
    """The prompt as one user turn of the tokenizer's chat template (after data.system_prompt's system turn).
    A template that raises (many refuse a system turn: Gemma's "System role not supported") is one line."""
    system = [] if data.system_prompt is None else [{"role": "system", "content": data.system_prompt}]
    try:
        return tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja2's TemplateError from the template's own raise_exception, or a bad template
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        if system:
            raise UserError(
                f"data.system_prompt: the chat template of {name} rejects a system turn ({reason}); write the "
                "instruction into data.prompt_template instead"
            ) from None
        raise UserError(f"data.use_chat_template: the chat template of {name} failed: {reason}") from None


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


def reference_answer(value: object, dataset: DatasetSpec, where: str) -> str | None:
    """A row's reference answer as the verifier compares it: text, or a whole number written as one. A float
    (a parquet column with a missing value is stored as floats: 12 becomes '12.0', the gap 'nan'), a list of
    accepted answers or any other value would be compared by its Python text and never match: refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = type(value).__name__
    hint = (
        "write answers as text (a column of floats turns 12 into '12.0' and a missing value into 'nan')"
        if isinstance(value, float)
        else "give one reference answer per row as text (a verifier of your own can accept several)"
    )
    raise UserError(f"{where}: {dataset.answer_field!r} is a {kind} ({value!r}), not text: {hint}")


def tokenize_rows(
    rows: list[tuple[int, dict]], dataset: DatasetSpec, data: DataSpec, tokenizer, routing: Routing = ONE_TEACHER
) -> PromptSet:
    """(row number, row) pairs of one file -> PromptSet with each row's teacher and that teacher's prompt;
    a prompt too long, or a row no teacher takes, is reported by file and row."""
    prompts, answers, teachers, teacher_prompts = [], [], [], []
    if rows:
        routing.check_columns(list(rows[0][1]), dataset)
    for number, row in rows:
        where = f"{dataset.path} row {number}"
        ids = render_prompt(row[dataset.prompt_field], data, tokenizer)
        if len(ids) > data.max_prompt_tokens:
            raise UserError(
                f"{where}: prompt has {len(ids)} tokens > data.max_prompt_tokens ({data.max_prompt_tokens})"
            )
        prompts.append(ids)
        answer = row.get(dataset.answer_field) if dataset.answer_field else None
        answers.append(reference_answer(answer, dataset, where))
        teacher = routing.teacher_of(row, dataset, where)
        teachers.append(teacher)
        text = routing.teacher_text(teacher, row, where)
        own_tokenizer = routing.tokenizers.get(teacher)
        own_data = routing.teacher_data(teacher, data)
        if own_tokenizer is not None:  # another vocabulary: the teacher reads the prompt in its own tokens
            rendered = text if text is not None else data.prompt_template.format(prompt=row[dataset.prompt_field])
            teacher_prompts.append(tokenize_prompt(rendered, own_data, own_tokenizer))
        else:
            teacher_prompts.append(None if text is None else tokenize_prompt(text, own_data, tokenizer))
    return PromptSet(prompts, answers, str(dataset.path), frozenset(), teachers, teacher_prompts)


def load_prompts(
    files: DatasetSpec | list[DatasetSpec], data: DataSpec, tokenizer, section: str, routing: Routing = ONE_TEACHER
) -> PromptSet:
    """Every file of a section (data.train, data.eval), in order, as one PromptSet."""
    files = files if isinstance(files, list) else [files]
    parts = []
    for i, dataset in enumerate(files):
        where = section if len(files) == 1 else f"{section}[{i}]"
        rows = read_rows(dataset, where)
        prompt_texts(rows, dataset)
        parts.append(tokenize_rows(list(enumerate(rows, start=1)), dataset, data, tokenizer, routing))
    return parts[0] if len(parts) == 1 else PromptSet.join(parts)


def load_selected_prompts(
    data: DataSpec, tokenizer, seed: int, routing: Routing = ONE_TEACHER
) -> tuple[PromptSet, dict]:
    """The training prompts after `data.selection`: duplicates of reference/eval prompts and repeats
    dropped, outside prompts mixed in at `outside_fraction` in a seeded order; with the counts."""
    from opd_ray.data.selection import deduplicate, mix_order, outside_count

    selection = data.selection
    files = data.train_files
    sections = ["data.train"] if len(files) == 1 else [f"data.train[{i}]" for i in range(len(files))]
    file_rows = [read_rows(dataset, section) for dataset, section in zip(files, sections, strict=True)]
    file_texts = [prompt_texts(rows, dataset) for rows, dataset in zip(file_rows, files, strict=True)]
    texts = [text for part in file_texts for text in part]
    reference: list[str] = []
    for i, dataset in enumerate([*selection.reference, *data.eval_files]):
        reference += prompt_texts(read_rows(dataset, f"data.selection.reference.{i}"), dataset)
    deduplicated = deduplicate(texts, reference, selection.near_duplicate_jaccard)
    kept = set(deduplicated.kept)
    if not kept:
        paths = ", ".join(d.path for d in files)
        raise UserError(f"data.selection: every prompt of {paths} was dropped ({dict(deduplicated.dropped)})")
    parts, offset = [], 0
    for rows, dataset in zip(file_rows, files, strict=True):
        keep = [(i + 1, rows[i]) for i in range(len(rows)) if offset + i in kept]
        parts.append(tokenize_rows(keep, dataset, data, tokenizer, routing))
        offset += len(rows)
    aligned = parts[0] if len(parts) == 1 else PromptSet.join(parts)
    stats: dict = {"pool": len(texts), "kept": len(kept), "dropped": dict(deduplicated.dropped), "outside": 0}
    if selection.outside is None or selection.outside_fraction == 0:
        return aligned, stats
    outside_rows = read_rows(selection.outside, "data.selection.outside")
    outside_kept = deduplicate(prompt_texts(outside_rows, selection.outside), reference + texts, None)
    count = outside_count(len(aligned), selection.outside_fraction, len(outside_kept.kept))
    chosen = sorted(random.Random(seed).sample(outside_kept.kept, count))
    outside = tokenize_rows([(i + 1, outside_rows[i]) for i in chosen], selection.outside, data, tokenizer, routing)
    outside.outside_rows = frozenset(range(len(outside)))
    order = mix_order(len(aligned), len(outside), seed)
    joined = PromptSet.join([aligned, outside])
    mixed = joined.rows([i if part == "aligned" else len(aligned) + i for part, i in order])
    mixed.source = aligned.source
    stats.update(outside=len(outside), outside_dropped=dict(outside_kept.dropped))
    return mixed, stats
