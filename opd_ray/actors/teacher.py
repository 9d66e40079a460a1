"""Teacher scoring service: replicas that score every sampled response token with the teacher.

A replica holds one backend (actors/teacher_backends.py: vLLM or transformers) and adds what
every teacher does: its own prompts, scoring in its own tokenizer when that differs
(actors/cross_tokenizer.py), and marking each batch with the teacher's index and weight.
"""

from __future__ import annotations

import time
from dataclasses import replace

import ray
import torch

from opd_ray.actors.cross_tokenizer import CrossTokenizer
from opd_ray.actors.runtime import EngineActor, count_start
from opd_ray.actors.teacher_backends import backend_class
from opd_ray.actors.vllm_engine import Completion
from opd_ray.data.preflight import vocab_size
from opd_ray.losses.batch import RolloutBatch, scores_from, with_prompts
from opd_ray.spec import ModelSpec, NamedTeacherSpec
from opd_ray.spec.plugins import import_inherited_plugins


class TeacherScorer(EngineActor):
    """A teacher replica (run as a Ray actor by `roles.start_teacher`); a plain class so tests can extend it.

    It holds one backend (the class `teacher.backend`'s record names). `index` is the teacher's place among the
    run's teachers: every batch it scores is marked with it and with the teacher's loss coefficient, so the
    learners know which teacher scored which row. A `self` teacher with `weights: current` receives every
    weight sync (`load_weights`)."""

    def __init__(
        self,
        model: ModelSpec,
        teacher: NamedTeacherSpec,
        seed: int,
        index: int = 0,
        student: ModelSpec | None = None,
    ) -> None:
        """`student` (cross_tokenizer teachers): the student whose tokens the scores are aligned back to; with
        identical vocabularies the ids are scored directly, as for any teacher."""
        from transformers import AutoTokenizer

        count_start("teacher replica")
        import_inherited_plugins()
        self.teacher, self.index = teacher, index
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.cross = None
        if student is not None:
            student_tokenizer = AutoTokenizer.from_pretrained(student.path, trust_remote_code=student.trust_remote_code)
            # heads of different sizes (padding rows): the alignment drops the teacher's ids past the student's
            same_rows = vocab_size(student, "models.student") == vocab_size(model, "teacher model")
            if student_tokenizer.get_vocab() != tokenizer.get_vocab() or not same_rows:
                self.cross = CrossTokenizer(student_tokenizer, tokenizer)
        self.backend = backend_class(teacher.backend_record.implementation)(model, teacher, seed, tokenizer)

    @ray.method(num_returns=2)
    def score(self, batch: RolloutBatch, teacher_prompts_P: dict[int, list[int]] | None = None) -> tuple:
        """The scored batch, and a small report the driver waits on without fetching the batch.

        With `teacher_prompts_P` (row -> this teacher's own prompt) the responses are scored after those
        prompts instead of the student's; only response positions are scored either way. A teacher with
        another tokenizer scores the responses' text in its own tokens (actors/cross_tokenizer.py)."""
        started = time.perf_counter()
        cross = self.cross is not None
        if cross:
            view, chunks = self.cross.teacher_view(batch, teacher_prompts_P)
            scored = self.cross.student_scores(batch, self.backend.score(view, cross), chunks)
        elif teacher_prompts_P is not None:
            scored = scores_from(batch, self.backend.score(with_prompts(batch, teacher_prompts_P), cross))
        else:
            scored = self.backend.score(batch, cross)
        rows = scored.num_sequences
        scored = replace(
            scored,
            teacher_id_B=torch.full((rows,), self.index, dtype=torch.long),
            teacher_coef_B=torch.full((rows,), self.teacher.coef),
        )
        return scored, {"seconds": time.perf_counter() - started}

    def load_weights(self, payload: dict, weight_version: int) -> None:
        """The student's current weights (a `self` teacher with `weights: current`), as a rollout engine gets them."""
        self.backend.load_weights(payload)
        self._weight_version = weight_version

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
        return self.backend.greedy(prompts_P, max_new_tokens)
