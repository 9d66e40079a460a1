"""A non-finite gradient behind a finite loss skips the update under every ZeRO stage (real DeepSpeed, one rank)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

GRADIENT_FAULT = """
import os, sys, torch, deepspeed
from deepspeed.runtime.zero import GatheredParameters
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from opd_ray.actors.learner import apply_update
from opd_ray.actors.learner_config import deepspeed_config, skip_inference_comm_op
from opd_ray.spec import LearnerSpec, ModelSpec

stage, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
skip_inference_comm_op()  # as the learner ranks do: a CPU would otherwise compile an op training never uses
deepspeed.init_distributed(dist_backend="gloo")
config = deepspeed_config(LearnerSpec(num_ranks=1, zero_stage=stage, lr=1e-2), ModelSpec(path=path), 1)
keep_alive = HfDeepSpeedConfig(config) if stage == 3 else None
module = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

def weights():
    params = list(engine.module.parameters())
    with GatheredParameters(params):
        return [p.detach().clone() for p in params]

def loss(poison_gradient):
    logits = engine(input_ids=ids).logits.float()
    value = logits.pow(2).mean()
    if poison_gradient:  # finite forward (sqrt(0) = 0), NaN backward (0 * inf): a finite loss with a NaN gradient
        value = value + torch.sqrt(logits - logits.detach()).sum()
    return value

before = weights()
poisoned = loss(True)
assert torch.isfinite(poisoned)
assert not apply_update(engine, poisoned, lambda flag: flag), "the NaN-gradient step was not reported as skipped"
assert all(torch.equal(a, b) for a, b in zip(before, weights())), "a NaN-gradient step changed the weights"
assert apply_update(engine, loss(False), lambda flag: flag)
after = weights()
assert all(torch.isfinite(w).all() for w in after)
assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the healthy step did not train"
print("ok")
"""


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_gradient_with_finite_loss_skips_the_update(tiny_dir: Path, stage: int) -> None:
    """Real DeepSpeed (one gloo rank, in its own process) for ZeRO 0, 2 and 3."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", GRADIENT_FAULT, str(stage), str(port), str(tiny_dir / "student")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
