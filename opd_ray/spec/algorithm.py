"""algorithm: the objective and its options; the diagnostics computed on every step."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from opd_ray.spec.base import Section
from opd_ray.spec.objectives import OBJECTIVE_RECORDS, SHARED_KEYS, ObjectiveRecord, key_owners, objective_record


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
    objective: str = Field(
        "topk",
        description="; ".join(f"{record.name} = {record.summary}" for record in OBJECTIVE_RECORDS.values())
        + " (spec/objectives.py: what each needs, and which of the keys below it reads)",
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
    baseline: Literal["none", "vopd"] = Field(
        "none",
        description="sampled_token: vopd subtracts -KL(p||q) on the teacher's top-k (sampled_token's default "
        "with discount 0 and standardize_rewards false)",
    )
    position_gamma: float = Field(0.0, ge=0, description="sampled_token: IW-OPD position weights (paper: 0.5)")
    entropy_gate: EntropyGateSpec = EntropyGateSpec()
    task_reward_coef: float = Field(0.0, ge=0, description="weight of the verifier's reward (RL mixed in)")
    student_data_fraction: float = Field(
        1.0, ge=0, le=1, description="GKD lambda: share of steps on student samples; the rest on dataset answers"
    )
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    """token_mean = every token weighs the same; sequence_mean = every sequence does"""
    importance_cap: float | None = Field(
        None,
        gt=0,
        description="off-policy correction for samples from older weights (asynchronous mode): each token's "
        "loss is weighted by min(p_theta(y_t) / p_rollout(y_t), cap), detached; sampled_token caps its ratio. "
        "null = none",
    )

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        """The objective's own defaults for the keys the spec does not set (sampled_token: the vOPD baseline),
        resolved here so that `opd-ray validate` and the spec.yaml a run writes show them."""
        if not isinstance(data, dict) or not isinstance(data.get("objective", "topk"), str):
            return data
        record = OBJECTIVE_RECORDS.get(data.get("objective", "topk"))
        return data if record is None else {**record.defaults(data), **data}

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, name: str) -> str:
        objective_record(name)
        return name

    @property
    def record(self) -> ObjectiveRecord:
        """What this objective needs (spec/objectives.py)."""
        return objective_record(self.objective)

    @model_validator(mode="after")
    def _keys_belong_to_objective(self) -> AlgorithmSpec:
        """A key only another family reads would be silently ignored: refuse it instead. A key at its default
        changes nothing, so the full spec a run writes (spec.yaml) still loads."""
        for key in sorted(self.model_fields_set - set(SHARED_KEYS) - set(self.record.keys)):
            owners = key_owners(key)
            if owners and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(
                    f"algorithm.{key} is read by objective {' / '.join(owners)} only, and this spec's objective is "
                    f"{self.objective}: remove it, or change algorithm.objective"
                )
        return self

    @model_validator(mode="after")
    def _options_fit_objective(self) -> AlgorithmSpec:
        if self.baseline == "vopd" and (self.discount > 0 or self.standardize_rewards):
            raise ValueError(
                "algorithm.baseline=vopd is the expected per-token reward: use it with discount 0 "
                "and standardize_rewards false"
            )
        if self.divergence == "forward_to_reverse" and self.anneal_steps < 1:
            raise ValueError("algorithm.divergence=forward_to_reverse needs algorithm.anneal_steps >= 1")
        if self.student_data_fraction < 1 and not self.record.trains_on_dataset_answers_ok(self):
            raise ValueError(
                "algorithm.student_data_fraction < 1 trains on dataset answers, which have no rollout "
                "log-probs or student top-k: use objective full_vocab, or topk with topk_support=teacher"
            )
        return self

    @property
    def needs_student_topk(self) -> bool:
        return self.record.student_topk(self)


class DiagnosticsSpec(Section):
    """Token-level diagnostics on every step's student rollouts (overlap@k, masses, entropies)."""

    enabled: bool = True
    """log the paper's token-level diagnostics (diag/...) every step"""
    top_k: int = Field(16, ge=1, description="k of overlap ratio@k; at most teacher.top_k")
