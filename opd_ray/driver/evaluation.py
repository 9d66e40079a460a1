"""Greedy accuracy of the student (on the rollout engines) or the teacher, and the gap distillation closed."""

from __future__ import annotations

from opd_ray.data.prompts import PromptSet
from opd_ray.data.verifiers import GuardedVerifier
from opd_ray.driver.roles import Roles, call_restarting, split


def evaluate(roles: Roles, kind: str, prompts: PromptSet, verifier: GuardedVerifier, max_new_tokens: int) -> float:
    """Greedy accuracy on the `kind` actors ("rollout" = the student, "teacher"); a response cut off
    by the length limit counts as wrong."""
    workers = roles.rollout_workers if kind == "rollout" else roles.teachers
    shards = split(list(range(len(prompts))), len(workers))
    args = [(prompts.subset(shard), max_new_tokens) for shard in shards]
    results = call_restarting(roles, kind, workers[: len(shards)], "greedy", args)
    return accuracy_of([c for shard in results for c in shard], prompts, verifier)


def accuracy_of(completions: list, prompts: PromptSet, verifier: GuardedVerifier) -> float:
    """Share of completions the verifier accepts; a response cut off by the length limit is wrong."""
    correct = sum(c.finished and verifier(c.text, prompts.answers[c.prompt_index], c.prompt_index) for c in completions)
    return correct / len(completions)


def gap_recovery(before: float, after: float, teacher: float) -> float | None:
    """Share of the teacher-student accuracy gap that distillation closed."""
    gap = teacher - before
    return (after - before) / gap if abs(gap) > 1e-9 else None
