"""Greedy accuracy of the student (on the rollout engines) or the teachers, and the gap distillation closed.

With several teachers the eval set is split by route: each teacher answers its own rows (with its own
prompt, when it has one), and the student's accuracy is also reported per route, so each teacher's gap
recovery is measured on the rows it teaches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from opd_ray.actors.vllm_engine import Completion
from opd_ray.data.prompts import PromptSet
from opd_ray.data.verifiers import GuardedVerifier
from opd_ray.driver.roles import Roles, call_restarting, split


@dataclass
class Accuracy:
    """Greedy accuracy over every eval row, and over the rows of each teacher."""

    overall: float
    by_teacher: dict[str, float]


def evaluate(roles: Roles, kind: str, prompts: PromptSet, verifier: GuardedVerifier, max_new_tokens: int) -> float:
    """Greedy accuracy of the student ("rollout") or the teachers ("teacher") on every eval row."""
    return evaluate_by_teacher(roles, kind, prompts, verifier, max_new_tokens).overall


def evaluate_by_teacher(
    roles: Roles,
    kind: str,
    prompts: PromptSet,
    verifier: GuardedVerifier,
    max_new_tokens: int,
    answer_stops: dict[str, list[str]] | None = None,
) -> Accuracy:
    """The student answers every row with its prompt; a teacher answers the rows routed to it, with its own
    prompt if it has one, its answer ending at the first of its `answer_stops` (teachers.<name>.answer_stop).
    A response cut off by the length limit counts as wrong."""
    rows_of = prompts.rows_by_teacher(list(range(len(prompts))), default=next(iter(roles.teacher_pools)))
    if kind == "rollout":
        completions = greedy_on(
            roles, "rollout", roles.rollout_workers, prompts.subset(list(range(len(prompts)))), max_new_tokens
        )
    else:
        completions = []
        for name, rows in rows_of.items():
            own = prompts.teacher_prompts(rows) or prompts.subset(rows)
            answers = greedy_on(roles, "teacher", roles.teacher_pools[name], own, max_new_tokens)
            completions += [ended_at(c, (answer_stops or {}).get(name, [])) for c in answers]
    correct = {c.prompt_index: is_correct(c, prompts, verifier) for c in completions}
    by_teacher = {name: sum(correct[i] for i in rows) / len(rows) for name, rows in rows_of.items()}
    return Accuracy(sum(correct.values()) / len(correct), by_teacher)


def ended_at(completion: Completion, stops: list[str]) -> Completion:
    """The completion up to the first of `stops` in its text, as a finished answer; as it is without one."""
    ends = [at for at in (completion.text.find(stop) for stop in stops) if at >= 0]
    if not ends:
        return completion
    return replace(completion, text=completion.text[: min(ends)], finished=True)


def greedy_on(roles: Roles, kind: str, actors: list, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list:
    """Greedy completions of `prompts_P`, split across `actors` (a dead one is restarted and its part repeated)."""
    shards = split(list(prompts_P), len(actors))
    args = [({i: prompts_P[i] for i in shard}, max_new_tokens) for shard in shards]
    results = call_restarting(roles, kind, actors[: len(shards)], "greedy", args)
    return [c for shard in results for c in shard]


def is_correct(completion, prompts: PromptSet, verifier: GuardedVerifier) -> bool:
    """The verifier accepts it; a response cut off by the length limit is wrong."""
    index = completion.prompt_index
    return completion.finished and verifier(completion.text, prompts.answers[index], index)


def accuracy_of(completions: list, prompts: PromptSet, verifier: GuardedVerifier) -> float:
    """Share of completions the verifier accepts."""
    return sum(is_correct(c, prompts, verifier) for c in completions) / len(completions)


def gap_recovery(before: float, after: float, teacher: float) -> float | None:
    """Share of the teacher-student accuracy gap that distillation closed; None when the teacher was not
    ahead (a teacher below the student, e.g. a self-teacher that cannot use its hint, leaves no gap: a
    ratio of two negative numbers would read as success)."""
    gap = teacher - before
    return (after - before) / gap if gap > 1e-9 else None
