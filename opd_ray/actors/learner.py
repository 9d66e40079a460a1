"""DeepSpeed learner ranks: recompute student log-probs with gradients and update the student.

Each rank is a Ray actor running one DeepSpeed (ZeRO) data-parallel rank: gloo on CPU,
NCCL on GPU. Every rank receives the same batch refs and keeps rows rank, rank+N, ...
(interleaved so that long and short sequences spread evenly). Losses are sums over local
tokens divided by the global token count, so the token-mean is exact across ranks even
though DeepSpeed averages gradients.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch

from opd_ray.actors.collective_sync import BucketPlan, join_group, plan_buckets, send_bucket, weight_entries
from opd_ray.actors.hf_model import (
    DTYPES,
    check_head_reproduces_logits,
    check_packing_exact,
    dtype_name,
    load_causal_lm,
)
from opd_ray.actors.lora import ADAPTER_DIR, merged_state_dict, trainable_parameters, with_lora
from opd_ray.actors.runtime import actor_location, clear_stale_build_locks, get_or_raise_first
from opd_ray.actors.weight_sync import pack_state_dict
from opd_ray.errors import UserError
from opd_ray.files import manifest_faults
from opd_ray.losses.batch import RolloutBatch, supervised_batch
from opd_ray.losses.objectives import token_logprobs
from opd_ray.losses.step import StepModels, combine_rank_metrics, diagnose, sampling_head, step_loss
from opd_ray.spec import AlgorithmSpec, LearnerSpec, ModelSpec
from opd_ray.spec.plugins import import_inherited_plugins

LEARNER_ENV = {"DS_ACCELERATOR": "cpu"} if not torch.cuda.is_available() else {}


def learner_threads(num_ranks: int) -> int:
    """Ranks on one CPU machine split its cores: oversubscribed ranks were ~2x slower here."""
    return max(1, (os.cpu_count() or 1) // num_ranks)


def deepspeed_config(learner: LearnerSpec, model: ModelSpec, micro_batch: int) -> dict[str, Any]:
    """The spec's settings with learner.deepspeed deep-merged on top: an override of one key of a section
    (zero_optimization.offload_optimizer) keeps the section's other keys (its stage)."""
    from omegaconf import OmegaConf

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": learner.grad_clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": learner.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": dtype_name(model) == "bfloat16"},
        "fp16": {"enabled": dtype_name(model) == "float16"},
        "wall_clock_breakdown": False,
    }
    return OmegaConf.to_container(OmegaConf.merge(config, learner.deepspeed))


def warmup_cosine(learner: LearnerSpec, total_steps: int) -> Any:
    """Linear warmup, then constant or cosine decay to min_lr_ratio: warmup mattered on the tiny task."""

    def factor(step: int) -> float:
        if step < learner.warmup_steps:
            return (step + 1) / learner.warmup_steps
        if learner.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - learner.warmup_steps) / max(1, total_steps - learner.warmup_steps))
        return learner.min_lr_ratio + (1 - learner.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def attention_implementation(choice: str, on_gpu: bool) -> str:
    """`auto`: flash-attention where it can run (CUDA, package installed), else PyTorch's sdpa."""
    if choice != "auto":
        return choice
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def prepare_for_training(module: Any, gradient_checkpointing: bool) -> None:
    """No KV cache in training forwards (nothing reads it; it only holds memory), and optionally
    activation checkpointing of every decoder layer (non-reentrant: works with ZeRO-3 and frozen inputs)."""
    module.config.use_cache = False
    if gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_")


def read_by_rank(name: str, rank: int) -> bool:
    """Whether learner `rank` reads a checkpoint file when it loads: the DeepSpeed state, its own ZeRO shard and
    the shared files, not the other ranks' shards nor the HF student (for resuming elsewhere)."""
    if not name.startswith("deepspeed/"):
        return False
    shard = ZERO_SHARD.search(name)
    return shard is None or int(shard.group(1)) == rank


def full_size(parameter: torch.nn.Parameter) -> int:
    """Numbers in a parameter; under ZeRO-3 the whole one's, not this rank's shard."""
    return getattr(parameter, "ds_numel", parameter.numel())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def skip_inference_comm_op() -> None:
    """On a CPU, DeepSpeed compiles its shared-memory all-reduce (`deepspeed_shm_comm`) at the first
    `init_distributed`: 66-74 s on a fresh 2-core machine, under a lock file that a killed build leaves behind
    for every later start to wait on. It serves only DeepSpeed-inference's tensor-parallel all-reduce; training
    reduces through torch.distributed (gloo), so it is marked unavailable (DeepSpeed keeps that dict for the
    process, edits included) and never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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
        is rollout.temperature: the student is trained as the distribution it samples from."""
        import_inherited_plugins()  # an objective of the spec's own registers itself here too
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
        """Writes `<token>-rank<r>` into the run directory as this rank sees it: the driver must see it too,
        or this rank's checkpoints would land on a disk the run never reads back."""
        path = os.path.join(directory, f"{token}-rank{self.rank}")
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as handle:
            handle.write(actor_location()["node_ip"])
        return path

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in the model, those that train, and the numbers of optimizer state this rank holds
        (Adam's two moments, its ZeRO share): what a LoRA student saves."""
        module = self.engine.module
        optimizer = self.engine.optimizer
        while hasattr(optimizer, "optimizer"):  # DeepSpeed's ZeRO wrapper around the torch optimizer
            optimizer = optimizer.optimizer
        state = sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
        return {
            "total": sum(full_size(p) for p in module.parameters()),
            "trainable": sum(full_size(p) for p in trainable_parameters(module)),
            "optimizer_state": state,
        }

    def parameters_finite(self) -> bool:
        """All ranks must call this: under ZeRO-3 each holds a shard."""
        finite = all(
            bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
            for p in self.engine.module.parameters()
        )
        return not self._any_rank(not finite)

    def save_checkpoint(self, directory: str, tokenizer_path: str) -> None:
        """All ranks: DeepSpeed state (weights, optimizer, scheduler; each rank its shard) and the HF student.
        A LoRA student's DeepSpeed state holds the adapters only (the frozen base is the initial student)."""
        deepspeed_dir = os.path.join(directory, "deepspeed")
        self.engine.save_checkpoint(deepspeed_dir, tag="state", save_latest=False, exclude_frozen_parameters=self.lora)
        self.save_pretrained(os.path.join(directory, "student"), tokenizer_path)

    def load_checkpoint(self, directory: str) -> None:
        """This rank's files are checked against the checkpoint's manifest as it reads them: the driver checked
        its own copy earlier, and a rank on another node reads another copy of shared storage."""
        faults = manifest_faults(Path(directory), partial(read_by_rank, rank=self.rank))
        if faults:
            raise UserError(
                f"checkpoint {directory}: learner rank {self.rank} found {', '.join(faults[:3])}: not as written; "
                "not loaded. Remove that checkpoint to resume from the one before"
            )
        path, _ = self.engine.load_checkpoint(
            os.path.join(directory, "deepspeed"), tag="state", load_module_strict=not self.lora
        )
        if path is None:
            raise UserError(f"checkpoint {directory} has no DeepSpeed state for this learner layout")

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
        """All ranks must call this (ZeRO-3 gathers shards collectively); rank 0 gets the weights.

        `copy=False` returns the live parameters where they are whole on CPU (ZeRO 0-2): for a
        caller that serializes them before this rank trains again (Ray does, on return)."""
        import deepspeed

        module = self.engine.module
        if self.lora:  # ZeRO 0-2 only (the spec says so): every rank holds the whole model
            return merged_state_dict(module) if self.rank == 0 else None
        params = list(module.parameters())
        live = not copy and torch.device(self.device).type == "cpu" and self.engine.zero_optimization_stage() < 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank != 0:
                return None
            if live:
                return {name: p.detach() for name, p in module.named_parameters()}
            return {name: p.detach().to("cpu").clone() for name, p in module.named_parameters()}

    def export_weights(self) -> dict | None:
        """The student's weights as arrays for the object store (see weight_sync.py)."""
        state_dict = self.full_state_dict(copy=False)
        return pack_state_dict(state_dict) if state_dict is not None else None

    def join_weight_group(
        self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float, bucket_bytes: int
    ) -> BucketPlan | None:
        """Rank 0 joins the weight-broadcast group as its rank 0 and returns the bucket plan every member follows."""
        if self.rank != 0:
            return None
        self.weight_group = join_group(address, 0, world_size, backend, timeout_s)
        return plan_buckets(weight_entries(self.engine.module.named_parameters()), bucket_bytes)

    def broadcast_weights(self, plan: BucketPlan) -> None:
        """All ranks must call this: under ZeRO-3 each bucket is gathered collectively just before rank 0 sends it."""
        import deepspeed

        parameters = dict(self.engine.module.named_parameters())
        for bucket in plan:
            tensors = [parameters[name] for name, _, _ in bucket]
            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
                if self.rank == 0:
                    send_bucket(self.weight_group, tensors)

    def save_pretrained(self, directory: str, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        state_dict = self.full_state_dict()
        if state_dict is None:
            return
        module = self.engine.module
        if self.lora:  # the merged model where a student belongs, the adapters beside it
            module.save_pretrained(os.path.join(directory, ADAPTER_DIR))
            module = module.get_base_model()
        module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=self.trust_remote_code)
        tokenizer.save_pretrained(directory)

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
