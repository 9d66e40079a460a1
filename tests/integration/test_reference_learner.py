"""The reference check through the real learner: DeepSpeed ranks (gloo) train the shipped student on the
committed batch (tests/reference/), and at every step the gradient they apply and the weights after the
optimizer step equal the independent reference's, which trains its own copy with torch's AdamW. One rank,
and two ranks under ZeRO-2 with the response tokens in chunks of 5 (each rank's rows and each chunk a
separate piece of the sum)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from opd_ray.spec import AlgorithmSpec, LearnerSpec, ModelSpec
from tests.reference import objectives as reference
from tests.reference.batch import SHIPPED, gradients, load_model, load_tensors, reference_batch
from tests.unit.losses.test_reference import batch_source, rollout_batch

pytestmark = pytest.mark.integration

LR, CLIP = 1e-3, 1.0
# one step of each family, in this order, on the same batch (the supervised control on its answers as a dataset's)
STEPS = [
    ({"objective": "sampled_token", "baseline": "vopd"},
     partial(reference.sampled_token_loss, clip_eps=0.2, vopd=True, k=None)),
    ({"objective": "topk", "topk_support": "union", "top_k": 4, "topk_tail": True},
     partial(reference.topk_loss, support="union", k=4, tail=True)),
    ({"objective": "full_vocab", "divergence": "jsd", "jsd_beta": 0.5},
     partial(reference.full_vocab_loss, name="jsd", beta=0.5)),
    ({"objective": "sft"}, reference.sft_loss),
]  # fmt: skip


class ReferenceTraining:
    """The reference's side: its own copy of the student and torch's AdamW, each step started from the
    learner's weights of the step before (so a difference cannot build up over the steps and hide in them)."""

    def __init__(self, tensors: dict) -> None:
        self.student, self.teacher = load_model("student"), load_model("teacher").eval()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=LR, weight_decay=0.0)
        self.batch = reference_batch(tensors)
        # torch's AdamW again, stepped with the learner's own gradients: what the learner's update must equal
        # wherever a gradient sits at float32 noise (Adam's eps amplifies that noise into a few % of lr)
        self.replay = load_model("student")
        self.replay_optimizer = torch.optim.AdamW(self.replay.parameters(), lr=LR, weight_decay=0.0)

    def update_from(self, grads: dict, weights: dict) -> dict:
        """The update torch's clipping and AdamW make from `grads` at `weights`, with the replay's own state."""
        with torch.no_grad():
            for name, parameter in self.replay.named_parameters():
                parameter.copy_(weights[name])
                parameter.grad = grads[name].clone()
        torch.nn.utils.clip_grad_norm_(self.replay.parameters(), CLIP)
        self.replay_optimizer.step()
        return {name: p.detach() - weights[name] for name, p in self.replay.named_parameters()}

    def step(self, settings: dict, loss, weights: dict) -> tuple[dict, dict]:
        """(the gradient at `weights`, the update the optimizer then makes)."""
        with torch.no_grad():
            for name, parameter in self.student.named_parameters():
                parameter.copy_(weights[name])
        self.optimizer.zero_grad()
        on_full_vocab = settings["objective"] == "full_vocab"
        value = loss(self.student, self.teacher, self.batch) if on_full_vocab else loss(self.student, self.batch)
        value.backward()
        grads = gradients(self.student)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), CLIP)
        self.optimizer.step()
        return grads, {name: p.detach() - weights[name] for name, p in self.student.named_parameters()}


@pytest.mark.parametrize(("ranks", "zero_stage", "chunk_tokens"), [(1, 0, 4096), (2, 2, 5)])
def test_the_learner_applies_the_references_gradient_at_every_step(ranks, zero_stage, chunk_tokens, local_ray):
    from opd_ray.actors.learner_group import LearnerGroup
    from opd_ray.actors.runtime import actor_env

    tensors = load_tensors()
    learner = LearnerSpec(num_ranks=ranks, zero_stage=zero_stage, lr=LR, grad_clip=CLIP, chunk_tokens=chunk_tokens)
    group = LearnerGroup(ModelSpec(path=str(SHIPPED / "student")), learner, 12 // ranks, len(STEPS), actor_env(),
                         teacher=ModelSpec(path=str(SHIPPED / "teacher")))  # fmt: skip
    try:
        refs = {source: [local_ray.put(rollout_batch(tensors, source))] for source in ("student", "dataset")}
        training = ReferenceTraining(tensors)
        before = group.full_state_dict()
        for step, (settings, loss) in enumerate(STEPS, start=1):
            expected_grads, expected_update = training.step(settings, loss, before)
            algorithm = AlgorithmSpec(**settings)
            shown = group.train_step_showing_gradient(refs[batch_source(algorithm)], algorithm)
            grads, after = shown[0][1], group.full_state_dict()
            assert grads.keys() == expected_grads.keys()
            difference = max(float((grads[k] - expected_grads[k]).abs().max()) for k in grads)
            scale = max(float(g.abs().max()) for g in expected_grads.values())
            # Adam steps by g / (|g| + 1e-8): where a clipped gradient is near 1e-8, float32 rounding of it (the
            # ranks sum in another order) changes the update by several % of lr; where the gradient is not tiny the
            # updates agree to within 1% of lr, and everywhere the learner's update is AdamW's on its own gradient
            update = {k: after[k] - before[k] - expected_update[k] for k in expected_grads}
            large = {k: expected_grads[k].abs() > 1e-5 * scale for k in expected_grads}
            worst = max(float(d.abs().max()) for d in update.values())
            worst_large = max(float((update[k].abs() * large[k]).max()) for k in update)
            replayed = training.update_from(grads, before)
            worst_replayed = max(float((after[k] - before[k] - replayed[k]).abs().max()) for k in replayed)
            print(f"{ranks} rank(s), ZeRO-{zero_stage}, step {step} ({settings['objective']}): max |grad difference| "
                  f"{difference:.2e} of {scale:.2e}; the step's update: max |difference| {worst:.2e}, "
                  f"{worst_large:.2e} where |grad| > 1e-5 of its max, {worst_replayed:.2e} from AdamW on the "
                  f"learner's gradient (lr {LR:.0e})")  # fmt: skip
            assert difference <= 1e-5 * scale, step
            assert worst_large <= 1e-2 * LR and worst_replayed <= 1e-2 * LR, step
            assert worst <= 0.1 * LR, step  # noise-level gradients: a bound on the amplified rounding
            before = after
    finally:
        group.shutdown()
