"""Verifiers: built-in ones and a user's module:function."""

from __future__ import annotations

import pytest

from opd_ray.data.verifiers import boxed, exact, final_number, resolve_verifier
from opd_ray.errors import UserError


def always_true(response: str, reference: str) -> bool:
    """A user's verifier, loaded by 'module:function'."""
    return True


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
