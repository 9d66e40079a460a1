"""`opd-ray probe SPEC`: is on-policy distillation likely to help with this teacher? Asked before training.

The seed paper names two conditions. The student and teacher must think alike: at states the
student visits, their top-k sets overlap and the shared set holds most of both models' mass
(the initial overlap is the practical proxy). And the teacher must know something the
student does not: a real accuracy gap. The probe samples student rollouts on a few hundred
training prompts, has the teacher score them, and reads the diagnostics a run logs at step
1 — computed by the learners on the same code path, without an update — plus both models'
greedy accuracy on the eval set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from operator import attrgetter
from pathlib import Path

import ray

from opd_ray.data.order import PromptSampler
from opd_ray.data.preflight import check_teacher
from opd_ray.data.prompts import PromptSet
from opd_ray.data.run_inputs import RunInputs, load_run_inputs
from opd_ray.driver.evaluation import Accuracy, evaluate_by_teacher
from opd_ray.driver.outputs_apart import check_outputs_apart
from opd_ray.driver.pipeline import rollout_and_score
from opd_ray.driver.placement import teacher_role
from opd_ray.driver.roles import start_roles, start_teacher
from opd_ray.driver.run_dir import run_directory
from opd_ray.errors import UserError
from opd_ray.files import write_json
from opd_ray.recipe.startup import start
from opd_ray.spec import ExperimentSpec, ModelSpec, ProbeSpec, load_spec

# (metric, what it means), in the order printed
SIGNALS = (
    ("diag/overlap_ratio", "overlap ratio@k: shared share of student and teacher top-k"),
    ("diag/overlap_mass_student", "student mass on the shared top-k set"),
    ("diag/overlap_mass_teacher", "teacher mass on the shared top-k set"),
    ("diag/overlap_advantage", "overlap-token advantage (near 0 good; very negative: overconfident student)"),
    ("diag/entropy_gap", "entropy gap |H(teacher) - H(student)|"),
    ("diag/top1_agreement", "top-1 agreement"),
    ("sampled_reverse_kl", "sampled reverse KL per token"),
)


@dataclass
class Verdict:
    likely_to_help: bool
    reasons: list[str]


def judge(
    overlap: float, teacher_accuracy: float | None, student_accuracy: float | None, probe: ProbeSpec, k: int
) -> Verdict:
    """The paper's two conditions, each with the number that decided it and what to do when it fails."""
    reasons = []
    compatible = overlap >= probe.min_overlap
    if compatible:
        reasons.append(f"they think alike: overlap ratio@{k} {overlap:.2f} >= {probe.min_overlap:g}")
    else:
        reasons.append(
            f"they think differently: overlap ratio@{k} {overlap:.2f} < {probe.min_overlap:g}, and OPD tends to stay "
            "flat from such a start; give the student an off-policy cold start (SFT on teacher-generated answers) "
            "or the teacher's own prompt template first"
        )
    if teacher_accuracy is None or student_accuracy is None:
        reasons.append("the teacher's advantage was not measured: the spec has no data.eval with answers")
        return Verdict(compatible, reasons)
    gap = teacher_accuracy - student_accuracy
    teaches = gap >= probe.min_accuracy_gap
    if teaches:
        reasons.append(
            f"the teacher knows more: accuracy {teacher_accuracy:.3f} vs the student's {student_accuracy:.3f} "
            f"(gap {gap:+.3f} >= {probe.min_accuracy_gap:g})"
        )
    else:
        reasons.append(
            f"the teacher has little to teach: accuracy {teacher_accuracy:.3f} vs the student's "
            f"{student_accuracy:.3f} (gap {gap:+.3f} < {probe.min_accuracy_gap:g}); use a stronger teacher, e.g. "
            "one trained further (RL) beyond what the student has seen"
        )
    return Verdict(compatible and teaches, reasons)


@dataclass
class Candidate:
    """A teacher the probe compares: the spec it runs under (its model and settings: prompt template, chat
    template, cross-tokenizer scoring) and the prompts as that spec renders them for it."""

    spec: ExperimentSpec
    inputs: RunInputs

    @property
    def model(self) -> ModelSpec:
        return self.spec.teacher_model(next(iter(self.spec.teachers)))


def check_candidates(spec: ExperimentSpec, inputs: RunInputs, paths: list[str]) -> list[Candidate]:
    """The spec's teacher, then each `--teacher`: a model folder (read with the spec's teacher settings) or a
    spec file whose one teacher comes with its own settings (another family's prompt format, another
    vocabulary); such a spec must train the same student on the same data, or the comparison is not one."""
    if paths and len(spec.teachers) > 1:
        raise UserError("opd-ray probe --teacher compares candidates for one teacher; this spec names several")
    name = next(iter(spec.teachers))
    candidates = [Candidate(spec, inputs)]
    for i, path in enumerate(paths, start=1):
        if path.endswith((".yaml", ".yml")):
            other = load_spec(path)
            for field in ("models.student", "data"):
                ours, theirs = (attrgetter(field)(s) for s in (spec, other))
                if ours != theirs:
                    raise UserError(f"--teacher #{i} ({path}): its {field} differs from the probed spec's")
            if len(other.teachers) != 1:
                raise UserError(f"--teacher #{i} ({path}): name one teacher in it (it has {len(other.teachers)})")
            other_name = next(iter(other.teachers))
            teachers = {name: other.teachers[other_name]}  # under the probed spec's name: its bundle, its role
            other = other.model_copy(update={"teachers": teachers, "run": spec.run, "probe": spec.probe})
            candidates.append(Candidate(other, load_run_inputs(other)))
        else:
            teacher = spec.teacher_model(name).model_copy(update={"path": path})
            check_teacher(spec, teacher, f"--teacher #{i}", inputs.tokenizer)
            settings = spec.teachers[name].model_copy(update={"model": teacher})
            candidates.append(Candidate(spec.model_copy(update={"teachers": {name: settings}}), inputs))
    return candidates


def run_probe(spec: ExperimentSpec, other_teachers: list[str] = ()) -> dict:
    """Starts the roles, samples and scores `probe.prompts` prompts, measures, writes probe.json. With
    `other_teachers`, each of them scores the same student samples too (one replica at a time, in the
    teacher's bundle, after its own prompts), and `candidates` ranks them all by the paper's two conditions."""
    run_dir = run_directory(spec.run.output_dir)  # refused now rather than after the probe's work
    check_outputs_apart(spec)
    inputs = start(spec)
    candidates = check_candidates(spec, inputs, list(other_teachers))
    started = time.perf_counter()  # the probe's own time, not start-up's (which may build tiny models)
    roles = start_roles(spec)
    try:
        indices = PromptSampler(len(inputs.train), spec.run.seed).next(min(spec.probe.prompts, len(inputs.train)))
        refs = rollout_and_score(roles, inputs.train, indices, step=0, seed=spec.run.seed)
        student_accuracy = accuracy(spec, roles, inputs, eval_set(spec, inputs), "rollout")  # per route too
        results = [measure(spec, roles, inputs, refs, eval_set(spec, inputs), student_accuracy)]
        name = next(iter(spec.teachers))
        for candidate in candidates[1:]:
            bundle = roles.placement.actor_options[teacher_role(name, len(spec.teachers))][0]
            for old in roles.teachers:
                ray.kill(old, no_restart=True)  # frees the bundle for the next candidate
            roles.teacher_pools = {name: [start_teacher(candidate.spec, name, 0, bundle)]}
            own_prompts = candidate.inputs.train.teacher_prompts(indices)
            rescored = [roles.teachers[0].score.remote(ref, own_prompts)[0] for ref in refs]
            own_eval = eval_set(candidate.spec, candidate.inputs)
            results.append(measure(candidate.spec, roles, candidate.inputs, rescored, own_eval, student_accuracy))
    finally:
        roles.shutdown()
    for candidate, result in zip(candidates, results, strict=True):
        result.update(teacher=candidate.model.path, wall_seconds=round(time.perf_counter() - started, 1))
    result = dict(results[0])  # the spec's own teacher, as a probe of one teacher reports it
    if len(results) > 1:
        result["candidates"] = sorted(results, key=rank_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "probe.json", result)
    return result


def eval_set(spec: ExperimentSpec, inputs: RunInputs) -> PromptSet | None:
    """`probe.eval_prompts` rows spread over data.eval (the same rows for every candidate), if it has answers."""
    if inputs.eval is None or any(answer is None for answer in inputs.eval.answers):
        return None
    return inputs.eval.spread(spec.probe.eval_prompts)


def rank_key(result: dict) -> tuple:
    """Likely to help first; then the higher overlap (thinks alike), then the larger accuracy gap."""
    gap = (result["teacher_accuracy"] or 0.0) - (result["student_accuracy"] or 0.0)
    return (not result["verdict"]["likely_to_help"], -(result["signals"]["diag/overlap_ratio"] or 0.0), -gap)


def accuracy(spec: ExperimentSpec, roles, inputs, eval_prompts: PromptSet | None, kind: str) -> Accuracy | None:
    if eval_prompts is None:
        return None
    return evaluate_by_teacher(
        roles, kind, eval_prompts, inputs.verifier, spec.rollout.max_new_tokens, spec.answer_stops
    )


def measure(spec: ExperimentSpec, roles, inputs, refs: list, eval_prompts, student_accuracy) -> dict:
    """Step 1's diagnostics of the scored samples `refs`, the current teacher's accuracy, and the verdict;
    with named teachers, the same for each teacher on its own rows (`teachers`)."""
    k = spec.diagnostics.top_k
    names = tuple(spec.teachers) if spec.several_teachers else ()
    metrics = roles.learners.diagnose(refs, spec.algorithm, k, names, spec.trainer.timeouts.step_s)
    teacher_accuracy = accuracy(spec, roles, inputs, eval_prompts, "teacher")
    result = probe_result(metrics, "", k, spec.probe, teacher_accuracy, student_accuracy, None)
    if names:
        result["teachers"] = {
            name: probe_result(metrics, f"teacher/{name}/", k, spec.probe, teacher_accuracy, student_accuracy, name)
            for name in names
            if f"teacher/{name}/sequences" in metrics
        }
    return result


def probe_result(metrics: dict, prefix: str, k: int, probe: ProbeSpec, teacher, student, name: str | None) -> dict:
    """What the probe reports for the metrics under `prefix` (all rows, or one teacher's), with the accuracies
    over the same rows and the verdict."""

    def on_rows(accuracy: Accuracy | None) -> float | None:
        if accuracy is None:
            return None
        return accuracy.overall if name is None else accuracy.by_teacher.get(name)

    teacher_accuracy, student_accuracy = on_rows(teacher), on_rows(student)
    verdict = judge(metrics[f"{prefix}diag/overlap_ratio"], teacher_accuracy, student_accuracy, probe, k)
    return {
        "k": k,
        "prompts": metrics[f"{prefix}sequences"],
        "response_tokens": metrics[f"{prefix}response_tokens"],
        "signals": {signal: metrics.get(f"{prefix}{signal}") for signal, _ in SIGNALS},
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
        "verdict": asdict(verdict),
    }


def print_probe(result: dict) -> None:
    """The signals and accuracies (a column per teacher when the spec names them), then each verdict."""
    from rich.table import Table

    from opd_ray.console import console

    columns = {"value": result, **{f"teacher {name}": own for name, own in result.get("teachers", {}).items()}}
    table = Table(title=f"opd-ray probe: {result['prompts']} prompts, {result['response_tokens']} student tokens")
    table.add_column("signal")
    for column in columns:
        table.add_column(column, justify="right")
    for name, meaning in SIGNALS:
        values = [number(own["signals"][name]) for own in columns.values()]
        table.add_row(meaning.replace("@k", f"@{result['k']}"), *values)
    for kind in ("teacher_accuracy", "student_accuracy"):
        table.add_row(kind.replace("_", " "), *[number(own[kind]) for own in columns.values()])
    console.print(table)
    for column, own in columns.items():
        verdict = own["verdict"]
        headline = "OPD is likely to help" if verdict["likely_to_help"] else "OPD is unlikely to help as set up"
        where = "" if own is result else f"{column}: "
        console.print(f"[bold]{where}{headline}[/]" + (f" ({result['wall_seconds']} s)" if own is result else ""))
        for reason in verdict["reasons"]:
            console.print(f"  - {reason}")
    if "candidates" in result:
        print_ranking(result["candidates"], result["k"])


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_ranking(candidates: list[dict], k: int) -> None:
    """One row a candidate teacher, best first: the paper's two conditions side by side."""
    from rich.table import Table

    from opd_ray.console import console

    table = Table(title=f"opd-ray probe: {len(candidates)} candidate teachers on the same student samples")
    for column in ("rank", "teacher", f"overlap@{k}", "top-1", "shared mass s/t", "entropy gap", "teacher acc."):
        table.add_column(column, overflow="fold")
    table.add_column("verdict")
    for rank, c in enumerate(candidates, start=1):
        signals = c["signals"]
        table.add_row(
            str(rank),
            "/".join(Path(c["teacher"]).parts[-2:]),  # probe.json has the whole path
            number(signals["diag/overlap_ratio"]),
            number(signals["diag/top1_agreement"]),
            f"{number(signals['diag/overlap_mass_student'])} / {number(signals['diag/overlap_mass_teacher'])}",
            number(signals["diag/entropy_gap"]),
            number(c["teacher_accuracy"]),
            "likely to help" if c["verdict"]["likely_to_help"] else "unlikely to help",
        )
    console.print(table)
