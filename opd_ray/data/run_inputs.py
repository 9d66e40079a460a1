"""A run's inputs, loaded once on the driver: the student's tokenizer, the prompts, the verifier.

Pre-flight (data/preflight.py) checks the models before anything is read, and the loaded
prompts against the engines and the vocabulary after; every driver command starts here.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_ray.data.preflight import (
    check_loaded,
    check_models,
    check_own_chat_templates,
    cross_tokenizers,
    template_tokenizer,
    warn_idle_teachers,
)
from opd_ray.data.prompts import PromptSet, load_prompts, load_selected_prompts
from opd_ray.data.routing import routing_for
from opd_ray.data.verifiers import GuardedVerifier, resolve_verifier
from opd_ray.spec import ExperimentSpec


@dataclass
class RunInputs:
    """A run's inputs, checked: what the driver tokenizes with, trains and evaluates on, and verifies with."""

    tokenizer: object
    train: PromptSet
    eval: PromptSet | None
    verifier: GuardedVerifier
    selection: dict | None = None  # what data.selection kept, dropped and mixed in


def load_run_inputs(spec: ExperimentSpec) -> RunInputs:
    """Checks the models, loads and checks the prompts (train, eval, data.selection), resolves the verifier."""
    student_tokenizer, teacher_tokenizers = check_models(spec)
    verifier = resolve_verifier(spec.data.verifier, spec.data.verifier_errors)
    templates = template_tokenizer(spec, student_tokenizer, teacher_tokenizers)
    own_tokenizers = cross_tokenizers(teacher_tokenizers, student_tokenizer)
    check_own_chat_templates(spec, own_tokenizers)
    routing = routing_for(spec, own_tokenizers)
    selection = None
    if spec.data.selection is not None:
        train, selection = load_selected_prompts(spec.data, templates, spec.run.seed, routing)
    else:
        train = load_prompts(spec.data.train_files, spec.data, templates, "data.train", routing)
    evaluation = None
    if spec.data.eval_files:
        evaluation = load_prompts(spec.data.eval_files, spec.data, templates, "data.eval", routing)
    warn_idle_teachers(routing, train)
    check_loaded(spec, train, evaluation, verifier, len(student_tokenizer))
    return RunInputs(student_tokenizer, train, evaluation, verifier, selection)
