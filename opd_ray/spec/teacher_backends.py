"""What scores for a teacher: one record a backend, in the spec layer.

`teachers.<name>.backend` names a record (or `auto`: the one records pick for replicas with GPUs, or for
CPUs). The spec and the pre-flight read what a backend can do from its record, and a teacher replica loads
the record's class (`module:Class`, behind actors/teacher_backends.py's `TeacherBackend`) by that path, so a
backend registered in the driver's process is found in the actors' too. A new backend is one class and one
record (`add_teacher_backend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opd_ray.spec.base import Registry


@dataclass(frozen=True)
class TeacherBackendRecord:
    name: str
    implementation: str  # module:Class of its TeacherBackend
    runs_an_engine: bool = False  # starts a vLLM engine: its context and KV cache are checked at pre-flight
    scores_chosen_ids: bool = False  # scores the student's top-k ids (algorithm.topk_support student/union)
    auto_on: Literal["gpu", "cpu"] | None = None  # what `backend: auto` picks on replicas with GPUs, or on CPUs


TEACHER_BACKEND_RECORDS = Registry("teacher backend")


def add_teacher_backend(record: TeacherBackendRecord) -> TeacherBackendRecord:
    if record.name == "auto":
        raise ValueError("teacher backend 'auto' picks one of the others: name yours otherwise")
    return TEACHER_BACKEND_RECORDS.add(record)


def automatic_backend(on_gpus: bool) -> str:
    """The backend `auto` picks: vLLM where a replica has GPUs, transformers on CPUs (1.5x faster there:
    benchmarks/RESULTS.md, teacher_scoring)."""
    wanted = "gpu" if on_gpus else "cpu"
    return next(name for name, record in TEACHER_BACKEND_RECORDS.items() if record.auto_on == wanted)


SHIPPED = "opd_ray.actors.teacher_backends"
add_teacher_backend(TeacherBackendRecord("vllm", f"{SHIPPED}:VllmTeacher", runs_an_engine=True, auto_on="gpu"))
add_teacher_backend(
    TeacherBackendRecord("transformers", f"{SHIPPED}:TransformersTeacher", scores_chosen_ids=True, auto_on="cpu")
)
