"""Reading a spec: YAML by OmegaConf, then pydantic; every mistake becomes one line naming the key.

OmegaConf gives interpolation (`${run.output_dir}`), environment lookups and `key=value`
overrides from the command line; pydantic (sections.py) gives types and ranges.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from opd_ray.errors import SpecError
from opd_ray.spec.sections import ExperimentSpec


def _allowed_keys(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """Walks the pydantic schema to the section that holds a bad key."""
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    location = tuple(error["loc"])
    field = ".".join(str(p) for p in location) or "spec"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(ExperimentSpec, location)
        hint = difflib.get_close_matches(str(location[-1]), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key '{field}'{suggestion}; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"missing required key '{field}'"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    return f"'{field}': {error['msg']} (got {error.get('input')!r})"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Reads YAML, applies `a.b=value` overrides, resolves interpolations, validates."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SpecError(f"override must look like key=value: {bad[0]!r}")
    try:
        config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as exc:
        raise SpecError(f"{path}: {exc}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        messages = [_describe(e) for e in exc.errors()]
        raise SpecError(f"{path}: " + "; ".join(messages)) from None


def spec_to_yaml(spec: ExperimentSpec) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(spec.model_dump(mode="json")))
