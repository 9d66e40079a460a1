"""A loss bug the field shipped, as a test that needs a real engine: the tokens' log-probs at a sampling
temperature (slime #2085, verl #6867). The ones that need no engine are in tests/unit/losses/test_known_loss_bugs.py.

The rollout worker runs in this process (its class is the one the roles start; no Ray needed)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.reference.batch import SHIPPED, load_model

pytestmark = pytest.mark.integration


def test_at_a_sampling_temperature_the_learner_recomputes_the_log_probs_the_tokens_were_drawn_with() -> None:
    """vLLM samples from softmax(logits / T) but by default reports the raw softmax(logits)'s log-probs: the
    reward log q - log p_old and the importance ratio would then be of a distribution nothing sampled from."""
    from opd_ray.actors.vllm_engine import ENGINE_ENV

    os.environ.update(ENGINE_ENV)  # before vLLM is imported, as the roles set it on their actors
    from transformers import AutoTokenizer

    from opd_ray.actors.rollout import RolloutWorker
    from opd_ray.losses.hidden import response_hidden_states
    from opd_ray.losses.objectives import token_logprobs
    from opd_ray.losses.step import sampling_head
    from opd_ray.spec import EngineSpec, ModelSpec, RolloutSpec

    temperature = 0.6
    rollout = RolloutSpec(temperature=temperature, max_new_tokens=6)
    worker = RolloutWorker(ModelSpec(path=str(SHIPPED / "student")), EngineSpec(max_model_len=32, kv_cache_gib=0.1),
                           rollout, seed=3)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "student")
    texts = ["123+456=", "98+17=", "505+505="]
    prompts = {i: tokenizer(text, add_special_tokens=False)["input_ids"] for i, text in enumerate(texts)}
    batch, _ = worker.sample(prompts, seed=5)
    student = load_model("student")
    hidden = response_hidden_states(student, batch, "cpu")
    targets = batch.input_ids_BL[:, 1:][batch.response_mask_BL[:, 1:].bool()]
    sampled = batch.rollout_logprobs_BL[:, 1:][batch.response_mask_BL[:, 1:].bool()]
    head = student.get_output_embeddings()
    with torch.no_grad():
        learner = token_logprobs(sampling_head(head, temperature)(hidden), targets)
        raw = token_logprobs(head(hidden), targets)
    print(f"max |learner - rollout| {float((learner - sampled).abs().max()):.2e} over {len(targets)} tokens")
    assert torch.allclose(learner, sampled, atol=1e-4)
    assert not torch.allclose(raw, sampled, atol=1e-2)  # the raw distribution's are not these
