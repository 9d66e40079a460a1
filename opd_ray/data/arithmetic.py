"""A synthetic reasoning task small enough for a CPU: addition answered in reversed digits.

"47+385=" -> "234" (432 reversed), then end-of-sequence. Reversing the digits makes every
output digit depend only on the digits before it plus a carry, so a two-layer model can
learn it, while a wrong early digit still derails the rest: a task where a teacher's
per-token signal is informative. The task is written out as an ordinary prompt/answer
dataset (jsonl) so that it travels through the same data path as a user's own prompts.
"""

from __future__ import annotations

import random
from pathlib import Path

from opd_ray.files import write_jsonl

ALPHABET = "0123456789+="


def make_problem(rng: random.Random, low: int = 10, high: int = 999, family: str = "sums") -> tuple[str, str]:
    if family == "three_sums":  # two-digit terms: about as long as a sum of two, a different pattern
        terms = [rng.randint(10, 99) for _ in range(3)]
    else:
        terms = [rng.randint(low, high), rng.randint(low, high)]
    return "+".join(map(str, terms)) + "=", str(sum(terms))[::-1]


def make_split(seed: int, size: int, exclude: set[str] | None = None, family: str = "sums") -> list[dict[str, str]]:
    """Distinct problems of one family; `exclude` keeps held-out prompts out of a training split."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict[str, str]] = []
    while len(rows) < size:
        prompt, answer = make_problem(rng, family=family)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer})
    return rows


def write_task_files(directory: Path, seed: int, train_size: int, eval_size: int) -> tuple[Path, Path]:
    """Held-out eval prompts are drawn first so that no training prompt can be one of them."""
    eval_rows = make_split(seed + 1, eval_size)
    train_rows = make_split(seed, train_size, exclude={r["prompt"] for r in eval_rows})
    train_path, eval_path = directory / "train.jsonl", directory / "eval.jsonl"
    write_jsonl(train_rows, train_path)
    write_jsonl(eval_rows, eval_path)
    return train_path, eval_path


def write_mixed_task_files(directory: Path, seed: int, train_size: int, eval_size: int) -> tuple[Path, Path]:
    """mixed_train.jsonl: every sums training row and half as many sums of three, interleaved (two sums, then
    one of three), with a `task` column naming the family (what a multi-teacher spec routes by);
    three_sums_eval.jsonl: held-out sums of three. The sums are the sums task's own training rows, so
    eval.jsonl stays held out from both. Sums of three are the easier family for a small model, hence the
    2:1 mix: a student trained on it has a foothold on both."""
    sums_eval = make_split(seed + 1, eval_size)
    sums_train = make_split(seed, train_size, exclude={r["prompt"] for r in sums_eval})
    three_eval = make_split(seed + 3, eval_size, family="three_sums")
    three_train = make_split(seed + 2, train_size // 2, exclude={r["prompt"] for r in three_eval}, family="three_sums")
    mixed = []
    for i, row in enumerate(sums_train):
        mixed.append({**row, "task": "sums"})
        if i % 2 == 1:
            mixed.append({**three_train[i // 2], "task": "three_sums"})
    train_path, eval_path = directory / "mixed_train.jsonl", directory / "three_sums_eval.jsonl"
    write_jsonl(mixed, train_path)
    write_jsonl([{**row, "task": "three_sums"} for row in three_eval], eval_path)
    return train_path, eval_path


def either_digit_order(response: str, reference: str) -> bool:
    """The sum written in either digit order: the miniature's two teachers write it differently, and
    both must be judged on what they know, not on their format."""
    got, want = response.strip(), reference.strip()
    return got in (want, want[::-1])
