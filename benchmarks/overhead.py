"""Time outside model compute as a share of a synchronous step.

Model compute is what the actors report doing: vLLM sampling on the rollout worker, teacher
scoring on the replica, and the learner's forward, loss, backward and optimizer step
(slowest rank). Everything else in a step is overhead: fetching batches from the object
store, weight sync (gather, pack, transfer, reload), Ray scheduling and the driver. The
baseline of the ratio is the step's own model compute, measured in the same run. The issue's
target: overhead <= 5% of step time.

    python benchmarks/overhead.py            # 60 steps, recorded in RESULTS.md
    python benchmarks/overhead.py --tiny     # CI: 3 steps, nothing recorded
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import build_tiny_models, markdown_table, mean, parse_args, report, run_distill, spec_dict, target

PROMPTS_PER_STEP, MAX_NEW_TOKENS = 64, 8


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv, steps=60)
    steps, warmup = (3, 1) if args.tiny else (args.steps, 5)
    with tempfile.TemporaryDirectory() as scratch:
        models = build_tiny_models(Path(scratch) / "models")
        metrics = run_distill(spec_dict(models, Path(scratch) / "run", steps, PROMPTS_PER_STEP, MAX_NEW_TOKENS))
    steady = metrics[warmup:]

    def per_step(key: str) -> float:
        return mean([m.get(key, 0.0) for m in steady])

    step = per_step("time/step")
    compute = {
        "rollout (vLLM sampling)": per_step("time/rollout"),
        "teacher (vLLM scoring)": per_step("time/teacher"),
        "learner (forward, loss, backward, step)": per_step("time/learner_compute"),
    }
    overhead_parts = {
        "learner batch fetch (object store)": per_step("time/learner_fetch"),
        "weight sync (gather, pack, transfer, reload)": per_step("time/weight_sync"),
    }
    total_compute = sum(compute.values())
    overhead = step - total_compute
    overhead_parts["scheduling, driver, the rest"] = overhead - sum(overhead_parts.values())
    rows = [[f"compute: {name}", seconds, seconds / step] for name, seconds in compute.items()]
    rows += [[f"overhead: {name}", seconds, seconds / step] for name, seconds in overhead_parts.items()]
    rows += [["model compute, all", total_compute, total_compute / step], ["overhead, all", overhead, overhead / step]]
    rows += [["step", step, 1.0]]
    table = markdown_table(["part of a synchronous step", "seconds / step", "share of step"], rows)
    config = (
        f"{steps} steps of {PROMPTS_PER_STEP} prompts, <= {MAX_NEW_TOKENS} new tokens, tiny models "
        "(quickstart shapes), 1 rollout worker, 1 teacher, 2 learner ranks (ZeRO-2); "
        f"means over steps {warmup + 1}-{steps}; "
        f"overhead / model compute = {overhead / total_compute:.3f}"
    )
    report("overhead", config, table, [target(overhead / step <= 0.05, "overhead <= 5% of step time")], not args.tiny)


if __name__ == "__main__":
    main()
