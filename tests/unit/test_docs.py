"""The documentation against the code: the generated reference pages name every spec key, CLI flag and
metric the code has, and every `opd-ray` command a page shows parses with today's CLI and its spec loads
(`mkdocs build --strict` in .ci/run checks the links and pages)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from opd_ray.cli import _parser, parse_command_line
from opd_ray.driver.metric_keys import DIAGNOSTIC_SIGNALS, METRIC_GROUPS, undocumented
from opd_ray.health.signals import Signals
from opd_ray.spec import ExperimentSpec, load_spec
from tests.conftest import REPO


@functools.cache
def reference_hook():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs/hooks/reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spec_keys(model, prefix: str = "") -> list[str]:
    keys, hook = [], reference_hook()
    for name, field in model.model_fields.items():
        nested = hook.nested_model(field.annotation)
        key = f"{prefix}{name}"
        if nested is None:
            keys.append(key)
        else:
            keys += spec_keys(nested, f"{key}{'.*' if hook.is_mapping(field.annotation) else ''}.")
    return keys


def test_the_spec_reference_names_every_key_with_its_default() -> None:
    page = reference_hook().spec_page()
    missing = [key for key in spec_keys(ExperimentSpec) if f"| `{key}` |" not in page]
    assert not missing, missing
    assert "| `trainer.steps` | int | `100` | >= 1 |" in page
    assert "| `logging.trackers` | list[" in page and "tensorboard" in page


def test_every_spec_key_says_what_it_means() -> None:
    """A new key needs a docstring (the string under the field) or a description: the reference shows it."""
    from opd_ray.spec import ExperimentSpec

    rows = [row for rows in reference_hook().spec_rows(ExperimentSpec).values() for row in rows]
    assert not [row[0] for row in rows if not row[4]]


def test_the_cli_reference_names_every_command_and_flag() -> None:
    page = reference_hook().cli_page()
    for name, sub in reference_hook().subcommands(_parser()).items():
        assert f"## `opd-ray {name}`" in page
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert f"`{', '.join(action.option_strings) or action.dest}`" in page, (name, action.dest)


def test_the_metric_reference_names_every_group_and_signal() -> None:
    page = reference_hook().metrics_page()
    for keys in METRIC_GROUPS.values():
        assert all(f"| `{key}` |" in page for key in keys)
    health = [f"health/{f.name}" for f in fields(Signals) if f.name != "steps"]
    assert not undocumented(health)  # a new doctor signal needs its line in driver/metric_keys.py
    from opd_ray.losses import diagnostics

    produced = set(re.findall(r'"(\w+)":', Path(diagnostics.__file__).read_text()))
    assert set(DIAGNOSTIC_SIGNALS) - {"top1_agreement"} <= produced
    assert undocumented(["diag/no_such_signal", "busy/rollout/extra"]) == ["busy/rollout/extra", "diag/no_such_signal"]


COMMAND = re.compile(r"(?:^\s*|&&\s*)(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?opd-ray\s+(.*)$")


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for every `opd-ray ...` line inside a code block of the docs and the README."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        inside = False
        for line in page.read_text().splitlines():
            if line.strip().startswith("```"):
                inside = not inside
                continue
            match = COMMAND.search(line) if inside else None
            if match:
                found.append((str(page.relative_to(REPO)), match.group(1).split(" #")[0].strip()))
    return found


@pytest.mark.parametrize("page, command", shown_commands())
def test_every_command_a_page_shows_parses_and_its_spec_loads(page: str, command: str) -> None:
    argv = shlex.split(command.replace("$PWD", str(REPO)))
    args = parse_command_line(argv)  # an unknown command or flag exits here
    if hasattr(args, "spec"):
        assert (REPO / args.spec).is_file(), f"{page}: {args.spec} does not exist"
        load_spec(REPO / args.spec, args.overrides)
    for teacher in getattr(args, "teacher", []):
        if teacher.endswith(".yaml"):
            assert (REPO / teacher).is_file(), f"{page}: {teacher} does not exist"


SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::(\w+))?"$')


def test_every_snippet_a_page_includes_exists_with_its_section() -> None:
    """A worked example is included from the test that runs it: the file and its section markers must exist, and
    the include line must be the snippet syntax exactly (a formatter once turned it into literal text)."""
    included = []
    for page in sorted((REPO / "docs").rglob("*.md")):
        for line in page.read_text().splitlines():
            if "8<" in line or "8 <" in line:
                match = SNIPPET.match(line.strip())
                assert match, f"{page.name}: {line!r} is not a snippet include"
                path, section = match.groups()
                text = (REPO / path).read_text()
                if section:
                    assert f"# --8<-- [start:{section}]" in text and f"# --8<-- [end:{section}]" in text, line
                included.append(path)
    assert "tests/unit/tracking/test_trackers.py" in included and "benchmarks/RESULTS.md" in included


def test_the_pages_show_the_commands_people_run_first() -> None:
    shown = {command for _, command in shown_commands()}
    assert "train examples/quickstart.yaml" in shown and len(shown) >= 10
