"""A recording stand-in for tiny-model training (a fake for what these tests are not about: how SFT trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.recipe import tiny_models


@pytest.fixture
def recorded_training(monkeypatch) -> list[tuple[str, Path, list]]:
    """(label, output directory, examples) of every tiny model the build would have trained, in order."""
    trained: list[tuple[str, Path, list]] = []

    def fake_train(init, output_dir, examples, learner, steps, batch_size, seed, label, records=None):
        trained.append((label, output_dir, examples))
        output_dir.mkdir(parents=True)
        for name, value in (records([0.0]) if records else {}).items():
            (output_dir / name).write_text(json.dumps(value))
        return [0.0]

    monkeypatch.setattr(tiny_models, "train_supervised", fake_train)
    monkeypatch.setattr(tiny_models, "connect", lambda ray_spec: None)
    return trained
