"""What each objective needs and which `algorithm.*` keys it reads: one record per objective.

The spec's validators, the driver, the data pre-flight and the learner read these records
instead of comparing objective names, so a new objective is one record here (`add_objective`)
and one loss function in `opd_ray/losses/objectives.py` (`OBJECTIVES`). This module imports
no torch: the spec layer validates a YAML file without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opd_ray.spec.base import Registry


def _never(algorithm: Any) -> bool:
    return False


def _no_defaults(algorithm: dict) -> dict:
    return {}


def _vopd_where_it_applies(algorithm: dict) -> dict:
    """sampled_token's baseline: vOPD (the expected per-token reward, in closed form on the teacher's top-k)
    wherever it is the right one, i.e. per-token rewards that are not standardised."""
    plain = algorithm.get("discount", 0.0) == 0 and not algorithm.get("standardize_rewards", False)
    return {"baseline": "vopd"} if plain else {}


@dataclass(frozen=True)
class ObjectiveRecord:
    """One objective: what it is, what it needs from the other roles, and where it is supported."""

    name: str
    summary: str
    # the algorithm.* keys only this family reads (a key another family owns is refused in the spec)
    keys: tuple[str, ...] = ()
    # trains on the dataset's reference answers on every step, with no teacher (the supervised control)
    trains_on_answers: bool = False
    # the loss reads `advantage_N`, built from whole sequences (returns, standardisation, a baseline, position
    # weights, the task reward) and carries its own importance ratio: a policy-gradient surrogate
    sequence_advantages: bool = False
    # the teacher scores the student's own rollouts (false for the supervised control)
    needs_teacher: bool = True
    # a frozen teacher copy on every learner rank (the exact full-vocabulary divergence)
    learner_teacher: bool = False
    # the rollout engine returns the student's top-k ids at every token, for the options given
    student_topk: Callable[[Any], bool] = _never
    # a teacher with another tokenizer can score for it (it gives log-probs on shared tokens only)
    cross_tokenizer: bool = True
    # several teachers, each scoring its own rows, can feed one batch
    several_teachers: bool = True
    # rollout.samples_per_prompt where the spec does not set it: a one-sample estimate needs several samples
    # of each prompt to descend its objective (docs/get-started/quickstart.md, "Objectives side by side")
    samples_per_prompt: int = 1
    # algorithm.* defaults of this family where the spec does not set the key: (the keys given) -> {key: value}
    defaults: Callable[[dict], dict] = _no_defaults

    def trains_on_dataset_answers_ok(self, algorithm: Any) -> bool:
        """Whether GKD's dataset share (student_data_fraction < 1) works: dataset answers have no rollout
        log-probs (a policy-gradient ratio) and no rollout-time student top-k."""
        return self.needs_teacher and not self.sequence_advantages and not self.student_topk(algorithm)


# keys every objective reads; every other algorithm.* key belongs to the families that name it
SHARED_KEYS = (
    "objective",
    "entropy_gate",
    "task_reward_coef",
    "student_data_fraction",
    "aggregation",
    "importance_cap",
)
DIVERGENCE_KEYS = ("divergence", "jsd_beta", "anneal_steps")

OBJECTIVE_RECORDS = Registry("objective")


def add_objective(record: ObjectiveRecord) -> ObjectiveRecord:
    """Registers an objective's record; its loss function goes into losses.objectives.OBJECTIVES under the name."""
    return OBJECTIVE_RECORDS.add(record)


def objective_record(name: str) -> ObjectiveRecord:
    """The record of `algorithm.objective`; an unknown name is refused naming the known ones."""
    try:
        return OBJECTIVE_RECORDS[name]
    except KeyError:
        raise ValueError(
            f"algorithm.objective {name!r} is not an objective; choose one of {', '.join(OBJECTIVE_RECORDS)}"
        ) from None


def key_owners(key: str) -> list[str]:
    """The objectives that read `algorithm.<key>` (empty for a shared key)."""
    return [record.name for record in OBJECTIVE_RECORDS.values() if key in record.keys]


add_objective(
    ObjectiveRecord(
        name="sampled_token",
        summary="one-sample reverse KL as a dense reward inside an importance-sampled policy gradient",
        keys=("clip_eps", "discount", "standardize_rewards", "baseline", "position_gamma"),
        sequence_advantages=True,
        samples_per_prompt=4,
        defaults=_vopd_where_it_applies,
    )
)
add_objective(
    ObjectiveRecord(
        name="topk",
        summary="analytic divergence on a top-k support",
        keys=(*DIVERGENCE_KEYS, "top_k", "topk_support", "topk_tail"),
        student_topk=lambda algorithm: algorithm.topk_support != "teacher",
    )
)
add_objective(
    ObjectiveRecord(
        name="full_vocab",
        summary="exact divergence against a teacher copy on each learner rank",
        keys=DIVERGENCE_KEYS,
        learner_teacher=True,
        cross_tokenizer=False,
        several_teachers=False,
    )
)
add_objective(
    ObjectiveRecord(
        name="sft",
        summary="supervised on the dataset's reference answers (a control, no teacher)",
        trains_on_answers=True,
        needs_teacher=False,
    )
)
