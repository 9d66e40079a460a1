"""Prompt files, templates, verifiers and the pre-flight checks on models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opd_ray.data.arithmetic import make_split, write_task_files
from opd_ray.data.preflight import prepare
from opd_ray.data.prompts import load_prompts
from opd_ray.data.verifiers import boxed, exact, final_number, resolve_verifier
from opd_ray.errors import UserError
from opd_ray.spec import DatasetSpec, DataSpec, ExperimentSpec
from tests.conftest import tiny_spec_dict


@pytest.fixture
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "student")


def test_task_splits_are_disjoint(tmp_path: Path) -> None:
    train, held_out = write_task_files(tmp_path, seed=0, train_size=300, eval_size=50)
    train_prompts = {json.loads(line)["prompt"] for line in train.read_text().splitlines()}
    eval_prompts = {json.loads(line)["prompt"] for line in held_out.read_text().splitlines()}
    assert len(train_prompts) == 300 and len(eval_prompts) == 50
    assert not train_prompts & eval_prompts
    row = make_split(1, 1)[0]
    a, b = row["prompt"].rstrip("=").split("+")
    assert row["answer"] == str(int(a) + int(b))[::-1]


def test_jsonl_and_parquet_read_the_same(tmp_path: Path, tokenizer) -> None:
    import datasets

    rows = [{"question": "12+34=", "solution": "64"}, {"question": "5+5=", "solution": "01"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    data = DataSpec(train=DatasetSpec(path=str(jsonl)), prompt_template="{prompt}")
    for path in (jsonl, parquet):
        spec = DatasetSpec(path=str(path), prompt_field="question", answer_field="solution")
        prompts = load_prompts(spec, data, tokenizer, "data.train")
        assert prompts.answers == ["64", "01"]
        assert tokenizer.decode(prompts.prompt_ids[0]) == "12+34="


def test_prompt_template_is_applied(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1+2", "answer": "3"}))
    data = DataSpec(train=DatasetSpec(path=str(path)), prompt_template="{prompt}=")
    prompts = load_prompts(data.train, data, tokenizer, "data.train")
    assert tokenizer.decode(prompts.prompt_ids[0]) == "1+2="


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "has no rows"),
        ('{"text": "1+1="}\n', "field 'prompt' not in"),
        ('{"prompt": ""}\n', "row 1: 'prompt' is empty"),
        ("not json at all\n", "cannot read"),
    ],
)
def test_bad_prompt_files_are_named(tmp_path: Path, tokenizer, content: str, fragment: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    data = DataSpec(train=DatasetSpec(path=str(path), answer_field=None))
    with pytest.raises(UserError, match=fragment):
        load_prompts(data.train, data, tokenizer, "data.train")


def test_verifiers() -> None:
    assert exact(" 42 ", "42") and not exact("421", "42")
    assert final_number("so the total is 1,234.", "1234")
    assert not final_number("no digits", "3")
    assert final_number("x = 2.50", "2.5")
    assert boxed("thus \\boxed{\\frac{1}{2}}", "\\frac{1}{2}")
    assert not boxed("thus 1/2", "1/2")
    assert resolve_verifier("tests.test_data:always_true")("a", "b")
    with pytest.raises(UserError, match="unknown verifier 'fuzzy'"):
        resolve_verifier("fuzzy")
    with pytest.raises(UserError, match="cannot load"):
        resolve_verifier("no_such_module:f")


def always_true(response: str, reference: str) -> bool:
    return True


def test_preflight_rejects_missing_model_dir(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["student"]["path"] = str(tmp_path / "absent")
    with pytest.raises(UserError, match=r"models\.student\.path: model directory not found"):
        prepare(ExperimentSpec.model_validate(raw))


def test_preflight_rejects_vocabulary_mismatch(tiny_dir: Path, tmp_path: Path) -> None:
    from opd_ray.recipe.tiny_models import build_char_tokenizer, save_random_model

    other = build_char_tokenizer("0123456789+=abc", tmp_path / "tok")
    save_random_model(other, 1, tmp_path / "teacher", seed=0)
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["teacher"]["path"] = str(tmp_path / "teacher")
    with pytest.raises(UserError, match="student and teacher tokenizers differ"):
        prepare(ExperimentSpec.model_validate(raw))


def test_preflight_rejects_empty_dataset(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["train"]["path"] = str(empty)
    with pytest.raises(UserError, match=r"data\.train\.path: .*has no rows"):
        prepare(ExperimentSpec.model_validate(raw))


def test_preflight_rejects_model_dir_without_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "student"
    shutil.copytree(tiny_dir / "student", broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["student"]["path"] = str(broken)
    with pytest.raises(UserError, match=r"no \*\.safetensors"):
        prepare(ExperimentSpec.model_validate(raw))


@pytest.mark.parametrize(
    ("algorithm", "reason"),
    [
        ({"objective": "topk", "task_reward_coef": 0.5}, "algorithm.task_reward_coef > 0"),
        ({"objective": "full_vocab", "student_data_fraction": 0.5}, "algorithm.student_data_fraction < 1"),
    ],
)
def test_preflight_names_options_that_need_reference_answers(
    tiny_dir: Path, tmp_path: Path, algorithm: dict, reason: str
) -> None:
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"prompt": "12+34="}\n{"prompt": "5+6="}\n')
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["train"] = {"path": str(prompts_only), "answer_field": None}
    raw["algorithm"] = algorithm
    with pytest.raises(UserError, match=reason.replace("+", r"\+")):
        prepare(ExperimentSpec.model_validate(raw))
