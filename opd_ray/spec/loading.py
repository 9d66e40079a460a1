"""Reading a spec: YAML by OmegaConf, then pydantic; every mistake becomes one line naming the key.

OmegaConf gives interpolation (`${run.output_dir}`), environment lookups and `key=value`
overrides from the command line; pydantic (the section modules, experiment.py) gives types and ranges.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from opd_ray.console import console
from opd_ray.errors import SpecError
from opd_ray.spec.experiment import ExperimentSpec
from opd_ray.spec.objectives import OBJECTIVE_RECORDS, SHARED_KEYS, key_owners
from opd_ray.spec.plugins import import_plugins


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
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        return message if not location or message.startswith(str(location[0])) else f"'{field}': {message}"
    return f"'{field}': {error['msg']} (got {error.get('input')!r})"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Reads YAML, applies `a.b=value` overrides, resolves interpolations, validates."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SpecError(f"{path} is a directory: give the spec's YAML file (e.g. examples/quickstart.yaml)")
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    config = read_yaml(path)
    if isinstance(config, DictConfig) and isinstance(config.get("plugins"), ListConfig):
        import_plugins([str(module) for module in config.plugins])  # their objectives before the next line reads them
    config = set_aside_other_objective_keys(config, overrides)
    for override in overrides:
        try:
            config = OmegaConf.merge(config, parse_override(override))
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            key = override.partition("=")[0]
            raise SpecError(
                f"override {override!r}: its value does not fit what {path} holds at {key} ({exc})".splitlines()[0]
            ) from None
    try:
        raw = OmegaConf.to_container(config, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: {exc}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    if isinstance(raw.get("plugins"), list):
        import_plugins([str(module) for module in raw["plugins"]])  # an override may name more
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        messages = [_describe(e) for e in exc.errors()]
        raise SpecError(f"{path}: " + "; ".join(messages)) from None
    spec._environment_values = environment_lookups(OmegaConf.to_container(config, resolve=False))
    return spec


def set_aside_other_objective_keys(config: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """`algorithm.objective=X` on the command line switches a spec to another objective (a control arm, a
    comparison): the file's keys that only its own objective reads are set aside, said in one line, instead of
    refused; the same keys given on the command line are still refused."""
    switched = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "algorithm.objective"]
    algorithm = config.get("algorithm") if isinstance(config, DictConfig) else None
    if not switched or not isinstance(algorithm, DictConfig) or switched[-1] not in OBJECTIVE_RECORDS:
        return config
    kept = set(SHARED_KEYS) | set(OBJECTIVE_RECORDS[switched[-1]].keys)
    aside = [str(key) for key in algorithm if str(key) not in kept and key_owners(str(key))]
    if aside:
        console.print(
            f"algorithm.objective={switched[-1]} from the command line: the file's algorithm."
            f"{', algorithm.'.join(aside)} (not read by {switched[-1]}) set aside",
            highlight=False,
            soft_wrap=True,
        )
        config = config.copy()
        for key in aside:
            del config.algorithm[key]
    return config


def read_yaml(path: Path) -> Any:
    """The spec file as OmegaConf reads it; a syntax error names the file, line and column."""
    try:
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        hint = " (quote values that hold ${...} inside {...})" if "${" in path.read_text() else ""
        raise SpecError(f"{where}: YAML syntax error: {exc.problem or exc.context}{hint}") from None
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: {exc}".splitlines()[0]) from None


def parse_override(override: str) -> Any:
    """One `key=value` from the command line; a value that is not YAML is blamed on the override, not the file."""
    key, equals, value = override.partition("=")
    if not equals or not key.strip():
        raise SpecError(f"override must look like key=value: {override!r}")
    try:
        return OmegaConf.from_dotlist([override])
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(
            f"override {override!r}: the value {value!r} is not valid YAML ({problem}); quote it, e.g. "
            f"{key}='\"{value}\"'"
        ) from None


def environment_lookups(unresolved: Any, location: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """{location: "${oc.env:...}"} of every value read from the environment (tokens, passwords, paths)."""
    if isinstance(unresolved, (dict, list)):
        found: dict[tuple[str, ...], str] = {}
        items = unresolved.items() if isinstance(unresolved, dict) else enumerate(unresolved)
        for key, value in items:
            found.update(environment_lookups(value, (*location, str(key))))
        return found
    if isinstance(unresolved, str) and "${oc.env:" in unresolved:
        return {location: unresolved}
    return {}


def spec_to_yaml(spec: ExperimentSpec) -> str:
    """The resolved spec, except that values read from the environment keep their `${oc.env:...}`: what
    `opd-ray validate` prints and a run writes to spec.yaml never holds a secret from the environment."""
    dumped = spec.model_dump(mode="json")
    for location, interpolation in spec._environment_values.items():
        section: Any = dumped
        for key in location[:-1]:
            section = child(section, key)
        if isinstance(section, dict) and location[-1] in section:
            section[location[-1]] = interpolation
        elif isinstance(section, list) and location[-1].isdigit() and int(location[-1]) < len(section):
            section[int(location[-1])] = interpolation
    return OmegaConf.to_yaml(OmegaConf.create(dumped))


def child(section: Any, key: str) -> Any:
    """A mapping's value or a list's item by its (string) index; None where there is none."""
    if isinstance(section, dict):
        return section.get(key)
    if isinstance(section, list) and key.isdigit() and int(key) < len(section):
        return section[int(key)]
    return None
