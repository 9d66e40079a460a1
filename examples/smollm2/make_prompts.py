"""Writes the SmolLM2 example's prompts: single-digit additions in four phrasings, as chat questions.

SmolLM2-135M-Instruct answers these correctly about half the time (greedy, its chat template),
far better than the multi-digit sums it was tried on first (19% at 1-50). Eval holds 20 of the
100 (a, b) pairs out of training entirely, so a rising eval accuracy is arithmetic the student
learned, not answers it saw. Deterministic: re-running rewrites the same files.

    python examples/smollm2/make_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PHRASINGS = ("What is {a}+{b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
EVAL_PAIRS = 20


def rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": p.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs for p in PHRASINGS]


def main() -> None:
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    here = Path(__file__).parent
    for name, subset in (("eval", pairs[:EVAL_PAIRS]), ("train", pairs[EVAL_PAIRS:])):
        lines = rows(subset)
        rng.shuffle(lines)
        (here / f"additions_{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        print(f"wrote {len(lines)} prompts to {here / f'additions_{name}.jsonl'}")


if __name__ == "__main__":
    main()
