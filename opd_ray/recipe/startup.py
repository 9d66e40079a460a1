"""What every command does before its actors start: models, data, Ray, in that order.

Missing tiny or imported models are built first (the synthetic task's files come with them), then the
spec's models, tokenizers and prompt files are checked and tokenized on the driver, so a
bad path or a vocabulary mismatch stops the command in seconds, and only then is Ray joined
or started.
"""

from __future__ import annotations

from opd_ray.data.run_inputs import RunInputs, load_run_inputs
from opd_ray.recipe.cluster import connect
from opd_ray.recipe.real_models import ensure_imported_models
from opd_ray.recipe.tiny_models import ensure_tiny_models
from opd_ray.spec import ExperimentSpec


def start(spec: ExperimentSpec) -> RunInputs:
    """Builds what `models.build_tiny` / `models.import_pretrained` name if missing, checks and tokenizes
    the data, connects to Ray."""
    if spec.models.build_tiny is not None:
        ensure_tiny_models(spec)
    if spec.models.import_pretrained is not None:
        ensure_imported_models(spec)
    inputs = load_run_inputs(spec)
    connect(spec.ray)
    return inputs
