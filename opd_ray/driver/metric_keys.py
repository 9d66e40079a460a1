"""Every key a step logs, grouped by prefix, with what it means: the source of the documentation's metric
reference (docs/hooks/reference.py) and of the test that fails when a run logs a key this table lacks.

`{teacher}` is a teacher's name, `{role}` rollout | teacher | learner, `{signal}` a diagnostic
(diag/...), `{position}` start | middle | end (the response's first, middle and last third).
"""

from __future__ import annotations

import re

DIAGNOSTIC_SIGNALS = {
    "overlap_ratio": "share of the student's top-k tokens that are also in the teacher's top-k (diagnostics.top_k)",
    "overlap_mass_student": "student probability mass on the shared top-k tokens",
    "overlap_mass_teacher": "teacher probability mass on the shared top-k tokens",
    "overlap_advantage": "mean log q - log p over the shared top-k tokens (rises towards 0 as the student aligns)",
    "student_entropy": "the student's entropy on its top-k",
    "teacher_entropy": "the teacher's entropy on its returned top-k",
    "entropy_gap": "|teacher entropy - student entropy|",
    "teacher_minus_student_logprob": "log q(y_t) - log p(y_t) at the sampled token: the per-token reward",
    "top1_agreement": "share of positions where the student's and the teacher's most likely token agree",
}

METRIC_GROUPS: dict[str, dict[str, str]] = {
    "step (no prefix)": {
        "step": "the step number (1-based)",
        "loss": "the objective the learners minimised (null when the update was skipped)",
        "lr": "the learning rate of the step",
        "grad_norm": "the global gradient norm before clipping",
        "skipped_update": "1 when the loss was not finite and no update was applied",
        "gradient_fault": "1 when the gradient was not finite (the update was skipped)",
        "sampled_reverse_kl": "mean log p(y_t) - log q(y_t) over the sampled tokens (the field's default signal)",
        "teacher_logprob": "mean teacher log-prob of the sampled tokens",
        "teacher_logprob_sq": "mean squared teacher log-prob (its spread: a teacher that is constant has none)",
        "student_logprob": "mean student log-prob of the sampled tokens (at the learner)",
        "reverse_kl_weight": "algorithm.forward_to_reverse: the weight of the reverse KL this step",
        "sample_reward": "the verifier's mean score of the step's samples",
        "response_tokens": "response tokens trained this step",
        "sequences": "sequences trained this step",
        "truncated_responses": "responses cut off at rollout.max_new_tokens",
        "cut_off_share": "share of responses cut off at the length limit (a collapse runs long)",
        "repetitive_share": "share of responses that repeat a 4-gram more than 3 times",
        "staleness": "updates between the weights that sampled the batch and the learners' (asynchronous mode)",
        "weight_version": "updates the learners have applied after this step",
        "rollout_weight_version": "the oldest weight version that sampled this step's batch",
        "prompts_digest": "a digest of the step's prompt indices (text: resume and reproducibility checks)",
        "dataset_batch": "1 on a step trained on the dataset's answers (GKD's mixing), not student samples",
    },
    "time/": {
        "time/step": "seconds of the whole step",
        "time/rollout": "seconds the student's samples took (slowest worker)",
        "time/teacher": "seconds the teacher scoring took (slowest replica)",
        "time/wait_for_data": "seconds the driver waited for the step's scored batches",
        "time/learn": "seconds of the learners' update, seen from the driver",
        "time/learner_fetch": "seconds the slowest learner rank spent fetching its batch from the object store",
        "time/learner_compute": "seconds the slowest learner rank computed",
        "time/weight_sync": "seconds new weights took to reach the rollout engines",
        "time/eval": "seconds of a step's greedy evaluation (trainer.eval_every)",
    },
    "busy/, idle_s/ (where the time goes)": {
        "busy/{role}": "share of the step the role's actors were busy",
        "idle_s/{role}": "seconds of the step the role's actors were idle",
    },
    "restarts/": {"restarts/{role}": "restarts of the role's actors so far in the run"},
    "padding_share/": {
        "padding_share/padded": "share of the learner's positions that are padding with rows padded to the longest",
        "padding_share/packed": "the same with rows packed end to end (learner.pack_sequences)",
    },
    "diag/ (the paper's token-level diagnostics)": {
        **{f"diag/{name}": meaning for name, meaning in DIAGNOSTIC_SIGNALS.items()},
        "diag/{signal}/{position}": "a diagnostic over the first, middle or last third of each response",
    },
    "gate/, cross_tokenizer/": {
        "gate/kept_fraction": "algorithm.entropy_gate: share of positions the gate kept",
        "cross_tokenizer/aligned_share": "share of positions a cross-tokenizer teacher matched one-to-one",
    },
    "health/ (the OPD doctor's signals)": {
        "health/advantage_rise": "overlap advantage now minus at the start (health.window steps each)",
        "health/cut_off_share": "the cut-off share now (collapse)",
        "health/entropy_gap_change": "entropy gap now minus at the start",
        "health/entropy_vs_start": "student entropy now over at the start (entropy_explosion)",
        "health/grad_norm_vs_median": "this step's gradient norm over the run's median (grad_spike)",
        "health/kl_vs_start": "sampled reverse KL now over at the start (objective_not_falling)",
        "health/overlap_rise": "overlap ratio now minus at the start (no_alignment)",
        "health/overlap_start": "overlap ratio at the start",
        "health/repetitive_share": "the repetitive share now",
        "health/repetitive_share_start": "the repetitive share at the start",
        "health/reward_drop": "sample reward at the start minus now (reward_divergence)",
        "health/reward_drop_error": "the standard error of that drop",
        "health/teacher_logprob_std": "the spread of the teacher's log-probs (teacher_broken)",
        "health/teacher_std_vs_uniform": "that spread against a uniform teacher's",
        "health/teacher_vs_uniform": "the teacher's mean log-prob against a uniform teacher's",
    },
    "eval/": {
        "eval/student_accuracy": "greedy accuracy of the student on the eval prompts (every trainer.eval_every)",
        "eval/gap_recovery": "(accuracy now - before) / (teacher - before)",
    },
    "teacher/{teacher}/ (several teachers)": {
        "teacher/{teacher}/{key}": "a step key over the rows routed to one teacher (loss, sequences, diag/..., "
        "eval/student_accuracy, eval/gap_recovery, ...)",
    },
}

PLACEHOLDER = re.compile(r"\{(\w+)\}")
PLACEHOLDER_PATTERNS = {"key": r".+", "signal": "|".join(DIAGNOSTIC_SIGNALS), "position": "start|middle|end"}


def key_patterns() -> list[re.Pattern]:
    """Each documented key as a regular expression ({teacher} and {role} any one path segment)."""
    patterns = []
    for keys in METRIC_GROUPS.values():
        for key in keys:
            parts = PLACEHOLDER.split(key)  # text, name, text, name, ...
            regex = "".join(
                re.escape(part) if i % 2 == 0 else f"(?:{PLACEHOLDER_PATTERNS.get(part, '[^/]+')})"
                for i, part in enumerate(parts)
            )
            patterns.append(re.compile(regex + "$"))
    return patterns


def undocumented(keys: set[str] | list[str]) -> list[str]:
    """The keys of logged steps that no entry of METRIC_GROUPS describes."""
    patterns = key_patterns()
    return sorted(key for key in set(keys) if not any(pattern.match(key) for pattern in patterns))
