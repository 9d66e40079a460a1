"""The doctor's rules on synthetic metric streams built for each: it fires, it does not fire, and at which step."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from opd_ray.health.doctor import Doctor
from opd_ray.spec import HealthSpec

VOCAB = 1000
HEALTHY: dict[str, Callable[[int], float]] = {  # a run that learns: what every stream starts from
    "sequences": lambda t: 16,
    "cut_off_share": lambda t: 0.1,
    "repetitive_share": lambda t: 0.0,
    "diag/student_entropy": lambda t: 2.0 - t / 200,
    "diag/overlap_ratio": lambda t: 0.6 + t / 500,
    "diag/entropy_gap": lambda t: 0.8 - t / 250,
    "diag/overlap_advantage": lambda t: -1.0 + t / 400,
    "teacher_logprob": lambda t: -1.0,
    "teacher_logprob_sq": lambda t: 1.5,  # a spread of 0.7 nats
    "sampled_reverse_kl": lambda t: 1.0 - t / 300,
    "sample_reward": lambda t: 0.2 + t / 500,
    "grad_norm": lambda t: 1.0 + 0.1 * math.sin(t),
}


def stream(steps: int, **changes: Callable[[int], float]) -> list[dict]:
    curves = {**HEALTHY, **changes}
    return [{"step": t, **{key: curve(t) for key, curve in curves.items()}} for t in range(1, steps + 1)]


def fired(rows: list[dict], **settings) -> dict[str, int]:
    """{condition: the step it first held}."""
    doctor = Doctor(HealthSpec(**settings), VOCAB).replay(rows)
    return {name: diagnosis.first_step for name, diagnosis in doctor.found.items()}


def test_a_healthy_run_triggers_nothing() -> None:
    assert fired(stream(200)) == {}


def test_collapse_into_loops_fires_once_most_responses_repeat() -> None:
    looping = stream(60, repetitive_share=lambda t: 0.0 if t <= 30 else 0.9)
    assert fired(looping) == {"collapse": 36}  # the last 10 steps' mean: 0.9 x 6/10 >= 0.5 first at step 36
    assert "collapse" not in fired(stream(60, repetitive_share=lambda t: 0.6))  # always this repetitive: a task trait


def test_collapse_at_the_length_limit_needs_the_entropy_to_fall_too() -> None:
    cut_off_and_sure = stream(60, cut_off_share=lambda t: 1.0, **{"diag/student_entropy": lambda t: 4.0 / (1 + t / 5)})
    assert fired(cut_off_and_sure)["collapse"] == 20  # from the first step the two windows are apart
    assert "collapse" not in fired(stream(60, cut_off_share=lambda t: 1.0))  # long answers, steady entropy


def test_entropy_explosion() -> None:
    # start mean 2.55; the last 10 steps' mean 2 + (t - 4.5) / 10 reaches 1.5 x 2.55 first at step 23
    assert fired(stream(40, **{"diag/student_entropy": lambda t: 2.0 + t / 10}))["entropy_explosion"] == 23
    assert "entropy_explosion" not in fired(stream(40, **{"diag/student_entropy": lambda t: 2.0 + t / 100}))


def test_no_alignment_is_judged_after_its_steps_and_needs_both_signals_flat() -> None:
    flat = {"diag/overlap_ratio": lambda t: 0.45, "diag/entropy_gap": lambda t: 0.9 + t / 1000}
    assert fired(stream(80, **flat)) == {"no_alignment": 50}
    assert fired(stream(80, **flat), alignment_steps=30) == {"no_alignment": 30}
    narrowing = {"diag/overlap_ratio": lambda t: 0.45, "diag/entropy_gap": lambda t: 0.9 - t / 100}
    assert "no_alignment" not in fired(stream(80, **narrowing))
    # a run that starts aligned and dips (the quickstart's first ~120 steps at lr 1e-3) is not this failure
    dip = {"diag/overlap_ratio": lambda t: 0.65 - 0.1 * min(t, 60) / 60, "diag/entropy_gap": lambda t: 0.9}
    assert "no_alignment" not in fired(stream(150, **dip))


def test_a_teacher_that_guesses_uniformly_or_never_varies_is_broken_from_the_first_step() -> None:
    uniform = -math.log(VOCAB)
    guessing = stream(5, teacher_logprob=lambda t: uniform, teacher_logprob_sq=lambda t: uniform**2 + 0.01)
    assert fired(guessing) == {"teacher_broken": 1}
    constant = stream(5, teacher_logprob=lambda t: -2.0, teacher_logprob_sq=lambda t: 4.0)
    assert fired(constant) == {"teacher_broken": 1}
    # a confident teacher that disagrees with a weak student's samples sits far below -ln|V|, with a wide
    # spread (the quickstart's step 1: 141% of -ln|V|): that is teaching, not a broken teacher
    disagreeing = stream(
        5, teacher_logprob=lambda t: 1.41 * uniform, teacher_logprob_sq=lambda t: (1.41 * uniform) ** 2 + 9
    )
    assert fired(disagreeing) == {}


def test_reward_divergence_needs_the_reward_down_while_the_kl_falls() -> None:
    trap = stream(60, sample_reward=lambda t: max(0.0, 0.5 - t / 60), sampled_reverse_kl=lambda t: 1.0 - t / 80)
    assert fired(trap)["reward_divergence"] == 25  # the reward is down by step 16; the KL down 20% at 25
    no_teaching = stream(60, sample_reward=lambda t: max(0.0, 0.5 - t / 60), sampled_reverse_kl=lambda t: 1.0)
    assert "reward_divergence" not in fired(no_teaching)


def test_a_reward_drop_within_sampling_noise_is_not_a_divergence() -> None:
    """16 samples a step: a window's mean reward of 0.12 moves by ~0.03 by chance, so a 0.06 drop between
    two windows (1.5 standard errors) is noise; with 256 samples a step the same drop is not."""

    def drop_of_006(sequences: int) -> list[dict]:
        return stream(
            40,
            sample_reward=lambda t: 0.12 if t <= 20 else 0.06,
            sampled_reverse_kl=lambda t: 1.0 - t / 80,
            sequences=lambda t: sequences,
        )

    assert "reward_divergence" not in fired(drop_of_006(16))
    assert "reward_divergence" in fired(drop_of_006(256))
    assert "reward_divergence" in fired(drop_of_006(16), reward_drop_sigmas=0)  # the rule without the test


def test_objective_not_falling_needs_the_reward_down_while_the_kl_holds_or_rises() -> None:
    rising = stream(60, sample_reward=lambda t: max(0.0, 0.5 - t / 60), sampled_reverse_kl=lambda t: 1.0 + t / 30)
    # the windows apart at 20, the reward already down 0.17; named once it has held for a window (20-29)
    assert fired(rising)["objective_not_falling"] == 29
    # an early dip: 3 poor steps keep the window's reward 0.06 down for the 8 steps they are all in it, not 10
    dip = stream(60, sample_reward=lambda t: 0.3 if 30 <= t <= 32 else 0.5, sampled_reverse_kl=lambda t: 1.2)
    assert "objective_not_falling" not in fired(dip)
    flat = stream(60, sample_reward=lambda t: max(0.0, 0.5 - t / 60), sampled_reverse_kl=lambda t: 1.0)
    assert "objective_not_falling" in fired(flat)
    learning = stream(60, sampled_reverse_kl=lambda t: 1.0 + t / 30)  # the reward rises: not this condition
    assert "objective_not_falling" not in fired(learning)


def test_a_gradient_spike_is_named_at_its_step() -> None:
    assert fired(stream(30, grad_norm=lambda t: 25.0 if t == 17 else 1.0)) == {"grad_spike": 17}


def test_the_doctor_adds_signals_stops_on_request_and_summarises() -> None:
    doctor = Doctor(HealthSpec(), VOCAB, stop_on=["collapse"])
    stopped_at = None
    for row in stream(60, repetitive_share=lambda t: 0.0 if t <= 30 else 0.9):
        new = doctor.observe(row["step"], row)
        assert "health/repetitive_share" in row and "health/advantage_rise" in row
        if doctor.must_stop(new):
            stopped_at = row["step"]
            break
    assert stopped_at == 36
    summary = doctor.summary()
    assert summary["status"] == "stopped" and summary["stopped_by"] == "collapse"
    assert summary["conditions"][0]["advice"].startswith("the student has collapsed")
    assert Doctor(HealthSpec(), VOCAB).replay(stream(50)).summary() == {"status": "ok", "conditions": []}


def test_dataset_batches_and_a_disabled_doctor_are_not_examined() -> None:
    rows = stream(60, repetitive_share=lambda t: 0.9 if t > 30 else 0.0)
    assert fired([{**row, "dataset_batch": 1} for row in rows]) == {}
    assert fired(rows, enabled=False) == {}


@pytest.mark.parametrize("window", [3, 10])
def test_replaying_a_run_finds_what_watching_it_found(window: int) -> None:
    rows = stream(70, **{"diag/student_entropy": lambda t: 2.0 + t / 10})
    live = Doctor(HealthSpec(window=window), VOCAB)
    for row in rows:
        live.observe(row["step"], dict(row))
    assert Doctor(HealthSpec(window=window), VOCAB).replay(rows).summary() == live.summary()


# --8<-- [start:toy_condition]
def too_sure(s, h) -> str | None:
    """A toy rule: the student's entropy has fallen below a tenth of its start (s: the step's Signals,
    h: the spec's health settings); the evidence is a sentence of numbers."""
    if s.entropy_vs_start is not None and s.steps >= 2 * h.window and s.entropy_vs_start < 0.1:
        return f"student entropy x{s.entropy_vs_start:.2f} of its start"
    return None


@pytest.fixture
def toy_condition():
    from opd_ray.health.conditions import CONDITIONS, Condition, register_condition
    from opd_ray.spec.conditions import CONDITION_RECORDS, ConditionRecord

    rule = Condition("too_sure", "the student's entropy fell below 0.1x its start", "a toy", too_sure)
    yield register_condition(rule, ConditionRecord("too_sure", first_step=lambda health: 2 * health.window))
    del CONDITIONS["too_sure"], CONDITION_RECORDS["too_sure"]


# --8<-- [end:toy_condition]


def test_a_new_condition_is_one_rule_in_the_table(toy_condition, tmp_path) -> None:
    from opd_ray.spec import ExperimentSpec
    from tests.conftest import tiny_spec_dict

    sure = stream(60, **{"diag/student_entropy": lambda t: 2.0 if t <= 10 else 0.01})
    assert fired(sure)["too_sure"] == 20  # from the step the two windows are 10 steps apart
    assert "too_sure" not in fired(stream(60))
    raw = tiny_spec_dict(tmp_path, tmp_path / "run")
    raw["trainer"].update(steps=60, stop_on=["too_sure"])
    assert ExperimentSpec.model_validate(raw).trainer.stop_on == ["too_sure"]  # trainer.stop_on may name it
    raw["trainer"].update(steps=5)
    with pytest.raises(ValueError, match=r"too_sure is judged from step 20 on"):
        ExperimentSpec.model_validate(raw)
