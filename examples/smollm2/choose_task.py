"""How the SmolLM2 example's task was chosen: each model's greedy accuracy and cut-off share per task.

A teacher worth distilling from must be good at the task *within the length limit*: an answer cut off
by `rollout.max_new_tokens` never counts as correct, and OPD pulls the student towards whatever the
teacher would write, rambling included. This prints, for every task and answer format, the greedy
accuracy of each model folder given and the share of its answers cut off, with the prompts rendered
exactly as a run renders them (opd-ray's prompt code, the same verifier).

    python examples/smollm2/choose_task.py TEACHER_DIR STUDENT_DIR [--max-new-tokens 48] [--limit 80]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_ray.data.prompts import render_prompt
from opd_ray.data.verifiers import BUILTIN
from opd_ray.spec.data import DataSpec

HERE = Path(__file__).parent
SHORT = "Answer in one short sentence."
# (task, eval file, verifier, system prompt): the formats tried, docs/real_models.md
CANDIDATES = (
    ("opposites", "opposites_eval.jsonl", "first_line_mentions", None),
    ("opposites", "opposites_eval.jsonl", "first_line_mentions", SHORT),
    ("capitals", "capitals_eval.jsonl", "first_line_mentions", None),
    ("capitals", "capitals_eval.jsonl", "first_line_mentions", SHORT),
    ("additions", "additions_eval.jsonl", "final_number", None),
    ("additions", "additions_eval.jsonl", "final_number", SHORT),
)


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[str, bool]]:
    """(text, finished) of each prompt's greedy answer, in batches with left padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), 16):
        batch = prompts[start : start + 16]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )
        for row in out[:, width:].tolist():
            finished = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if finished else row
            answers.append((tokenizer.decode(row, skip_special_tokens=True), finished))
    return answers


def measure(folder: str, args: argparse.Namespace) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = []
    for task, file, verifier, system in CANDIDATES:
        rows = [json.loads(line) for line in (HERE / file).read_text().splitlines()][: args.limit]
        data = DataSpec(train={"path": file}, use_chat_template=True, system_prompt=system, verifier=verifier)
        prompts = [render_prompt(row["prompt"], data, tokenizer) for row in rows]
        answers = greedy(model, tokenizer, prompts, args.max_new_tokens)
        correct = sum(
            done and BUILTIN[verifier](text, row["answer"]) for (text, done), row in zip(answers, rows, strict=True)
        )
        cut = sum(not done for _, done in answers)
        results.append(
            {
                "model": Path(folder).name,
                "task": task,
                "system_prompt": system,
                "accuracy": correct / len(rows),
                "cut_off": cut / len(rows),
                "rows": len(rows),
                "example": answers[0][0],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="model folders (teacher first)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=80, help="eval rows per task")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = [result for folder in args.folders for result in measure(folder, args)]
    print("\n| model | task | system prompt | greedy accuracy | cut off |\n|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['model']} | {r['task']} | {r['system_prompt'] or '(default)'} | {r['accuracy']:.2f} | "
            f"{r['cut_off']:.0%} |"
        )


if __name__ == "__main__":
    main()
