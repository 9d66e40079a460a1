"""The pre-flight checks: one clear line for a missing model, a vocabulary mismatch, an empty dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opd_ray.data.run_inputs import load_run_inputs
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def test_preflight_rejects_missing_model_dir(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["student"]["path"] = str(tmp_path / "absent")
    with pytest.raises(UserError, match=r"models\.student\.path: model directory not found"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_preflight_rejects_vocabulary_mismatch(tiny_dir: Path, tmp_path: Path) -> None:
    from opd_ray.recipe.tiny_models import build_char_tokenizer, save_random_model

    other = build_char_tokenizer("0123456789+=abc", tmp_path / "tok")
    save_random_model(other, 1, tmp_path / "teacher", seed=0)
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["teacher"]["path"] = str(tmp_path / "teacher")
    with pytest.raises(UserError, match="student and teacher tokenizers differ"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_padding_rows_are_refused_unless_cross_tokenizer_scoring_drops_them(tiny_dir: Path, tmp_path: Path) -> None:
    """Two sizes of one family: the same tokenizer, heads of different sizes (padding rows)."""
    from opd_ray.recipe.tiny_models import build_char_tokenizer, save_random_model

    tokenizer = build_char_tokenizer("0123456789+=", tmp_path / "tok")
    teacher = save_random_model(tokenizer, 1, tmp_path / "teacher", seed=0)
    config = (teacher / "config.json").read_text().replace('"vocab_size": 15', '"vocab_size": 64')
    (teacher / "config.json").write_text(config)
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["teacher"]["path"] = str(teacher)
    with pytest.raises(
        UserError, match=r"vocab_size 15 != teacher vocab_size 64 .* teachers\.teacher\.cross_tokenizer: true"
    ):
        load_run_inputs(ExperimentSpec.model_validate(raw))
    raw["teacher"]["cross_tokenizer"] = True
    assert load_run_inputs(ExperimentSpec.model_validate(raw)).train is not None


def test_preflight_rejects_empty_dataset(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["train"]["path"] = str(empty)
    with pytest.raises(UserError, match=r"data\.train\.path: .*has no rows"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_preflight_rejects_model_dir_without_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "student"
    shutil.copytree(tiny_dir / "student", broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["models"]["student"]["path"] = str(broken)
    with pytest.raises(UserError, match=r"no \*\.safetensors"):
        load_run_inputs(ExperimentSpec.model_validate(raw))


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
        load_run_inputs(ExperimentSpec.model_validate(raw))


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (
            {"max_model_len": 128},
            r"rollout\.engine\.max_model_len \(128\) exceeds models\.student's max_position_embeddings \(64\)",
        ),
        ({"kv_cache_gib": 1e-5}, r"rollout\.engine\.kv_cache_gib \(1e-05\) cannot hold one 32-token sequence"),
    ],
)
def test_preflight_rejects_an_engine_the_model_cannot_fill(
    tiny_dir: Path, tmp_path: Path, engine: dict, message: str
) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["rollout"]["engine"].update(engine)
    with pytest.raises(UserError, match=message):
        load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_lora_module_the_student_lacks_is_named_before_anything_starts(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["learner"]["lora"] = {"target_modules": ["q_proj", "qkv_proj"]}
    with pytest.raises(UserError, match=r"the student has no module named \['qkv_proj'\]; .*q_proj"):
        load_run_inputs(ExperimentSpec.model_validate(raw))
    raw["learner"]["lora"] = {"target_modules": ["q_proj", "v_proj"]}
    load_run_inputs(ExperimentSpec.model_validate(raw))


def test_a_sequence_longer_than_the_teachers_context_is_one_line() -> None:
    from opd_ray.actors.teacher_backends import ContextTooShort, check_context

    check_context(32, 32, cross_tokenizer=True)
    with pytest.raises(
        ContextTooShort, match=r"sequence of 40 tokens, longer than its engine.max_model_len \(32\) \(the student's"
    ):
        check_context(40, 32, cross_tokenizer=True)


def test_a_named_teachers_replicas_engine_and_resources_may_change_on_resume() -> None:
    from opd_ray.driver.fingerprint import may_change

    assert may_change("teachers.math.num_replicas") and may_change("teachers.math.engine.kv_cache_gib")
    assert may_change("teachers.code.resources.num_gpus") and may_change("teachers.teacher.engine.max_model_len")
    assert not may_change("teachers.math.model.path") and not may_change("teachers.math.top_k")


def test_a_teacher_in_its_own_tokens_without_a_chat_template_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    """A base model (Gemma 3 270M ships no chat template) as a cross-tokenizer teacher of a chat student:
    one line saying to read it without the template, not apply_chat_template's traceback at tokenizing."""
    from types import SimpleNamespace

    from opd_ray.data.preflight import check_own_chat_templates

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["data"]["use_chat_template"] = True
    spec = ExperimentSpec.model_validate(raw)
    base_model_tokenizer = SimpleNamespace(chat_template=None)  # stands in for a tokenizer without a template
    with pytest.raises(UserError, match=r"teachers\.teacher: the tokenizer of .* has no chat template"):
        check_own_chat_templates(spec, {"teacher": base_model_tokenizer})
    raw["teacher"] = {**raw.get("teacher", {}), "use_chat_template": False}
    check_own_chat_templates(ExperimentSpec.model_validate(raw), {"teacher": base_model_tokenizer})
