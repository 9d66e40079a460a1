"""Gap recovery and how evaluation prompts are split across actors."""

from __future__ import annotations

import pytest


def test_gap_recovery_and_split() -> None:
    from opd_ray.driver.evaluation import gap_recovery
    from opd_ray.driver.roles import split

    assert gap_recovery(before=0.2, after=0.6, teacher=1.0) == pytest.approx(0.5)
    assert gap_recovery(before=0.5, after=0.4, teacher=0.5) is None  # no gap to recover
    assert gap_recovery(before=0.17, after=0.0, teacher=0.0) is None  # a teacher below the student: not 1.0
    assert split(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    assert split([7], 3) == [[7]]  # idle workers get nothing rather than an empty request


def test_a_teachers_answer_ends_at_its_answer_stop() -> None:
    """A base model prompted few-shot writes its answer, a newline and the next question until the length
    limit: with answer_stop ["\\n"] the text before the newline is scored, as a finished answer."""
    from opd_ray.actors.vllm_engine import Completion
    from opd_ray.driver.evaluation import ended_at

    rambling = Completion(3, [1, 2, 3], [], None, finished=False, text=" Paris\n\nQ: What is the capital of Peru?")
    ended = ended_at(rambling, ["\n", "Q:"])
    assert (ended.text, ended.finished, ended.prompt_index) == (" Paris", True, 3)
    assert ended_at(rambling, []) is rambling and ended_at(rambling, ["###"]) is rambling
