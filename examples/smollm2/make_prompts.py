"""Writes the SmolLM2 example's prompt files: opposites (the example's task), capital cities (the task of
the real pair, docs/real_models.md "The paper on real models") and single-digit additions (the task of the
example's first version, kept for `choose_task.py`'s table).

Each task holds some of its items out of training entirely (words, countries, (a, b) pairs), so a
rising eval accuracy is knowledge the student recovered, not answers it saw: opposites 80 words
(`opposites.py`), 24 held out, in three phrasings; capitals 124 countries (`capitals.py`), 30 held out,
asked once each in eval; additions 100 pairs, 20 held out, four phrasings.
Deterministic: re-running rewrites the same files.

    python examples/smollm2/make_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from capitals import CAPITALS
from opposites import OPPOSITES

HERE = Path(__file__).parent
ADDITION_PHRASINGS = ("What is {a}+{b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
CAPITAL_PHRASINGS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
)
OPPOSITE_PHRASINGS = (
    'What is the opposite of "{word}"? Answer with one word.',
    'Give the opposite of the word "{word}" in one word.',
    'Which word means the opposite of "{word}"? Answer with one word.',
)
EVAL_PAIRS = 20
EVAL_WORDS = 24
EVAL_COUNTRIES = 30


def addition_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": p.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs for p in ADDITION_PHRASINGS]


def capital_rows(countries: list[str], phrasings: tuple[str, ...]) -> list[dict]:
    return [{"prompt": p.format(country=c), "answer": CAPITALS[c]} for c in countries for p in phrasings]


def opposite_rows(words: list[str], phrasings: tuple[str, ...]) -> list[dict]:
    return [{"prompt": p.format(word=w), "answer": OPPOSITES[w]} for w in words for p in phrasings]


def write(name: str, lines: list[dict]) -> None:
    path = HERE / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {len(lines)} prompts to {path}")


def main() -> None:
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    for name, subset in (("eval", pairs[:EVAL_PAIRS]), ("train", pairs[EVAL_PAIRS:])):
        lines = addition_rows(subset)
        rng.shuffle(lines)
        write(f"additions_{name}", lines)
    countries = sorted(CAPITALS)
    random.Random(0).shuffle(countries)
    held_out, trained = countries[:EVAL_COUNTRIES], countries[EVAL_COUNTRIES:]
    write("capitals_eval", capital_rows(held_out, CAPITAL_PHRASINGS[:1]))
    train = capital_rows(trained, CAPITAL_PHRASINGS)
    random.Random(1).shuffle(train)
    write("capitals_train", train)
    words = sorted(OPPOSITES)
    random.Random(0).shuffle(words)
    write("opposites_eval", opposite_rows(words[:EVAL_WORDS], OPPOSITE_PHRASINGS[::2]))
    train = opposite_rows(words[EVAL_WORDS:], OPPOSITE_PHRASINGS)
    random.Random(1).shuffle(train)
    write("opposites_train", train)


if __name__ == "__main__":
    main()
