"""The doctor's rules on runs that really worked and really failed (tests/data/health/README.md says which)."""

from __future__ import annotations

from pathlib import Path

from opd_ray.driver.metrics import read_metrics
from opd_ray.health.doctor import Doctor
from opd_ray.spec import HealthSpec

RUNS = Path(__file__).parents[2] / "data" / "health"


def verdict(name: str, vocab_size: int, **settings) -> dict[str, int]:
    doctor = Doctor(HealthSpec(**settings), vocab_size).replay(read_metrics(RUNS / name))
    return {condition: d.first_step for condition, d in doctor.found.items()}


def test_the_working_runs_trigger_nothing() -> None:
    assert verdict("quickstart_compatible.jsonl", 15) == {}  # dip included: overlap@4 fell 0.09 by step 60
    # this build's run of it: in its dip the sample reward fell 0.05 while the sampled KL stood at x1.32, at steps
    # 80-81 only; objective_not_falling asks for a whole window of that
    assert verdict("quickstart_compatible_early_dip.jsonl", 15) == {}
    assert verdict("smollm2_opd.jsonl", 49152) == {}
    assert verdict("smollm2_opd.jsonl", 49152, window=5) == {}
    assert verdict("smollm2_opposites_opd.jsonl", 49152) == {}  # the example on this build: 0.167 -> 0.646
    assert verdict("smollm2_opposites_opd.jsonl", 49152, window=5) == {}
    # capitals from SmolLM2 (0.033 -> 0.367): the sample reward of 16 samples a step ends 0.054 below its start,
    # 1.6 standard errors; the rule before it asked for more than chance called that reward_divergence at step 40
    assert verdict("smollm2_capitals_compatible.jsonl", 49152) == {}
    assert verdict("smollm2_capitals_compatible.jsonl", 49152, reward_drop_sigmas=0) == {"reward_divergence": 40}


def test_the_incompatible_teacher_is_flagged_within_its_first_50_steps() -> None:
    assert verdict("miniature_incompatible.jsonl", 15) == {"no_alignment": 50}


def test_the_collapsed_tiny_run_is_flagged_where_it_was_stopped() -> None:
    # its teacher is the tests' random-init model: log-probs within 10% of -ln 15 on every token, which the
    # doctor rightly calls broken (it teaches nothing); the collapse is the student's own
    # random models never end an answer: never_ends from the first window on, collapse once the entropy fell too
    found = verdict("tiny_collapse_lr0.05.jsonl", 15, window=3)
    assert found == {"never_ends": 3, "teacher_broken": 4, "collapse": 10}


def test_a_sampled_token_run_that_climbs_its_own_objective_is_flagged_early() -> None:
    found = verdict("quickstart_sampled_token_standardized.jsonl", 15)
    assert found["objective_not_falling"] <= 200 < 600, found  # of 600 steps; the student ends at 0.000


def test_the_student_that_learned_never_to_stop_is_flagged_at_its_first_full_window() -> None:
    """The pruned SmolLM2 taught capitals by Gemma 3 270M (examples/smollm2_capitals_gemma.yaml): Gemma, a base
    model read few-shot, gives the student's end of answer almost no probability, so by step 4 every response
    runs to the length limit while overlap@16 rises 0.38 -> 0.59 and the sampled KL falls 3.2 -> 1.8 (the
    student ends at 0.000). The live run, before never_ends existed, reported health ok."""
    assert verdict("smollm2_capitals_gemma_never_ends.jsonl", 49152) == {"never_ends": 11}
    assert verdict("smollm2_capitals_gemma_never_ends.jsonl", 49152, window=5) == {"never_ends": 7}


def test_a_cold_start_that_ends_answers_is_flagged_once_the_student_unlearns_it() -> None:
    """The same pair after 30 SFT steps on Gemma's own answers: steps 1-3 end every answer, then from step 6 every
    response is cut off again (0.000 after); the live run named never_ends at step 13, the replay agrees."""
    assert verdict("smollm2_capitals_gemma_cold_start_never_ends.jsonl", 49152) == {"never_ends": 13}
    assert verdict("smollm2_capitals_gemma_cold_start_never_ends.jsonl", 49152, window=5) == {"never_ends": 9}


def test_the_student_top16_support_explosion_is_flagged_once_its_windows_are_apart() -> None:
    """examples/smollm2_distill.yaml with topk_support=student at lr 1e-4, 20 steps: the student's sampled
    entropy climbs 3.6 -> 7.6 nats while the loss falls 1.1 -> 0.2 (the support's degenerate minimum). Its rise
    is within the first 10 steps, so at the default window the start window holds it and nothing is named."""
    assert verdict("smollm2_student_support_explosion.jsonl", 49152) == {}
    assert verdict("smollm2_student_support_explosion.jsonl", 49152, window=5) == {"entropy_explosion": 19}
    assert verdict("smollm2_student_support_explosion.jsonl", 49152, window=3) == {"entropy_explosion": 10}


def test_a_learning_rate_fifty_times_the_examples_is_flagged_within_ten_steps() -> None:
    """examples/smollm2_distill.yaml at learner.lr=1e-3 (the example's is 2e-5), 20 steps: every response cut off
    from step 2, a burst of loops at steps 5-6, overlap@16 falling 0.46 -> 0.38; the student ends at 0.000. The
    live run (before never_ends) said health ok."""
    assert verdict("smollm2_lr1e-3_never_ends.jsonl", 49152) == {"never_ends": 10}
    assert verdict("smollm2_lr1e-3_never_ends.jsonl", 49152, window=5) == {"never_ends": 6, "entropy_explosion": 14}
