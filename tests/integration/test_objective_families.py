"""Every objective family through the real pipeline: local Ray, vLLM rollouts, both teacher backends,
2 DeepSpeed ranks on the tiny random-init models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opd_ray.driver.metric_keys import undocumented
from opd_ray.spec import AlgorithmSpec, ExperimentSpec
from tests.conftest import start_teacher_actor, tiny_spec_dict

pytestmark = pytest.mark.integration


def test_transformers_teacher_matches_vllm_and_every_variant_trains(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    from opd_ray.actors.teacher import TeacherScorer
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.pipeline import rollout_and_score
    from opd_ray.driver.roles import start_roles

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["teacher"]["backend"] = "transformers"
    raw["algorithm"] = {"objective": "topk", "topk_support": "union", "top_k": 4}
    raw["data"]["verifier"] = "exact"
    spec = ExperimentSpec.model_validate(raw)
    inputs = load_run_inputs(spec)
    vllm_teacher = start_teacher_actor(  # starts while the roles do
        TeacherScorer, spec.teacher_model("teacher"), spec.teachers["teacher"].model_copy(update={"backend": "vllm"}), 0
    )
    roles = start_roles(spec)
    try:
        refs = rollout_and_score(roles, inputs.train, list(range(16)), 1)
        by_transformers = local_ray.get(refs[0])
        by_vllm = local_ray.get(vllm_teacher.score.remote(by_transformers)[0])
        response = by_transformers.response_mask_BL.bool()
        assert by_transformers.student_topk_ids_BLK.shape[-1] == 4
        assert by_transformers.task_rewards_B is not None
        lp_t, lp_v = by_transformers.teacher_logprobs_BL[response], by_vllm.teacher_logprobs_BL[response]
        assert (lp_t - lp_v).abs().max() < 1e-4
        top_t, top_v = by_transformers.teacher_topk_logprobs_BLK[response], by_vllm.teacher_topk_logprobs_BLK[response]
        assert (top_t - top_v).abs().max() < 1e-4
        # the teacher's log-probs at the student's top-k are its full-vocabulary log-probs there
        at_student = by_transformers.teacher_logprobs_at_student_topk_BLK[response]
        assert (at_student <= 0).all() and (at_student.exp().sum(-1) <= 1 + 1e-5).all()

        variants = {
            "topk student": {"objective": "topk", "topk_support": "student", "top_k": 4},
            "topk intersection": {"objective": "topk", "topk_support": "intersection", "top_k": 4},
            "topk union + tail": {"objective": "topk", "topk_support": "union", "top_k": 4, "topk_tail": True},
            "topk teacher forward": {"objective": "topk", "divergence": "forward_kl"},
            "topk jsd": {"objective": "topk", "divergence": "jsd", "jsd_beta": 0.5},
            "forward to reverse": {"objective": "topk", "divergence": "forward_to_reverse", "anneal_steps": 20},
            "entropy gate": {"objective": "topk", "entropy_gate": {"mastered_percentile": 30}},
            "topk + task reward": {"objective": "topk", "task_reward_coef": 1.0},
            "sampled + vopd + IW + task": {
                "objective": "sampled_token",
                "baseline": "vopd",
                "position_gamma": 0.5,
                "task_reward_coef": 1.0,
                "clip_eps": None,
            },
            "sampled, returns, standardised": {
                "objective": "sampled_token",
                "discount": 1.0,
                "standardize_rewards": True,
            },
            "sequence mean": {"objective": "topk", "aggregation": "sequence_mean"},
        }
        for step, (name, variant) in enumerate(variants.items(), start=2):
            refs = rollout_and_score(roles, inputs.train, list(range(16 * step, 16 * step + 16)), step)
            metrics = roles.learners.train_step(refs, AlgorithmSpec(**variant), 4, step)
            assert math.isfinite(metrics["loss"]), name
            assert 0.0 <= metrics["sample_reward"] <= 1.0, name
            assert "diag/overlap_ratio" in metrics, name
            if name == "entropy gate":
                assert 0.0 < metrics["gate/kept_fraction"] < 1.0
            if name == "forward to reverse":
                assert 0.0 < metrics["reverse_kl_weight"] < 1.0
            assert not undocumented(metrics), name  # every key a variant logs is in the metric reference
    finally:
        roles.shutdown()
        local_ray.kill(vllm_teacher)


def test_gkd_mixes_student_and_dataset_batches(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """GKD from a spec change alone: JSD(0.5) on the full vocabulary, half the steps on dataset answers."""
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")

    raw["learner"]["num_ranks"] = 1  # one rank: nothing here depends on how many
    raw["algorithm"] = {"objective": "full_vocab", "divergence": "jsd", "student_data_fraction": 0.5}
    raw["trainer"].update(steps=8, save_final=False)
    run_stages(ExperimentSpec.model_validate(raw))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    on_dataset = [m for m in metrics if m.get("dataset_batch")]
    assert not undocumented({key for m in metrics for key in m})
    on_student = [m for m in metrics if not m.get("dataset_batch")]
    assert on_dataset and on_student
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert all("diag/overlap_ratio" in m and "sampled_reverse_kl" in m for m in on_student)
    assert all("diag/overlap_ratio" not in m and "time/rollout" not in m for m in on_dataset)
