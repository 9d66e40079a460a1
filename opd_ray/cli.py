"""`opd-ray validate|train|probe|build-tiny SPEC [key=value ...]`, `opd-ray report RUN_DIR...` and
`opd-ray import-model SOURCE OUTPUT`.

User errors (bad spec, missing files, mismatched vocabularies) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_ray.errors import UserError
from opd_ray.spec import load_spec, spec_to_yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-ray", description="On-policy distillation of language models on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "check a spec and print the resolved config"),
        ("train", "run on-policy distillation from a spec"),
        ("probe", "before training: overlap, masses, entropy gap, accuracies, and whether OPD is likely to help"),
        ("build-tiny", "build the tiny models models.build_tiny names (shipped copies are used when they match)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("spec", help="experiment spec (YAML)")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.steps=10")
        if name == "train":
            what = sub.add_mutually_exclusive_group()
            what.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
            what.add_argument(
                "--overwrite", action="store_true", help="delete the results of a previous run in run.output_dir first"
            )
            sub.add_argument(
                "--force", action="store_true", help="with --resume: continue even if the spec defines another run"
            )
        if name == "validate":
            sub.add_argument(
                "--no-files", action="store_true", help="check the spec only, not its models, tokenizers and data"
            )
        if name == "probe":
            sub.add_argument(
                "--teacher",
                action="append",
                default=[],
                metavar="PATH",
                help="another candidate teacher (repeatable): a model folder (the spec's teacher settings) or a spec "
                "YAML whose teacher comes with its own (prompt format, vocabulary); each scores the same student "
                "samples; one ranking",
            )
        if name == "build-tiny":
            sub.add_argument("--from-scratch", action="store_true", help="train even when a shipped copy matches")
    imported = commands.add_parser(
        "import-model", help="a GGUF file or model folder -> the safetensors folder opd-ray loads (optionally pruned)"
    )
    imported.add_argument("source", help="a .gguf file, a model folder, or package:<module>/<file>")
    imported.add_argument("output", help="folder to write (replaced if it exists)")
    imported.add_argument("--keep-layers", help="decoder layers to keep, e.g. 0-21,28,29 (a pruned student)")
    imported.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    report = commands.add_parser("report", help="accuracies and diagnostics, early vs late, of finished runs")
    report.add_argument("runs", nargs="+", help="run directories (run.output_dir)")
    report.add_argument("--window", type=int, default=50, help="steps averaged at the start and at the end")
    report.add_argument(
        "--plot", metavar="DIR", help="also write PNGs (overlap ratio, top-1 agreement, entropy gap, accuracy) here"
    )
    return parser


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from opd_ray.console import console

    table = Table(title=f"opd-ray: {summary['run']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "teacher_accuracy",
        "student_accuracy_before",
        "student_accuracy_after",
        "gap_recovery",
        "steps",
        "wall_seconds",
        "student_path",
    ):
        value = summary.get(key)
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    health = summary.get("health")
    if health is not None:
        table.add_row("health", health["status"])
    console.print(table)
    if health and health["conditions"]:
        conditions = Table(title="opd-ray health: conditions found (health: in the spec sets their thresholds)")
        for column in ("condition", "first step", "last step", "evidence", "advice"):
            conditions.add_column(column, overflow="fold")
        for c in health["conditions"]:
            conditions.add_row(c["condition"], str(c["first_step"]), str(c["last_step"]), c["evidence"], c["advice"])
        console.print(conditions)


def code_the_spec_runs(spec) -> list[str]:
    """What a spec makes opd-ray import and run besides opd-ray itself: a reviewer's checklist."""
    notes = []
    verifier = spec.data.verifier or ""
    if ":" in verifier and not verifier.startswith("opd_ray."):
        notes.append(
            f"data.verifier imports and runs {verifier.partition(':')[0]} on the driver and every rollout worker"
        )
    remote = [label for label, model in spec.models_by_role() if model.trust_remote_code]
    if remote:
        notes.append(f"trust_remote_code runs the Python files in the model folders of {', '.join(remote)}")
    return notes


def _check_files(spec) -> None:
    """The pre-flight of `train` (model folders, tokenizers, vocabularies, data rows, the verifier), without
    Ray; models the spec builds itself are checked once they exist."""
    from opd_ray.data.run_inputs import load_run_inputs

    builds = spec.models.build_tiny is not None or spec.models.import_pretrained is not None
    if builds and not Path(spec.models.student.path).is_dir():
        print("opd-ray: files not checked: the models are built by the first `opd-ray train`", file=sys.stderr)
        return
    inputs = load_run_inputs(spec)
    evaluation = f", {len(inputs.eval)} eval prompts" if inputs.eval is not None else ""
    print(
        f"opd-ray: files ok: {len(inputs.train)} training prompts{evaluation}, {len(inputs.tokenizer)} tokens",
        file=sys.stderr,
    )


def _build_tiny(spec, from_scratch: bool) -> int:
    from opd_ray.recipe.tiny_models import ensure_tiny_models

    if spec.models.build_tiny is None:
        raise UserError("models.build_tiny: the spec names no tiny models to build")
    ensure_tiny_models(spec, from_scratch=from_scratch)
    print(f"tiny models ready in {spec.models.build_tiny.directory}")
    return 0


def _import_model(args: argparse.Namespace) -> int:
    from opd_ray.recipe.real_models import import_model
    from opd_ray.spec import check_distinct_layers, parse_layer_list

    try:
        layers = check_distinct_layers(parse_layer_list(args.keep_layers)) if args.keep_layers else None
    except ValueError as exc:
        raise UserError(f"--keep-layers {exc}") from None
    print(f"wrote {import_model(args.source, Path(args.output).expanduser(), layers, args.dtype)}")
    return 0


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """key=value overrides may come before or after the flags (`train SPEC --overwrite a=1` and
    `train SPEC a=1 --overwrite`): argparse stops collecting them at the first flag."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    try:
        if args.command == "report":
            from opd_ray.report import render

            run_dirs = [Path(r).expanduser() for r in args.runs]
            print(render(run_dirs, args.window))
            if args.plot:
                from opd_ray.plots import plot_runs

                for path in plot_runs(run_dirs, Path(args.plot)):
                    print(f"wrote {path}")
            return 0
        if args.command == "import-model":
            return _import_model(args)
        spec = load_spec(args.spec, args.overrides)
        if args.command == "validate":
            print(spec_to_yaml(spec), end="")
            for note in code_the_spec_runs(spec):
                print(f"opd-ray: note: {note} (docs: operations/protections.md, What a spec can run)", file=sys.stderr)
            if not args.no_files:
                from opd_ray.driver.outputs_apart import check_outputs_apart

                check_outputs_apart(spec, Path(args.spec).expanduser(), resume=True)
                _check_files(spec)
            return 0
        if args.command == "build-tiny":
            return _build_tiny(spec, args.from_scratch)
        if args.command == "probe":
            from opd_ray.recipe.probe import print_probe, run_probe

            print_probe(run_probe(spec, args.teacher))
            return 0
        from opd_ray.recipe.stages import run_stages

        spec_file = Path(args.spec).expanduser()
        _print_summary(
            run_stages(spec, resume=args.resume, overwrite=args.overwrite, force=args.force, spec_file=spec_file)
        )
        return 0
    except UserError as exc:
        print(f"opd-ray: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # a run stopped by SIGTERM exits 143


if __name__ == "__main__":
    sys.exit(main())
