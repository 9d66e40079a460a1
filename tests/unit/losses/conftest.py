"""The reference checks' batch and shipped models, loaded once for the loss tests that use them."""

from __future__ import annotations

import pytest

from tests.reference.batch import load_model, load_tensors


@pytest.fixture(scope="module")
def shipped():
    """The batch, the teacher, and the student that sampled it (each test trains copies of it)."""
    return load_tensors(), load_model("teacher").eval(), load_model("student")
