"""LearnerGroup: the driver's handle on the N learner ranks. Each method starts the same method on every rank
and waits for all of them within its named timeout; the driver calls these, never a rank by a method name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
import torch

from opd_ray.actors.learner import LEARNER_ENV, LearnerWorker
from opd_ray.actors.learner_config import learner_threads
from opd_ray.actors.runtime import get_or_raise_first
from opd_ray.losses.step import combine_rank_metrics
from opd_ray.spec import AlgorithmSpec, LearnerSpec, ModelSpec


class LearnerGroup:
    """N learner ranks behind one handle: a call fans out to every rank."""

    def __init__(
        self,
        model: ModelSpec,
        learner: LearnerSpec,
        micro_batch: int,
        total_steps: int,
        runtime_env: dict,
        teacher: ModelSpec | None = None,
        rank_options: list[dict] | None = None,
        start_timeout_s: float | None = None,
        temperature: float = 1.0,
    ) -> None:
        """`rank_options`: extra actor options per rank (their placement-group bundle); ranks that are not up
        within `start_timeout_s` (trainer.timeouts.start_s) are named; `temperature`: rollout.temperature."""
        options = {
            **learner.resources.actor_options(),
            "runtime_env": {"env_vars": {**runtime_env.get("env_vars", {}), **LEARNER_ENV}},
        }
        threads = str(learner_threads(learner.num_ranks))
        options["runtime_env"]["env_vars"].update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        rank_options = rank_options or [{} for _ in range(learner.num_ranks)]
        self.workers = [LearnerWorker.options(**options, **extra).remote() for extra in rank_options]
        starting = "learner ranks starting (trainer.timeouts.start_s)"
        (master,) = get_or_raise_first([self.workers[0].address.remote()], start_timeout_s, starting)
        setups = [
            w.setup.remote(
                rank, learner.num_ranks, master, model, learner, micro_batch, total_steps, teacher, temperature
            )
            for rank, w in enumerate(self.workers)
        ]
        get_or_raise_first(setups, start_timeout_s, starting)

    def _on_each(self, call: Callable[[Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """`call(rank)` started on every rank (a rank's method, e.g. `lambda rank: rank.loss.remote(...)`)."""
        return [call(worker) for worker in self.workers]

    def _all(self, call: Callable[[Any], ray.ObjectRef], timeout_s: float | None, waiting_for: str) -> list[Any]:
        """Every rank's result of `call`, within `timeout_s` (the named timeout is in `waiting_for`)."""
        return get_or_raise_first(self._on_each(call), timeout_s, waiting_for)

    def train_step(
        self,
        batch_refs: list[ray.ObjectRef],
        algorithm: AlgorithmSpec,
        diagnostics_k: int | None = None,
        step: int = 1,
        wait: Callable[[list[ray.ObjectRef]], list[Any]] = get_or_raise_first,
        teacher_names: tuple[str, ...] = (),
    ) -> dict[str, float]:
        """`wait` collects the ranks' results; the driver passes one that keeps the rollout pipeline
        moving while the learners train. `teacher_names` adds per-teacher metrics."""
        args = (batch_refs, algorithm, diagnostics_k, step, teacher_names)
        return combine_rank_metrics(wait(self._on_each(lambda rank: rank.train_step.remote(*args))))

    def train_step_showing_gradient(
        self, batch_refs: list[ray.ObjectRef], algorithm: AlgorithmSpec, timeout_s: float | None = None
    ) -> list[tuple[dict[str, Any], dict[str, torch.Tensor] | None]]:
        """A step as train_step, each rank also returning the gradient it applied (rank 0 the whole one): what
        tests/integration/test_reference_learner.py checks against an independent reference."""
        waiting = "learner ranks (a step showing its gradient)"
        return self._all(
            lambda rank: rank.train_step_showing_gradient.remote(batch_refs, algorithm), timeout_s, waiting
        )

    def supervised_steps(self, examples_ref: ray.ObjectRef, steps: int, batch_size: int, seed: int, timeout_s: float):
        """`steps` supervised steps on the examples (every rank draws the same rows); each rank's losses."""
        waiting = "learner ranks in SFT (trainer.timeouts.step_s)"
        return self._all(
            lambda rank: rank.supervised_steps.remote(examples_ref, steps, batch_size, seed), timeout_s, waiting
        )

    def loss(self, batch_refs: list[ray.ObjectRef], algorithm: AlgorithmSpec, timeout_s: float = 600) -> float:
        """The step's loss under `algorithm` (the ranks' shares added), without an update."""
        return sum(self._all(lambda rank: rank.loss.remote(batch_refs, algorithm), timeout_s, "learner ranks (loss)"))

    def diagnose(
        self,
        batch_refs: list[ray.ObjectRef],
        algorithm: AlgorithmSpec,
        k: int,
        names: tuple[str, ...],
        timeout_s: float,
    ) -> dict[str, float]:
        """A step's metrics and diagnostics without an update (`opd-ray probe`), the ranks' shares combined."""
        waiting = "learner ranks computing the diagnostics (trainer.timeouts.step_s)"
        per_rank = self._all(lambda rank: rank.diagnose.remote(batch_refs, algorithm, k, names), timeout_s, waiting)
        return combine_rank_metrics(per_rank)

    def export_weights(self, timeout_s: float | None = None) -> ray.ObjectRef:
        """ObjectRef of rank 0's packed weights; the bytes stay in the object store."""
        refs = self._on_each(lambda rank: rank.export_weights.remote())
        get_or_raise_first(refs[1:], timeout_s, "learner ranks gathering weights (trainer.timeouts.sync_s)")
        return refs[0]

    def full_state_dict(self, timeout_s: float | None = None) -> dict[str, torch.Tensor]:
        """The student's weights, gathered (rank 0's copy)."""
        return self._all(lambda rank: rank.full_state_dict.remote(), timeout_s, "learner ranks gathering weights")[0]

    def parameters_finite(self, timeout_s: float) -> bool:
        waiting = "learner ranks checking their weights (trainer.timeouts.checkpoint_s)"
        return all(self._all(lambda rank: rank.parameters_finite.remote(), timeout_s, waiting))

    def parameter_counts(self, timeout_s: float) -> list[dict[str, int]]:
        """Each rank's parameters, trainable parameters and optimizer state (LearnerWorker.parameter_counts)."""
        return self._all(lambda rank: rank.parameter_counts.remote(), timeout_s, "learner parameter counts")

    def save_checkpoint(self, directory: str, tokenizer_path: str, timeout_s: float) -> None:
        waiting = "learner ranks writing a checkpoint (trainer.timeouts.checkpoint_s)"
        self._all(lambda rank: rank.save_checkpoint.remote(directory, tokenizer_path), timeout_s, waiting)

    def load_checkpoint(self, directory: str, timeout_s: float) -> None:
        waiting = "learner ranks loading the checkpoint (trainer.timeouts.checkpoint_s)"
        self._all(lambda rank: rank.load_checkpoint.remote(directory), timeout_s, waiting)

    def save_pretrained(self, directory: str, tokenizer_path: str, timeout_s: float) -> None:
        """The student as a Hugging Face folder (written by rank 0, gathered by all)."""
        waiting = "learner ranks saving the student (trainer.timeouts.checkpoint_s)"
        self._all(lambda rank: rank.save_pretrained.remote(directory, tokenizer_path), timeout_s, waiting)

    def write_storage_mark(self, directory: str, token: str, timeout_s: float) -> list[str]:
        """The mark file each rank wrote into `directory` as its node sees it (check_shared_storage)."""
        waiting = "learner ranks (trainer.timeouts.start_s)"
        return self._all(lambda rank: rank.write_storage_mark.remote(directory, token), timeout_s, waiting)

    def sequence_logprobs(self, sequence: list[int], timeout_s: float | None = None) -> list[list[float]]:
        """Each rank's student log-probs of a fixed sequence (checks that weights are where they should be)."""
        return self._all(lambda rank: rank.sequence_logprobs.remote(sequence), timeout_s, "learner ranks (log-probs)")

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
