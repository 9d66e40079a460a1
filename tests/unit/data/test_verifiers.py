"""Verifiers: built-in ones and a user's module:function."""

from __future__ import annotations

import pytest

from opd_ray.data.verifiers import boxed, exact, final_number, resolve_verifier
from opd_ray.errors import UserError


# --8<-- [start:user_verifier]
def always_true(response: str, reference: str) -> bool:
    """A user's verifier, loaded by 'module:function'."""
    return True


# --8<-- [end:user_verifier]


def test_verifiers() -> None:
    assert exact(" 42 ", "42") and not exact("421", "42")
    assert final_number("so the total is 1,234.", "1234")
    assert not final_number("no digits", "3")
    assert final_number("x = 2.50", "2.5")
    assert boxed("thus \\boxed{\\frac{1}{2}}", "\\frac{1}{2}")
    assert not boxed("thus 1/2", "1/2")
    assert resolve_verifier("tests.unit.data.test_verifiers:always_true")("a", "b")
    with pytest.raises(UserError, match="unknown verifier 'fuzzy'"):
        resolve_verifier("fuzzy")
    with pytest.raises(UserError, match="cannot load"):
        resolve_verifier("no_such_module:f")


def test_first_line_mentions_reads_whole_words_of_the_first_line_only() -> None:
    from opd_ray.data.verifiers import first_line_mentions

    assert first_line_mentions('The opposite of "big" is "little".', "small|little")
    assert first_line_mentions("\n  the capital of France is paris.", "Paris")  # case, leading blank line
    assert first_line_mentions("It is New Delhi.", "New Delhi")
    assert not first_line_mentions("Parisian food", "Paris")  # part of a word
    assert not first_line_mentions("It could be Lyon.\nOr Paris.", "Paris")  # a later line
    assert not first_line_mentions("", "Paris") and not first_line_mentions("Paris", " | ")
