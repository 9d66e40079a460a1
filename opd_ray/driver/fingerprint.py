"""What defines a run, recorded with each checkpoint and finished stage, so that --resume continues the same run.

A fingerprint maps every spec key that defines the run (models, data, objective, seed, batch
and sampling settings: everything not in `MAY_CHANGE_ON_RESUME`) to its value, and each model
folder and data file to a digest of its contents. Resuming with another teacher, other data or
another objective is refused with the keys that differ; the keys that only say how long to
train, how often to evaluate or checkpoint, how to log, where to run and how long to wait may
change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from opd_ray.driver.digests import DIGEST_SCHEME, contents_digest
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec, ModelSpec, NamedTeacherSpec, TeacherSpec
from opd_ray.spec.roles import SHORTHAND_TEACHER

MAY_CHANGE_ON_RESUME = (
    "run.name",
    "run.output_dir",
    "trainer.steps",
    "trainer.eval_every",
    "trainer.reuse_teacher_accuracy",
    "trainer.save_final",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.max_actor_restarts",
    "trainer.max_bad_steps",
    "trainer.timeouts",  # how long to wait on actors
    "trainer.stop_on",
    "logging",
    "health",
    "diagnostics",
    "probe",
    "ray",
    "placement",
    "weight_sync",
    "rollout.num_workers",
    "rollout.resources",
    "rollout.engine",
    "teachers.*.num_replicas",  # each teacher's (the one-teacher shorthand's is teachers.teacher)
    "teachers.*.resources",
    "teachers.*.engine",
    "teachers.*.chunk_tokens",
    "teachers.*.share_prompts",
    "teachers.*.pack_sequences",
    "learner.resources",
    "learner.chunk_tokens",
    "learner.pack_sequences",
    "learner.gradient_checkpointing",
    "learner.attn_implementation",
    "data.verifier_errors",
    "models.build_tiny",  # what they build is fingerprinted by its contents
    "models.import_pretrained",
)
LEGACY_WHOLE_FILE_BYTES = 64 << 20  # fingerprints recorded before DIGEST_SCHEME digested larger files by edges
LEGACY_EDGE_BYTES = 1 << 20


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def may_change(key: str) -> bool:
    """`key` is one of MAY_CHANGE_ON_RESUME or inside one (`*` stands for one name: a teacher's)."""
    parts = key.split(".")
    for allowed in MAY_CHANGE_ON_RESUME:
        pattern = allowed.split(".")
        if len(parts) >= len(pattern) and all(
            want in ("*", got) for want, got in zip(pattern, parts[: len(pattern)], strict=True)
        ):
            return True
    return False


def legacy_file_digest(path: Path) -> str:
    """How fingerprints recorded before DIGEST_SCHEME digested a file (size, first and last MiB past 64 MiB): to
    compare them with the spec as they were made. New fingerprints hash every byte (digests.py)."""
    digest, size = hashlib.sha256(), path.stat().st_size
    with path.open("rb") as handle:
        if size <= LEGACY_WHOLE_FILE_BYTES:
            digest.update(handle.read())
        else:
            digest.update(str(size).encode() + handle.read(LEGACY_EDGE_BYTES))
            handle.seek(size - LEGACY_EDGE_BYTES)
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def legacy_contents_digest(path: Path) -> str:
    """The older folder digest: top-level files only (see legacy_file_digest)."""
    if path.is_file():
        return legacy_file_digest(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for item in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{item.name}:{legacy_file_digest(item)};".encode())
    return digest.hexdigest()[:16]


def resolved_dtype(model: ModelSpec, gpus: float) -> str:
    """`dtype: auto` as the role resolves it: by the device class it runs on (bfloat16 on a GPU, float32 on CPUs:
    actors/hf_model.dtype_name), so a figure measured on CPUs is never taken for a GPU run's."""
    return model.dtype if model.dtype != "auto" else f"auto on {'GPU' if gpus > 0 else 'CPU'}"


def resolved_dtypes(spec: ExperimentSpec) -> dict[str, str]:
    """Each model's resolved dtype, by the role that runs it."""
    resolved = {"models.student.dtype (resolved)": resolved_dtype(spec.models.student, spec.learner.resources.num_gpus)}
    for name, teacher in spec.teachers.items():
        model = spec.teacher_model(name)
        resolved[f"teachers.{name}.dtype (resolved)"] = resolved_dtype(model, teacher.resources.num_gpus)
    return resolved


def input_files(spec: ExperimentSpec) -> dict[str, str]:
    """{spec key: path} of every model folder and data file the run reads."""
    files = {"models.student": spec.models.student.path}
    for name, teacher in spec.teachers.items():
        if not teacher.is_self:
            files[f"teachers.{name}.model"] = teacher.model.path
    for section, datasets in (("data.train", spec.data.train_files), ("data.eval", spec.data.eval_files)):
        for i, dataset in enumerate(datasets):
            files[section if len(datasets) == 1 else f"{section}[{i}]"] = dataset.path
    if spec.data.selection is not None:
        for i, reference in enumerate(spec.data.selection.reference):
            files[f"data.selection.reference.{i}"] = reference.path
        if spec.data.selection.outside is not None:
            files["data.selection.outside"] = spec.data.selection.outside.path
    return files


def run_fingerprint(spec: ExperimentSpec, legacy: bool = False) -> dict[str, str]:
    """{key: value} of what defines the run; `legacy` computes it as builds before DIGEST_SCHEME did (to compare
    with a checkpoint they wrote: no resolved dtypes, edge digests of big files, top-level folder files)."""
    defining = {k: json.dumps(v) for k, v in flatten(spec.model_dump(mode="json")).items() if not may_change(k)}
    digest = legacy_contents_digest if legacy else contents_digest
    for key, path in input_files(spec).items():
        defining[f"{key} (contents)"] = digest(Path(path))
    if not legacy:
        defining["digests"] = DIGEST_SCHEME
        defining.update(resolved_dtypes(spec))
    return defining


def in_current_shape(recorded: dict[str, str]) -> dict[str, str]:
    """A fingerprint recorded before the one-teacher shorthand became teachers.teacher at load, in today's keys:
    a shorthand run's teacher.* and models.teacher* move under teachers.teacher (with the named-teacher
    settings the shorthand could not set, at their defaults); a named run's unused teacher.* defaults go."""
    if not any(key == "models.teacher" or key.startswith(("teacher.", "models.teacher")) for key in recorded):
        return recorded
    named = any(key.startswith("teachers.") for key in recorded)
    shape: dict[str, str] = {}
    for key, value in recorded.items():
        if key.startswith("models.teacher") and not named:
            shape[f"teachers.{SHORTHAND_TEACHER}.model{key.removeprefix('models.teacher')}"] = value
        elif key.startswith("teacher.") and not named:
            shape[f"teachers.{SHORTHAND_TEACHER}.{key.removeprefix('teacher.')}"] = value
        elif key != "models.teacher" and not key.startswith("teacher."):
            shape[key] = value
    if not named:
        defaults = NamedTeacherSpec(model="self").model_dump(mode="json")
        for field in set(NamedTeacherSpec.model_fields) - set(TeacherSpec.model_fields) - {"model"}:
            shape.setdefault(f"teachers.{SHORTHAND_TEACHER}.{field}", json.dumps(defaults[field]))
    return shape


def differing_keys(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    return sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))


def check_same_run(recorded: dict[str, str] | None, spec: ExperimentSpec, what: str, force: bool) -> None:
    """Refuses to continue `what` (a checkpoint, a finished stage) under a spec that defines another run."""
    if not recorded:
        return  # written before fingerprints existed: nothing to compare
    differences = differing_keys(in_current_shape(recorded), run_fingerprint(spec, legacy="digests" not in recorded))
    if not differences:
        return
    shown = ", ".join(differences[:8]) + (f" and {len(differences) - 8} more" if len(differences) > 8 else "")
    if force:
        from opd_ray.console import console

        console.print(f"[yellow]--force: resuming {what} although these differ: {shown}[/]")
        return
    raise UserError(
        f"--resume: the spec defines another run than {what} ({shown} differ); pass --force to resume anyway, "
        "or set run.output_dir to a new directory"
    )
