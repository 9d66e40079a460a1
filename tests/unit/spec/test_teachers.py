"""Several teachers by name, and the student as its own teacher: what the spec accepts and refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from opd_ray.spec import ExperimentSpec


def named(raw: dict, teachers: dict, route: dict | None = None) -> dict:
    """The tiny spec with `teachers:` instead of models.teacher and the teacher: section."""
    raw = {**raw, "models": {"student": raw["models"]["student"]}}
    raw.pop("teacher")
    raw["teachers"] = teachers
    if route is not None:
        raw["data"] = {**raw["data"], "route": route}
    return raw


@pytest.fixture
def raw(tiny_dir, tmp_path) -> dict:
    from tests.conftest import tiny_spec_dict

    return tiny_spec_dict(tiny_dir, tmp_path / "run")


def two_teachers(raw: dict) -> dict:
    engine = raw["teacher"]["engine"]
    teachers = {
        "sums": {"model": raw["models"]["teacher"], "top_k": 15, "engine": engine},
        "hinted": {
            "model": "self",
            "weights": "current",
            "top_k": 15,
            "engine": engine,
            "coef": 0.5,
            "prompt_template": "{prompt}{answer}=",
        },
    }
    return named(raw, teachers, {"field": "task", "teachers": {"add": "sums"}, "default": "hinted"})


def test_the_one_teacher_shorthand_is_a_teacher_named_teacher(raw) -> None:
    spec = ExperimentSpec.model_validate(raw)
    assert list(spec.teachers) == ["teacher"] and not spec.several_teachers
    assert spec.teacher_model("teacher").path == raw["models"]["teacher"]["path"]
    assert spec.teachers["teacher"].top_k == raw["teacher"]["top_k"]  # the teacher: settings come along
    assert "teacher" not in spec.model_dump() and "teacher" not in spec.models.model_dump()


def test_named_teachers_and_self(raw) -> None:
    spec = ExperimentSpec.model_validate(two_teachers(raw))
    assert spec.several_teachers and list(spec.teachers) == ["sums", "hinted"]
    assert spec.teacher_model("hinted") == spec.models.student  # self: the student's initial weights
    assert spec.teachers["hinted"].is_self and spec.teachers["hinted"].coef == 0.5
    assert [label for label, _ in spec.models_by_role()] == ["teacher", "student"]  # self is not built


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["data"]["route"]["teachers"].update(mul="nobody"),
            r"data\.route\.teachers\.mul: no teacher named 'nobody'",
        ),
        (lambda r: r["data"].pop("route"), r"2 teachers but no route for the rows of .*train\.jsonl"),
        (lambda r: r["teachers"]["sums"].update(top_k=8), r"every teacher needs the same top_k"),
        (lambda r: r["teachers"]["sums"].update(weights="current"), r"weights: current is for model: self"),
        (
            lambda r: r.update(weight_sync={"method": "collective"}),
            r"teachers\.hinted: weights current .*weight_sync\.method=object_store",
        ),
        (lambda r: r.update(teacher={"top_k": 4}), r"teachers: replaces models\.teacher and the teacher: section"),
        (lambda r: r["models"].update(teacher={"path": "x"}), r"teachers: replaces models\.teacher"),
        (lambda r: r["teachers"].update({"a/b": r["teachers"]["sums"]}), r"teachers\.a/b: a name may hold"),
        (lambda r: r["teachers"]["hinted"].update(prompt_template="{prompt"), r"prompt_template: .*brace"),
        (lambda r: r["algorithm"].update(objective="full_vocab"), r"full_vocab loads one frozen teacher"),
    ],
)
def test_teacher_mistakes_are_named(raw, change, message: str) -> None:
    broken = two_teachers(raw)
    change(broken)
    with pytest.raises(ValidationError, match=message):
        ExperimentSpec.model_validate(broken)


def test_a_train_file_may_name_its_teacher(raw) -> None:
    spec_raw = two_teachers(raw)
    spec_raw["data"].pop("route")
    spec_raw["data"]["train"] = [
        {**raw["data"]["train"], "teacher": "sums"},
        {**raw["data"]["train"], "teacher": "hinted"},
    ]
    spec = ExperimentSpec.model_validate(spec_raw)
    assert [d.teacher for d in spec.data.train_files] == ["sums", "hinted"]
    spec_raw["data"]["train"][1]["teacher"] = "nobody"
    with pytest.raises(ValidationError, match=r"data\.train\[1\]\.teacher: no teacher named 'nobody'"):
        ExperimentSpec.model_validate(spec_raw)


@pytest.mark.parametrize(
    "overrides",
    [[], ["data.route.teachers.three_sums=sums"], ["data.route.teachers.sums=three"], ["algorithm.objective=sft"]],
)
def test_the_multi_teacher_example_and_its_comparison_runs_load(overrides: list[str]) -> None:
    """The commands in examples/multi_teacher.yaml's header: the routed run, each single-teacher run, the control."""
    from opd_ray.spec import load_spec
    from tests.conftest import REPO

    spec = load_spec(REPO / "examples" / "multi_teacher.yaml", overrides)
    assert list(spec.teachers) == ["sums", "three"]
    assert [d.teacher for d in spec.data.eval_files] == ["sums", "three"]  # accuracy per family in every run
    routed = set(spec.data.route.teachers.values())
    assert routed == (
        {"sums"}
        if "three_sums=sums" in str(overrides)
        else {"three"}
        if "sums=three" in str(overrides)
        else {"sums", "three"}
    )


def test_the_self_distillation_example_is_the_student_shown_the_answer() -> None:
    from opd_ray.spec import load_spec
    from tests.conftest import REPO

    spec = load_spec(REPO / "examples" / "self_distill.yaml")
    ((name, teacher),) = spec.teachers.items()
    assert teacher.is_self and teacher.weights == "current" and "{answer}" in teacher.prompt_template
    assert spec.teacher_model(name) == spec.models.student
    frozen = load_spec(REPO / "examples" / "self_distill.yaml", [f"teachers.{name}.weights=frozen"])
    assert frozen.teachers[name].weights == "frozen"
