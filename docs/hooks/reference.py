"""MkDocs hook: the reference pages, generated from the code at every build so they cannot go stale.

reference/spec.md   every spec key: type, default, constraints, description (the pydantic models)
reference/cli.md    every command and flag (cli.py's argparse parser)
reference/metrics.md every logged key by prefix (driver/metric_keys.py, which a test checks runs against)

Figures outside docs/ that pages show (the paper miniature's PNGs) are added to the site here too.
tests/unit/test_docs.py imports this file to check the pages against the code.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parents[2]
FIGURES = ["examples/paper_miniature/results/*.png"]


def on_files(files, config):
    from mkdocs.structure.files import File

    for name, text in reference_pages().items():
        files.append(File.generated(config, f"reference/{name}", content=text))
    for pattern in FIGURES:
        for path in sorted(REPO.glob(pattern)):
            relative = str(path.relative_to(REPO))
            files.append(File.generated(config, relative, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """A "last updated" line under every page written by hand: the date of the last commit that changed it."""
    source = page.file.abs_src_path
    if page.file.generated_by or source is None:
        return markdown
    return markdown + f"\n\n---\n*Last updated: {last_commit_date(Path(source))}*\n"


def last_commit_date(path: Path) -> str:
    """`git log`'s date of the file's last commit; "not committed yet" outside a checkout or for a new file."""
    try:
        found = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return found.stdout.strip() or "not committed yet"


def reference_pages() -> dict[str, str]:
    return {"spec.md": spec_page(), "cli.md": cli_page(), "metrics.md": metrics_page()}


# ---- spec keys ----


def spec_page() -> str:
    from opd_ray.spec import ExperimentSpec

    lines = [
        "# Spec keys",
        "",
        "Every key of an experiment spec, generated from the pydantic models in `opd_ray/spec/` (so it is the",
        "code's). `opd-ray validate SPEC` prints a spec with every key resolved; `key=value` on the command line",
        "overrides one. `teachers.<name>` holds the keys of `teachers.*` for each named teacher; the one-teacher",
        "shorthand `models.teacher` + `teacher:` becomes `teachers.teacher`.",
        "",
    ]
    for section, rows in spec_rows(ExperimentSpec).items():
        lines += [f"## `{section}`", ""]
        about = section_doc(ExperimentSpec, section)
        lines += [about, ""] if about else []
        lines += ["| key | type | default | constraints | meaning |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def section_doc(model: type[BaseModel], section: str) -> str:
    """The docstring of a top-level section's own model (not the one every section inherits)."""
    field = model.model_fields.get(section)
    nested = nested_model(field.annotation) if field is not None else None
    doc = nested.__dict__.get("__doc__") if nested is not None else None
    return inspect.cleandoc(doc) if doc else ""


def row_cells(row: tuple[str, ...]) -> list[str]:
    key, *rest = row
    return [f"`{key}`", *rest]


def spec_rows(model: type[BaseModel], prefix: str = "") -> dict[str, list[tuple[str, ...]]]:
    """{section: [(key, type, default, constraints, description)]}: nested sections recursed into."""
    sections: dict[str, list[tuple[str, ...]]] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = key.split(".")[0] if "." in key else "top level"
        nested = nested_model(field.annotation)
        if nested is not None:
            for sub, rows in spec_rows(nested, f"{key}{'.*' if is_mapping(field.annotation) else ''}.").items():
                sections.setdefault(sub, []).extend(rows)
            if not field.description:
                continue
        row = (key, type_name(field.annotation), default_of(field), constraints(field), cell(field.description or ""))
        sections.setdefault(section, []).append(row)
    return sections


def nested_model(annotation) -> type[BaseModel] | None:
    """The section model a field holds (directly, optionally, or as a dict's values), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = nested_model(argument)
        if found is not None:
            return found
    return None


def is_mapping(annotation) -> bool:
    return typing.get_origin(annotation) is dict


def type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " \\| ".join(type_name(a) for a in typing.get_args(annotation))
    return cell(str(annotation).replace("typing.", ""))


def default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def constraints(field: FieldInfo) -> str:
    found = []
    for item in field.metadata:
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >=")):
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---- the command line ----


def cli_page() -> str:
    from opd_ray.cli import _parser

    parser = _parser()
    lines = ["# CLI", "", "Every `opd-ray` command and flag, generated from `opd_ray/cli.py`'s parser.", ""]
    for name, sub in subcommands(parser).items():
        lines += [f"## `opd-ray {name}`", "", sub.description or parser_help(parser, name), ""]
        lines += ["```text", sub.format_usage().strip(), "```", "", "| argument | meaning |", "|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(action.option_strings) or action.dest
            default = "" if action.default in (None, False, [], argparse.SUPPRESS) else f" (default {action.default})"
            lines.append(f"| `{names}` | {cell(action.help or '')}{default} |")
        lines.append("")
    return "\n".join(lines)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parser_help(parser: argparse.ArgumentParser, name: str) -> str:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next((c.help for c in action._choices_actions if c.dest == name), "") or ""


# ---- metrics ----


def metrics_page() -> str:
    from opd_ray.driver.metric_keys import METRIC_GROUPS

    lines = [
        "# Metrics",
        "",
        "Every key a step logs to `metrics.jsonl` (and to the trackers in `logging.trackers`), grouped by prefix;",
        "generated from `opd_ray/driver/metric_keys.py`, and the integration tests fail when a run logs a key",
        "that table lacks. `{teacher}` is a teacher's name, `{role}` rollout, teacher or learner, `{signal}` a",
        "`diag/` signal, `{position}` start, middle or end (a third of each response). The summary's keys",
        "(`summary.json`) reach the trackers as `summary/...` at the end of a run.",
        "",
    ]
    for group, keys in METRIC_GROUPS.items():
        lines += [f"## {group}", "", "| key | meaning |", "|---|---|"]
        lines += [f"| `{key}` | {cell(meaning)} |" for key, meaning in keys.items()]
        lines.append("")
    return "\n".join(lines)
