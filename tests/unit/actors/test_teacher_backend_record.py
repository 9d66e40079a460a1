"""A new teacher backend is one class and one record: a spec may name it, and a teacher replica loads it by the
record's `module:Class` (so a replica in another process finds it without the driver's registration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.actors.vllm_engine import Completion
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


# --8<-- [start:toy_backend]
class EchoTeacher:
    """A toy backend: answers every prompt with the prompt's own last token, scores nothing."""

    def __init__(self, model, settings, seed: int, tokenizer) -> None:
        self.tokenizer = tokenizer

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
        return [
            Completion(i, ids[-1:], [], None, True, self.tokenizer.decode(ids[-1:])) for i, ids in prompts_P.items()
        ]

    def score(self, batch, cross_tokenizer: bool):
        raise NotImplementedError("a toy")

    def load_weights(self, payload: dict) -> None:
        raise NotImplementedError("a toy")


# --8<-- [end:toy_backend]


@pytest.fixture
def echo_backend():
    from opd_ray.spec.teacher_backends import TEACHER_BACKEND_RECORDS, TeacherBackendRecord, add_teacher_backend

    add_teacher_backend(TeacherBackendRecord("echo", "tests.unit.actors.test_teacher_backend_record:EchoTeacher"))
    yield
    TEACHER_BACKEND_RECORDS.pop("echo")


def test_a_new_backend_is_named_by_a_spec_and_loaded_by_a_replica(tiny_dir: Path, tmp_path: Path, echo_backend):
    from opd_ray.actors.teacher import TeacherScorer

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["teacher"]["backend"] = "echoes"
    with pytest.raises(ValueError, match=r"'echoes' is not a teacher backend; the backends are auto, vllm, trans"):
        ExperimentSpec.model_validate(raw)
    raw["teacher"]["backend"] = "echo"
    spec = ExperimentSpec.model_validate(raw)
    with pytest.raises(ValueError, match=r"needs the teacher's log-probs at the student's top-k ids"):
        ExperimentSpec.model_validate({**raw, "algorithm": {"objective": "topk", "topk_support": "student"}})
    scorer = TeacherScorer(spec.teacher_model("teacher"), spec.teachers["teacher"], seed=0)
    assert isinstance(scorer.backend, EchoTeacher)
    (answer,) = scorer.greedy({0: [5, 6, 7]}, max_new_tokens=4)
    assert answer.token_ids == [7] and answer.finished
