"""Tiny Hugging Face models and a character tokenizer, built locally.

Nothing can be downloaded at run time, so tests and the quickstart make their own models:
real `transformers` model directories (config + safetensors + tokenizer) that every role
loads by path through the same code a user's model goes through. vLLM's CPU attention
needs head_dim >= 32, hence hidden 128 with 4 heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opd_ray.console import console
from opd_ray.data.arithmetic import ALPHABET, write_task_files
from opd_ray.driver.cluster import connect
from opd_ray.recipe.sft import train_sft
from opd_ray.spec import ExperimentSpec, LearnerSpec, ModelSpec

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_char_tokenizer(alphabet: str, directory: Path) -> PreTrainedTokenizerFast:
    """One token per character; decoding joins characters back without spaces."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="right"
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


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


def save_random_model(tokenizer: PreTrainedTokenizerFast, num_layers: int, directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = tiny_qwen2_config(len(tokenizer), num_layers, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _train_by_sft(
    spec: ExperimentSpec,
    init_dir: Path,
    output_dir: Path,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    label: str,
) -> float:
    """SFT through the same DeepSpeed learner the distillation uses; returns the last loss."""
    build = spec.models.build_tiny
    learner = LearnerSpec(
        num_ranks=spec.learner.num_ranks,
        zero_stage=spec.learner.zero_stage,
        lr=lr,
        lr_schedule="cosine",
        warmup_steps=min(50, steps // 10),
        min_lr_ratio=0.05,
        resources=spec.learner.resources,
    )
    init = ModelSpec(path=str(init_dir))
    return train_sft(init, output_dir, examples, learner, steps, build.sft_batch_size, spec.run.seed, label)


def model_recipe(spec: ExperimentSpec, label: str) -> dict:
    """Everything that decides one tiny model's weights; a model is rebuilt only when its recipe changes,
    so specs that share the student but name another teacher reuse what is built."""
    build = spec.models.build_tiny
    shared = {k: getattr(build, k) for k in ("sft_batch_size", "train_size", "eval_size")}
    shared.update(learner_ranks=spec.learner.num_ranks, seed=spec.run.seed)
    if label == "teacher":
        own = {"layers": build.teacher_layers, "steps": build.teacher_sft_steps, "lr": build.teacher_sft_lr}
        own["digits"] = build.teacher_digits
    else:
        own = {"layers": build.student_layers, "steps": build.student_sft_steps, "lr": build.student_sft_lr}
        own["digits"] = "reversed"
    return {**shared, **own}


def is_built(directory: Path, recipe: dict) -> bool:
    marker = directory / "build.json"
    return marker.is_file() and json.loads(marker.read_text()) == recipe


def ensure_tiny_models(spec: ExperimentSpec) -> None:
    """Builds the arithmetic task files and a trained teacher and student once; later runs reuse them.

    The student always answers in reversed digit order; `build_tiny.teacher_digits: forward` trains a
    teacher that answers the same sums most significant digit first (the miniature's teacher with a
    different thinking pattern). Only models inside `build_tiny.directory` are built: a path elsewhere
    (a user's model, the cold-started student of a run) is left as it is.
    """
    build = spec.models.build_tiny
    root = Path(build.directory)
    wanted = [
        (label, Path(model.path), model_recipe(spec, label))
        for label, model in (("teacher", spec.models.teacher), ("student", spec.models.student))
        if Path(model.path).resolve().is_relative_to(root.resolve())  # a model elsewhere is not ours to write
    ]
    missing = [(label, directory, recipe) for label, directory, recipe in wanted if not is_built(directory, recipe)]
    if not missing:
        return
    console.print(f"building tiny {' and '.join(m[0] for m in missing)} in {root} (once; cached for later runs)")
    tokenizer = build_char_tokenizer(ALPHABET, root / "tokenizer")
    train_path, _ = write_task_files(root, spec.run.seed, build.train_size, build.eval_size)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    eos = [tokenizer.eos_token_id]
    connect(spec.ray)
    for label, output_dir, recipe in missing:
        order = -1 if recipe["digits"] == "forward" else 1  # the task files hold the reversed answer
        examples = [(tokenizer(r["prompt"]).input_ids, tokenizer(r["answer"][::order]).input_ids + eos) for r in rows]
        init_dir = save_random_model(tokenizer, recipe["layers"], root / f"init-{label}", seed=spec.run.seed)
        _train_by_sft(spec, init_dir, output_dir, examples, recipe["steps"], recipe["lr"], label)
        (output_dir / "build.json").write_text(json.dumps(recipe, indent=2))
