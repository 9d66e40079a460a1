"""Checks that run on the driver before any worker starts: model directories, tokenizers, data
(data/run_inputs.py loads a run's inputs and calls them).

Everything here is cheap (configs, tokenizer files, prompt files), so a bad path or a
teacher/student vocabulary mismatch is reported in seconds, not after engines have loaded.
"""

from __future__ import annotations

from pathlib import Path

from opd_ray.console import console
from opd_ray.data.prompts import PromptSet
from opd_ray.data.verifiers import GuardedVerifier, check_verifier
from opd_ray.errors import UserError
from opd_ray.spec import EngineSpec, ExperimentSpec, ModelSpec


def check_model_dir(model: ModelSpec, field: str) -> None:
    path = Path(model.path)
    if not path.is_dir():
        raise UserError(f"{field}.path: model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{field}.path: {path} has no config.json (not a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{field}.path: {path} has no *.safetensors weights (only safetensors are loaded)")
    check_causal_lm(model, field)


def check_causal_lm(model: ModelSpec, field: str) -> None:
    """Every role loads its model as a causal language model (AutoModelForCausalLM, vLLM's generator): a folder
    of another kind (an encoder, a vision model, a sequence-to-sequence model) is refused here, not by an actor
    minutes later."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{field}.path: cannot read config.json in {model.path}: {reason}") from None
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    if model.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    raise UserError(
        f"{field}.path: {model.path} holds a {config.model_type!r} model ({architectures}), which transformers cannot "
        "load as a causal language model (AutoModelForCausalLM): opd-ray trains and scores causal LMs only"
    )


def load_tokenizer(model: ModelSpec, field: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unreadable tokenizers
        raise UserError(f"{field}.path: cannot load a tokenizer from {model.path}: {exc}") from None


def text_config(model: ModelSpec, field: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:
        raise UserError(f"{field}.path: cannot read config.json in {model.path}: {exc}") from None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_lora_targets(spec: ExperimentSpec) -> None:
    """learner.lora.target_modules must name modules the student has (peft would stop the learners with a
    traceback once the engines are up): the student is built on the meta device, without its weights."""
    lora = spec.learner.lora
    if lora is None or not isinstance(lora.target_modules, list):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    student = spec.models.student
    config = AutoConfig.from_pretrained(student.path, trust_remote_code=student.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=student.trust_remote_code)
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())})
        raise UserError(
            f"learner.lora.target_modules: the student has no module named {unknown}; its layers' modules are "
            f"{', '.join(leaves)} (or use all-linear)"
        )


def vocab_size(model: ModelSpec, field: str) -> int:
    return int(text_config(model, field).vocab_size)


DTYPE_BYTES = {"float32": 4, "auto": 4, "bfloat16": 2, "float16": 2}  # auto: float32 is the larger case


def check_engine_fits_model(model: ModelSpec, engine: EngineSpec, field: str, model_field: str) -> None:
    """What vLLM would otherwise refuse minutes later, after loading weights, with a long traceback: a
    context longer than the model's positions, or a KV cache that cannot hold one full sequence."""
    config = text_config(model, model_field)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and engine.max_model_len > positions:
        raise UserError(
            f"{field}.max_model_len ({engine.max_model_len}) exceeds {model_field}'s max_position_embeddings "
            f"({positions})"
        )
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * DTYPE_BYTES[model.dtype]
    needed_gib = engine.max_model_len * per_token / 2**30
    if engine.kv_cache_gib < needed_gib:
        raise UserError(
            f"{field}.kv_cache_gib ({engine.kv_cache_gib}) cannot hold one {engine.max_model_len}-token sequence of "
            f"{model_field} ({per_token} bytes a token): give it at least {needed_gib:.3f}"
        )


def check_same_vocabulary(
    student: ModelSpec,
    teacher: ModelSpec,
    student_tokenizer,
    teacher_tokenizer,
    teacher_field: str,
    cross_tokenizer: bool = False,
    settings: str = "teachers.teacher",
) -> None:
    """Per-token distillation compares distributions over the same token ids; a teacher whose vocabulary
    differs is refused unless its settings (`settings`, where they live in the spec) say `cross_tokenizer: true`."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        if cross_tokenizer:
            return
        only_student = len(set(student_vocab.items()) - set(teacher_vocab.items()))
        only_teacher = len(set(teacher_vocab.items()) - set(student_vocab.items()))
        raise UserError(
            f"{teacher_field}: student and teacher tokenizers differ "
            f"({len(student_vocab)} vs {len(teacher_vocab)} tokens; {only_student} ids only in the student's, "
            f"{only_teacher} only in the teacher's): set {settings}.cross_tokenizer: true to score the student's "
            "text with the teacher's own tokenizer, aligned by bytes (docs/methods/cross-tokenizer.md)"
        )
    student_rows = vocab_size(student, "models.student")
    teacher_rows = vocab_size(teacher, teacher_field)
    if student_rows != teacher_rows and not cross_tokenizer:
        raise UserError(
            f"{teacher_field}: student vocab_size {student_rows} != teacher vocab_size {teacher_rows} in config.json "
            f"(the tokenizers are the same: padding rows differ); set {settings}.cross_tokenizer: true and the "
            "teacher's ids past the student's tokenizer are dropped"
        )
    if cross_tokenizer and student_rows == teacher_rows:
        console.print(f"{teacher_field}: the same tokenizer as the student's; cross_tokenizer scoring is not needed")


def check_teacher(spec: ExperimentSpec, teacher: ModelSpec, field: str, student_tokenizer, name: str | None = None):
    """A teacher as pre-flight checks it (one of the spec's, or a candidate of `opd-ray probe --teacher`): its
    folder, its vocabulary against the student's, and, when an engine loads it, the engine's context and KV
    cache. `name`: the teacher whose settings it runs with (default: the spec's first). Returns its tokenizer."""
    name = name or next(iter(spec.teachers))
    settings = spec.teachers[name]
    check_model_dir(teacher, field)
    teacher_tokenizer = load_tokenizer(teacher, field)
    cross = settings.cross_tokenizer
    check_same_vocabulary(
        spec.models.student, teacher, student_tokenizer, teacher_tokenizer, field, cross, f"teachers.{name}"
    )
    if settings.backend_record.runs_an_engine or "teacher_generate" in spec.stages:
        check_engine_fits_model(teacher, settings.engine, f"teachers.{name}.engine", field)
    return teacher_tokenizer


def check_teachers(spec: ExperimentSpec, student_tokenizer) -> dict:
    """Every teacher of the spec, each against the student's vocabulary; name -> tokenizer. A `self` teacher
    is the student's own model, so only its engine is checked."""
    tokenizers = {}
    for name, settings in spec.teachers.items():
        model = spec.teacher_model(name)
        field = f"teachers.{name}.model"
        if settings.is_self:
            if settings.backend_record.runs_an_engine:
                check_engine_fits_model(model, settings.engine, f"teachers.{name}.engine", "models.student")
            tokenizers[name] = student_tokenizer
        else:
            tokenizers[name] = check_teacher(spec, model, field, student_tokenizer, name)
    return tokenizers


def cross_tokenizers(teacher_tokenizers: dict, student_tokenizer) -> dict:
    """The teachers whose vocabulary differs from the student's (allowed by their cross_tokenizer setting, or
    pre-flight stopped): name -> tokenizer. They read prompts in their own tokens (data/routing.py)."""
    student_vocab = student_tokenizer.get_vocab()
    return {name: t for name, t in teacher_tokenizers.items() if t.get_vocab() != student_vocab}


def check_own_chat_templates(spec: ExperimentSpec, own_tokenizers: dict) -> None:
    """A teacher that reads its own prompt in its own tokens through a chat template must have one (a base
    model has none: it reads a few-shot prompt without it)."""
    for name, tokenizer in own_tokenizers.items():
        wanted = spec.teachers[name].reads_chat_template(spec.data.use_chat_template)
        if wanted and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"teachers.{name}: the tokenizer of {spec.teacher_model(name).path} has no chat template, and this "
                f"teacher reads prompts in its own tokens; set teachers.{name}.use_chat_template: false (and a "
                "prompt_template in the format it was trained on)"
            )


def check_models(spec: ExperimentSpec) -> tuple[object, dict]:
    """The student's folder and tokenizer, and every teacher's against it: (student tokenizer, name -> tokenizer)."""
    check_model_dir(spec.models.student, "models.student")
    student_tokenizer = load_tokenizer(spec.models.student, "models.student")
    return student_tokenizer, check_teachers(spec, student_tokenizer)


def template_tokenizer(spec: ExperimentSpec, student_tokenizer, teacher_tokenizers: dict):
    """The tokenizer whose chat template builds the prompts (data.template_source); it must have one when
    data.use_chat_template is set. The vocabularies match (checked before), so the teacher's template
    tokenized by the teacher gives ids the student reads the same way."""
    first_name = next(iter(teacher_tokenizers))
    chosen = teacher_tokenizers[first_name] if spec.data.template_source == "teacher" else student_tokenizer
    if spec.data.use_chat_template and not getattr(chosen, "chat_template", None):
        owner, path = ("models.student", spec.models.student.path)
        if spec.data.template_source == "teacher":
            owner, path = f"teachers.{first_name}.model", spec.teacher_model(first_name).path
        raise UserError(
            f"data.use_chat_template: the tokenizer of {owner} ({path}) has no chat template; set "
            "data.template_source to the model that has one, or use data.prompt_template"
        )
    return chosen


def check_answers(spec: ExperimentSpec, train: PromptSet, evaluation: PromptSet | None) -> None:
    """Every setting that reads the dataset's reference answers finds one on every row it reads."""
    algorithm = spec.algorithm
    needs_answers = {
        f"algorithm.objective={algorithm.objective}": algorithm.record.trains_on_answers,
        "algorithm.student_data_fraction < 1": algorithm.student_data_fraction < 1,
        "algorithm.task_reward_coef > 0": algorithm.task_reward_coef > 0,
        "cold_start.teacher_generate.require_correct": spec.cold_start is not None
        and "teacher_generate" in spec.stages
        and spec.cold_start.teacher_generate.require_correct,
    }
    for reason, needed in needs_answers.items():
        if needed and any(a is None for a in train.answers):
            raise UserError(f"{reason} needs a reference answer on every row of {train.source}")
    if spec.cold_start is not None and "teacher_generate" in spec.stages:
        wanted = spec.cold_start.teacher_generate.prompts
        if "opd" in spec.stages and wanted >= len(train):
            raise UserError(
                f"cold_start.teacher_generate.prompts ({wanted}) leaves no prompts for OPD: "
                f"{train.source} has {len(train)} rows"
            )
    if evaluation is not None and any(a is None for a in evaluation.answers):
        raise UserError(f"data.eval: every row of {evaluation.source} needs a reference answer for the verifier")


def check_loaded(
    spec: ExperimentSpec, train: PromptSet, evaluation: PromptSet | None, verifier: GuardedVerifier, vocabulary: int
) -> None:
    """What needs the loaded prompts: answers, lengths against every engine, top-k against the vocabulary,
    LoRA targets, and the verifier on one reference answer."""
    check_answers(spec, train, evaluation)
    check_engine_fits_model(spec.models.student, spec.rollout.engine, "rollout.engine", "models.student")
    check_lora_targets(spec)
    check_prompts_fit(spec, train, "data.train")
    if evaluation is not None:
        check_prompts_fit(spec, evaluation, "data.eval")
    check_top_k_fits_vocabulary(spec, vocabulary)
    reference = next((a for a in [*train.answers, *(evaluation.answers if evaluation else [])] if a is not None), None)
    if reference is not None:
        check_verifier(verifier, reference)


def check_prompts_fit(spec: ExperimentSpec, prompts: PromptSet, section: str) -> None:
    """The longest prompt of a file plus rollout.max_new_tokens must fit the rollout engine's context, and the
    longest prompt each teacher reads (its own, when it has a prompt_template) that teacher's."""
    new_tokens = spec.rollout.max_new_tokens + 1
    reads = {"rollout.engine": (spec.rollout.engine, [len(p) for p in prompts.prompt_ids])}
    teachers = spec.teachers
    rows_of = prompts.rows_by_teacher(list(range(len(prompts))), default=next(iter(teachers)))
    for name, settings in teachers.items():
        rows = rows_of.get(name, [])
        own = prompts.teacher_prompt_ids
        lengths = [len(own[i] if own is not None and own[i] is not None else prompts.prompt_ids[i]) for i in rows]
        reads[f"teachers.{name}.engine"] = (settings.engine, lengths)
    for field, (engine, lengths) in reads.items():
        if lengths and max(lengths) + new_tokens > engine.max_model_len:
            raise UserError(
                f"{field}.max_model_len ({engine.max_model_len}) is shorter than the longest prompt of {section} "
                f"it reads plus rollout.max_new_tokens ({max(lengths) + new_tokens})"
            )


def warn_idle_teachers(routing, train: PromptSet) -> None:
    """A teacher no training row routes to would hold its resources for nothing."""
    idle = sorted(set(routing.names) - set(train.teachers or []))
    if idle:
        console.print(f"[yellow]teachers {', '.join(idle)}: no training row is routed to them[/]")


def check_top_k_fits_vocabulary(spec: ExperimentSpec, vocabulary: int) -> None:
    """A top-k larger than the vocabulary has no meaning (and vLLM would fail on it at the first step)."""
    ks = {f"teachers.{name}.top_k": t.top_k for name, t in spec.teachers.items()}
    ks["algorithm.top_k"] = spec.algorithm.top_k
    if spec.diagnostics.enabled:
        ks["diagnostics.top_k"] = spec.diagnostics.top_k
    for field, k in ks.items():
        if k is not None and k > vocabulary:
            raise UserError(f"{field} ({k}) exceeds the vocabulary of models.student ({vocabulary} tokens)")
