"""The sections of an experiment spec: pydantic models with types, ranges and descriptions.

Every section refuses unknown keys, so a typo costs seconds instead of a cluster allocation;
the validators at the end check what involves several sections at once.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    """strict: `steps: true` is not 1 and `lr: "1e-3"` is not a number (YAML already types both);
    no inf/nan anywhere: an infinite lr or temperature would only show up as a NaN loss much later."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RunSpec(Section):
    name: str = "opd"
    output_dir: str = "runs/opd"
    seed: int = 0


class ModelSpec(Section):
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto = bfloat16 on a GPU with bf16, float32 elsewhere (CPUs without bf16 units run it "
        "through slow generic kernels)",
    )
    trust_remote_code: bool = False


class TinyModelsSpec(Section):
    """Builds the synthetic task, its tokenizer and a trained teacher/student if missing."""

    directory: str
    teacher_layers: int = Field(4, ge=1)
    student_layers: int = Field(2, ge=1)
    teacher_sft_steps: int = Field(1500, ge=0)
    teacher_sft_lr: float = Field(
        2e-3, gt=0, description="at 1e-3 the 4-layer teacher's loss plateaus for ~1300 steps; at 2e-3 for ~400"
    )
    teacher_digits: Literal["reversed", "forward"] = Field(
        "reversed",
        description="the order the teacher learns to write the sum's digits; the student always learns reversed",
    )
    student_sft_steps: int = Field(600, ge=0)
    student_sft_lr: float = Field(1e-3, gt=0)
    tasks: dict[str, Literal["sums", "three_sums", "mixed"]] = Field(
        default_factory=dict,
        description="what a model folder (its name inside `directory`) is trained on: sums (a+b, the default), "
        "three_sums (a+b+c) or mixed (both, from mixed_train.jsonl, which is written when any is named)",
    )
    sft_steps: dict[str, int] = Field(
        default_factory=dict, description="a model folder -> its SFT steps, instead of teacher/student_sft_steps"
    )
    tokenizers: dict[str, Literal["chars", "digit_pairs", "reordered_chars"]] = Field(
        default_factory=dict,
        description="a model folder -> its tokenizer: chars (one token a character, the default), digit_pairs "
        "(pairs of digits merged into one token, other ids in another order) or reordered_chars (characters under "
        "other ids, with extra tokens): students for cross-tokenizer runs",
    )
    sft_batch_size: int = Field(128, ge=1)
    train_size: int = Field(20000, ge=1)
    eval_size: int = Field(500, ge=1)


def parse_layer_list(value: Any) -> Any:
    """`"0-21,28,29"` -> [0, 1, ..., 21, 28, 29]; a list passes through (pydantic checks its items)."""
    if not isinstance(value, str):
        return value
    layers: list[int] = []
    for part in value.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{value!r}: write layer indices as a list or as ranges like '0-21,28,29'")
        if dash and int(last) < int(first):
            raise ValueError(f"{value!r}: the range {part} runs backwards; write it as {last}-{first}")
        layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    return layers


def check_distinct_layers(layers: list[int]) -> list[int]:
    """A layer kept twice would share its weights between two places of the pruned model."""
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are listed more than once; each source layer can be kept once")
    return layers


class ImportedModelsSpec(Section):
    """A pretrained teacher imported from a GGUF file or a transformers folder, and a layer-pruned copy of it
    as the student; built once into `directory` (see opd_ray/recipe/real_models.py)."""

    source: str = Field(
        ..., description="a .gguf file or a model folder; package:<module>/<file> = a file inside an installed package"
    )
    directory: str
    student_layers: list[int] = Field(
        ..., min_length=1, description="the source's decoder layers the student keeps, e.g. '0-21,28,29'"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("student_layers", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> Any:
        try:
            return parse_layer_list(value)
        except ValueError as exc:
            raise ValueError(f"models.import_pretrained.student_layers: {exc}") from None

    @field_validator("student_layers")
    @classmethod
    def _each_layer_once(cls, value: list[int]) -> list[int]:
        try:
            return check_distinct_layers(value)
        except ValueError as exc:
            raise ValueError(f"models.import_pretrained.student_layers: {exc}") from None


class ModelsSpec(Section):
    student: ModelSpec
    teacher: ModelSpec | None = Field(None, description="the one teacher; several go under `teachers:` instead")
    build_tiny: TinyModelsSpec | None = None
    import_pretrained: ImportedModelsSpec | None = None


class DatasetSpec(Section):
    path: str
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    limit: int | None = Field(None, ge=1)
    teacher: str | None = Field(
        None, description="with several teachers: the one that scores every row of this file (wins over data.route)"
    )


class RouteSpec(Section):
    """Which teacher scores a row, by the value of one of its fields (e.g. a `domain` column)."""

    field: str
    teachers: dict[str, str] = Field(..., min_length=1, description="field value -> teacher name")
    default: str | None = Field(None, description="the teacher of a value not listed; null = such a row is an error")


class PromptSelectionSpec(Section):
    """Training prompts cleaned and mixed before any is sampled (the paper's teacher-aligned prompts)."""

    reference: list[DatasetSpec] = Field(
        default_factory=list, description="prompts to keep out of training (benchmarks); data.eval is always added"
    )
    near_duplicate_jaccard: float | None = Field(
        0.8,
        gt=0,
        le=1,
        description="drop prompts whose character 5-gram Jaccard to a kept or reference one "
        "reaches this (MinHash estimate); null = exact duplicates only",
    )
    outside: DatasetSpec | None = Field(None, description="prompts from outside the teacher's distribution")
    outside_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the training prompts taken from `outside` (against entropy collapse)"
    )
    keep_top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="score every (non-outside) prompt by the teacher's mean log-prob of a student sample and "
        "train on this best fraction; null = no scoring",
    )

    @model_validator(mode="after")
    def _outside_needs_prompts(self) -> PromptSelectionSpec:
        if self.outside_fraction > 0 and self.outside is None:
            raise ValueError("data.selection.outside_fraction > 0 needs data.selection.outside (a prompt file)")
        return self


class DataSpec(Section):
    train: DatasetSpec | list[DatasetSpec] = Field(
        ..., description="one prompt file, or several (each may name its teacher)"
    )
    eval: DatasetSpec | list[DatasetSpec] | None = None
    route: RouteSpec | None = Field(None, description="several teachers: which one scores a row, by a data field")
    prompt_template: str = "{prompt}"
    use_chat_template: bool = False
    template_source: Literal["student", "teacher"] = Field(
        "student", description="whose tokenizer's chat template wraps the prompts; teacher = teacher-aligned prompts"
    )
    selection: PromptSelectionSpec | None = Field(None, description="dedup and mixing of the training prompts")
    verifier: str = Field("exact", description="exact | final_number | boxed | module:function")
    max_prompt_tokens: int = Field(256, ge=1)

    verifier_errors: Literal["count_wrong", "raise"] = Field(
        "count_wrong",
        description="a user verifier that raises during a run: count_wrong = report it (verifier, response, row) "
        "and score the sample as wrong; raise = stop the run",
    )

    @property
    def train_files(self) -> list[DatasetSpec]:
        return self.train if isinstance(self.train, list) else [self.train]

    @property
    def eval_files(self) -> list[DatasetSpec]:
        return [] if self.eval is None else self.eval if isinstance(self.eval, list) else [self.eval]

    @model_validator(mode="after")
    def _files_given(self) -> DataSpec:
        if not self.train_files:
            raise ValueError("data.train: name at least one prompt file")
        if isinstance(self.eval, list) and not self.eval:
            raise ValueError("data.eval: name at least one prompt file, or leave data.eval out")
        return self

    @model_validator(mode="after")
    def _template_has_prompt(self) -> DataSpec:
        fields = template_fields(self.prompt_template, "data.prompt_template")
        if fields != {"prompt"}:
            unknown = sorted(fields - {"prompt"})
            what = f"unknown placeholder {{{unknown[0]}}}" if unknown else "no {prompt} placeholder"
            raise ValueError(
                f"data.prompt_template: {what}; the template may only use {{prompt}} "
                "(write a literal brace as {{ or }})"
            )
        return self


def template_fields(template: str, field: str) -> set[str]:
    """The {placeholders} of a prompt template; a stray brace is named with the spec field."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{field}: {exc} (write a literal brace as {{{{ or }}}})") from None


class EngineSpec(Section):
    """vLLM engine settings shared by rollout workers and teacher replicas."""

    kv_cache_gib: float = Field(1.0, gt=0)
    max_model_len: int = Field(512, ge=8)
    enforce_eager: bool = True
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    max_logprobs: int = Field(32, ge=1)


Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
RoleName = Literal["rollout", "teacher", "learner"]


class ResourcesSpec(Section):
    """What one actor of a role asks Ray for; a role's actors are reserved together as one placement group."""

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
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
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    engine: EngineSpec = EngineSpec()
    resources: ResourcesSpec = ResourcesSpec()


class TeacherSpec(Section):
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="transformers can also score requested ids (the student's top-k)"
    )
    num_replicas: int = Field(1, ge=1)
    top_k: int = Field(16, ge=1)
    chunk_tokens: int = Field(2048, ge=1, description="transformers: tokens per logits chunk")
    share_prompts: bool = Field(
        True,
        description="transformers: with rollout.samples_per_prompt > 1, run each prompt once and its samples "
        "on top of its KV cache (vLLM recomputes prompts whenever prompt log-probs are asked for)",
    )
    cross_tokenizer: bool = Field(
        False,
        description="the teacher's tokenizer differs from the student's: it scores the student's text in its own "
        "tokens, aligned back to the student's by bytes (README: A teacher with another tokenizer)",
    )
    engine: EngineSpec = EngineSpec()
    resources: ResourcesSpec = ResourcesSpec()

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

    @property
    def is_self(self) -> bool:
        return self.model == "self"

    @model_validator(mode="after")
    def _current_weights_are_the_students(self) -> NamedTeacherSpec:
        if self.weights == "current" and not self.is_self:
            raise ValueError("weights: current is for model: self (the student's own, synced weights)")
        if self.prompt_template is not None:
            template_fields(self.prompt_template, "prompt_template")
        return self


TEACHER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # names become metric keys: teacher/<name>/loss


# Responses at least this long turn on the learner's activation checkpointing by default: from
# there a model's per-layer activations outgrow its weights and optimizer state (measured on an H200,
# benchmarks/RESULTS.md).
LONG_RESPONSE_TOKENS = 512


class LoraSpec(Section):
    """Low-rank adapters (peft) on the student: only they train and hold optimizer state."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0, description="the adapters' output is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
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
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(1e-6, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    chunk_tokens: int = Field(
        4096, ge=1, description="response tokens per logits chunk: bounds the N x |V| memory of every loss"
    )
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")
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


class EntropyGateSpec(Section):
    """SEAD-style token selection by teacher/student entropy percentiles (over this rank's response tokens).

    Gated tokens get zero gradient; the aggregation's denominator is unchanged.
    """

    mastered_percentile: float | None = Field(
        None, ge=0, le=100, description="skip tokens where both entropies are at or below this percentile"
    )
    teacher_uncertain_percentile: float | None = Field(
        None, ge=0, le=100, description="skip tokens where the teacher's entropy is at or above this percentile"
    )

    @property
    def enabled(self) -> bool:
        return self.mastered_percentile is not None or self.teacher_uncertain_percentile is not None


class AlgorithmSpec(Section):
    objective: Literal["sampled_token", "topk", "full_vocab", "sft"] = Field(
        "topk",
        description="sampled_token = one-sample reverse KL as a dense reward; topk = analytic divergence on a "
        "top-k support; full_vocab = exact divergence against a teacher copy on each learner rank; "
        "sft = supervised on the dataset's reference answers (a control, no teacher)",
    )
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "forward_to_reverse"] = Field(
        "reverse_kl", description="topk / full_vocab: what is measured between student and teacher"
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="jsd: mixture beta*teacher + (1-beta)*student (TRL's)")
    anneal_steps: int = Field(0, ge=0, description="forward_to_reverse: cosine ramp length, in steps")
    top_k: int | None = Field(None, ge=1, description="topk: support size k; null = teacher.top_k")
    topk_support: Literal["student", "teacher", "intersection", "union"] = Field(
        "teacher",
        description="topk: whose top-k forms the support (student/intersection/union need "
        "teacher.backend=transformers)",
    )
    topk_tail: bool = Field(False, description="topk: add one bucket for the mass outside the support")
    clip_eps: float | None = Field(0.2, gt=0, description="PPO clip range of sampled_token; null = no clipping")
    discount: float = Field(0.0, ge=0, le=1, description="sampled_token credit: 0 = per-token reward, 1 = full return")
    standardize_rewards: bool = Field(False, description="sampled_token: zero-mean, unit-variance advantages per batch")
    baseline: Literal["none", "vopd"] = Field("none", description="sampled_token: vopd subtracts -KL(p||q) on top-k")
    position_gamma: float = Field(0.0, ge=0, description="sampled_token: IW-OPD position weights (paper: 0.5)")
    entropy_gate: EntropyGateSpec = EntropyGateSpec()
    task_reward_coef: float = Field(0.0, ge=0, description="weight of the verifier's reward (RL mixed in)")
    student_data_fraction: float = Field(
        1.0, ge=0, le=1, description="GKD lambda: share of steps on student samples; the rest on dataset answers"
    )
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    importance_cap: float | None = Field(
        None,
        gt=0,
        description="off-policy correction for samples from older weights (asynchronous mode): each token's "
        "loss is weighted by min(p_theta(y_t) / p_rollout(y_t), cap), detached; sampled_token caps its ratio. "
        "null = none",
    )

    @model_validator(mode="after")
    def _options_fit_objective(self) -> AlgorithmSpec:
        if self.baseline == "vopd" and (self.discount > 0 or self.standardize_rewards):
            raise ValueError(
                "algorithm.baseline=vopd is the expected per-token reward: use it with discount 0 "
                "and standardize_rewards false"
            )
        if self.divergence == "forward_to_reverse" and self.anneal_steps < 1:
            raise ValueError("algorithm.divergence=forward_to_reverse needs algorithm.anneal_steps >= 1")
        if self.student_data_fraction < 1 and not (
            self.objective == "full_vocab" or (self.objective == "topk" and self.topk_support == "teacher")
        ):
            raise ValueError(
                "algorithm.student_data_fraction < 1 trains on dataset answers, which have no rollout "
                "log-probs or student top-k: use objective full_vocab, or topk with topk_support=teacher"
            )
        return self

    @property
    def needs_student_topk(self) -> bool:
        return self.objective == "topk" and self.topk_support != "teacher"


class DiagnosticsSpec(Section):
    """Token-level diagnostics on every step's student rollouts (overlap@k, masses, entropies)."""

    enabled: bool = True
    top_k: int = Field(16, ge=1, description="k of overlap ratio@k; at most teacher.top_k")


class TimeoutsSpec(Section):
    """How long the driver waits on its actors before it names the one that is stuck (nothing waits forever)."""

    start_s: float = Field(
        900, gt=0, description="actors starting: models loaded, engines up, learner ranks joined, a restart back"
    )
    step_s: float = Field(
        1800,
        gt=0,
        description="one shard on one rollout worker or teacher (a stuck one is killed, restarted and its shard "
        "re-issued), one learner update, one evaluation call (stuck learners stop the run)",
    )
    sync_s: float = Field(600, gt=0, description="new weights reaching every rollout engine")
    checkpoint_s: float = Field(1800, gt=0, description="learners saving or loading a checkpoint or the final student")
    eval_s: float = Field(
        3600,
        gt=0,
        description="one actor's share of a greedy evaluation (a stuck one is killed, restarted and its share "
        "re-issued, at most trainer.max_actor_restarts times)",
    )
    build_wait_s: float = Field(
        3600, gt=0, description="another process building the models this spec uses in the shared model cache"
    )


ConditionName = Literal[
    "collapse", "entropy_explosion", "no_alignment", "teacher_broken", "reward_divergence", "grad_spike"
]
CONDITIONS: tuple[str, ...] = get_args(ConditionName)
# What the doctor needs to judge a condition (health/conditions.py): the diagnostics' signals, and enough steps
# for its "now" and "start" windows not to overlap (or, for no_alignment, health.alignment_steps).
CONDITIONS_FROM_DIAGNOSTICS = ("no_alignment", "entropy_explosion")
CONDITION_FIRST_STEP = {
    "collapse": lambda health: 2 * health.window,
    "entropy_explosion": lambda health: 2 * health.window,
    "reward_divergence": lambda health: 2 * health.window,
    "no_alignment": lambda health: health.alignment_steps,
}


class HealthSpec(Section):
    """The OPD doctor (opd_ray/health/): the thresholds of its named conditions. Each compares the mean of
    the last `window` steps ("now") with the mean of the first `window` trained steps ("start")."""

    enabled: bool = True
    window: int = Field(10, ge=1, description="steps averaged for 'now' and for 'the start'")
    collapse_repetitive_share: float = Field(
        0.5, gt=0, le=1, description="collapse: this share of responses repeat a 4-gram more than 3 times, ..."
    )
    collapse_cut_off_share: float = Field(
        0.9, gt=0, le=1, description="...or this share is cut off at the length limit while the entropy falls"
    )
    collapse_entropy_ratio: float = Field(
        0.5, gt=0, lt=1, description="collapse: student entropy now / at the start at or below this"
    )
    explosion_entropy_ratio: float = Field(
        1.5, gt=1, description="entropy_explosion: student entropy now / at the start at or above this"
    )
    alignment_steps: int = Field(
        50, ge=2, description="no_alignment is judged from this step on (the paper's signals need time to move)"
    )
    low_start_overlap: float = Field(
        0.6,
        ge=0,
        le=1,
        description="no_alignment: the run started below this overlap@k (probe.min_overlap's default: the paper's "
        "successful runs start ~0.7), ...",
    )
    min_overlap_rise: float = Field(0.02, ge=0, description="...and since then overlap@k rose less than this...")
    min_entropy_gap_narrowing: float = Field(
        0.1, ge=0, description="...and the entropy gap narrowing by less than this share of its start"
    )
    teacher_uniform_tolerance: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="teacher_broken: the teacher's log-probs of the sampled tokens within this relative distance "
        "of -ln|V| and spread by less than this share of ln|V| (a uniform teacher), ...",
    )
    teacher_min_logprob_std: float = Field(1e-3, ge=0, description="...or spread by less than this (constant)")
    reward_drop: float = Field(
        0.05, gt=0, le=1, description="reward_divergence: the sample reward fell this much below its start..."
    )
    kl_drop: float = Field(0.2, gt=0, lt=1, description="...while the sampled reverse KL fell by this share")
    grad_spike_factor: float = Field(
        10, gt=1, description="grad_spike: a step's gradient norm at least this many times the window's median"
    )


class TrainerSpec(Section):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(64, ge=1)
    weight_sync_interval: int = Field(1, ge=1)
    max_staleness: int = Field(
        0,
        ge=0,
        description="asynchronous mode: rollouts of up to this many later steps run while the learners "
        "train; 0 = synchronous, fully on-policy. The rollout buffer holds at most max_staleness + 1 launched steps",
    )
    prompts_per_shard: int | None = Field(
        None,
        ge=1,
        description="prompts in one unit of rollout/teacher work, handed to whichever actor is free; "
        "null = prompts_per_step / rollout.num_workers (one shard per worker)",
    )
    eval_every: int = Field(0, ge=0, description="0 = only before and after training")
    save_final: bool = True
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = none")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    max_actor_restarts: int = Field(3, ge=0, description="restarts of each rollout worker / teacher replica")
    max_bad_steps: int = Field(
        3, ge=1, description="consecutive steps with a non-finite loss (updates skipped) before the run stops"
    )
    timeouts: TimeoutsSpec = TimeoutsSpec()
    stop_on: list[ConditionName] = Field(
        default_factory=list,
        description="conditions of the OPD doctor (health) that stop the run when they fire, e.g. [collapse]",
    )

    def shard_size(self, num_workers: int) -> int:
        return self.prompts_per_shard or max(1, -(-self.prompts_per_step // num_workers))


StageName = Literal["teacher_generate", "sft", "opd"]
STAGE_ORDER: tuple[str, ...] = get_args(StageName)  # the order stages run in


# The repetition rule (opd_ray/data/repetition.py): the cold start's filter and the doctor's count.
REPEAT_NGRAM = 4
MAX_NGRAM_REPEATS = 3


class TeacherGenerationSpec(Section):
    """Stage teacher_generate: the teacher answers some training prompts, through a rollout engine."""

    prompts: int = Field(..., ge=1, description="training prompts the teacher answers; OPD trains on the rest")
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, description="null = rollout.max_new_tokens")
    drop_truncated: bool = Field(True, description="drop answers cut off by max_new_tokens")
    repeat_ngram: int = Field(REPEAT_NGRAM, ge=1, description="n of the repetition filter")
    max_ngram_repeats: int = Field(
        MAX_NGRAM_REPEATS, ge=1, description="drop an answer in which a repeat_ngram-gram occurs more often than this"
    )
    require_correct: bool = Field(False, description="drop answers the task verifier marks wrong (needs answers)")


class SftStageSpec(Section):
    """Stage sft: cross-entropy on the kept teacher answers' tokens, with the learner ranks of the run."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-5, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(10, ge=0)


class ColdStartSpec(Section):
    """The off-policy cold start before OPD: teacher answers, then SFT of the student on them."""

    teacher_generate: TeacherGenerationSpec
    sft: SftStageSpec = SftStageSpec()


class ProbeSpec(Section):
    """`opd-ray probe`: how much to sample before training, and the thresholds of its verdict."""

    prompts: int = Field(256, ge=1, description="training prompts the student samples and the teacher scores")
    eval_prompts: int = Field(
        200, ge=1, description="eval prompts (evenly spaced over data.eval) for both models' greedy accuracy"
    )
    min_overlap: float = Field(
        0.6,
        ge=0,
        le=1,
        description="overlap ratio@k below this: the two think differently (the paper's successful runs start ~0.7)",
    )
    min_accuracy_gap: float = Field(
        0.05, ge=-1, le=1, description="teacher minus student accuracy below this: little left to teach"
    )


class PlacementSpec(Section):
    """Which roles share bundles, and how long to wait for the cluster to hold them."""

    colocate: list[RoleName] = Field(
        default_factory=list,
        description="roles that share one placement group: actor i of each lands in bundle i, which holds their "
        "summed resources (e.g. [rollout, learner] with num_gpus 0.5 each: one GPU per bundle, shared)",
    )
    colocated_strategy: Strategy = "PACK"
    timeout_s: float = Field(
        120, gt=0, description="seconds to wait for the placement groups before stopping with what is missing"
    )
    wait_for_nodes_s: float = Field(
        0,
        ge=0,
        description="seconds to wait for nodes still joining the cluster (a Slurm or autoscaled start) before the "
        "cluster is judged too small for the run; 0 = judge at once",
    )

    @model_validator(mode="after")
    def _colocate_at_least_two_roles(self) -> PlacementSpec:
        if self.colocate and len(set(self.colocate)) < 2:
            raise ValueError("placement.colocate lists the roles that share bundles: name two or three different roles")
        return self


class WeightSyncSpec(Section):
    """How new student weights reach the rollout engines."""

    method: Literal["object_store", "collective"] = Field(
        "object_store",
        description="object_store: learner rank 0 puts the weights into Ray's object store once and every engine "
        "maps them; collective: a process group of learner rank 0 and every engine, weights broadcast in buckets",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="collective: auto = nccl on GPU, else gloo")
    bucket_mb: float = Field(256, gt=0, description="collective: size of one broadcast; bounds the extra memory")
    timeout_s: float = Field(600, gt=0, description="collective: seconds a broadcast may wait for its peers")


class RaySpec(Section):
    address: str | None = Field(None, description="None starts a local Ray; 'auto' joins a running cluster")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray")
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False


class ExperimentSpec(Section):
    run: RunSpec = RunSpec()
    models: ModelsSpec
    data: DataSpec
    rollout: RolloutSpec = RolloutSpec()
    teacher: TeacherSpec = TeacherSpec()
    teachers: dict[str, NamedTeacherSpec] | None = Field(
        None,
        description="several teachers by name (or the student itself, `model: self`); rows reach one each through "
        "data.route or their train file's `teacher`. Without it: models.teacher with the `teacher:` settings",
    )
    learner: LearnerSpec = LearnerSpec()
    algorithm: AlgorithmSpec = AlgorithmSpec()
    diagnostics: DiagnosticsSpec = DiagnosticsSpec()
    health: HealthSpec = HealthSpec()
    trainer: TrainerSpec = TrainerSpec()
    stages: list[StageName] = Field(
        default_factory=lambda: ["opd"],
        description="run in this order, each skipped when its output exists: teacher_generate -> sft -> opd",
    )
    cold_start: ColdStartSpec | None = None
    probe: ProbeSpec = ProbeSpec()
    placement: PlacementSpec = PlacementSpec()
    weight_sync: WeightSyncSpec = WeightSyncSpec()
    ray: RaySpec = RaySpec()
    # {location: "${oc.env:...}"}: set by load_spec so that spec_to_yaml never writes an environment value
    _environment_values: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _checkpointing_follows_response_length(cls, data: Any) -> Any:
        """Resolves learner.gradient_checkpointing=null here, so `opd-ray validate` prints what a run will do."""
        if not isinstance(data, dict):
            return data
        learner = data.get("learner") or {}
        rollout = data.get("rollout") or {}
        if isinstance(learner, dict) and isinstance(rollout, dict) and learner.get("gradient_checkpointing") is None:
            max_new_tokens = rollout.get("max_new_tokens", RolloutSpec.model_fields["max_new_tokens"].default)
            if isinstance(max_new_tokens, int):
                long_responses = max_new_tokens >= LONG_RESPONSE_TOKENS
                data = {**data, "learner": {**learner, "gradient_checkpointing": long_responses}}
        return data

    def teacher_specs(self) -> dict[str, NamedTeacherSpec]:
        """Every teacher by name; the one-teacher shorthand (models.teacher + teacher:) is named "teacher"."""
        if self.teachers is not None:
            return dict(self.teachers)
        settings = {name: getattr(self.teacher, name) for name in TeacherSpec.model_fields}
        return {"teacher": NamedTeacherSpec(model=self.models.teacher, **settings)}

    def teacher_model(self, name: str) -> ModelSpec:
        """The model a teacher loads: its own, or the student's initial one for `model: self`."""
        teacher = self.teacher_specs()[name]
        return self.models.student if teacher.is_self else teacher.model

    def models_by_role(self) -> list[tuple[str, ModelSpec]]:
        """("teacher", model) for every teacher with a model of its own, then ("student", model): what the
        model builders (models.build_tiny, models.import_pretrained) make when missing."""
        teachers = [("teacher", t.model) for t in self.teacher_specs().values() if not t.is_self]
        return [*teachers, ("student", self.models.student)]

    def teacher_field(self, name: str) -> str:
        """Where a teacher's settings live in the spec, for error messages."""
        return f"teachers.{name}" if self.teachers is not None else "teacher"

    @property
    def named_teachers(self) -> bool:
        """Whether the spec names its teachers (`teachers:`): then metrics are also logged per teacher."""
        return self.teachers is not None

    @model_validator(mode="after")
    def _teachers_named_once(self) -> ExperimentSpec:
        if self.teachers is None:
            if self.models.teacher is None:
                raise ValueError("models.teacher (one teacher) or teachers (several, by name) is required")
            if self.data.route is not None or any(d.teacher for d in self.data.train_files + self.data.eval_files):
                raise ValueError("data.route and a data file's teacher name teachers: list them under teachers:")
            return self
        if self.models.teacher is not None or "teacher" in self.model_fields_set:
            raise ValueError(
                "teachers: replaces models.teacher and the teacher: section (the one-teacher shorthand); "
                "give each teacher its model and settings under teachers:"
            )
        if not self.teachers:
            raise ValueError("teachers: name at least one teacher")
        for name in self.teachers:
            if not TEACHER_NAME.match(name):
                raise ValueError(f"teachers.{name}: a name may hold letters, digits, '_', '-' and '.' only")
        self._check_routes()
        self._check_teachers_fit_one_batch()
        return self

    def _check_routes(self) -> None:
        """Every route names a teacher; with several teachers every train row has a route."""
        names = set(self.teachers)
        route = self.data.route
        named = {}
        if route is not None:
            named.update({f"data.route.teachers.{value}": name for value, name in route.teachers.items()})
            if route.default is not None:
                named["data.route.default"] = route.default
        for section, files in (("data.train", self.data.train_files), ("data.eval", self.data.eval_files)):
            named.update({f"{section}[{i}].teacher": d.teacher for i, d in enumerate(files) if d.teacher})
        for field, name in named.items():
            if name not in names:
                raise ValueError(f"{field}: no teacher named {name!r} (teachers: {', '.join(sorted(names))})")
        unrouted = [d.path for d in self.data.train_files if d.teacher is None]
        if len(names) > 1 and route is None and unrouted:
            raise ValueError(
                f"teachers: {len(names)} teachers but no route for the rows of {unrouted[0]}: set data.route "
                "(a field's value -> teacher) or the file's teacher"
            )

    def _check_teachers_fit_one_batch(self) -> None:
        """A step's rows from several teachers are trained as one batch, with one top-k width."""
        top_ks = {name: teacher.top_k for name, teacher in self.teachers.items()}
        if len(set(top_ks.values())) > 1:
            raise ValueError(f"teachers: every teacher needs the same top_k (rows of several are one batch): {top_ks}")
        current = [name for name, teacher in self.teachers.items() if teacher.weights == "current"]
        if current and self.weight_sync.method == "collective":
            raise ValueError(
                f"teachers.{current[0]}: weights current receives the student's weights through the object store; "
                "use weight_sync.method=object_store"
            )
        if self.algorithm.objective == "full_vocab" and (len(self.teachers) > 1 or current):
            raise ValueError(
                "algorithm.objective=full_vocab loads one frozen teacher copy on each learner rank: name one "
                "teacher, with weights frozen"
            )
        if self.cold_start is not None and "teacher_generate" in self.stages and len(self.teachers) > 1:
            raise ValueError("stages: teacher_generate answers with one teacher; it does not take several yet")

    @model_validator(mode="after")
    def _cross_tokenizer_scoring_fits(self) -> ExperimentSpec:
        """What a teacher with another vocabulary can give: a chunk reward, and its top-k on shared tokens."""
        algorithm = self.algorithm
        for name, teacher in self.teacher_specs().items():
            if not teacher.cross_tokenizer:
                continue
            field = f"{self.teacher_field(name)}.cross_tokenizer"
            if teacher.is_self:
                raise ValueError(f"{field}: a self teacher has the student's tokenizer")
            if algorithm.objective == "full_vocab":
                raise ValueError(
                    f"{field}: objective {algorithm.objective} needs one vocabulary; use sampled_token or topk"
                )
            if algorithm.objective == "topk" and algorithm.topk_support != "teacher":
                raise ValueError(
                    f"{field}: topk_support {algorithm.topk_support} needs the teacher's log-probs at student ids; "
                    "use topk_support=teacher (its top-k, matched to the student's tokens by text)"
                )
            if "teacher_generate" in self.stages:
                raise ValueError(f"{field}: stages teacher_generate trains on the teacher's token ids")
        return self

    @model_validator(mode="after")
    def _lora_syncs_through_the_object_store(self) -> ExperimentSpec:
        if self.learner.lora is not None and self.weight_sync.method == "collective":
            raise ValueError(
                "learner.lora: merged weights are sent through the object store; use weight_sync.method=object_store"
            )
        return self

    @model_validator(mode="after")
    def _stop_on_can_fire(self) -> ExperimentSpec:
        """A condition in trainer.stop_on that can never be judged would promise a stop that never comes."""
        stop_on, steps = self.trainer.stop_on, self.trainer.steps
        if stop_on and not self.health.enabled:
            raise ValueError(f"trainer.stop_on {stop_on}: health.enabled is false, so the doctor never judges them")
        for name in stop_on:
            if name in CONDITIONS_FROM_DIAGNOSTICS and not self.diagnostics.enabled:
                raise ValueError(
                    f"trainer.stop_on: {name} is judged from the diagnostics, and diagnostics.enabled is false"
                )
            first = CONDITION_FIRST_STEP.get(name, lambda health: 1)(self.health)
            if first > steps:
                raise ValueError(
                    f"trainer.stop_on: {name} is judged from step {first} on (health.window / health.alignment_steps), "
                    f"after the run's last step (trainer.steps {steps})"
                )
        return self

    @model_validator(mode="after")
    def _stages_in_order(self) -> ExperimentSpec:
        stages = list(self.stages)
        if not stages or stages != [s for s in STAGE_ORDER if s in stages] or len(set(stages)) < len(stages):
            raise ValueError(f"stages {stages}: name each at most once, in the order {' -> '.join(STAGE_ORDER)}")
        if "sft" in stages and "teacher_generate" not in stages:
            raise ValueError("stages: sft trains on teacher_generate's answers; list teacher_generate before it")
        if "teacher_generate" in stages and self.cold_start is None:
            raise ValueError("stages: teacher_generate needs cold_start.teacher_generate (at least its prompts)")
        if self.cold_start is not None and "sft" in stages:
            if self.cold_start.sft.batch_size % self.learner.num_ranks:
                raise ValueError(
                    f"cold_start.sft.batch_size ({self.cold_start.sft.batch_size}) does not divide across "
                    f"learner.num_ranks = {self.learner.num_ranks}"
                )
        return self

    @model_validator(mode="after")
    def _batch_divides_across_ranks(self) -> ExperimentSpec:
        sequences = self.trainer.prompts_per_step * self.rollout.samples_per_prompt
        if sequences % self.learner.num_ranks:
            raise ValueError(
                f"trainer.prompts_per_step x rollout.samples_per_prompt = {sequences} sequences "
                f"do not divide across learner.num_ranks = {self.learner.num_ranks}"
            )
        algorithm = self.algorithm
        teachers = self.teacher_specs()
        top_k = min(teacher.top_k for teacher in teachers.values())
        if algorithm.top_k is not None and algorithm.top_k > top_k:
            raise ValueError(f"algorithm.top_k ({algorithm.top_k}) exceeds teacher.top_k ({top_k})")
        if algorithm.needs_student_topk:
            vllm_teachers = [self.teacher_field(n) for n, t in teachers.items() if t.backend != "transformers"]
            if vllm_teachers:
                raise ValueError(
                    f"algorithm.topk_support={algorithm.topk_support} needs the teacher's log-probs at the "
                    f"student's top-k ids, which only {vllm_teachers[0]}.backend=transformers returns"
                )
            k = algorithm.top_k or top_k
            if k > self.rollout.engine.max_logprobs:
                raise ValueError(
                    f"the student's top-{k} exceeds rollout.engine.max_logprobs ({self.rollout.engine.max_logprobs})"
                )
        roles = {"rollout": self.rollout, "learner": self.learner}
        roles.update({self.teacher_field(name): teacher for name, teacher in teachers.items()})
        for role, settings in roles.items():
            if not any(amount > 0 for amount in settings.resources.demand().values()):
                raise ValueError(
                    f"{role}.resources: an actor must ask for some CPU, GPU or custom resource "
                    "(its placement-group bundle cannot be empty)"
                )
        shares_gpu = {"rollout", "learner"} <= set(self.placement.colocate) and self.rollout.resources.num_gpus > 0
        if shares_gpu and self.weight_sync.method == "collective" and self.weight_sync.backend != "gloo":
            raise ValueError(
                "weight_sync.method=collective cannot run NCCL between a rollout engine and a learner on the "
                "same GPU (placement.colocate): use weight_sync.method=object_store"
            )
        engines = {"rollout.engine": self.rollout.engine}
        engines.update({f"{self.teacher_field(name)}.engine": t.engine for name, t in teachers.items()})
        for field, engine in engines.items():
            if self.rollout.max_new_tokens >= engine.max_model_len:
                raise ValueError(
                    f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) leaves no room for a prompt in "
                    f"{field}.max_model_len ({engine.max_model_len})"
                )
        if self.diagnostics.enabled and self.diagnostics.top_k > top_k:
            raise ValueError(
                f"diagnostics.top_k ({self.diagnostics.top_k}) exceeds teacher.top_k ({top_k}): "
                "the overlap needs the teacher's top-k"
            )
        return self
