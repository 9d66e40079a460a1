"""The whole spec: every section, and the validators that involve several sections at once."""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from opd_ray.spec.algorithm import AlgorithmSpec, DiagnosticsSpec
from opd_ray.spec.base import PathText, Section
from opd_ray.spec.cluster import PlacementSpec, RaySpec, WeightSyncSpec
from opd_ray.spec.conditions import CONDITION_RECORDS
from opd_ray.spec.data import DataSpec
from opd_ray.spec.models import ModelSpec, ModelsSpec
from opd_ray.spec.objectives import OBJECTIVE_RECORDS
from opd_ray.spec.recipe import ColdStartSpec, ProbeSpec
from opd_ray.spec.roles import (
    LONG_RESPONSE_TOKENS,
    SHORTHAND_TEACHER,
    TEACHER_NAME,
    LearnerSpec,
    NamedTeacherSpec,
    RolloutSpec,
    expand_one_teacher_shorthand,
)
from opd_ray.spec.stages import check_stages
from opd_ray.spec.tracking import LoggingSpec
from opd_ray.spec.trainer import (
    HealthSpec,
    TrainerSpec,
)


class RunSpec(Section):
    name: str = "opd"
    """the run's name: the summary's title, the tracked run's name, and part of the default output_dir"""
    output_dir: PathText = "runs/opd"
    """the run directory: metrics.jsonl, summary.json, student/, checkpoints/ (one run per directory)"""
    seed: int = 0
    """every random draw (data order, sampling seeds, GKD's mixing) derives from it and the step"""


class ExperimentSpec(Section):
    run: RunSpec = RunSpec()
    models: ModelsSpec
    data: DataSpec
    rollout: RolloutSpec = RolloutSpec()
    teachers: dict[str, NamedTeacherSpec] = Field(
        ...,
        description="every teacher by name (or the student itself, `model: self`); rows reach one each through "
        "data.route or their train file's `teacher`. The one-teacher shorthand, models.teacher with the "
        f"`teacher:` settings, becomes teachers.{SHORTHAND_TEACHER} when the spec loads",
    )
    learner: LearnerSpec = LearnerSpec()
    algorithm: AlgorithmSpec = AlgorithmSpec()
    diagnostics: DiagnosticsSpec = DiagnosticsSpec()
    health: HealthSpec = HealthSpec()
    trainer: TrainerSpec = TrainerSpec()
    stages: list[str] = Field(
        default_factory=lambda: ["opd"],
        description="the recipe's stages (spec/stages.py), run in their order, each skipped when its output exists: "
        "teacher_generate -> sft -> opd as shipped",
    )
    cold_start: ColdStartSpec | None = None
    probe: ProbeSpec = ProbeSpec()
    placement: PlacementSpec = PlacementSpec()
    weight_sync: WeightSyncSpec = WeightSyncSpec()
    ray: RaySpec = RaySpec()
    logging: LoggingSpec = LoggingSpec()
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported before the spec is validated, in the driver and in every actor: where "
        "an objective, stage, tracker, condition or teacher backend of your own registers itself (docs: extending)",
    )
    # {location: "${oc.env:...}"}: set by load_spec so that spec_to_yaml never writes an environment value
    _environment_values: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _one_teacher_shorthand(cls, data: Any) -> Any:
        """models.teacher + teacher: become teachers.teacher here, so nothing past loading knows two spellings."""
        return expand_one_teacher_shorthand(data) if isinstance(data, dict) else data

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

    @model_validator(mode="before")
    @classmethod
    def _samples_follow_objective(cls, data: Any) -> Any:
        """Resolves an unset rollout.samples_per_prompt to what the objective needs (spec/objectives.py:
        sampled_token, a one-sample estimate, 4; the analytic objectives 1), so `opd-ray validate` prints it."""
        if not isinstance(data, dict):
            return data
        rollout, algorithm = data.get("rollout") or {}, data.get("algorithm") or {}
        if not isinstance(rollout, dict) or not isinstance(algorithm, dict) or "samples_per_prompt" in rollout:
            return data
        record = OBJECTIVE_RECORDS.get(algorithm.get("objective", "topk"))
        if record is None or record.samples_per_prompt == 1:
            return data
        return {**data, "rollout": {**rollout, "samples_per_prompt": record.samples_per_prompt}}

    def teacher_model(self, name: str) -> ModelSpec:
        """The model a teacher loads: its own, or the student's initial one for `model: self`."""
        teacher = self.teachers[name]
        return self.models.student if teacher.is_self else teacher.model

    def models_by_role(self) -> list[tuple[str, ModelSpec]]:
        """("teacher", model) for every teacher with a model of its own, then ("student", model): what the
        model builders (models.build_tiny, models.import_pretrained) make when missing."""
        teachers = [("teacher", t.model) for t in self.teachers.values() if not t.is_self]
        return [*teachers, ("student", self.models.student)]

    @property
    def answer_stops(self) -> dict[str, list[str]]:
        """Each teacher's answer_stop: where its own answers end in evaluation."""
        return {name: teacher.answer_stop for name, teacher in self.teachers.items()}

    @property
    def several_teachers(self) -> bool:
        """More than one teacher: then metrics are also logged per teacher, and each is a role of its own."""
        return len(self.teachers) > 1

    @model_validator(mode="after")
    def _teachers_named_once(self) -> ExperimentSpec:
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
        record = self.algorithm.record
        if (len(self.teachers) > 1 and not record.several_teachers) or (current and record.learner_teacher):
            raise ValueError(
                f"algorithm.objective={record.name} loads one frozen teacher copy on each learner rank: name one "
                "teacher, with weights frozen"
            )

    @model_validator(mode="after")
    def _cross_tokenizer_scoring_fits(self) -> ExperimentSpec:
        """What a teacher with another vocabulary can give: a chunk reward, and its top-k on shared tokens."""
        algorithm = self.algorithm
        for name, teacher in self.teachers.items():
            if not teacher.cross_tokenizer:
                continue
            field = f"teachers.{name}.cross_tokenizer"
            if teacher.is_self:
                raise ValueError(f"{field}: a self teacher has the student's tokenizer")
            if not algorithm.record.cross_tokenizer:
                raise ValueError(
                    f"{field}: objective {algorithm.objective} needs one vocabulary; use sampled_token or topk"
                )
            if algorithm.needs_student_topk:
                raise ValueError(
                    f"{field}: topk_support {algorithm.topk_support} needs the teacher's log-probs at student ids; "
                    "use topk_support=teacher (its top-k, matched to the student's tokens by text)"
                )
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
            record = CONDITION_RECORDS.get(name)
            if record is None:
                raise ValueError(
                    f"trainer.stop_on: {name!r} is not a condition; they are {', '.join(CONDITION_RECORDS)}"
                )
            if record.from_diagnostics and not self.diagnostics.enabled:
                raise ValueError(
                    f"trainer.stop_on: {name} is judged from the diagnostics, and diagnostics.enabled is false"
                )
            first = record.first_step(self.health)
            if first > steps:
                raise ValueError(
                    f"trainer.stop_on: {name} is judged from step {first} on (health.window / health.alignment_steps), "
                    f"after the run's last step (trainer.steps {steps})"
                )
        return self

    @model_validator(mode="after")
    def _stages_runnable(self) -> ExperimentSpec:
        check_stages(list(self.stages), self)
        return self

    @model_validator(mode="after")
    def _batch_divides_across_ranks(self) -> ExperimentSpec:
        sequences = self.trainer.prompts_per_step * self.rollout.samples_per_prompt
        if sequences % self.learner.num_ranks:
            raise ValueError(
                f"trainer.prompts_per_step x rollout.samples_per_prompt = {sequences} sequences "
                f"do not divide across learner.num_ranks = {self.learner.num_ranks}"
            )
        return self

    @property
    def teacher_top_k(self) -> int:
        """The top-k every teacher returns: the smallest of theirs."""
        return min(teacher.top_k for teacher in self.teachers.values())

    @model_validator(mode="after")
    def _top_k_within_the_teachers(self) -> ExperimentSpec:
        top_k = self.teacher_top_k
        if self.algorithm.top_k is not None and self.algorithm.top_k > top_k:
            raise ValueError(f"algorithm.top_k ({self.algorithm.top_k}) exceeds teacher.top_k ({top_k})")
        if self.diagnostics.enabled and self.diagnostics.top_k > top_k:
            raise ValueError(
                f"diagnostics.top_k ({self.diagnostics.top_k}) exceeds teacher.top_k ({top_k}): "
                "the overlap needs the teacher's top-k"
            )
        return self

    @model_validator(mode="after")
    def _student_top_k_scorable(self) -> ExperimentSpec:
        algorithm = self.algorithm
        if not algorithm.needs_student_topk:
            return self
        unable = [f"teachers.{n}" for n, t in self.teachers.items() if not t.backend_record.scores_chosen_ids]
        if unable:
            raise ValueError(
                f"algorithm.topk_support={algorithm.topk_support} needs the teacher's log-probs at the "
                f"student's top-k ids: set {unable[0]}.backend=transformers (vLLM 0.32 scores chosen ids "
                "only in its V2 model runner, which vLLM-CPU cannot start: docs/methods/objectives.md)"
            )
        k = algorithm.top_k or self.teacher_top_k
        if k > self.rollout.engine.max_logprobs:
            raise ValueError(
                f"the student's top-{k} exceeds rollout.engine.max_logprobs ({self.rollout.engine.max_logprobs})"
            )
        return self

    @model_validator(mode="after")
    def _every_role_asks_for_resources(self) -> ExperimentSpec:
        roles = {"rollout": self.rollout, "learner": self.learner}
        roles.update({f"teachers.{name}": teacher for name, teacher in self.teachers.items()})
        for role, settings in roles.items():
            if not any(amount > 0 for amount in settings.resources.demand().values()):
                raise ValueError(
                    f"{role}.resources: an actor must ask for some CPU, GPU or custom resource "
                    "(its placement-group bundle cannot be empty)"
                )
        return self

    @model_validator(mode="after")
    def _no_nccl_within_one_gpu(self) -> ExperimentSpec:
        shares_gpu = {"rollout", "learner"} <= set(self.placement.colocate) and self.rollout.resources.num_gpus > 0
        if shares_gpu and self.weight_sync.method == "collective" and self.weight_sync.backend != "gloo":
            raise ValueError(
                "weight_sync.method=collective cannot run NCCL between a rollout engine and a learner on the "
                "same GPU (placement.colocate): use weight_sync.method=object_store"
            )
        return self

    @model_validator(mode="after")
    def _room_for_a_prompt(self) -> ExperimentSpec:
        engines = {"rollout.engine": self.rollout.engine}
        engines.update({f"teachers.{name}.engine": t.engine for name, t in self.teachers.items()})
        for field, engine in engines.items():
            if self.rollout.max_new_tokens >= engine.max_model_len:
                raise ValueError(
                    f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) leaves no room for a prompt in "
                    f"{field}.max_model_len ({engine.max_model_len})"
                )
        return self
