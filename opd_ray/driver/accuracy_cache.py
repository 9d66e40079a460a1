"""The teachers' accuracy before training, measured once and reused while nothing that decides it changes.

A teacher does not train, so its greedy accuracy on the eval set is the same on every run of a spec
until the teacher, the eval rows or the way it answers change. Measuring it again costs a whole
greedy evaluation at every start (on 2 cores, about a third of the time before step 1 of the SmolLM2
example). The key digests exactly what decides it: each teacher's model folder (every byte, digests.py), its
dtype as its device resolves `auto`, its settings that shape its answers (backend, engine, answer_stop, its own
prompt template), the token ids of every eval prompt it reads with the reference answers and the rows routed
to it, the verifier, the length limit, and the opd-ray version. A `self` teacher is keyed by the student's
folder it starts from. A verifier of your own (`module:function`) is keyed by its name: after changing its
code, measure again.
`trainer.reuse_teacher_accuracy: false` measures it again (and refreshes the entry).
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path

from opd_ray.data.prompts import PromptSet
from opd_ray.driver.digests import contents_digest
from opd_ray.driver.evaluation import Accuracy
from opd_ray.driver.fingerprint import resolved_dtype
from opd_ray.files import cache_dir, write_json
from opd_ray.spec import ExperimentSpec

# the teacher settings that only say where and how fast it runs, not what it answers
NOT_ANSWER_SHAPING = {"num_replicas", "resources", "coef", "chunk_tokens", "share_prompts", "pack_sequences", "top_k"}


def cache_root() -> Path:
    return cache_dir() / "teacher_accuracy"


def teacher_accuracy_key(spec: ExperimentSpec, eval_prompts: PromptSet) -> str:
    """A digest of everything the teachers' greedy eval accuracy depends on (see the module docstring)."""
    teachers = {}
    for name, teacher in spec.teachers.items():
        settings = teacher.model_dump(mode="json", exclude=NOT_ANSWER_SHAPING)
        settings["model contents"] = contents_digest(Path(spec.teacher_model(name).path))
        settings["dtype (resolved)"] = resolved_dtype(spec.teacher_model(name), teacher.resources.num_gpus)
        teachers[name] = settings
    rows = {
        "prompt_ids": eval_prompts.prompt_ids,
        "teacher_prompt_ids": eval_prompts.teacher_prompt_ids,
        "answers": eval_prompts.answers,
        "teachers": eval_prompts.teachers,
    }
    decided_by = {
        "opd-ray": version("opd-ray"),  # a new build may answer or score differently
        "teachers": teachers,
        "eval rows": rows,
        "verifier": spec.data.verifier,
        "max_new_tokens": spec.rollout.max_new_tokens,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:20]


def cache_entry(spec: ExperimentSpec, eval_prompts: PromptSet) -> Path:
    """This spec's entry: its key digests the teachers' model folders, so a run computes it once."""
    return cache_root() / f"{teacher_accuracy_key(spec, eval_prompts)}.json"


def cached_teacher_accuracy(entry: Path) -> tuple[Accuracy, str] | None:
    """The stored accuracy and when it was measured, if the entry holds one."""
    try:
        record = json.loads(entry.read_text())
        return Accuracy(float(record["overall"]), dict(record["by_teacher"])), str(record["measured"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, or torn by a crash: measured again
        return None


def store_teacher_accuracy(entry: Path, spec: ExperimentSpec, accuracy: Accuracy) -> None:
    """Kept for the next run with the same key (written aside and renamed by `write_json`)."""
    record = {
        "overall": accuracy.overall,
        "by_teacher": accuracy.by_teacher,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "teachers": {name: spec.teacher_model(name).path for name in spec.teachers},
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    write_json(entry, record)
