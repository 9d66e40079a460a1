"""The quickstart's tiny models come from the shipped copies; any other recipe, or --from-scratch, trains."""

from __future__ import annotations

import filecmp
from pathlib import Path

from opd_ray.recipe import tiny_models
from opd_ray.spec import load_spec
from tests.conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_the_quickstart_recipe_copies_the_shipped_models(tmp_path: Path, recorded_training: list) -> None:
    spec = load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path}"])
    tiny_models.ensure_tiny_models(spec)
    assert recorded_training == []
    for label in ("teacher", "student"):
        shipped = tiny_models.SHIPPED / label
        names = sorted(p.name for p in shipped.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(shipped, tmp_path / label, names, shallow=False)
        assert (mismatch, errors) == ([], []) and "model.safetensors" in match
    assert (tmp_path / "train.jsonl").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_another_recipe_or_from_scratch_trains(tmp_path: Path, recorded_training: list) -> None:
    changed = load_spec(
        QUICKSTART, [f"models.build_tiny.directory={tmp_path / 'a'}", "models.build_tiny.student_sft_steps=599"]
    )
    tiny_models.ensure_tiny_models(changed)
    assert [label for label, _, _ in recorded_training] == ["student"]  # the teacher's still matches the shipped one
    same = load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path / 'b'}"])
    tiny_models.ensure_tiny_models(same, from_scratch=True)
    assert [label for label, _, _ in recorded_training] == ["student", "teacher", "student"]
