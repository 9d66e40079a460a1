"""A vLLM engine configured the same way for every role that holds one (rollout, teacher).

vLLM is imported lazily: the environment it reads at import time (in-process engine, KV
cache size on CPU) is set by `ENGINE_ENV` on the Ray actor that owns the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from opd_ray.actors.hf_model import dtype_name
from opd_ray.spec import EngineSpec, ModelSpec

if TYPE_CHECKING:
    from vllm import LLM

# In-process engine: ~10 s start instead of ~25 s with worker processes, and no fork.
# TORCHDYNAMO_DISABLE skips a ~7 s torch.compile of the logprob kernel that buys nothing on
# the tiny CPU models; set TORCHDYNAMO_DISABLE=0 where `opd-ray` starts to keep compilation.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": os.environ.get("TORCHDYNAMO_DISABLE", "1"),
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    # torch's C++ warnings (vLLM-CPU's "NUMA binding: Using MEMBIND policy" on every engine start)
    "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
}


@dataclass
class Completion:
    """One sampled response: what a rollout or an evaluation needs from vLLM's output."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # of the sampled token, under the sampling distribution (after temperature)
    topk_ids: list[list[int]] | None  # the model's top-k ids at each sampled position, by rank
    finished: bool  # ended with end-of-sequence rather than the length limit
    text: str


def create_engine(
    model: ModelSpec, engine: EngineSpec, seed: int, worker_extension: str | None = None, sampling: bool = False
) -> LLM:
    """`sampling` (a rollout engine): sampled tokens' log-probs as vLLM samples them, after the temperature
    (vLLM's default reports the raw distribution's, which at rollout.temperature != 1 is not the one the
    tokens were drawn from)."""
    from vllm import LLM

    kwargs: dict = {"logprobs_mode": "processed_logprobs"} if sampling else {}
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int(engine.kv_cache_gib * 2**30)
        if sampling:
            kwargs.update(cpu_unchunked_prefill(engine.max_model_len))
    if worker_extension:
        kwargs["worker_extension_cls"] = worker_extension
    return LLM(
        model=model.path,
        dtype=dtype_name(model),
        trust_remote_code=model.trust_remote_code,
        max_model_len=engine.max_model_len,
        max_logprobs=engine.max_logprobs,
        enforce_eager=engine.enforce_eager,
        seed=seed,
        **kwargs,
    )


CPU_BATCHED_TOKENS = 4096  # vLLM's own CPU default for the LLM class


def cpu_unchunked_prefill(max_model_len: int) -> dict:
    """vLLM-CPU (0.32) cannot sample seeded requests whose prompt is prefilled in chunks: discarding the token
    sampled after a partial prefill rewinds the request's generator by an offset, which only CUDA generators
    have (`RuntimeError: CPU Generator does not use offset`). It happens once a call's prompts exceed the
    batched-token budget (120 few-shot prompts x 2 samples did), so a CPU sampling engine prefills whole
    prompts; the budget must then hold the longest sequence."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(CPU_BATCHED_TOKENS, max_model_len)}


def generate(
    llm: LLM,
    prompts_P: list[list[int]],
    prompt_index_P: list[int],
    *,
    samples_per_prompt: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | None,
    top_k_ids: int = 0,
) -> list[Completion]:
    """Samples (temperature > 0) or decodes greedily (temperature 0); one Completion per sample.

    `top_k_ids` > 0 also records the model's top-k ids at every sampled position (a temperature does not
    change their order): the student's top-k support.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        n=samples_per_prompt,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_new_tokens,
        logprobs=top_k_ids if temperature > 0 else None,
        seed=seed,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts_P], params, use_tqdm=False)
    completions = []
    for index, output in zip(prompt_index_P, outputs, strict=True):
        for sample in output.outputs:
            ids = list(sample.token_ids)
            steps = sample.logprobs or []
            logprobs = [step[t].logprob for step, t in zip(steps, ids, strict=True)] if steps else []
            topk_ids = [ranked_ids(step, top_k_ids) for step in steps] if top_k_ids else None
            completions.append(
                Completion(index, ids, logprobs, topk_ids, finished=sample.finish_reason == "stop", text=sample.text)
            )
    return completions


def ranked_ids(position: dict, k: int) -> list[int]:
    """Ids of ranks 1..k in one position's logprob dict (vLLM adds the sampled token when it ranks lower)."""
    return [token for token, _ in sorted(position.items(), key=lambda item: item[1].rank)[:k]]


def greedy(llm: LLM, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
    """Deterministic decoding for evaluation; `prompts_P` maps dataset row -> prompt ids."""
    indices = list(prompts_P)
    return generate(
        llm,
        [prompts_P[i] for i in indices],
        indices,
        samples_per_prompt=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        seed=None,
    )


def prompt_logprobs(llm: LLM, sequences_B: list[list[int]], top_k: int) -> list:
    """vLLM's per-position scoring of given sequences, one `FlatLogprobs` per sequence.

    Position i (i >= 1; position 0 is empty) holds k + 1 entries: the actual token i, then
    the top-k by rank. Indexing a position gives the usual {token: Logprob} dict; the flat
    lists let the teacher build its tensors without a Python loop over positions. Nothing
    is detokenized: scoring needs ids, and decoding every candidate cost more than the model.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=1.0, detokenize=False, flat_logprobs=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences_B], params, use_tqdm=False)
    return [output.prompt_logprobs for output in outputs]
