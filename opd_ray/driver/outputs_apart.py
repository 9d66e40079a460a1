"""A run writes only where nothing it reads lives: its outputs never overwrite its inputs.

`run.output_dir` receives spec.yaml, metrics.jsonl, student/, checkpoints/ and more, and `--overwrite` deletes
those names. A run directory that is, holds, or lies inside a model folder, a data file, a model cache or the
spec file itself would write over (or delete) what the user gave the run: refused before anything starts,
naming both. One exception: resuming from the spec.yaml the run recorded (`opd-ray train runs/x/spec.yaml
--resume`), which the run rewrites with the same text.
"""

from __future__ import annotations

from pathlib import Path

from opd_ray.driver.fingerprint import input_files
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from opd_ray.spec.models import PACKAGE_PREFIX


def read_paths(spec: ExperimentSpec, spec_file: Path | None) -> dict[str, Path]:
    """{what: path} of everything the run reads: models, data, the model caches and sources, the spec file."""
    paths = {key: Path(path) for key, path in input_files(spec).items()}
    if spec.models.build_tiny is not None:
        paths["models.build_tiny.directory"] = Path(spec.models.build_tiny.directory)
    imported = spec.models.import_pretrained
    if imported is not None:
        paths["models.import_pretrained.directory"] = Path(imported.directory)
        if not imported.source.startswith(PACKAGE_PREFIX):
            paths["models.import_pretrained.source"] = Path(imported.source)
    if spec_file is not None:
        paths["the spec file"] = spec_file
    return {what: path.expanduser().resolve() for what, path in paths.items()}


def overlaps(one: Path, other: Path) -> bool:
    return one == other or one.is_relative_to(other) or other.is_relative_to(one)


def check_outputs_apart(spec: ExperimentSpec, spec_file: Path | None = None, resume: bool = False) -> None:
    """Refuses a run directory that is, holds or lies inside anything the run reads (see the module docstring)."""
    run_dir = Path(spec.run.output_dir).expanduser().resolve()
    recorded_spec = run_dir / "spec.yaml"
    for what, path in read_paths(spec, spec_file).items():
        if what == "the spec file" and resume and path == recorded_spec:
            continue  # the run's own record, resumed: rewritten with the same text
        if overlaps(run_dir, path):
            where = "is" if run_dir == path else "holds" if path.is_relative_to(run_dir) else "lies inside"
            raise UserError(
                f"run.output_dir {run_dir} {where} {what} ({path}): the run writes spec.yaml, metrics.jsonl, "
                "student/ and checkpoints/ there and --overwrite deletes them; set run.output_dir to a directory "
                "of its own"
            )
