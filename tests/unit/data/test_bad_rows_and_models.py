"""Bad inputs that crashed or passed silently (each tried as a new user would), each refused in one line naming
the cause before any actor starts: answers that are not text, templates that format their values, a verifier
module that fails as it imports, a chat template that refuses a system turn, a model folder that is not a causal
LM, and import-model's source and layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opd_ray.data.run_inputs import load_run_inputs
from opd_ray.data.verifiers import resolve_verifier
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def spec_over(tiny_dir: Path, tmp_path: Path, rows: list[dict] | None = None, **data) -> ExperimentSpec:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    if rows is not None:
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        raw["data"]["train"]["path"] = str(path)
    raw["data"].update(data)
    return ExperimentSpec.model_validate(raw)


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        (["12", "twelve"], r"row 1: 'answer' is a list \(\['12', 'twelve'\]\), not text: give one reference"),
        (12.0, r"row 1: 'answer' is a float \(12.0\), not text: write answers as text"),
        (True, r"row 1: 'answer' is a bool"),
    ],
)
def test_an_answer_that_is_not_text_is_refused_by_row(tiny_dir: Path, tmp_path: Path, answer, refused: str) -> None:
    with pytest.raises(UserError, match=refused):
        load_run_inputs(spec_over(tiny_dir, tmp_path, [{"prompt": "1+2=", "answer": answer}]))


def test_a_parquet_column_of_floats_with_a_gap_is_refused_and_whole_numbers_are_text(tiny_dir, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["1+2=", "3+4="], "answer": [3.0, None]}), path)
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["train"]["path"] = str(path)
    with pytest.raises(UserError, match=r"rows.parquet row 1: 'answer' is a float \(3.0\)"):
        load_run_inputs(ExperimentSpec.model_validate(raw))
    pq.write_table(pa.table({"prompt": ["1+2=", "3+4="], "answer": [3, 7]}), path)
    assert load_run_inputs(ExperimentSpec.model_validate(raw)).train.answers == ["3", "7"]


@pytest.mark.parametrize("template", ["Q: {prompt:d}", "{prompt!r} =", "{prompt:>20}"])
def test_a_template_that_formats_its_value_is_refused(tiny_dir: Path, tmp_path: Path, template: str) -> None:
    with pytest.raises(ValueError, match=r"data.prompt_template: \{prompt.*\} formats the value, but row values are"):
        spec_over(tiny_dir, tmp_path, prompt_template=template)


def test_a_teacher_template_that_formats_its_value_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["teacher"]["prompt_template"] = "{answer:.2f} {prompt}"
    with pytest.raises(ValueError, match=r"\{answer:.2f\} formats the value"):
        ExperimentSpec.model_validate(raw)


def test_a_verifier_module_that_fails_as_it_imports_is_one_line(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "broken_verifier.py").write_text("raise RuntimeError('needs a GPU to import')\n")
    (tmp_path / "typo_verifier.py").write_text("def check(response, reference)\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"importing 'broken_verifier' failed: RuntimeError: needs a GPU to import"):
        resolve_verifier("broken_verifier:check")
    with pytest.raises(UserError, match=r"importing 'typo_verifier' failed \(.*typo_verifier.py:1\): SyntaxError"):
        resolve_verifier("typo_verifier:check")


def test_a_chat_template_that_refuses_a_system_turn_is_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    student = tmp_path / "student"
    shutil.copytree(tiny_dir / "student", student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    (student / "chat_template.jinja").unlink(missing_ok=True)
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["student"]["path"] = str(student)
    raw["teacher"]["cross_tokenizer"] = True  # the teacher keeps the tokenizer it was built with
    raw["data"].update(use_chat_template=True, system_prompt="Answer with digits.")
    with pytest.raises(UserError, match=r"data.system_prompt: the chat template of .* rejects a system turn"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_model_folder_that_is_not_a_causal_lm_is_refused_by_role(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import ViTConfig

    vision = tmp_path / "vit"
    ViTConfig(num_hidden_layers=1).save_pretrained(vision)
    (vision / "model.safetensors").write_bytes(b"")
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["teacher"]["path"] = str(vision)
    with pytest.raises(UserError, match=r"teachers.teacher.model.path: .* holds a 'vit' model .* causal LMs only"):
        load_run_inputs(ExperimentSpec.model_validate(raw))
