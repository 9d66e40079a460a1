"""`plugins:` makes an objective of one's own exist in the driver and in the actors' processes: the spec
validates with it, and a process started with the actors' environment finds it registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_ray.errors import SpecError
from opd_ray.spec import load_spec
from opd_ray.spec.plugins import PLUGINS_VARIABLE
from tests.conftest import REPO, tiny_spec_dict

PLUGIN = "tests.unit.spec.plugin_objective"


@pytest.fixture
def fresh_registries(monkeypatch: pytest.MonkeyPatch):
    from opd_ray.losses.objectives import OBJECTIVES
    from opd_ray.spec.objectives import OBJECTIVE_RECORDS

    monkeypatch.delenv(PLUGINS_VARIABLE, raising=False)
    yield
    OBJECTIVE_RECORDS.pop("plugin_k2", None)
    OBJECTIVES.pop("plugin_k2", None)
    sys.modules.pop(PLUGIN, None)


def spec_file(tmp_path: Path, tiny_dir: Path, **top: object) -> Path:
    raw = {**tiny_spec_dict(tiny_dir, tmp_path / "run"), **top}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_plugins_objective_validates_and_reaches_the_actors(tiny_dir: Path, tmp_path: Path, fresh_registries):
    from opd_ray.actors.runtime import actor_env

    path = spec_file(tmp_path, tiny_dir, plugins=[PLUGIN], algorithm={"objective": "plugin_k2"})
    spec = load_spec(path)
    assert spec.algorithm.objective == "plugin_k2" and spec.plugins == [PLUGIN]
    env = actor_env()["env_vars"]
    assert env[PLUGINS_VARIABLE] == PLUGIN
    actor = (
        "from opd_ray.spec.plugins import import_inherited_plugins\n"
        "from opd_ray.spec.objectives import OBJECTIVE_RECORDS\n"
        "assert 'plugin_k2' not in OBJECTIVE_RECORDS\n"
        "import_inherited_plugins()\n"
        "print(OBJECTIVE_RECORDS['plugin_k2'].summary)\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", actor], env={**_plain_env(), **env}, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == "the toy k2 objective, from a plugin"


def test_without_the_plugin_the_objective_is_unknown_and_a_broken_plugin_is_one_line(
    tiny_dir, tmp_path, fresh_registries
):
    with pytest.raises(SpecError, match=r"'plugin_k2' is not an objective"):
        load_spec(spec_file(tmp_path, tiny_dir, algorithm={"objective": "plugin_k2"}))
    with pytest.raises(SpecError, match=r"plugins: importing 'no_such_plugin' failed: ModuleNotFoundError"):
        load_spec(spec_file(tmp_path, tiny_dir, plugins=["no_such_plugin"]))


def _plain_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != PLUGINS_VARIABLE}
