"""Step time in asynchronous mode against each stage timed alone.

One synchronous run (`trainer.max_staleness: 0`) times every stage with nothing else
running: rollout and teacher compute (as the actors report it), the learner update and the
weight sync. Asynchronous runs (`max_staleness: 2`) then overlap them. The issue's target:
an asynchronous step takes at most 1.15x the slowest stage alone. Same tiny models (the
quickstart's shapes, random init), prompts and seeds in every run; the first steps (engine
and kernel warm-up) are left out of the means.

    python benchmarks/stages.py            # 60 steps per run, recorded in RESULTS.md
    python benchmarks/stages.py --tiny     # CI: 3 steps, nothing recorded
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import build_tiny_models, markdown_table, mean, parse_args, report, run_distill, spec_dict, target

PROMPTS_PER_STEP, MAX_NEW_TOKENS = 64, 8


def stage_means(metrics: list[dict], warmup: int) -> dict[str, float]:
    steady = metrics[warmup:]
    keys = ("time/rollout", "time/teacher", "time/learn", "time/weight_sync", "time/step")
    return {key: mean([m.get(key, 0.0) for m in steady]) for key in keys}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv, steps=60)
    steps, warmup = (3, 1) if args.tiny else (args.steps, 5)

    runs = {
        "synchronous (max_staleness 0), 1 rollout worker + 1 teacher": (0, 1),
        "asynchronous (max_staleness 2), 1 rollout worker + 1 teacher": (2, 1),
        "asynchronous (max_staleness 2), 2 rollout workers + 2 teachers": (2, 2),
    }
    if args.tiny:  # CI checks that the script runs: one run (each adds start-up time, not coverage), whose
        # per-stage actor compute stands in for the stages alone; nothing is recorded at this size
        runs = {name: runs[name] for name in ["asynchronous (max_staleness 2), 1 rollout worker + 1 teacher"]}
    with tempfile.TemporaryDirectory() as scratch:
        models = build_tiny_models(Path(scratch) / "models")
        results = {}
        for name, (staleness, replicas) in runs.items():
            raw = spec_dict(models, Path(scratch) / f"run{len(results)}", steps, PROMPTS_PER_STEP, MAX_NEW_TOKENS)
            raw["trainer"]["max_staleness"] = staleness
            raw["rollout"]["num_workers"] = replicas
            raw["teacher"]["num_replicas"] = replicas
            results[name] = stage_means(run_distill(raw), warmup)

    alone = next(iter(results.values()))
    slowest_name, slowest = max(
        (("rollout", alone["time/rollout"]), ("teacher", alone["time/teacher"]), ("learner", alone["time/learn"])),
        key=lambda item: item[1],
    )
    rows = [
        [f"stage alone: {stage}", alone[key], alone[key] / slowest]
        for stage, key in (
            ("rollout", "time/rollout"),
            ("teacher", "time/teacher"),
            ("learner", "time/learn"),
            ("weight sync", "time/weight_sync"),
        )
    ]
    rows += [[f"step: {name}", r["time/step"], r["time/step"] / slowest] for name, r in results.items()]
    table = markdown_table(["what", "seconds / step", f"vs slowest stage alone ({slowest_name})"], rows)
    best_async = min(r["time/step"] for name, r in results.items() if name.startswith("asynchronous"))
    config = (
        f"{steps} steps of {PROMPTS_PER_STEP} prompts, <= {MAX_NEW_TOKENS} new tokens, objective topk (k = |V| = 15), "
        f"2 learner ranks (ZeRO-2); means over steps {warmup + 1}-{steps}; rollout/teacher = actor compute per step"
    )
    report(
        "stages",
        config,
        table,
        [target(best_async <= 1.15 * slowest, "asynchronous step <= 1.15x the slowest stage alone")],
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
