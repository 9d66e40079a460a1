"""Bad inputs that used to pass `opd-ray validate` (or crash later with a traceback): each is now one line
naming the cause, printed by the CLI with exit status 2, before anything expensive starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from opd_ray.cli import main
from opd_ray.data.run_inputs import load_run_inputs
from opd_ray.data.verifiers import GuardedVerifier
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec, load_spec, spec_to_yaml
from tests.conftest import REPO, tiny_spec_dict

MINIMAL = """\
models:
  student: {path: /m/student}
  teacher: {path: /m/teacher}
data:
  train: {path: /d/train.jsonl}
"""


def validate_fails(tmp_path: Path, capsys: pytest.CaptureFixture, text: str, overrides: list[str]) -> str:
    """Runs `opd-ray validate` in this process; returns its single stderr line."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert main(["validate", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("extra_yaml", "overrides", "fragment"),
    [
        ("", ["learner.lr=.inf"], "'learner.lr': Input should be a finite number"),
        ("", ["learner.lr=.nan"], "'learner.lr': Input should be a finite number"),
        ("rollout: {temperature: .inf}\n", [], "'rollout.temperature': Input should be a finite number"),
        ("", ["trainer.steps=true"], "'trainer.steps': Input should be a valid integer (got True)"),
        ("learner: {lr: '1e-3'}\n", [], "'learner.lr': Input should be a valid number"),
        ("", ["rollout.max_new_tokens=600"], "rollout.max_new_tokens (600) leaves no room for a prompt"),
        ("data2: 1\n", [], "unknown key 'data2'"),
        ("", ["data.prompt_template='Q: {question}'"], "unknown placeholder {question}"),
        ("", ["data.prompt_template='{prompt} {'"], "data.prompt_template: Single '{'"),
        ("rollout: {resources: {custom: {fast: -1}}}\n", [], "'rollout.resources.custom': negative amounts"),
        (
            "learner: {deepspeed: {zero_optimization: {stage: 3}}}\n",
            [],
            "learner.deepspeed.zero_optimization.stage is set by the spec: use learner.zero_stage",
        ),
        ("learner: {deepspeed: {bf16: {enabled: true}}}\n", [], "use models.student.dtype"),
        ("run: {name: x, output_dir: runs/${run.name}}\n", [], "spec.yaml:6:34: YAML syntax error"),
        ("trainer: {steps: 3\n", [], "spec.yaml:7:1: YAML syntax error"),
        ("", ["algorithm.objective=reverse"], "algorithm.objective 'reverse' is not an objective; choose one of"),
        (
            "",
            ["algorithm.clip_eps=0.1"],
            "algorithm.clip_eps is read by objective sampled_token only, and this spec's objective is topk",
        ),
        (
            "",
            ["algorithm.objective=sft", "algorithm.divergence=jsd"],
            "algorithm.divergence is read by objective topk / full_vocab only",
        ),
    ],
)
def test_validate_names_the_bad_value_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra_yaml: str, overrides: list[str], fragment: str
) -> None:
    assert fragment in validate_fails(tmp_path, capsys, MINIMAL + extra_yaml, overrides)


def preflight_error(tiny_dir: Path, tmp_path: Path, **changes: dict) -> str:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    for section, values in changes.items():
        raw[section].update(values)
    with pytest.raises(UserError) as info:
        load_run_inputs(ExperimentSpec.model_validate(raw))
    assert "\n" not in str(info.value)
    return str(info.value)


def not_a_verifier(response: str) -> bool:  # one argument: cannot be called as f(response, reference)
    return bool(response)


def verifier_returning_text(response: str, reference: str) -> str:
    return "yes"


def test_preflight_checks_what_needs_the_tokenizer_or_the_data(tiny_dir: Path, tmp_path: Path) -> None:
    # the tiny vocabulary has 15 tokens
    assert "teacher.top_k (16) exceeds the vocabulary of models.student (15 tokens)" in preflight_error(
        tiny_dir, tmp_path, teacher={"top_k": 16}
    )
    long_eval = tmp_path / "long_eval.jsonl"
    long_eval.write_text(json.dumps({"prompt": "1+2=" * 10, "answer": "3"}) + "\n")
    assert "longest prompt of data.eval" in preflight_error(tiny_dir, tmp_path, data={"eval": {"path": str(long_eval)}})
    assert "data.verifier: 'os:sep' is not callable" in preflight_error(tiny_dir, tmp_path, data={"verifier": "os:sep"})
    module = "tests.unit.spec.test_bad_inputs"
    assert "cannot be called as f(response, reference) -> bool" in preflight_error(
        tiny_dir, tmp_path, data={"verifier": f"{module}:not_a_verifier"}
    )
    assert "returned str 'yes'; it must return a bool" in preflight_error(
        tiny_dir, tmp_path, data={"verifier": f"{module}:verifier_returning_text"}
    )


def raises_on_long_answers(response: str, reference: str) -> bool:
    if len(response) > 3:
        raise ValueError("cannot parse")
    return response == reference


def test_a_verifier_that_raises_scores_wrong_and_says_where_or_stops_when_asked(
    capsys: pytest.CaptureFixture,
) -> None:
    verifier = GuardedVerifier("mine:check", raises_on_long_answers)
    assert verifier("12", "12", row=4) is True
    assert verifier("12345", "12", row=7) is False
    assert verifier.errors == 1
    err = capsys.readouterr().err
    assert "data.verifier 'mine:check' raised ValueError: cannot parse on row 7, response '12345'" in err
    with pytest.raises(UserError, match=r"row 7, response '12345', reference '12' \(data.verifier_errors=raise\)"):
        GuardedVerifier("mine:check", raises_on_long_answers, on_error="raise")("12345", "12", row=7)


def test_deepspeed_overrides_merge_into_the_specs_sections() -> None:
    from opd_ray.actors.learner_config import deepspeed_config
    from opd_ray.spec import LearnerSpec, ModelSpec

    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    config = deepspeed_config(LearnerSpec(zero_stage=2, deepspeed=offload), ModelSpec(path="m"), micro_batch=4)
    assert config["zero_optimization"]["stage"] == 2  # kept, not replaced by the override's section
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["train_micro_batch_size_per_gpu"] == 4


def test_values_from_the_environment_are_not_written_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_TEST_SECRET_DIR", "/secret/place")
    path = tmp_path / "spec.yaml"
    path.write_text(MINIMAL + "run: {output_dir: '${oc.env:OPD_TEST_SECRET_DIR}/runs'}\n")
    spec = load_spec(path)
    assert spec.run.output_dir == "/secret/place/runs"  # the run uses the value...
    written = spec_to_yaml(spec)
    assert "/secret/place" not in written  # ...spec.yaml keeps the lookup
    assert yaml.safe_load(written)["run"]["output_dir"] == "${oc.env:OPD_TEST_SECRET_DIR}/runs"
    assert "/secret/place" not in spec_to_yaml(spec.model_copy(update={"stages": ["opd"]}))


def test_validate_checks_the_files_too_unless_told_not_to(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0
    assert "files ok: 512 training prompts, 32 eval prompts, 15 tokens" in capsys.readouterr().err
    raw["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.train.path: file not found" in err and len(err.strip().splitlines()) == 1
    assert main(["validate", "--no-files", str(path)]) == 0


# ---- second pass: inputs a new user tried that still crashed or were accepted (issue 26, item 9) ----

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
