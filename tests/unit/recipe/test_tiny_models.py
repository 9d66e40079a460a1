"""The quickstart's tiny models come from the shipped copies; any other recipe, or --from-scratch, trains."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from opd_ray.errors import UserError
from opd_ray.recipe import tiny_models
from opd_ray.spec import load_spec
from tests.conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_the_quickstart_recipe_copies_the_shipped_models(tmp_path: Path, recorded_training: list) -> None:
    spec = load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path}"])
    tiny_models.ensure_tiny_models(spec)
    assert recorded_training == []
    for label in ("teacher", "student"):
        shipped = tiny_models.SHIPPED / label
        names = sorted(p.name for p in shipped.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(shipped, tmp_path / label, names, shallow=False)
        assert (mismatch, errors) == ([], []) and "model.safetensors" in match
    assert (tmp_path / "train.jsonl").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_another_recipe_or_from_scratch_trains(tmp_path: Path, recorded_training: list) -> None:
    changed = load_spec(
        QUICKSTART, [f"models.build_tiny.directory={tmp_path / 'a'}", "models.build_tiny.student_sft_steps=599"]
    )
    tiny_models.ensure_tiny_models(changed)
    assert [label for label, _, _ in recorded_training] == ["student"]  # the teacher's still matches the shipped one
    same = load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path / 'b'}"])
    tiny_models.ensure_tiny_models(same, from_scratch=True)
    assert [label for label, _, _ in recorded_training] == ["student", "teacher", "student"]


def test_the_multi_teacher_example_builds_a_specialist_and_a_student_of_both_families(
    tmp_path: Path, recorded_training: list
) -> None:
    """examples/multi_teacher.yaml: the quickstart's teacher is copied; the three-sums teacher trains on
    sums of three only and the student on the 2:1 mix; the eval files are held out from the mix."""
    import json

    spec = load_spec(REPO / "examples" / "multi_teacher.yaml", [f"models.build_tiny.directory={tmp_path}"])
    tiny_models.ensure_tiny_models(spec)
    trained = {directory.name: examples for _, directory, examples in recorded_training}
    assert sorted(trained) == ["student-mixed", "teacher-three"]  # "teacher" is the shipped copy
    tokenizer = tiny_models.build_char_tokenizer(tiny_models.ALPHABET, tmp_path / "tok")
    pluses = lambda examples: sorted({tokenizer.decode(prompt).count("+") for prompt, _ in examples})  # noqa: E731
    assert pluses(trained["teacher-three"]) == [2] and len(trained["teacher-three"]) == 10_000
    assert pluses(trained["student-mixed"]) == [1, 2] and len(trained["student-mixed"]) == 30_000
    rows = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    mixed = rows("mixed_train.jsonl")
    assert [row["task"] for row in mixed[:6]] == ["sums", "sums", "three_sums"] * 2
    held_out = {row["prompt"] for row in rows("eval.jsonl") + rows("three_sums_eval.jsonl")}
    assert not held_out & {row["prompt"] for row in mixed}
    assert all(eval(row["prompt"][:-1]) == int(row["answer"][::-1]) for row in mixed)  # the sums are right


def test_a_folder_opd_ray_did_not_build_is_never_replaced(tmp_path: Path, recorded_training: list) -> None:
    users = tmp_path / "student"
    users.mkdir()
    (users / "my-notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"models.student .*holds files opd-ray did not write"):
        tiny_models.ensure_tiny_models(load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path}"]))
    assert (users / "my-notes.txt").read_text() == "mine" and recorded_training == []
    same = [f"models.build_tiny.directory={tmp_path}", f"models.teacher.path={tmp_path / 'x'}"]
    with pytest.raises(UserError, match="name the same folder"):
        tiny_models.ensure_tiny_models(load_spec(QUICKSTART, [*same, f"models.student.path={tmp_path / 'x'}"]))


def test_the_hinted_task_shows_each_sum_after_its_answer_as_the_self_teacher_reads_it(tmp_path: Path) -> None:
    """sums_with_hints: every sum, and every sum again behind its answer, written the way
    examples/self_distill.yaml's teacher template writes it (so a student built on it can read that hint)."""
    from opd_ray.data.arithmetic import write_task_files

    write_task_files(tmp_path, seed=0, train_size=40, eval_size=10)
    sums = tiny_models.task_rows(tmp_path, "sums")
    hinted = tiny_models.task_rows(tmp_path, "sums_with_hints")
    assert hinted[: len(sums)] == sums and len(hinted) == 2 * len(sums)
    self_distill = load_spec(REPO / "examples" / "self_distill.yaml", [f"models.build_tiny.directory={tmp_path}"])
    template = self_distill.teachers["hinted"].prompt_template
    for row, shown in zip(sums, hinted[len(sums) :], strict=True):
        assert shown == {**row, "prompt": template.format(**row)} and shown["prompt"].startswith(row["answer"] + "=")


def test_the_tiny_build_never_replaces_a_task_file_it_did_not_write(tmp_path: Path, recorded_training) -> None:
    mine = tmp_path / "train.jsonl"
    mine.write_text('{"prompt": "my own data", "answer": "kept"}\n')
    with pytest.raises(UserError, match=r"holds train.jsonl, which the tiny build did not write"):
        tiny_models.ensure_tiny_models(load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path}"]))
    assert mine.read_text() == '{"prompt": "my own data", "answer": "kept"}\n'
    assert not (tmp_path / "student").exists() and recorded_training == []

    mine.unlink()  # an empty folder: built, and the build's own files are its to replace later
    tiny_models.ensure_tiny_models(load_spec(QUICKSTART, [f"models.build_tiny.directory={tmp_path}"]))
    assert (tmp_path / "train.jsonl").is_file() and (tmp_path / "tiny_build.json").is_file()
