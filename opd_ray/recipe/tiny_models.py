"""Tiny Hugging Face models and a character tokenizer, built locally.

Nothing can be downloaded at run time, so tests and the quickstart make their own models:
real `transformers` model directories (config + safetensors + tokenizer) that every role
loads by path through the same code a user's model goes through. vLLM's CPU attention
needs head_dim >= 32, hence hidden 128 with 4 heads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opd_ray.console import console
from opd_ray.data.arithmetic import ALPHABET, write_mixed_task_files, write_task_files
from opd_ray.errors import UserError
from opd_ray.files import BUILD_RECORD, check_replaceable, write_json, written_aside
from opd_ray.recipe.cluster import connect
from opd_ray.recipe.model_cache import check_distinct_folders, ensure_built, is_built
from opd_ray.recipe.supervised import Example, train_supervised
from opd_ray.spec import ExperimentSpec, LearnerSpec, ModelSpec

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SHIPPED = Path(__file__).parent / "shipped"  # the quickstart's teacher and student, as its recipe builds them


def saved_tokenizer(core: Tokenizer, directory: Path) -> PreTrainedTokenizerFast:
    """A tokenizers pipeline as a transformers tokenizer with the tiny task's special tokens, saved in
    `directory`; decoding joins tokens back without spaces."""
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="right"
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_char_level_tokenizer(vocab: dict[str, int], directory: Path) -> PreTrainedTokenizerFast:
    """One token per character, with these ids; tokens of several characters in `vocab` are never produced."""
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return saved_tokenizer(core, directory)


def build_char_tokenizer(alphabet: str, directory: Path) -> PreTrainedTokenizerFast:
    """One token per character; decoding joins characters back without spaces."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    return build_char_level_tokenizer(vocab, directory)


def digit_pair_vocabulary(alphabet: str) -> dict[str, int]:
    """The hundred digit pairs at ids 0-99, then the special tokens, then the single characters in reverse
    order: no id means what it means in `build_char_tokenizer`."""
    digits = "0123456789"
    vocab = {a + b: i for i, (a, b) in enumerate((a, b) for a in digits for b in digits)}
    for token in (EOS, PAD, UNK, *reversed(alphabet)):
        vocab.setdefault(token, len(vocab))
    return vocab


def build_digit_pair_tokenizer(alphabet: str, directory: Path) -> PreTrainedTokenizerFast:
    """A second tokenizer for the same text: every pair of digits is one token (BPE merges, lower pairs
    first, so "123" is "12" "3" and "321" is "3" "21"), ids as in `digit_pair_vocabulary`."""
    digits = "0123456789"
    merges = [(a, b) for a in digits for b in digits]
    core = Tokenizer(models.BPE(vocab=digit_pair_vocabulary(alphabet), merges=merges, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\d+|\D"), behavior="isolated")
    return saved_tokenizer(core, directory)


def build_reordered_char_tokenizer(alphabet: str, directory: Path) -> PreTrainedTokenizerFast:
    """The character tokenizer's tokenization under other ids, with the digit pairs as extra tokens that text
    never produces: another vocabulary whose every chunk is one-to-one with the character teacher's."""
    return build_char_level_tokenizer(digit_pair_vocabulary(alphabet), directory)


TOKENIZERS = {
    "chars": build_char_tokenizer,
    "digit_pairs": build_digit_pair_tokenizer,
    "reordered_chars": build_reordered_char_tokenizer,
}


def tiny_qwen2_config(vocab_size: int, num_layers: int, eos_id: int, pad_id: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="float32",
    )


def save_random_model(
    tokenizer: PreTrainedTokenizerFast, num_layers: int, directory: Path, seed: int, architecture: str = "qwen2"
) -> Path:
    """`architecture` llama: the same shape without Qwen2's attention biases, for a tokenizer of its own:
    transformers loads a qwen2 model's tokenizer as Qwen2's, whose pre-tokenizer splits every digit,
    while a llama model's keeps the tokenizer.json it was saved with (the digit-pair student's)."""
    torch.manual_seed(seed)
    config = tiny_qwen2_config(len(tokenizer), num_layers, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if architecture == "llama":
        config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")})
        model = LlamaForCausalLM(config)
    else:
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def sft_learner(spec: ExperimentSpec, steps: int, lr: float) -> LearnerSpec:
    """The learner settings a tiny model is trained with: the spec's ranks and ZeRO stage, warmup, cosine decay."""
    return LearnerSpec(
        num_ranks=spec.learner.num_ranks,
        zero_stage=spec.learner.zero_stage,
        lr=lr,
        lr_schedule="cosine",
        warmup_steps=min(50, steps // 10),
        min_lr_ratio=0.05,
        resources=spec.learner.resources,
    )


def sft_examples(tokenizer: PreTrainedTokenizerFast, rows: list[dict], digits: str) -> list[Example]:
    """(prompt ids, answer ids + end-of-sequence); the task files hold the reversed answer."""
    order = -1 if digits == "forward" else 1
    eos = [tokenizer.eos_token_id]
    return [(tokenizer(r["prompt"]).input_ids, tokenizer(r["answer"][::order]).input_ids + eos) for r in rows]


def model_recipe(spec: ExperimentSpec, label: str, folder: str = "") -> dict:
    """Everything that decides one tiny model's weights; a model is rebuilt only when its recipe changes,
    so specs that share the student but name another teacher reuse what is built. `folder` (the model's
    folder name) picks its task from build_tiny.tasks; the sums task adds nothing, so the shipped recipes hold."""
    build = spec.models.build_tiny
    shared = {k: getattr(build, k) for k in ("sft_batch_size", "train_size", "eval_size")}
    shared.update(learner_ranks=spec.learner.num_ranks, seed=spec.run.seed)
    if label == "teacher":
        own = {"layers": build.teacher_layers, "steps": build.teacher_sft_steps, "lr": build.teacher_sft_lr}
        own["digits"] = build.teacher_digits
    else:
        own = {"layers": build.student_layers, "steps": build.student_sft_steps, "lr": build.student_sft_lr}
        own["digits"] = "reversed"
    task = build.tasks.get(folder, "sums")
    if task != "sums":
        own["task"] = task
    if folder in build.sft_steps:
        own["steps"] = build.sft_steps[folder]
    if build.tokenizers.get(folder, "chars") != "chars":
        own["tokenizer"] = build.tokenizers[folder]
    return {**shared, **own}


def shipped_model(label: str, recipe: dict) -> Path | None:
    """The committed copy of a tiny model, if it was built by exactly this recipe (the quickstart's)."""
    candidate = SHIPPED / label
    return candidate if is_built(candidate, recipe) else None


def ensure_tiny_models(spec: ExperimentSpec, from_scratch: bool = False) -> None:
    """Writes the arithmetic task files and makes sure a trained teacher and student exist; later runs reuse them.

    A model whose recipe matches a shipped one (the quickstart's) is copied from `SHIPPED` in seconds
    unless `from_scratch`; any other is trained, once. The student always answers in reversed digit
    order; `build_tiny.teacher_digits: forward` trains a teacher that answers the same sums most
    significant digit first (the miniature's teacher with a different thinking pattern). Only models
    inside `build_tiny.directory` are written: a path elsewhere (a user's model, the cold-started
    student of a run) is left as it is, and so is a folder inside it that opd-ray did not build. The
    directory is a shared cache: builds hold its lock (model_cache.py), so a run reading it is never
    rebuilt under.
    """
    build = spec.models.build_tiny
    root = Path(build.directory)
    wanted = [
        (label, Path(model.path), model_recipe(spec, label, Path(model.path).name))
        for label, model in spec.models_by_role()
        if Path(model.path).resolve().is_relative_to(root.resolve())  # a model elsewhere is not ours to write
    ]
    check_distinct_folders(wanted, "models.build_tiny")
    for label, directory, _ in wanted:
        check_replaceable(directory, f"models.{label} (built by models.build_tiny)")

    def missing_models() -> list[tuple[str, Path, dict]]:
        return [(label, directory, recipe) for label, directory, recipe in wanted if not is_built(directory, recipe)]

    def mixed_missing() -> bool:
        wants_mixed = any(task not in SUMS_TASKS for task in build.tasks.values())
        return wants_mixed and not (root / "mixed_train.jsonl").is_file()

    def pending() -> list[str]:
        return [str(directory) for _, directory, _ in missing_models()] + (
            ["mixed task files"] if mixed_missing() else []
        )

    def build_missing(_: list[str]) -> None:
        if mixed_missing():
            claim_build_files(root, list(MIXED_FILES))
            write_mixed_task_files(root, spec.run.seed, build.train_size, build.eval_size)
        missing = missing_models()
        if missing:
            build_models(spec, missing, from_scratch)

    ensure_built(root, pending, build_missing, spec.trainer.timeouts.build_wait_s)


TASK_RECORD = "tiny_build.json"  # the task files and tokenizers the tiny build wrote beside its models
TASK_FILES = ("tokenizer", "train.jsonl", "eval.jsonl")
MIXED_FILES = ("mixed_train.jsonl", "three_sums_eval.jsonl")


def claim_build_files(root: Path, names: list[str]) -> None:
    """The tiny build writes task files and tokenizers beside its models; one already there that it did not
    write (a user's own train.jsonl in the folder named as models.build_tiny.directory) is never replaced.
    What it wrote is listed in tiny_build.json (a directory built before that record: its model folders'
    build.json says the directory is the tiny build's)."""
    record = root / TASK_RECORD
    if record.is_file():
        ours = set(json.loads(record.read_text()))
    else:
        built_here = any((child / BUILD_RECORD).is_file() for child in root.iterdir()) if root.is_dir() else False
        ours = set(TASK_FILES + MIXED_FILES) if built_here else set()
    foreign = [name for name in names if (root / name).exists() and name not in ours]
    if foreign:
        raise UserError(
            f"models.build_tiny.directory: {root} holds {', '.join(foreign)}, which the tiny build did not write and "
            "would replace: name a directory of its own for the tiny models"
        )
    write_json(record, sorted(ours | set(names)))


def build_models(spec: ExperimentSpec, missing: list[tuple[str, Path, dict]], from_scratch: bool) -> None:
    """The task files, then each missing model: copied when a shipped build has its recipe, else trained."""
    build = spec.models.build_tiny
    root = Path(build.directory)
    kinds = {recipe.get("tokenizer", "chars") for _, _, recipe in missing} - {"chars"}
    claim_build_files(root, [*TASK_FILES, *(f"tokenizer-{kind}" for kind in sorted(kinds))])
    tokenizer = build_char_tokenizer(ALPHABET, root / "tokenizer")
    write_task_files(root, spec.run.seed, build.train_size, build.eval_size)
    rows: dict[str, list[dict]] = {}  # task -> its training rows, read once, and only if a model is trained
    for label, output_dir, recipe in missing:
        shipped = None if from_scratch else shipped_model(label, recipe)
        if shipped is not None:
            console.print(f"tiny {label}: copying the shipped build of this recipe into {output_dir}")
            with written_aside(output_dir) as partial:
                shutil.copytree(shipped, partial)
            continue
        console.print(f"building tiny {label} in {output_dir} (once; cached for later runs)")
        connect(spec.ray)
        task = recipe.get("task", "sums")
        if task not in rows:
            rows[task] = task_rows(root, task)
        kind = recipe.get("tokenizer", "chars")
        own_tokenizer = tokenizer if kind == "chars" else TOKENIZERS[kind](ALPHABET, root / f"tokenizer-{kind}")
        build_model(spec, label, output_dir, recipe, own_tokenizer, rows[task])


# the prompt a self-teacher reads in examples/self_distill.yaml: the answer, then the question
HINTED_PROMPT = "{answer}={prompt}"
SUMS_TASKS = ("sums", "sums_with_hints")  # the tasks read from train.jsonl; the others need the mixed file


def task_rows(root: Path, task: str) -> list[dict]:
    """The training rows of a task: the sums file (with `sums_with_hints`, each sum also shown after its answer,
    as examples/self_distill.yaml's teacher reads it), or the mixed file (whole, or one family of it)."""
    if task in SUMS_TASKS:
        sums = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
        if task == "sums":
            return sums
        return sums + [{**row, "prompt": HINTED_PROMPT.format(**row)} for row in sums]
    mixed = [json.loads(line) for line in (root / "mixed_train.jsonl").read_text().splitlines()]
    return mixed if task == "mixed" else [row for row in mixed if row["task"] == task]


def build_model(
    spec: ExperimentSpec, label: str, output_dir: Path, recipe: dict, tokenizer: PreTrainedTokenizerFast, rows: list
) -> None:
    """Random init, then SFT on the task's answers; `build.json` (the recipe) and `build_log.json` (the loss
    every 50 steps, what a rebuild is checked against) are written into the folder before it takes its name."""
    examples = sft_examples(tokenizer, rows, recipe["digits"])
    root = Path(spec.models.build_tiny.directory)
    architecture = "llama" if recipe.get("tokenizer") == "digit_pairs" else "qwen2"  # see save_random_model
    init_dir = save_random_model(
        tokenizer, recipe["layers"], root / f"init-{output_dir.name}", spec.run.seed, architecture
    )
    learner = sft_learner(spec, recipe["steps"], recipe["lr"])
    init = ModelSpec(path=str(init_dir))
    batch_size, seed = spec.models.build_tiny.sft_batch_size, spec.run.seed

    def records(losses: list[float]) -> dict[str, object]:
        return {BUILD_RECORD: recipe, "build_log.json": {"loss_every_50_steps": losses}}

    train_supervised(init, output_dir, examples, learner, recipe["steps"], batch_size, seed, label, records=records)
