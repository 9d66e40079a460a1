"""The paper's miniature: its verifier, the second tiny teacher, its three run specs, plots and report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from opd_ray.cli import main
from opd_ray.data.arithmetic import either_digit_order
from opd_ray.data.verifiers import resolve_verifier
from opd_ray.plots import accuracy_curve, moving_average, plot_runs
from opd_ray.recipe import tiny_models
from opd_ray.spec import load_spec
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "paper_miniature"


def load_example_script():
    spec = importlib.util.spec_from_file_location("paper_miniature_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int, overlap_start: float, accuracies: tuple[float, float, float]) -> Path:
    """A finished run's files as the driver writes them: one metrics line a step, evals every 10."""
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "diag/overlap_ratio": overlap_start + step / 100, "diag/entropy_gap": 1 / step}
            row["diag/top1_agreement"] = overlap_start
            if step % 10 == 0 and step < steps:
                row["eval/student_accuracy"] = 0.5
            f.write(json.dumps(row) + "\n")
    before, after, teacher = accuracies
    summary = {"student_accuracy_before": before, "student_accuracy_after": after, "teacher_accuracy": teacher}
    (run_dir / "summary.json").write_text(json.dumps({**summary, "objective": "topk", "wall_seconds": 9.0}))
    return run_dir


def test_either_digit_order_accepts_both_orders_and_nothing_else() -> None:
    verifier = resolve_verifier("opd_ray.data.arithmetic:either_digit_order")
    assert verifier.function is either_digit_order
    assert verifier("234", "234") and verifier("432", "234") and verifier(" 432\n", "234")
    assert not verifier("243", "234") and not verifier("2345", "234") and not verifier("", "234")


def test_the_three_runs_resolve_to_one_student_and_the_named_teachers(tmp_path: Path) -> None:
    script = load_example_script()
    specs = {
        name: load_spec(script.SPEC, [f"run.output_dir={tmp_path / name}", *overrides])
        for name, overrides in script.RUNS.items()
    }
    assert len({s.models.student.path for s in specs.values()}) == 1
    compatible, incompatible, cold = specs["compatible"], specs["incompatible"], specs["cold_start"]
    assert compatible.models.build_tiny.teacher_digits == "reversed"
    assert incompatible.teacher_model("teacher").path.endswith("/teacher-forward")
    assert incompatible.models.build_tiny.teacher_digits == "forward"
    assert cold.teachers == incompatible.teachers
    assert compatible.stages == incompatible.stages == ["opd"]
    assert cold.stages == ["teacher_generate", "sft", "opd"]
    assert {s.data.verifier for s in specs.values()} == {"opd_ray.data.arithmetic:either_digit_order"}


def test_a_second_teacher_is_built_beside_the_cached_student(tmp_path: Path, recorded_training: list) -> None:
    """Training is replaced by a recording fake (what is trained on, not how, is under test here)."""
    trained = recorded_training
    script = load_example_script()
    common = [f"models.build_tiny.directory={tmp_path}", "models.build_tiny.train_size=16"]
    tiny_models.ensure_tiny_models(load_spec(script.SPEC, common))
    assert [t[0] for t in trained] == ["teacher", "student"]
    tiny_models.ensure_tiny_models(load_spec(script.SPEC, common))
    assert len(trained) == 2, "a model whose recipe is unchanged is not rebuilt"

    tiny_models.ensure_tiny_models(load_spec(script.SPEC, [*common, *script.FORWARD_TEACHER]))
    assert [(t[0], t[1].name) for t in trained[2:]] == [("teacher", "teacher-forward")]
    tokenizer = tiny_models.PreTrainedTokenizerFast.from_pretrained(tmp_path / "tokenizer")
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for (_, reversed_ids), (_, forward_ids), row in zip(trained[0][2], trained[2][2], rows, strict=True):
        assert tokenizer.decode(reversed_ids, skip_special_tokens=True) == row["answer"]
        assert tokenizer.decode(forward_ids, skip_special_tokens=True) == row["answer"][::-1]
        assert forward_ids[-1] == tokenizer.eos_token_id
    recipe = json.loads((tmp_path / "teacher-forward" / "build.json").read_text())
    assert recipe["digits"] == "forward"

    elsewhere = tmp_path.parent / f"{tmp_path.name}-cold-started-student"
    tiny_models.ensure_tiny_models(load_spec(script.SPEC, [*common, f"models.student.path={elsewhere}"]))
    assert len(trained) == 3 and not elsewhere.exists(), "a model outside the build directory is left alone"


def test_moving_average_and_accuracy_curve() -> None:
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    metrics = [{"step": 10, "eval/student_accuracy": 0.6}, {"step": 20}]
    summary = {"student_accuracy_before": 0.4, "student_accuracy_after": 0.7}
    assert accuracy_curve(summary, metrics) == ([0, 10, 20], [0.4, 0.6, 0.7])


def test_report_plot_writes_one_png_a_signal_with_every_run(tmp_path: Path, capsys) -> None:
    runs = [write_run(tmp_path / "a", 30, 0.5, (0.3, 0.8, 0.9)), write_run(tmp_path / "b", 40, 0.2, (0.3, 0.4, 0.9))]
    assert main(["report", str(runs[0]), str(runs[1]), "--window", "5", "--plot", str(tmp_path / "plots")]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["accuracy.png", "entropy_gap.png", "overlap_ratio.png", "top1_agreement.png"]
    for name in written:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(Exception, match="2 labels for 1 runs"):
        plot_runs(runs[:1], tmp_path / "x", labels=["a", "b"])


def test_miniature_report_states_each_runs_gap_recovery_from_the_original_student(tmp_path: Path) -> None:
    script = load_example_script()
    write_run(tmp_path / "compatible", 40, 0.7, (0.5, 0.9, 1.0))
    write_run(tmp_path / "cold_start", 40, 0.6, (0.2, 0.75, 1.0))  # starts from the cold-started student
    rows = [script.run_row(name, tmp_path / name, original_student=0.5) for name in ("compatible", "cold_start")]
    assert rows[0]["gap_recovery"] == pytest.approx(0.8)
    assert rows[1]["gap_recovery"] == pytest.approx(0.5) and rows[1]["after_cold_start"] == 0.2
    assert rows[0]["overlap_first"] == pytest.approx(0.7 + 0.105)  # mean of steps 1..20
    probe = {
        "signals": {f"diag/{k}": 0.5 for k in ("overlap_ratio", "top1_agreement", "overlap_mass_student")},
        "teacher_accuracy": 1.0,
        "student_accuracy": 0.5,
        "verdict": {"likely_to_help": False},
        "wall_seconds": 48.0,
    }
    probe["signals"].update({"diag/overlap_mass_teacher": 0.5, "diag/entropy_gap": 0.1})
    text = script.render_report(rows, {"incompatible": probe}, k=4)
    assert "| compatible | 1.000 | 0.500 | - | 0.900 | 0.800 |" in text
    assert "| cold_start | 1.000 | 0.500 | 0.200 | 0.750 | 0.500 |" in text
    assert "| incompatible | 0.500 | 0.500 | 0.500 / 0.500 | 0.100 | 1.000 | 0.500 | unlikely to help | 48 |" in text
    assert "| 0.805 -> 1.005 | 0.700 -> 0.700 |" in text  # overlap and top-1 agreement, first and last 20 steps
