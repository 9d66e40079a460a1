"""The doctor's named conditions: each one's rule, the evidence it quotes, and what to do about it.

A rule reads the step's `Signals` and the spec's thresholds (`health:`) and returns the evidence
(a short sentence of numbers) when the condition holds, or None. Rules that compare "now" with
"the start" wait until the two windows no longer overlap (2 x `health.window` steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opd_ray.health.signals import Signals
from opd_ray.spec import HealthSpec
from opd_ray.spec.conditions import ConditionRecord, add_condition_record


@dataclass(frozen=True)
class Condition:
    name: str
    rule: str  # the rule in words (the docs, opd-ray report)
    advice: str
    check: Callable[[Signals, HealthSpec], str | None]
    # steps in a row the rule must hold before the condition is named: 1, or a whole window for a rule that a
    # working run's early dip (a fresh optimizer) meets for a few steps
    sustained: Callable[[HealthSpec], int] = lambda h: 1


def windows_apart(signals: Signals, settings: HealthSpec) -> bool:
    return signals.steps >= 2 * settings.window


def collapse(s: Signals, h: HealthSpec) -> str | None:
    if not windows_apart(s, h):
        return None
    if s.repetitive_share is not None and s.repetitive_share >= h.collapse_repetitive_share:
        if s.repetitive_share >= 2 * (s.repetitive_share_start or 0.0):
            start = s.repetitive_share_start or 0.0
            return f"{s.repetitive_share:.0%} of responses loop (a 4-gram > 3 times; {start:.0%} at the start)"
    if s.cut_off_share is not None and s.entropy_vs_start is not None:
        if s.cut_off_share >= h.collapse_cut_off_share and s.entropy_vs_start <= h.collapse_entropy_ratio:
            cut, entropy = s.cut_off_share, s.entropy_vs_start
            return f"{cut:.0%} of responses cut off at the length limit, student entropy x{entropy:.2f} of its start"
    return None


def never_ends(s: Signals, h: HealthSpec) -> str | None:
    """Nearly every response runs to the length limit for a whole window: each one scores as wrong. Seen on a
    real run whose teacher (a base model of another family) gave the student's end of answer almost no
    probability: the student learned never to stop while overlap@k rose and the KL fell."""
    if s.steps >= h.window and s.cut_off_share is not None and s.cut_off_share >= h.collapse_cut_off_share:
        return f"{s.cut_off_share:.0%} of responses cut off at the length limit over the last {h.window} steps"
    return None


def entropy_explosion(s: Signals, h: HealthSpec) -> str | None:
    if windows_apart(s, h) and s.entropy_vs_start is not None and s.entropy_vs_start >= h.explosion_entropy_ratio:
        return f"student entropy x{s.entropy_vs_start:.2f} of its start"
    return None


def no_alignment(s: Signals, h: HealthSpec) -> str | None:
    if s.steps < h.alignment_steps or None in (s.overlap_start, s.overlap_rise, s.entropy_gap_change):
        return None
    started_apart = s.overlap_start < h.low_start_overlap
    if started_apart and s.overlap_rise < h.min_overlap_rise and s.entropy_gap_change > -h.min_entropy_gap_narrowing:
        rise, gap = s.overlap_rise, s.entropy_gap_change
        return (
            f"overlap@k started at {s.overlap_start:.2f}, and after {s.steps} steps it moved {rise:+.3f} and the "
            f"entropy gap {gap:+.0%}"
        )
    return None


def teacher_broken(s: Signals, h: HealthSpec) -> str | None:
    near_uniform = s.teacher_vs_uniform is not None and abs(s.teacher_vs_uniform - 1) <= h.teacher_uniform_tolerance
    if (
        near_uniform
        and s.teacher_std_vs_uniform is not None
        and s.teacher_std_vs_uniform <= h.teacher_uniform_tolerance
    ):
        return f"the teacher's log-probs sit at {s.teacher_vs_uniform:.0%} of -ln|V| on every token (a uniform guess)"
    if s.teacher_logprob_std is not None and s.teacher_logprob_std < h.teacher_min_logprob_std:
        return f"the teacher's log-probs are constant over the step's tokens (spread {s.teacher_logprob_std:.1e})"
    return None


def reward_fell(s: Signals, h: HealthSpec) -> bool:
    """The sample reward is health.reward_drop below its start (windows apart), and by more than chance
    (health.reward_drop_sigmas standard errors): what reward_divergence and objective_not_falling both start
    from; the sampled reverse KL then says which of the two it is."""
    if not windows_apart(s, h) or None in (s.reward_drop, s.kl_vs_start) or s.reward_drop < h.reward_drop:
        return False
    return s.reward_drop_error is None or s.reward_drop >= h.reward_drop_sigmas * s.reward_drop_error


def reward_divergence(s: Signals, h: HealthSpec) -> str | None:
    if reward_fell(s, h) and s.kl_vs_start <= 1 - h.kl_drop:
        drop, kl = s.reward_drop, s.kl_vs_start
        return f"sample reward {drop:.2f} below its start while the sampled reverse KL fell to x{kl:.2f} of its start"
    return None


def objective_not_falling(s: Signals, h: HealthSpec) -> str | None:
    """reward_divergence's other half: the reward fell and the KL did not. The sampled reverse KL is every
    objective's own quantity on the student's samples, so a run whose KL holds or rises is not minimising it."""
    if reward_fell(s, h) and s.kl_vs_start > 1 - h.kl_drop:
        drop, kl = s.reward_drop, s.kl_vs_start
        return f"sample reward {drop:.2f} below its start while the sampled reverse KL stayed at x{kl:.2f} of its start"
    return None


def grad_spike(s: Signals, h: HealthSpec) -> str | None:
    if s.grad_norm_vs_median is not None and s.grad_norm_vs_median >= h.grad_spike_factor:
        return f"gradient norm x{s.grad_norm_vs_median:.0f} of the median of the steps before"
    return None


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition(
            "collapse",
            "most responses loop (a repeated 4-gram) and did not at the start, or nearly all are cut off at the "
            "length limit while the student's entropy has fallen to half its start",
            "the student has collapsed into degenerate text whatever the KL says: lower learner.lr, add "
            "algorithm.topk_tail, or cold-start the student (stages: [teacher_generate, sft, opd])",
            collapse,
        ),
        Condition(
            "never_ends",
            "nearly all responses (health.collapse_cut_off_share) are cut off at the length limit, over a window",
            "the student no longer ends its answers, and a cut-off answer never counts: if the teacher is of "
            "another family or format, it may not end answers where the student does (its end-of-sequence "
            "after a few-shot answer is improbable): compare teachers with opd-ray probe, or cold-start the student; "
            "if answers are truly longer, raise rollout.max_new_tokens",
            never_ends,
        ),
        Condition(
            "entropy_explosion",
            "the student's entropy has risen to 1.5x its start",
            "the student is spreading mass where the loss does not look: add algorithm.topk_tail (a top-k support "
            "without it leaves the rest of the vocabulary free), use topk_support: teacher, lower learner.lr",
            entropy_explosion,
        ),
        Condition(
            "no_alignment",
            "the run started with a low overlap@k (the paper's proxy for thinking differently) and after "
            "health.alignment_steps overlap@k has not risen nor the entropy gap narrowed (its failure signature)",
            "student and teacher think differently: compare teachers with opd-ray probe, cold-start the student, "
            "or use the teacher's prompt template (data.template_source: teacher)",
            no_alignment,
        ),
        Condition(
            "teacher_broken",
            "the teacher's log-probs of the student's tokens sit at -ln|V| on every token (a uniform guess), or do "
            "not vary at all",
            "the teacher scores nothing: check models.teacher.path, its chat template (data.use_chat_template, "
            "data.template_source), its dtype and that it was loaded from the right weights",
            teacher_broken,
        ),
        Condition(
            "reward_divergence",
            "the verifier's reward on the student's samples fell below where it started while the sampled reverse "
            "KL fell",
            "the student agrees with the teacher more and solves less: check the teacher's accuracy on these "
            "prompts and its sampling settings, mix in the task reward (algorithm.task_reward_coef), or stop",
            reward_divergence,
        ),
        Condition(
            "objective_not_falling",
            "the verifier's reward on the student's samples fell below where it started while the sampled reverse "
            "KL did not fall (by health.kl_drop), for health.window steps in a row",
            "training is not minimising its own objective and the student solves less: lower learner.lr; for "
            "sampled_token (a one-sample estimate) also raise rollout.samples_per_prompt, or use the top-k objective",
            objective_not_falling,
            sustained=lambda h: h.window,
        ),
        Condition(
            "grad_spike",
            "a step's gradient norm is 10x the median of the steps before it",
            "one batch pulled hard: lower learner.lr or learner.grad_clip, and look at that step's rows",
            grad_spike,
        ),
    )
}


def register_condition(condition: Condition, record: ConditionRecord | None = None) -> Condition:
    """A new condition: its rule here, and its record (what judging it needs) for `trainer.stop_on` to name it."""
    if condition.name in CONDITIONS:
        raise ValueError(f"condition {condition.name!r} is already registered")
    add_condition_record(record or ConditionRecord(condition.name))
    CONDITIONS[condition.name] = condition
    return condition
