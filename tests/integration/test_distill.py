"""Real local Ray, real vLLM engines, real DeepSpeed ranks (2, gloo) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


COLLECTIVE = {  # two engines colocated with the two learner ranks; ~40 buckets of 48 kB over gloo
    "weight_sync": {"method": "collective", "bucket_mb": 0.05},
    "placement": {"colocate": ["rollout", "learner"]},
    "rollout": {"num_workers": 2},
}


def test_both_weight_sync_paths_make_rollout_engines_match_zero3_learners(
    tiny_dir: Path, tmp_path: Path, local_ray
) -> None:
    """After ZeRO-3 gathers and in-place vLLM reloads, engines and learner ranks give the same log-probs:
    first broadcast bucket by bucket (each bucket gathered alone) to two engines colocated with the
    ranks, then through the object store.

    Trains with the full-vocabulary objective, so the frozen teacher copy is loaded beside a
    ZeRO-3-partitioned student (it must not be partitioned itself)."""
    from ray.util.placement_group import placement_group_table

    from opd_ray.data.preflight import prepare
    from opd_ray.driver.pipeline import rollout_and_score
    from opd_ray.driver.roles import start_roles, sync_weights

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["learner"]["zero_stage"] = 3
    raw["algorithm"] = {"objective": "full_vocab", "divergence": "jsd"}
    for section, values in COLLECTIVE.items():
        raw[section] = {**raw.get(section, {}), **values}
    spec = ExperimentSpec.model_validate(raw)
    prepared = prepare(spec)
    roles = start_roles(spec)
    try:
        learners = roles.learners
        tokenizer = prepared.tokenizer
        sequence = prepared.train.prompt_ids[0] + tokenizer("4321").input_ids + [tokenizer.eos_token_id]
        engine_before = local_ray.get(roles.rollout_workers[0].sequence_logprobs.remote(sequence))
        learner_before = local_ray.get(learners.call("sequence_logprobs", sequence))[0]
        assert max_abs_diff(engine_before, learner_before) < 1e-5
        bundles = sorted(len(placement_group_table(group)["bundles"]) for group in roles.placement.groups)
        assert bundles == [1, 2]  # rollout+learner share a pool

        def train_then_check_engines(steps: range, sync, engine_before: list[float]) -> list[float]:
            for step in steps:
                refs = rollout_and_score(roles, prepared.train, list(range(16 * step, 16 * step + 16)), step)
                learners.train_step(refs, spec.algorithm)
            sync(steps[-1] + 1)
            learner_after = local_ray.get(learners.call("sequence_logprobs", sequence))
            for rollout in roles.rollout_workers:
                engine_after = local_ray.get(rollout.sequence_logprobs.remote(sequence))
                assert max_abs_diff(engine_before, engine_after) > 1e-2, "training did not change the engine"
                for rank_logprobs in learner_after:  # ZeRO-3 ranks agree with each other and with the engine
                    assert max_abs_diff(engine_after, rank_logprobs) < 1e-5
                assert local_ray.get(rollout.version.remote()) == steps[-1] + 1
            return engine_after

        synced = train_then_check_engines(range(3), lambda version: sync_weights(roles, version), engine_before)
        assert len(roles.broadcast.plan) > 10  # the student really went in many buckets

        def through_object_store(version: int) -> None:
            weights = learners.export_weights()
            local_ray.get([worker.load_weights.remote(weights, version) for worker in roles.rollout_workers])

        train_then_check_engines(range(3, 5), through_object_store, synced)
    finally:
        roles.shutdown()


def test_distill_lowers_reverse_kl_and_writes_run_dir(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """Several OPD steps with ZeRO-2: the exact (k = |V|) reverse KL to the teacher falls."""
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["trainer"].update(steps=24, prompts_per_step=32)
    raw["learner"].update(lr=3e-3, warmup_steps=2)
    summary = run_stages(ExperimentSpec.model_validate(raw))

    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert [m["weight_version"] for m in metrics] == list(range(1, 25))
    assert all(m["rollout_policy_version"] == m["weight_version"] - 1 for m in metrics)  # fully on-policy
    first, last = metrics[:4], metrics[-4:]
    kl_first = sum(m["loss"] for m in first) / 4
    kl_last = sum(m["loss"] for m in last) / 4
    assert kl_last < 0.7 * kl_first, (kl_first, kl_last)
    for key in ("time/rollout", "time/teacher", "time/learn", "time/weight_sync", "response_tokens"):
        assert key in metrics[0]
    for m in metrics:  # diagnostics at k=4 on every step, overall and by position
        assert 0.0 <= m["diag/overlap_ratio"] <= 1.0
        assert 0.0 <= m["diag/overlap_mass_student"] <= 1.0 + 1e-6
        assert m["diag/overlap_advantage"] <= 1e-6
        assert "diag/entropy_gap/start" in m  # middle/end appear once responses are long enough

    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary
    for key in ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy", "gap_recovery"):
        assert key in saved
    assert (run_dir / "student" / "config.json").is_file()
    assert any((run_dir / "student").glob("*.safetensors"))
    assert (run_dir / "student" / "tokenizer.json").is_file()


def test_cli_trains_on_user_jsonl_with_final_number_verifier(tiny_dir: Path, tmp_path: Path, local_ray, capsys) -> None:
    """A user's own prompt file, a template, a named verifier and sampled-token OPD with vOPD + IW-OPD, via the CLI
    (its `main`, inside the tests' Ray). The eval rows are the file's first 8, so prompt selection takes them
    out of training."""
    import yaml

    from opd_ray.cli import main

    prompts = tmp_path / "mine.jsonl"
    rows = [{"question": f"{a}+{a + 1}", "final": str(2 * a + 1)} for a in range(10, 42)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    dataset = {"path": str(prompts), "prompt_field": "question", "answer_field": "final"}
    raw["data"] = {
        "train": dataset,
        "eval": {**dataset, "limit": 8},
        "prompt_template": "{prompt}=",
        "verifier": "final_number",
        "selection": {"near_duplicate_jaccard": None},
    }
    raw["trainer"].update(steps=2, prompts_per_step=8)
    raw["algorithm"] = {"objective": "sampled_token", "clip_eps": 0.2, "baseline": "vopd", "position_gamma": 0.5}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(spec_path)]) == 0
    printed = capsys.readouterr()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["student_accuracy_after"] <= 1.0
    selection = {"pool": 32, "kept": 24, "dropped": {"exact_reference": 8}, "outside": 0}
    assert summary["prompt_selection"] == selection
    assert json.loads((tmp_path / "run" / "selection.json").read_text()) == selection
    assert "student_accuracy_after" in printed.out + printed.err


def test_sft_control_raises_likelihood_of_reference_answers(tiny_dir: Path, tmp_path: Path, local_ray) -> None:
    """The control arm trains on the dataset's answers through the same learner, without a teacher signal."""
    from opd_ray.recipe.stages import run_stages

    raw = tiny_spec_dict(tiny_dir, tmp_path / "run")
    raw["algorithm"] = {"objective": "sft", "aggregation": "sequence_mean"}
    raw["trainer"].update(steps=16, prompts_per_step=32, save_final=False)
    raw["learner"].update(lr=3e-3, warmup_steps=1)
    run_stages(ExperimentSpec.model_validate(raw))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("sampled_reverse_kl" not in m for m in metrics)  # no teacher was asked
    assert "time/teacher" not in metrics[0]
    assert sum(m["loss"] for m in metrics[-3:]) < 0.9 * sum(m["loss"] for m in metrics[:3])
