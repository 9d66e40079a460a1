"""The roles' sections: rollout workers, teachers (one or several, by name), the learner; engines and resources."""

from __future__ import annotations

import re
from typing import Any, Literal

from omegaconf import OmegaConf
from pydantic import BaseModel, Field, field_validator, model_validator

from opd_ray.spec.base import Section, template_fields
from opd_ray.spec.models import ModelSpec
from opd_ray.spec.teacher_backends import TEACHER_BACKEND_RECORDS, TeacherBackendRecord, automatic_backend


class EngineSpec(Section):
    """vLLM engine settings shared by rollout workers and teacher replicas."""

    kv_cache_gib: float = Field(1.0, gt=0)
    """vLLM's KV cache on CPUs (GiB)"""
    max_model_len: int = Field(512, ge=8)
    """the longest prompt + answer the engine holds"""
    enforce_eager: bool = True
    """no CUDA graphs (start-up seconds saved; GPUs may prefer false)"""
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    """vLLM's share of the GPU's memory on GPUs"""
    max_logprobs: int = Field(32, ge=1)
    """the most top-k log-probs the engine may return (teacher.top_k and the student's top-k fit in it)"""


Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
RoleName = Literal["rollout", "teacher", "learner"]


class ResourcesSpec(Section):
    """What one actor of a role asks Ray for; a role's actors are reserved together as one placement group."""

    num_cpus: float = Field(0.5, ge=0)
    """logical CPUs each actor of the role reserves"""
    num_gpus: float = Field(0, ge=0)
    """GPUs each actor of the role reserves (fractions share a GPU)"""
    strategy: Strategy = Field(
        "PACK",
        description="how the role's placement group spreads its actors over nodes: PACK (few nodes), SPREAD "
        "(many), STRICT_PACK (one node), STRICT_SPREAD (one node each)",
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources, e.g. {teacher_node: 1} to put a role on nodes started with "
        "--resources '{\"teacher_node\": 8}'",
    )

    @field_validator("custom")
    @classmethod
    def _amounts_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = {name: amount for name, amount in value.items() if amount < 0}
        if negative:
            raise ValueError(f"negative amounts {negative}")
        return value

    def actor_options(self) -> dict:
        """The resource part of `ActorClass.options(...)`."""
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.custom:
            options["resources"] = dict(self.custom)
        return options

    def demand(self) -> dict[str, float]:
        """In Ray's resource names, as `ray.cluster_resources()` reports them."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}


class RolloutSpec(Section):
    num_workers: int = Field(1, ge=1)
    """vLLM rollout workers sampling the student"""
    samples_per_prompt: int = Field(
        1, ge=1, description="samples of each prompt per step; unset, it follows the objective (sampled_token: 4)"
    )
    temperature: float = Field(1.0, gt=0)
    """the student's sampling temperature (the learner divides its logits by it too)"""
    top_p: float = Field(1.0, gt=0, le=1)
    """nucleus sampling of the student's rollouts"""
    max_new_tokens: int = Field(64, ge=1)
    """the longest answer a sample may have; a longer one is cut off (cut_off_share)"""
    engine: EngineSpec = EngineSpec()
    resources: ResourcesSpec = ResourcesSpec()


class TeacherSpec(Section):
    backend: str = Field(
        "auto",
        description="a teacher backend (spec/teacher_backends.py: vllm, transformers as shipped); auto = vllm where "
        "the replica has GPUs (resources.num_gpus > 0), transformers on CPUs, where it scored 1.5x faster "
        "(benchmarks/RESULTS.md: teacher_scoring). transformers also scores requested ids (the student's top-k)",
    )
    num_replicas: int = Field(1, ge=1)
    """teacher replicas scoring in parallel (each takes the next free shard)"""
    top_k: int = Field(16, ge=1)
    """log-probs of the teacher's top-k tokens returned at every position"""
    chunk_tokens: int = Field(2048, ge=1, description="transformers: tokens per logits chunk")
    share_prompts: bool = Field(
        True,
        description="transformers: with rollout.samples_per_prompt > 1, run each prompt once and its samples "
        "on top of its KV cache (vLLM recomputes prompts whenever prompt log-probs are asked for)",
    )
    pack_sequences: bool = Field(
        True,
        description="transformers: score the batch's rows packed end to end instead of padded to the longest "
        "(as learner.pack_sequences)",
    )
    cross_tokenizer: bool = Field(
        False,
        description="the teacher's tokenizer differs from the student's: it scores the student's text in its own "
        "tokens, aligned back to the student's by bytes (docs/methods/cross-tokenizer.md)",
    )
    engine: EngineSpec = EngineSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="before")
    @classmethod
    def _auto_backend(cls, data: Any) -> Any:
        """The backend is chosen once, here: everything after validation (and spec.yaml) sees vllm or transformers."""
        if not isinstance(data, dict) or data.get("backend", "auto") != "auto":
            return data
        resources = data.get("resources") or {}
        gpus = resources.get("num_gpus", 0) if isinstance(resources, dict) else getattr(resources, "num_gpus", 0)
        on_gpus = isinstance(gpus, int | float) and gpus > 0
        return {**data, "backend": automatic_backend(on_gpus)}

    @field_validator("backend")
    @classmethod
    def _a_registered_backend(cls, backend: str) -> str:
        if backend not in TEACHER_BACKEND_RECORDS:
            known = ", ".join(["auto", *TEACHER_BACKEND_RECORDS])
            raise ValueError(f"{backend!r} is not a teacher backend; the backends are {known}")
        return backend

    @property
    def backend_record(self) -> TeacherBackendRecord:
        return TEACHER_BACKEND_RECORDS[self.backend]

    @model_validator(mode="after")
    def _top_k_fits_engine(self) -> TeacherSpec:
        if self.top_k > self.engine.max_logprobs:
            raise ValueError(
                f"teacher.top_k ({self.top_k}) exceeds teacher.engine.max_logprobs "
                f"({self.engine.max_logprobs}); raise max_logprobs or lower top_k"
            )
        return self


class NamedTeacherSpec(TeacherSpec):
    """One of several teachers under `teachers:`, by name: its model, how it runs, what its tokens weigh, and
    the prompt it reads. `model: self` is the student scoring its own samples (on-policy self-distillation),
    usually shown privileged context through `prompt_template`."""

    model: ModelSpec | Literal["self"]
    weights: Literal["frozen", "current"] = Field(
        "frozen",
        description="model self: the student's initial weights (frozen), or its current ones (every weight sync "
        "reaches this teacher too)",
    )
    coef: float = Field(1.0, gt=0, description="weight of this teacher's tokens in the loss")
    prompt_template: str | None = Field(
        None,
        description="the prompt this teacher reads, built from the row: {prompt}, {answer} or any other field; "
        "the response it scores is the student's. null = the student's prompt",
    )
    use_chat_template: bool | None = Field(
        None,
        description="this teacher's own prompt (its prompt_template, or any prompt in another vocabulary) through "
        "its tokenizer's chat template; false for a base model read with a few-shot prompt; "
        "null = data.use_chat_template",
    )
    answer_stop: list[str] = Field(
        default_factory=list,
        description="text that ends this teacher's own answer, in evaluation and (another vocabulary) in stage "
        "teacher_generate: a base model prompted few-shot writes a newline after its answer, then the next "
        'question; ["\\n"] takes the text before it as a finished answer',
    )

    @property
    def is_self(self) -> bool:
        return self.model == "self"

    def reads_chat_template(self, data_default: bool) -> bool:
        """Whether this teacher's own prompt goes through a chat template: its setting, else data.use_chat_template."""
        return data_default if self.use_chat_template is None else self.use_chat_template

    @model_validator(mode="after")
    def _current_weights_are_the_students(self) -> NamedTeacherSpec:
        if self.weights == "current" and not self.is_self:
            raise ValueError("weights: current is for model: self (the student's own, synced weights)")
        if self.prompt_template is not None:
            template_fields(self.prompt_template, "prompt_template")
        if any(not stop for stop in self.answer_stop):
            raise ValueError("answer_stop: an empty string would end every answer before its first character")
        return self


TEACHER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # names become metric keys: teacher/<name>/loss
SHORTHAND_TEACHER = "teacher"  # the name the one-teacher shorthand's teacher gets under teachers:


def expand_one_teacher_shorthand(data: dict[str, Any]) -> dict[str, Any]:
    """The raw spec with models.teacher and the `teacher:` section moved to teachers.teacher (its model and
    settings); a spec with `teachers:` is returned as it is, and one with both spellings refused, except
    `teachers.teacher.<setting>` beside the shorthand: the same teacher's address (an override, or what an
    error message names), merged in."""
    models = data.get("models")
    teacher_model = models.get("teacher") if isinstance(models, dict) else None
    settings = data.get("teacher")
    if isinstance(settings, BaseModel):
        settings = settings.model_dump(exclude_unset=True)
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"teacher: a mapping of the teacher's settings is needed here (got {settings!r})")
    teachers = data.get("teachers")
    if teachers is not None:
        addressed = isinstance(teachers, dict) and set(teachers) == {SHORTHAND_TEACHER}
        if teacher_model is not None and addressed and "model" not in (teachers[SHORTHAND_TEACHER] or {}):
            settings = OmegaConf.to_container(OmegaConf.merge(settings or {}, teachers[SHORTHAND_TEACHER] or {}))
        elif teacher_model is not None or settings is not None:
            raise ValueError(
                "teachers: replaces models.teacher and the teacher: section (the one-teacher shorthand); "
                "give each teacher its model and settings under teachers:"
            )
        else:
            return data
    if teacher_model is None:
        raise ValueError("models.teacher (one teacher) or teachers (several, by name) is required")
    rest = {key: value for key, value in data.items() if key != "teacher"}
    models = {key: value for key, value in models.items() if key != "teacher"}
    return {**rest, "models": models, "teachers": {SHORTHAND_TEACHER: {**(settings or {}), "model": teacher_model}}}


# Responses at least this long turn on the learner's activation checkpointing by default: from
# there a model's per-layer activations outgrow its weights and optimizer state (measured on an H200,
# benchmarks/RESULTS.md).
LONG_RESPONSE_TOKENS = 512


class LoraSpec(Section):
    """Low-rank adapters (peft) on the student: only they train and hold optimizer state."""

    rank: int = Field(8, ge=1)
    """the adapters' rank"""
    alpha: float = Field(16.0, gt=0, description="the adapters' output is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    """dropout on the adapters' input"""
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="module names to adapt (q_proj, v_proj, ...), or every linear layer but the head; the student's "
        "module names are checked before anything starts",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("learner.lora.target_modules is empty: name the modules to adapt, or all-linear")
        return value


class LearnerSpec(Section):
    num_ranks: int = Field(2, ge=1)
    """DeepSpeed learner processes (data parallel)"""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + weights sharded"""
    lr: float = Field(1e-6, gt=0)
    """the learners' peak learning rate (AdamW)"""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant, or cosine decay to min_lr_ratio x lr over trainer.steps"""
    warmup_steps: int = Field(0, ge=0)
    """linear warm-up steps before the schedule"""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """cosine: the final learning rate as a share of lr"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's weight decay"""
    grad_clip: float = Field(1.0, gt=0)
    """clip the global gradient norm to this"""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """the learners' torch.distributed backend; auto = nccl on GPUs, gloo on CPUs"""
    chunk_tokens: int = Field(
        4096, ge=1, description="response tokens per logits chunk: bounds the N x |V| memory of every loss"
    )
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")
    pack_sequences: bool = Field(
        True,
        description="the student's forward runs the step's rows packed end to end (position ids restarting per "
        "sequence, no padding computed) instead of padded to the longest; false for a model whose code ignores "
        "position_ids (some trust_remote_code models)",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="activation checkpointing of every decoder layer: keeps one layer's activations instead of "
        f"all (70 -> 10.5 GiB at 4 x 8192 tokens of a 0.6B model) for ~20% more compute; null = on when "
        f"rollout.max_new_tokens >= {LONG_RESPONSE_TOKENS}",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto = flash_attention_2 on CUDA when flash-attn is installed, else sdpa"
    )
    lora: LoraSpec | None = Field(
        None, description="train low-rank adapters instead of every weight; rollouts get the merged weights"
    )
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _lora_under_zero_two(self) -> LearnerSpec:
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("learner.lora: adapters train under zero_stage 0-2 (the frozen base is not partitioned)")
        return self

    @field_validator("deepspeed")
    @classmethod
    def _spec_owned_keys_stay_in_the_spec(cls, value: dict[str, Any]) -> dict[str, Any]:
        for dotted, owner in DEEPSPEED_KEYS_OWNED_BY_SPEC.items():
            section: Any = value
            for part in dotted.split("."):
                section = section.get(part) if isinstance(section, dict) else None
            if section is not None:
                raise ValueError(f"learner.deepspeed.{dotted} is set by the spec: use {owner} instead")
        return value


# DeepSpeed settings the spec derives from its own keys; learner.deepspeed may add to the rest.
DEEPSPEED_KEYS_OWNED_BY_SPEC = {
    "zero_optimization.stage": "learner.zero_stage",
    "train_micro_batch_size_per_gpu": "trainer.prompts_per_step (split across learner.num_ranks)",
    "train_batch_size": "trainer.prompts_per_step x rollout.samples_per_prompt",
    "gradient_accumulation_steps": "trainer.prompts_per_step (one update a step)",
    "gradient_clipping": "learner.grad_clip",
    "bf16": "models.student.dtype",
    "fp16": "models.student.dtype",
    "optimizer": "learner.lr / learner.weight_decay (opd-ray builds the optimizer)",
    "scheduler": "learner.lr_schedule / learner.warmup_steps",
}
