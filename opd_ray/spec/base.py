"""What every section of a spec shares: strict pydantic models, and the small parsers several sections use."""

from __future__ import annotations

import os
import string
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

# A path as the spec gives it, with `~` expanded when the spec is loaded: a run reads and writes where the user
# meant, never into a folder literally named "~" under the working directory.
PathText = Annotated[str, AfterValidator(os.path.expanduser)]


class Section(BaseModel):
    """strict: `steps: true` is not 1 and `lr: "1e-3"` is not a number (YAML already types both);
    no inf/nan anywhere: an infinite lr or temperature would only show up as a NaN loss much later.
    A field's docstring (the string under it) is its description: the spec reference shows it."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


def parse_layer_list(value: Any) -> Any:
    """`"0-21,28,29"` -> [0, 1, ..., 21, 28, 29]; a list passes through (pydantic checks its items)."""
    if not isinstance(value, str):
        return value
    layers: list[int] = []
    for part in value.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{value!r}: write layer indices as a list or as ranges like '0-21,28,29'")
        if dash and int(last) < int(first):
            raise ValueError(f"{value!r}: the range {part} runs backwards; write it as {last}-{first}")
        layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    return layers


def check_distinct_layers(layers: list[int]) -> list[int]:
    """A layer kept twice would share its weights between two places of the pruned model."""
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are listed more than once; each source layer can be kept once")
    return layers


def template_fields(template: str, field: str) -> set[str]:
    """The {placeholders} of a prompt template; a stray brace is named with the spec field, and so is a format
    spec or conversion ({prompt:d}, {answer!r}): row values are text, which `:d` or `:.2f` cannot format."""
    try:
        parts = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as exc:
        raise ValueError(f"{field}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for name, spec, conversion in parts:
        if name is not None and (spec or conversion):
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{field}: {written} formats the value, but row values are text: write {{{name}}}")
    return {name for name, _, _ in parts if name is not None}


class Registry(dict):
    """Records of one kind of extension by name (objectives, stages, trackers, conditions, teacher backends):
    the names a spec may use are its keys."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, record: Any) -> Any:
        """Registers `record` under its `name`; a name registered twice is refused (two plugins, one name)."""
        if record.name in self:
            raise ValueError(f"{self.kind} {record.name!r} is already registered")
        self[record.name] = record
        return record
