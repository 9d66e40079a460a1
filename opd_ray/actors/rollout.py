"""Rollout worker: a vLLM engine holding the student's current weights.

Samples responses with their sampling-time log-probs and tags the batch with the weight
version that produced it, so the learner knows how stale a sample is.
"""

from __future__ import annotations

import math
import time

import ray
import torch

from opd_ray.actors.collective_sync import BucketPlan
from opd_ray.actors.runtime import EngineActor, count_start
from opd_ray.actors.vllm_engine import Completion, create_engine, generate, greedy, prompt_logprobs
from opd_ray.actors.weight_sync import WORKER_EXTENSION
from opd_ray.data.verifiers import resolve_verifier
from opd_ray.losses.batch import ResponseRow, RolloutBatch, batch_from_rows
from opd_ray.spec import EngineSpec, ModelSpec, RolloutSpec
from opd_ray.spec.plugins import import_inherited_plugins


def completions_to_batch(
    prompts_P: dict[int, list[int]], completions: list[Completion], weight_version: int, top_k_ids: int = 0
) -> RolloutBatch:
    """The engine's completions as a batch, tagged with the weights that sampled them."""
    rows = [
        ResponseRow(prompts_P[c.prompt_index], c.token_ids, c.prompt_index, c.finished, c.logprobs, c.topk_ids)
        for c in completions
    ]
    return batch_from_rows(rows, weight_version, top_k_ids=top_k_ids)


class RolloutWorker(EngineActor):
    """A rollout worker (run as a Ray actor: `ray.remote(RolloutWorker)`, like every engine-holding actor)."""

    def __init__(
        self,
        model: ModelSpec,
        engine: EngineSpec,
        rollout: RolloutSpec,
        seed: int,
        student_top_k: int = 0,
        verifier: str | None = None,
        verifier_errors: str = "count_wrong",
    ) -> None:
        count_start("rollout engine")
        import_inherited_plugins()
        self.llm = create_engine(model, engine, seed, worker_extension=WORKER_EXTENSION, sampling=True)
        self.rollout = rollout
        self.seed = seed
        self.student_top_k = student_top_k
        self.verifier = resolve_verifier(verifier, verifier_errors) if verifier else None

    def reward(self, completion: Completion, answer: str | None) -> float:
        """1.0 correct, 0.0 wrong or cut off, NaN for a row without a reference answer (not counted)."""
        if answer is None:
            return math.nan
        return float(completion.finished and self.verifier(completion.text, answer, completion.prompt_index))

    @ray.method(num_returns=2)
    def sample(
        self, prompts_P: dict[int, list[int]], seed: int, answers_P: dict[int, str | None] | None = None
    ) -> tuple[RolloutBatch, dict]:
        """`prompts_P` maps dataset row -> prompt token ids; the returned batch stays in the object store.

        `seed` comes from the driver (run, step, shard), so a shard samples the same whichever
        worker takes it. With `answers_P` each response is scored by the verifier (1.0 correct,
        0.0 otherwise; a truncated response is wrong), for task-reward mixing and the
        sample-accuracy metric. The second return is a small report the driver waits on: it
        learns that the batch exists (or that this worker died), the weight version used and
        the compute time, without fetching the batch.
        """
        started = time.perf_counter()
        completions = self.complete(prompts_P, seed)
        batch = completions_to_batch(prompts_P, completions, self._weight_version, self.student_top_k)
        if answers_P is not None and self.verifier is not None:
            batch.task_rewards_B = torch.tensor([self.reward(c, answers_P[c.prompt_index]) for c in completions])
        return batch, {"weight_version": self._weight_version, "seconds": time.perf_counter() - started}

    def complete(self, prompts_P: dict[int, list[int]], seed: int) -> list[Completion]:
        """Samples with the worker's rollout settings; the completions themselves (text included), which
        the teacher-generation stage writes out as a dataset."""
        indices = list(prompts_P)
        return generate(
            self.llm,
            [prompts_P[i] for i in indices],
            indices,
            samples_per_prompt=self.rollout.samples_per_prompt,
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            max_new_tokens=self.rollout.max_new_tokens,
            seed=seed,
            top_k_ids=self.student_top_k,
        )

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
        return greedy(self.llm, prompts_P, max_new_tokens)

    def load_weights(self, payload: dict, weight_version: int) -> None:
        """In place, without restarting the engine; cached prefixes of the old weights are dropped."""
        self._reload("load_packed_weights", payload, weight_version)

    def _reload(self, extension_method: str, argument: object, weight_version: int) -> None:
        """Runs a weight-receiving method of the engine's worker extension (weight_sync.py)."""
        self.llm.collective_rpc(extension_method, args=(argument,))
        self.llm.reset_prefix_cache()
        self._weight_version = weight_version

    def join_weight_group(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """The engine's worker joins learner rank 0's broadcast group (weight_sync.method = collective)."""
        self.llm.collective_rpc("join_weight_group", args=(address, rank, world_size, backend, timeout_s))

    def receive_weights(self, plan: BucketPlan, weight_version: int) -> None:
        """Takes part in one broadcast; the engine loads each bucket as it arrives."""
        self._reload("receive_weight_buckets", plan, weight_version)

    def sequence_logprobs(self, sequence: list[int]) -> list[float]:
        """log p(token_i | tokens_<i) for i >= 1 under the engine's current weights."""
        entries = prompt_logprobs(self.llm, [sequence], top_k=1)[0]
        return [entries[i][sequence[i]].logprob for i in range(1, len(sequence))]
