"""DeepSpeed learner ranks: recompute student log-probs with gradients and update the student.

Each rank is a Ray actor running one DeepSpeed (ZeRO) data-parallel rank: gloo on CPU,
NCCL on GPU. Every rank receives the same batch refs and keeps rows rank, rank+N, ...
(interleaved so that long and short sequences spread evenly). Losses are sums over local
tokens divided by the global token count, so the token-mean is exact across ranks even
though DeepSpeed averages gradients.

LearnerWorker is the actor: its setup builds the rank (learner_config.py), its steps are here, and its
state outside the step (checkpoints, whole weights, the weight broadcast) is learner_state.py's RankState.
The driver reaches the ranks through LearnerGroup (learner_group.py).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from opd_ray.actors.collective_sync import BucketPlan
from opd_ray.actors.hf_model import (
    DTYPES,
    check_head_reproduces_logits,
    check_packing_exact,
    dtype_name,
    load_causal_lm,
)
from opd_ray.actors.learner_config import (
    attention_implementation,
    deepspeed_config,
    free_port,
    prepare_for_training,
    skip_inference_comm_op,
    warmup_cosine,
)
from opd_ray.actors.learner_state import RankState
from opd_ray.actors.lora import trainable_parameters, with_lora
from opd_ray.actors.runtime import actor_location, clear_stale_build_locks, count_start
from opd_ray.actors.weight_sync import pack_state_dict
from opd_ray.errors import UserError
from opd_ray.losses.batch import RolloutBatch, supervised_batch
from opd_ray.losses.objectives import token_logprobs
from opd_ray.losses.step import StepModels, diagnose, sampling_head, step_loss
from opd_ray.spec import AlgorithmSpec, LearnerSpec, ModelSpec
from opd_ray.spec.plugins import import_inherited_plugins

LEARNER_ENV = {"DS_ACCELERATOR": "cpu"} if not torch.cuda.is_available() else {}


@ray.remote
class LearnerWorker:
    def location(self) -> dict:
        return actor_location()

    def address(self) -> tuple[str, int]:
        """Rank 0's address for the process group; asked before the group is formed."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(
        self,
        rank: int,
        world_size: int,
        master: tuple[str, int],
        model: ModelSpec,
        learner: LearnerSpec,
        micro_batch: int,
        total_steps: int,
        teacher: ModelSpec | None = None,
        temperature: float = 1.0,
    ) -> None:
        """`teacher` loads a frozen teacher copy on this rank, for full-vocabulary objectives; `temperature`
        is rollout.temperature: the student is trained as the distribution it samples from. One function in
        the order the rank must be built (process group, then the frozen teacher before ZeRO-3's config exists,
        the student, the optimizer, the engine, then the checks that need the engine); the pieces it calls live
        in learner_config.py and learner_state.py."""
        import_inherited_plugins()  # an objective of the spec's own registers itself here too
        count_start("learner rank")
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        self.rank, self.world_size = rank, world_size
        self.trust_remote_code = model.trust_remote_code  # for the tokenizer saved beside the student
        on_gpu = torch.cuda.is_available()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        backend = learner.backend if learner.backend != "auto" else ("nccl" if on_gpu else "gloo")
        if not on_gpu:
            skip_inference_comm_op()
        clear_stale_build_locks()  # a torch extension build killed earlier must not hang this start
        deepspeed.init_distributed(dist_backend=backend)
        config = deepspeed_config(learner, model, micro_batch)
        self.chunk_tokens, self.temperature = learner.chunk_tokens, temperature
        self.pack = learner.pack_sequences
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        # Before the ZeRO-3 config below exists: the frozen teacher must not be partitioned.
        self.teacher = load_causal_lm(teacher, device) if teacher is not None else None
        # Must be alive while the model is built, or ZeRO-3 skips transformers' weight init.
        self._hf_ds_config = HfDeepSpeedConfig(config) if learner.zero_stage == 3 else None
        module = AutoModelForCausalLM.from_pretrained(
            model.path,
            dtype=DTYPES[dtype_name(model)],
            trust_remote_code=model.trust_remote_code,
            use_safetensors=True,
            attn_implementation=attention_implementation(learner.attn_implementation, on_gpu),
        )
        prepare_for_training(module, bool(learner.gradient_checkpointing))
        if learner.lora is not None:
            module = with_lora(module, learner.lora)
        self.lora = learner.lora is not None
        parameters = trainable_parameters(module)  # with LoRA, the adapters alone hold optimizer state
        optimizer = torch.optim.AdamW(parameters, lr=learner.lr, weight_decay=learner.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(learner, total_steps))
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.device = self.engine.device
        self.state = RankState(self.engine, rank, self.lora, model.trust_remote_code)
        self._check_heads()
        if self.pack:
            vocab = self.engine.module.get_output_embeddings().out_features
            check_packing_exact(self.engine, vocab, self.device, "learner.pack_sequences")

    def _check_heads(self) -> None:
        """Chunked losses need logits = head(last hidden state), and a teacher head over the same vocabulary."""
        student_head = self.engine.module.get_output_embeddings()
        vocab = student_head.out_features
        check_head_reproduces_logits(self.engine, student_head, vocab, self.device)
        if self.teacher is not None:
            teacher_head = self.teacher.get_output_embeddings()
            if teacher_head.out_features != vocab:
                raise UserError(
                    f"full-vocabulary objective: teacher head has {teacher_head.out_features} outputs, "
                    f"student head {vocab}; they must share a vocabulary"
                )
            check_head_reproduces_logits(self.teacher, teacher_head, vocab, self.device)

    def _models(self) -> StepModels:
        return StepModels(
            self.engine,
            sampling_head(self.engine.module.get_output_embeddings(), self.temperature),
            self.device,
            self.chunk_tokens,
            self.teacher,
            None if self.teacher is None else self.teacher.get_output_embeddings(),
            self.pack,
        )

    def _train_on(
        self,
        full: RolloutBatch,
        algorithm: AlgorithmSpec,
        diagnostics_k: int | None = None,
        step: int = 1,
        teacher_names: tuple[str, ...] = (),
        before_step: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """One optimizer step on this rank's rows of `full` (losses/step.py); returns shares the driver adds
        across ranks. `before_step` runs between the backward and the optimizer step."""
        self.engine.train()
        loss, metrics = step_loss(
            self._models(), full, algorithm, self.rank, self.world_size, diagnostics_k, step, teacher_names
        )
        if self._any_rank(not bool(torch.isfinite(loss))):  # every rank skips together, or backward hangs
            metrics.update(loss=None, skipped_update=1, lr=float(self.engine.get_lr()[0]))
            return metrics
        # loss x ranks: DeepSpeed averages the ranks' gradients, and each rank's loss is its share of the sum
        if not apply_update(self.engine, loss * self.world_size, self._any_rank, before_step):
            metrics.update(skipped_update=1, gradient_fault=1)
        norm = self.engine.get_global_grad_norm()
        if norm is not None and math.isfinite(float(norm)):
            metrics["grad_norm"] = float(norm)  # one global norm: the same on every rank
        metrics["loss"] = float(loss.detach())
        metrics["lr"] = float(self.engine.get_lr()[0])
        return metrics

    def train_step_showing_gradient(
        self, batch_refs: list[ray.ObjectRef], algorithm: AlgorithmSpec
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """A train step that also returns the gradient it applied: every trainable parameter's, whole (gathered
        from the ZeRO partitions) and before clipping; rank 0 returns it, the others None. All ranks must take
        part. What tests/integration/test_reference_learner.py compares with the independent reference."""
        from deepspeed.utils import safe_get_full_grad

        seen: dict[str, torch.Tensor] = {}

        def keep() -> None:
            for name, parameter in self.engine.module.named_parameters():
                if parameter.requires_grad:
                    seen[name] = safe_get_full_grad(parameter).detach().float().cpu().clone()

        metrics = self._train_on(RolloutBatch.concat(ray.get(batch_refs)), algorithm, before_step=keep)
        return metrics, seen if self.rank == 0 else None

    def loss(self, batch_refs: list[ray.ObjectRef], algorithm: AlgorithmSpec) -> float:
        """This rank's share of the loss `algorithm` gives the batch, with no update: one student, several
        objectives compared on it. All ranks must take part (ZeRO-3 forwards are collective)."""
        self.engine.eval()
        full = RolloutBatch.concat(ray.get(batch_refs))
        with torch.no_grad():
            loss, _ = step_loss(self._models(), full, algorithm, self.rank, self.world_size)
        return float(loss)

    def diagnose(
        self,
        batch_refs: list[ray.ObjectRef],
        algorithm: AlgorithmSpec,
        diagnostics_k: int,
        teacher_names: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """A step's metrics and diagnostics without an update (`opd-ray probe`), per teacher with
        `teacher_names`. All ranks must take part (ZeRO-3 forwards are collective)."""
        self.engine.eval()
        full = RolloutBatch.concat(ray.get(batch_refs))
        return diagnose(self._models(), full, algorithm, self.rank, self.world_size, diagnostics_k, teacher_names)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any."""
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def write_storage_mark(self, directory: str, token: str) -> str:
        return self.state.write_storage_mark(directory, token)

    def parameter_counts(self) -> dict[str, int]:
        return self.state.parameter_counts()

    def parameters_finite(self) -> bool:
        """All ranks must call this: under ZeRO-3 each holds a shard."""
        finite = all(
            bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
            for p in self.engine.module.parameters()
        )
        return not self._any_rank(not finite)

    def save_checkpoint(self, directory: str, tokenizer_path: str) -> None:
        self.state.save_checkpoint(directory, tokenizer_path)

    def load_checkpoint(self, directory: str) -> None:
        self.state.load_checkpoint(directory)

    def train_step(
        self,
        batch_refs: list[ray.ObjectRef],
        algorithm: AlgorithmSpec,
        diagnostics_k: int | None,
        step: int = 1,
        teacher_names: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The timings say where a learner step goes: fetching the batch from the object store,
        or computing (forward, loss, backward, optimizer step)."""
        started = time.perf_counter()
        batch = RolloutBatch.concat(ray.get(batch_refs))
        fetched = time.perf_counter()
        metrics = self._train_on(batch, algorithm, diagnostics_k, step, teacher_names)
        metrics["time/learner_fetch"] = fetched - started
        metrics["time/learner_compute"] = time.perf_counter() - fetched
        return metrics

    def supervised_steps(
        self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, seed: int
    ) -> list[float]:
        """Supervised steps on answer tokens; every rank draws the same rows and keeps its share."""
        rng = random.Random(seed)
        algorithm = AlgorithmSpec(objective="sft")
        losses = []
        for _ in range(steps):
            rows = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            losses.append(self._train_on(supervised_batch(rows), algorithm)["loss"])
        return losses

    def full_state_dict(self, copy: bool = True) -> dict[str, torch.Tensor] | None:
        return self.state.full_state_dict(copy)

    def export_weights(self) -> dict | None:
        """The student's weights as arrays for the object store (see weight_sync.py)."""
        state_dict = self.full_state_dict(copy=False)
        return pack_state_dict(state_dict) if state_dict is not None else None

    def join_weight_group(
        self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float, bucket_bytes: int
    ) -> BucketPlan | None:
        return self.state.join_weight_group(address, world_size, backend, timeout_s, bucket_bytes)

    def broadcast_weights(self, plan: BucketPlan) -> None:
        self.state.broadcast_weights(plan)

    def save_pretrained(self, directory: str, tokenizer_path: str) -> None:
        self.state.save_pretrained(directory, tokenizer_path)

    def sequence_logprobs(self, sequence: list[int]) -> list[float]:
        """Student log-probs of a fixed sequence, for checking that weight sync is exact."""
        self.engine.eval()
        ids = torch.tensor([sequence], device=self.device)
        with torch.no_grad():
            logits = self.engine(input_ids=ids).logits[0, :-1].float()
            return token_logprobs(logits, ids[0, 1:]).tolist()


def apply_update(engine: Any, loss: torch.Tensor, any_rank: Any, before_step: Callable[[], None] | None = None) -> bool:
    """Backward and optimizer step; False when a non-finite gradient made the step a no-op.

    Under ZeRO 1-3, DeepSpeed itself skips a step whose gradient norm is not finite (and
    reports the norm as inf); without ZeRO nothing does, so the gradients are checked here
    on every rank and, if any is bad, dropped before the optimizer sees them.
    """
    engine.backward(loss)
    if before_step is not None:
        before_step()
    if engine.zero_optimization_stage() == 0:
        bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in engine.module.parameters())
        if any_rank(bad):
            engine.module.zero_grad(set_to_none=True)
            return False
        engine.step()
        return True
    engine.step()
    norm = engine.get_global_grad_norm()
    return norm is None or math.isfinite(float(norm))
