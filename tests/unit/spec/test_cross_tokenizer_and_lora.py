"""What the spec accepts and refuses for a teacher with another tokenizer and for a LoRA student."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from opd_ray.spec import ExperimentSpec


@pytest.fixture
def raw(tiny_dir, tmp_path) -> dict:
    from tests.conftest import tiny_spec_dict

    return tiny_spec_dict(tiny_dir, tmp_path / "run")


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"objective": "full_vocab"}, "objective full_vocab needs one vocabulary"),
        ({"objective": "topk", "topk_support": "union"}, "topk_support union needs the teacher's log-probs"),
        ({"objective": "topk", "topk_support": "student"}, "topk_support student .* use topk_support=teacher"),
    ],
)
def test_cross_tokenizer_scoring_refuses_what_needs_one_vocabulary(raw, algorithm: dict, message: str) -> None:
    raw["teacher"]["cross_tokenizer"] = True
    raw["algorithm"] = algorithm
    with pytest.raises(ValidationError, match=f"teacher.cross_tokenizer: {message}"):
        ExperimentSpec.model_validate(raw)


@pytest.mark.parametrize(
    "algorithm", [{"objective": "sampled_token"}, {"objective": "topk", "topk_support": "teacher"}]
)
def test_cross_tokenizer_scoring_takes_the_chunk_reward_and_the_teachers_top_k(raw, algorithm: dict) -> None:
    raw["teacher"]["cross_tokenizer"] = True
    raw["algorithm"] = algorithm
    assert ExperimentSpec.model_validate(raw).teachers["teacher"].cross_tokenizer


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learner": {"zero_stage": 3}}, "learner.lora: adapters train under zero_stage 0-2"),
        ({"weight_sync": {"method": "collective"}}, "learner.lora: merged weights are sent through the object store"),
    ],
)
def test_lora_refuses_what_it_cannot_do_yet(raw, change: dict, message: str) -> None:
    raw["learner"]["lora"] = {"rank": 4}
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ValidationError, match=message):
        ExperimentSpec.model_validate(raw)


@pytest.mark.parametrize("name", ["cross_tokenizer.yaml", "quickstart_lora.yaml"])
def test_the_examples_load(name: str) -> None:
    from opd_ray.spec import load_spec
    from tests.conftest import REPO

    spec = load_spec(REPO / "examples" / name, [])
    if name == "cross_tokenizer.yaml":
        assert spec.teachers["teacher"].cross_tokenizer and spec.models.build_tiny.tokenizers
    else:
        assert spec.learner.lora is not None and spec.learner.lora.rank == 8
