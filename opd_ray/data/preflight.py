"""Checks that run on the driver before any worker starts: model directories, tokenizers, data.

Everything here is cheap (configs, tokenizer files, prompt files), so a bad path or a
teacher/student vocabulary mismatch is reported in seconds, not after engines have loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opd_ray.data.prompts import PromptSet, load_prompts, load_selected_prompts
from opd_ray.data.verifiers import Verifier, resolve_verifier
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec, ModelSpec


@dataclass
class Prepared:
    tokenizer: object
    train: PromptSet
    eval: PromptSet | None
    verifier: Verifier
    selection: dict | None = None  # what data.selection kept, dropped and mixed in


def check_model_dir(model: ModelSpec, field: str) -> None:
    path = Path(model.path)
    if not path.is_dir():
        raise UserError(f"{field}.path: model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{field}.path: {path} has no config.json (not a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{field}.path: {path} has no *.safetensors weights (only safetensors are loaded)")


def load_tokenizer(model: ModelSpec, field: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unreadable tokenizers
        raise UserError(f"{field}.path: cannot load a tokenizer from {model.path}: {exc}") from None


def vocab_size(model: ModelSpec, field: str) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:
        raise UserError(f"{field}.path: cannot read config.json in {model.path}: {exc}") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def check_same_vocabulary(spec: ExperimentSpec, student_tokenizer, teacher_tokenizer) -> None:
    """Per-token distillation compares distributions over the same token ids."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = len(set(student_vocab.items()) - set(teacher_vocab.items()))
        only_teacher = len(set(teacher_vocab.items()) - set(student_vocab.items()))
        raise UserError(
            "models: student and teacher tokenizers differ "
            f"({len(student_vocab)} vs {len(teacher_vocab)} tokens; {only_student} ids only in the student's, "
            f"{only_teacher} only in the teacher's): token-level distillation needs one vocabulary"
        )
    student_rows = vocab_size(spec.models.student, "models.student")
    teacher_rows = vocab_size(spec.models.teacher, "models.teacher")
    if student_rows != teacher_rows:
        raise UserError(
            f"models: student vocab_size {student_rows} != teacher vocab_size {teacher_rows} in config.json"
        )


def prepare(spec: ExperimentSpec) -> Prepared:
    check_model_dir(spec.models.student, "models.student")
    check_model_dir(spec.models.teacher, "models.teacher")
    student_tokenizer = load_tokenizer(spec.models.student, "models.student")
    teacher_tokenizer = load_tokenizer(spec.models.teacher, "models.teacher")
    check_same_vocabulary(spec, student_tokenizer, teacher_tokenizer)
    verifier = resolve_verifier(spec.data.verifier)
    # The vocabularies match (checked above), so the teacher's template tokenized by the teacher
    # gives ids the student reads the same way.
    template_tokenizer = teacher_tokenizer if spec.data.template_source == "teacher" else student_tokenizer
    if spec.data.use_chat_template and not getattr(template_tokenizer, "chat_template", None):
        owner = spec.data.template_source
        path = getattr(spec.models, owner).path
        raise UserError(
            f"data.use_chat_template: the tokenizer of models.{owner} ({path}) has no chat template; set "
            "data.template_source to the model that has one, or use data.prompt_template"
        )
    selection = None
    if spec.data.selection is not None:
        train, selection = load_selected_prompts(spec.data, template_tokenizer, spec.run.seed)
    else:
        train = load_prompts(spec.data.train, spec.data, template_tokenizer, "data.train")
    evaluation = load_prompts(spec.data.eval, spec.data, template_tokenizer, "data.eval") if spec.data.eval else None
    algorithm = spec.algorithm
    needs_answers = {
        "algorithm.objective=sft": algorithm.objective == "sft",
        "algorithm.student_data_fraction < 1": algorithm.student_data_fraction < 1,
        "algorithm.task_reward_coef > 0": algorithm.task_reward_coef > 0,
        "cold_start.teacher_generate.require_correct": spec.cold_start is not None
        and "teacher_generate" in spec.stages
        and spec.cold_start.teacher_generate.require_correct,
    }
    for reason, needed in needs_answers.items():
        if needed and any(a is None for a in train.answers):
            raise UserError(f"{reason} needs a reference answer on every row of {spec.data.train.path}")
    if spec.cold_start is not None and "teacher_generate" in spec.stages:
        wanted = spec.cold_start.teacher_generate.prompts
        if "opd" in spec.stages and wanted >= len(train):
            raise UserError(
                f"cold_start.teacher_generate.prompts ({wanted}) leaves no prompts for OPD: "
                f"{spec.data.train.path} has {len(train)} rows"
            )
    if evaluation is not None and any(a is None for a in evaluation.answers):
        raise UserError(f"data.eval: every row of {spec.data.eval.path} needs a reference answer for the verifier")
    longest = max(len(p) for p in train.prompt_ids) + spec.rollout.max_new_tokens + 1
    for field, engine in (("rollout.engine", spec.rollout.engine), ("teacher.engine", spec.teacher.engine)):
        if longest > engine.max_model_len:
            raise UserError(
                f"{field}.max_model_len ({engine.max_model_len}) is shorter than the longest prompt plus "
                f"rollout.max_new_tokens ({longest})"
            )
    return Prepared(student_tokenizer, train, evaluation, verifier, selection)
