"""Bad input a new user would try: each one line naming the cause, before anything starts (opd-ray validate)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_ray.cli import main
from opd_ray.spec import load_spec, spec_to_yaml
from tests.conftest import REPO

QUICKSTART = str(REPO / "examples" / "quickstart.yaml")


def refused(capsys, *args: str) -> str:
    assert main(["validate", "--no-files", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_section_that_is_not_a_mapping(capsys, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("models: {student: {path: s}, teacher: {path: t}}\ndata: {train: {path: d}}\nrollout: [1, 2]\n")
    assert "'rollout': Input should be a valid dictionary" in refused(capsys, str(spec))
    assert "override 'rollout=[1,2]': its value does not fit" in refused(capsys, QUICKSTART, "rollout=[1,2]")


def test_a_command_line_value_that_is_not_yaml_is_blamed_on_the_override(capsys) -> None:
    err = refused(capsys, QUICKSTART, "data.prompt_template={prompt} {x}")
    assert "override 'data.prompt_template={prompt} {x}'" in err and "quickstart.yaml:1" not in err


def test_a_directory_given_as_the_spec(capsys) -> None:
    assert "is a directory: give the spec's YAML file" in refused(capsys, str(REPO / "examples"))


@pytest.mark.parametrize(
    ("layers", "message"),
    [("'0-5,9-7'", "the range 9-7 runs backwards"), ("[1, 1, 2]", "layers [1] are listed more than once")],
)
def test_layer_lists_that_would_drop_or_repeat_layers(capsys, layers: str, message: str) -> None:
    override = f"models.import_pretrained={{source: a.gguf, directory: d, student_layers: {layers}}}"
    assert message in refused(capsys, QUICKSTART, override)


def test_lora_without_target_modules(capsys) -> None:
    assert "learner.lora.target_modules is empty" in refused(capsys, QUICKSTART, "learner.lora.target_modules=[]")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["health.enabled=false"], "health.enabled is false, so the doctor never judges them"),
        (["trainer.steps=5"], "collapse is judged from step 20 on"),
        (
            ["trainer.stop_on=[no_alignment]", "diagnostics.enabled=false"],
            "no_alignment is judged from the diagnostics",
        ),
    ],
)
def test_stop_on_that_can_never_fire(capsys, overrides: list[str], message: str) -> None:
    assert message in refused(capsys, QUICKSTART, "trainer.stop_on=[collapse]", *overrides)


def test_environment_values_inside_lists_stay_out_of_spec_yaml(monkeypatch) -> None:
    monkeypatch.setenv("OPD_RAY_TEST_MODULE", "q_proj_secret")
    spec = load_spec(QUICKSTART, ["learner.lora.target_modules=[v_proj,'${oc.env:OPD_RAY_TEST_MODULE}']"])
    assert spec.learner.lora.target_modules == ["v_proj", "q_proj_secret"]
    written = spec_to_yaml(spec)
    assert "q_proj_secret" not in written and "${oc.env:OPD_RAY_TEST_MODULE}" in written
    assert os.environ["OPD_RAY_TEST_MODULE"] == "q_proj_secret"


def test_validate_says_what_code_a_spec_runs(capsys) -> None:
    assert main(["validate", "--no-files", QUICKSTART, "data.verifier=my_lab.checks:grade"]) == 0
    assert "data.verifier imports and runs my_lab.checks" in capsys.readouterr().err
