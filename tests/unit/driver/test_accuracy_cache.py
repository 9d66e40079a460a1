"""The teachers' accuracy cache: reused while the teacher, the eval prompts and the decoding are the same, and
measured again when any of them changes (what a stale number would hide)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from opd_ray.data.prompts import PromptSet
from opd_ray.driver.accuracy_cache import (
    cache_entry,
    cached_teacher_accuracy,
    store_teacher_accuracy,
    teacher_accuracy_key,
)
from opd_ray.driver.evaluation import Accuracy
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

EVAL = PromptSet([[1, 2, 3], [4, 5]], ["3", "9"], "eval.jsonl")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPD_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def spec_with(raw: dict, **trainer) -> ExperimentSpec:
    return ExperimentSpec.model_validate({**raw, "trainer": {**raw["trainer"], **trainer}})


@pytest.fixture
def raw(tiny_dir: Path, tmp_path: Path) -> dict:
    own_teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dir / "teacher", own_teacher)  # a copy this test may change
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"] = {**raw["models"], "teacher": {"path": str(own_teacher)}}
    return raw


def test_a_stored_accuracy_is_read_back_by_the_same_spec_and_by_one_that_trains_longer(raw: dict) -> None:
    spec = spec_with(raw)
    assert cached_teacher_accuracy(cache_entry(spec, EVAL)) is None
    store_teacher_accuracy(cache_entry(spec, EVAL), spec, Accuracy(0.5, {"teacher": 0.5}))
    accuracy, measured = cached_teacher_accuracy(cache_entry(spec_with(raw, steps=500, eval_every=5), EVAL))
    assert accuracy == Accuracy(0.5, {"teacher": 0.5}) and measured[:2] == "20"


def test_what_decides_the_accuracy_changes_the_key(raw: dict) -> None:
    spec = spec_with(raw)
    key = teacher_accuracy_key(spec, EVAL)
    other_rows = PromptSet([[1, 2, 3], [4, 6]], ["3", "9"], "eval.jsonl")
    other_answers = PromptSet([[1, 2, 3], [4, 5]], ["3", "8"], "eval.jsonl")
    longer = ExperimentSpec.model_validate({**raw, "rollout": {**raw["rollout"], "max_new_tokens": 7}})
    other_verifier = ExperimentSpec.model_validate({**raw, "data": {**raw["data"], "verifier": "final_number"}})
    other_backend = ExperimentSpec.model_validate({**raw, "teacher": {**raw["teacher"], "backend": "vllm"}})
    changed = [
        teacher_accuracy_key(spec, other_rows),
        teacher_accuracy_key(spec, other_answers),
        teacher_accuracy_key(longer, EVAL),
        teacher_accuracy_key(other_verifier, EVAL),
        teacher_accuracy_key(other_backend, EVAL),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    fast = {"num_replicas": 2, "top_k": 4, "pack_sequences": False}
    faster = ExperimentSpec.model_validate({**raw, "teacher": {**raw["teacher"], **fast}})
    assert teacher_accuracy_key(faster, EVAL) == key  # replicas and the scoring top-k do not change its answers


def test_new_teacher_weights_in_the_same_folder_are_measured_again(raw: dict) -> None:
    spec = spec_with(raw)
    store_teacher_accuracy(cache_entry(spec, EVAL), spec, Accuracy(0.5, {"teacher": 0.5}))
    weights = Path(raw["models"]["teacher"]["path"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert cached_teacher_accuracy(cache_entry(spec, EVAL)) is None


def test_a_torn_entry_is_measured_again_not_an_error(raw: dict, own_cache: Path) -> None:
    spec = spec_with(raw)
    store_teacher_accuracy(cache_entry(spec, EVAL), spec, Accuracy(0.5, {"teacher": 0.5}))
    (entry,) = (own_cache / "teacher_accuracy").iterdir()
    entry.write_text('{"overall": 0.5, "by_te')
    assert cached_teacher_accuracy(cache_entry(spec, EVAL)) is None


def test_a_run_measures_the_teacher_once_and_then_only_the_student(raw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """measure_before_training with a stand-in for the greedy evaluations (they need engines; what is under test
    is which of them run): the first run asks the teacher and stores it, the next asks only the student."""
    from opd_ray.driver import loop

    asked: list[str] = []

    def evaluations_standing_in(run, kind: str) -> Accuracy:
        asked.append(kind)
        return Accuracy(0.75, {"teacher": 0.75}) if kind == "teacher" else Accuracy(0.25, {"teacher": 0.25})

    monkeypatch.setattr(loop, "accuracies", evaluations_standing_in)
    spec = spec_with(raw)
    for _ in range(2):
        run = SimpleNamespace(spec=spec, inputs=SimpleNamespace(eval=EVAL), summary={}, startup={})
        loop.measure_before_training(run)
        assert run.summary["teacher_accuracy"] == 0.75 and run.summary["student_accuracy_before"] == 0.25
        assert run.startup["accuracy_before"] >= 0
    assert asked == ["teacher", "rollout", "rollout"]
    assert run.summary["teacher_accuracy_cached"] is True


def test_reuse_turned_off_measures_the_teacher_again(raw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from opd_ray.driver import loop

    asked: list[str] = []
    monkeypatch.setattr(loop, "accuracies", lambda run, kind: asked.append(kind) or Accuracy(0.5, {"teacher": 0.5}))
    store_teacher_accuracy(cache_entry(spec_with(raw), EVAL), spec_with(raw), Accuracy(0.9, {"teacher": 0.9}))
    run = SimpleNamespace(spec=spec_with(raw, reuse_teacher_accuracy=False), inputs=SimpleNamespace(eval=EVAL))
    run.summary, run.startup = {}, {}
    loop.measure_before_training(run)
    assert asked == ["teacher", "rollout"] and run.summary["teacher_accuracy"] == 0.5
    assert run.summary["teacher_accuracy_cached"] is False


def test_the_key_holds_the_resolved_dtype_and_the_opd_ray_version(raw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """dtype auto is float32 on CPUs and bfloat16 on GPUs: a CPU figure must not be reused by a GPU run."""
    from opd_ray.driver import accuracy_cache

    key = teacher_accuracy_key(spec_with(raw), EVAL)
    on_gpus = {**raw["teacher"], "resources": {"num_gpus": 1}}
    assert teacher_accuracy_key(ExperimentSpec.model_validate({**raw, "teacher": on_gpus}), EVAL) != key
    monkeypatch.setattr(accuracy_cache, "version", lambda name: "999.0")
    assert teacher_accuracy_key(spec_with(raw), EVAL) != key
