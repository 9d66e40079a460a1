"""A synthetic reasoning task small enough for a CPU: addition answered in reversed digits.

"47+385=" -> "234" (432 reversed), then end-of-sequence. Reversing the digits makes every
output digit depend only on the digits before it plus a carry, so a two-layer model can
learn it, while a wrong early digit still derails the rest: a task where a teacher's
per-token signal is informative. The task is written out as an ordinary prompt/answer
dataset (jsonl) so that it travels through the same data path as a user's own prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "0123456789+="


def make_problem(rng: random.Random, low: int = 10, high: int = 999) -> tuple[str, str]:
    a, b = rng.randint(low, high), rng.randint(low, high)
    return f"{a}+{b}=", str(a + b)[::-1]


def make_split(seed: int, size: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """Distinct problems; `exclude` keeps held-out prompts out of a training split."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict[str, str]] = []
    while len(rows) < size:
        prompt, answer = make_problem(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_task_files(directory: Path, seed: int, train_size: int, eval_size: int) -> tuple[Path, Path]:
    """Held-out eval prompts are drawn first so that no training prompt can be one of them."""
    eval_rows = make_split(seed + 1, eval_size)
    train_rows = make_split(seed, train_size, exclude={r["prompt"] for r in eval_rows})
    train_path, eval_path = directory / "train.jsonl", directory / "eval.jsonl"
    write_jsonl(train_rows, train_path)
    write_jsonl(eval_rows, eval_path)
    return train_path, eval_path


def either_digit_order(response: str, reference: str) -> bool:
    """The sum written in either digit order: the miniature's two teachers write it differently, and
    both must be judged on what they know, not on their format."""
    got, want = response.strip(), reference.strip()
    return got in (want, want[::-1])
