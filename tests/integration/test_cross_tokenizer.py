"""A run whose student and teacher have different tokenizers (real Ray, vLLM, DeepSpeed): the teacher reads
the student's text in its own character tokens, the digit-pair student learns from the aligned scores, and the
sampled reverse KL between them (per token, of its chunk) falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.driver.metric_keys import undocumented
from opd_ray.errors import UserError
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opd_ray.data.arithmetic import ALPHABET
    from opd_ray.recipe.tiny_models import build_digit_pair_tokenizer, save_random_model

    root = tmp_path_factory.mktemp("pairs")
    tokenizer = build_digit_pair_tokenizer(ALPHABET, root / "tokenizer")
    return save_random_model(tokenizer, 1, root / "student", seed=2, architecture="llama")


def cross_spec(tiny_dir: Path, pair_student: Path, run_dir: Path, **teacher) -> dict:
    """The quickstart's trained character-level teacher (shipped) and a random digit-pair student."""
    from opd_ray.recipe.tiny_models import SHIPPED

    raw = tiny_spec_dict(tiny_dir, run_dir)
    raw["models"] = {"student": {"path": str(pair_student)}, "teacher": {"path": str(SHIPPED / "teacher")}}
    raw["teacher"].update(teacher)
    raw["trainer"].update(steps=24, prompts_per_step=32)
    raw["learner"].update(lr=3e-3, warmup_steps=2, num_ranks=1)  # one rank: the update is the same global mean
    raw["algorithm"] = {"objective": "topk", "topk_support": "teacher", "topk_tail": True}
    return raw


def test_pre_flight_says_how_to_score_across_tokenizers(tiny_dir: Path, pair_student: Path, tmp_path: Path) -> None:
    from opd_ray.data.run_inputs import load_run_inputs

    spec = ExperimentSpec.model_validate(cross_spec(tiny_dir, pair_student, tmp_path / "run"))
    with pytest.raises(UserError, match=r"tokenizers differ .* set teachers\.teacher\.cross_tokenizer: true"):
        load_run_inputs(spec)


def test_a_student_with_another_tokenizer_learns_from_the_aligned_teacher(
    tiny_dir: Path, pair_student: Path, tmp_path: Path, local_ray
) -> None:
    from opd_ray.recipe.stages import run_stages

    raw = cross_spec(tiny_dir, pair_student, tmp_path / "run", cross_tokenizer=True)
    summary = run_stages(ExperimentSpec.model_validate(raw))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert not undocumented({key for m in metrics for key in m})
    kl_first = sum(m["sampled_reverse_kl"] for m in metrics[:4]) / 4
    kl_last = sum(m["sampled_reverse_kl"] for m in metrics[-4:]) / 4
    assert kl_last < 0.7 * kl_first, (kl_first, kl_last)
    shares = [m["cross_tokenizer/aligned_share"] for m in metrics]
    assert all(0 <= s <= 1 for s in shares) and min(shares) < 1  # digit pairs are never one-to-one
    assert "diag/overlap_ratio" in metrics[-1]  # on the aligned positions, over the shared tokens
    assert summary["student_accuracy_after"] is not None
