"""Several teachers and the student as its own teacher, through real Ray, vLLM, transformers and DeepSpeed.

Four teachers on the tiny models, one row in four each (a `task` column routes them): "a" (the tiny
teacher, vLLM), "b" (another model, transformers), "now" (the student itself, current weights, shown the
answer; vLLM) and "frozen" (the student's initial weights, shown the answer another way; transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_ray.driver.metric_keys import undocumented
from opd_ray.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.integration

ROUTES = ["a", "b", "now", "frozen"]


def routed(tiny_dir: Path, directory: Path, source: str, rows: int) -> str:
    """`rows` rows of a tiny task file with a `task` column cycling through the four teachers."""
    lines = (tiny_dir / source).read_text().splitlines()[:rows]
    path = directory / source
    path.write_text(
        "".join(json.dumps({**json.loads(line), "task": ROUTES[i % 4]}) + "\n" for i, line in enumerate(lines))
    )
    return str(path)


def four_teachers(tiny_dir: Path, directory: Path) -> dict:
    raw = tiny_spec_dict(tiny_dir, directory / "run")
    engine = raw.pop("teacher")["engine"]
    student = raw["models"].pop("teacher") and raw["models"]["student"]
    teacher = {"path": str(tiny_dir / "teacher")}
    raw["teachers"] = {
        "a": {"model": teacher, "top_k": 15, "engine": engine},
        "b": {"model": student, "backend": "transformers", "top_k": 15, "coef": 2.0},
        "now": {
            "model": "self",
            "weights": "current",
            "top_k": 15,
            "engine": engine,
            "prompt_template": "{prompt}{answer}=",
        },
        "frozen": {"model": "self", "backend": "transformers", "top_k": 15, "prompt_template": "{answer}+{prompt}"},
    }
    raw["data"] = {
        "train": {"path": routed(tiny_dir, directory, "train.jsonl", 64)},
        "eval": {"path": routed(tiny_dir, directory, "eval.jsonl", 16)},
        "route": {"field": "task", "teachers": {name: name for name in ROUTES}},
    }
    raw["learner"].update(num_ranks=1, lr=0.05)  # one rank; a large step, so that "now" visibly moves
    return raw


@pytest.fixture(scope="module")
def teachers_started(tiny_dir, tmp_path_factory, local_ray):
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.roles import start_roles

    spec = ExperimentSpec.model_validate(four_teachers(tiny_dir, tmp_path_factory.mktemp("teachers")))
    inputs = load_run_inputs(spec)
    roles = start_roles(spec)
    try:
        yield spec, inputs, roles
    finally:
        roles.shutdown()


def reference_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """A plain transformers forward over prompt + response: log-probs of the response tokens."""
    sequence = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=sequence).logits[0, :-1].float(), -1)
    return logprobs.gather(-1, sequence[0, 1:, None])[len(prompt) - 1 :, 0]


def rows_of(batches) -> list[tuple[int, int, list[int], torch.Tensor]]:
    """(dataset row, teacher index, response ids, teacher log-probs of the response) of every scored row."""
    out = []
    for batch in batches:
        for b in range(batch.num_sequences):
            response_L = batch.response_mask_BL[b].bool()
            response = batch.input_ids_BL[b][response_L].tolist()
            out.append(
                (
                    int(batch.prompt_index_B[b]),
                    int(batch.teacher_id_B[b]),
                    response,
                    batch.teacher_logprobs_BL[b][response_L],
                )
            )
    return out


def test_every_row_is_scored_by_its_routes_teacher_on_that_teachers_prompt(teachers_started, local_ray) -> None:
    """Each row's marks name the teacher of its route, and its scores are that teacher's model on that
    teacher's prompt (a float check against transformers), on the response positions only."""
    from opd_ray.driver.pipeline import rollout_and_score

    spec, inputs, roles = teachers_started
    train, names = inputs.train, list(spec.teachers)
    models = {"a": AutoModelForCausalLM.from_pretrained(spec.teacher_model("a").path).eval()}
    models["b"] = models["now"] = models["frozen"] = AutoModelForCausalLM.from_pretrained(
        spec.models.student.path
    ).eval()
    batches = local_ray.get(rollout_and_score(roles, train, list(range(16)), step=1))
    scored = rows_of(batches)
    assert sorted(row for row, *_ in scored) == list(range(16))
    for row, teacher, response, teacher_logprobs in scored:
        name = names[teacher]
        assert name == train.teachers[row] == ROUTES[row % 4]
        prompt = train.teacher_prompt_ids[row] or train.prompt_ids[row]
        assert (prompt == train.prompt_ids[row]) == (name in ("a", "b"))
        expected = reference_logprobs(models[name], prompt, response)
        torch.testing.assert_close(teacher_logprobs, expected, rtol=1e-4, atol=1e-4, msg=f"row {row} ({name})")


def test_a_self_teacher_follows_the_learner_only_with_current_weights(teachers_started, local_ray) -> None:
    """After one update and a weight sync, "now" scores what the learner computes for the same teacher
    prompt + response; "frozen" still scores with the initial student."""
    from opd_ray.driver.pipeline import rollout_and_score
    from opd_ray.driver.roles import sync_weights

    spec, inputs, roles = teachers_started
    train, names = inputs.train, list(spec.teachers)
    refs = rollout_and_score(roles, train, list(range(16, 32)), step=2)
    metrics = roles.learners.train_step(refs, spec.algorithm, 4, 1, teacher_names=tuple(names))
    assert {f"teacher/{name}/loss" for name in names} <= set(metrics)
    sync_weights(roles, 1)
    initial = AutoModelForCausalLM.from_pretrained(spec.models.student.path).eval()
    for row, teacher, response, teacher_logprobs in rows_of(
        local_ray.get(rollout_and_score(roles, train, list(range(16)), step=3))
    ):
        prompt = train.teacher_prompt_ids[row] or train.prompt_ids[row]
        before = reference_logprobs(initial, prompt, response)
        if names[teacher] == "now":
            learner = roles.learners.sequence_logprobs(prompt + response)[0]
            torch.testing.assert_close(teacher_logprobs, torch.tensor(learner[len(prompt) - 1 :]), rtol=1e-4, atol=1e-4)
            assert (teacher_logprobs - before).abs().max() > 1e-2  # it did move
        elif names[teacher] == "frozen":
            torch.testing.assert_close(teacher_logprobs, before, rtol=1e-4, atol=1e-4)


def test_a_dead_teacher_replica_is_restarted_alone(teachers_started, local_ray) -> None:
    """Killing teacher "a"'s replica restarts that replica only; its shard is scored again and no row is lost."""
    import ray

    from opd_ray.driver.pipeline import rollout_and_score

    _, inputs, roles = teachers_started
    pids = {name: local_ray.get(pool[0].location.remote())["pid"] for name, pool in roles.teacher_pools.items()}
    ray.kill(roles.teacher_pools["a"][0], no_restart=False)
    batches = local_ray.get(rollout_and_score(roles, inputs.train, list(range(32, 48)), step=4))
    assert sorted(row for b in batches for row in b.prompt_index_B.tolist()) == list(range(32, 48))
    assert roles.restarts["teacher"] == 1
    after = {name: local_ray.get(pool[0].location.remote())["pid"] for name, pool in roles.teacher_pools.items()}
    assert after["a"] != pids["a"]
    assert {name: pid for name, pid in after.items() if name != "a"} == {n: p for n, p in pids.items() if n != "a"}


def test_a_run_with_two_teachers_logs_and_evaluates_each(tiny_dir, tmp_path, local_ray) -> None:
    """The whole loop (sampled-token objective) with a teacher and a current `self` teacher (transformers:
    quick to start): per-teacher keys on every step, each teacher's eval rows and gap in the summary, each
    teacher a role."""
    from opd_ray.recipe.stages import run_stages

    raw = four_teachers(tiny_dir, tmp_path)
    raw["teachers"] = {name: raw["teachers"][name] for name in ("a", "now")}
    for teacher in raw["teachers"].values():
        teacher.update(backend="transformers")
    raw["data"]["route"]["teachers"] = {"a": "a", "b": "a", "now": "now", "frozen": "now"}
    raw["trainer"].update(steps=2, eval_every=1)
    raw["learner"]["lr"] = 3e-3
    raw["algorithm"] = {"objective": "sampled_token"}  # the fixture's update used topk
    summary = run_stages(ExperimentSpec.model_validate(raw))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        for name in ("a", "now"):
            for key in ("loss", "teacher_logprob", "sampled_reverse_kl", "diag/overlap_ratio", "response_tokens"):
                assert f"teacher/{name}/{key}" in m, (name, key)
        assert m["teacher/a/sequences"] + m["teacher/now/sequences"] == m["sequences"] == 16
        assert not undocumented(m)  # the per-teacher keys are in the metric reference
    assert "teacher/a/eval/student_accuracy" in metrics[0]  # step 1 of 2 is evaluated (the last by the summary)
    assert set(summary["teachers"]) == {"a", "now"}
    for own in summary["teachers"].values():
        assert {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "gap_recovery"} <= set(own)
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert {"teacher.a", "teacher.now"} <= set(placement)
