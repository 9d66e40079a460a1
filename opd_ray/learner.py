"""DeepSpeed learner ranks: recompute student log-probs with gradients and update the student.

Each rank is a Ray actor running one DeepSpeed (ZeRO) data-parallel rank: gloo on CPU,
NCCL on GPU. Every rank receives the same batch refs and keeps rows rank, rank+N, ...
(interleaved so that long and short sequences spread evenly). Losses are sums over local
tokens divided by the global token count, so the token-mean is exact across ranks even
though DeepSpeed averages gradients.
"""

from __future__ import annotations

import math
import os
import random
import socket
from dataclasses import replace
from typing import Any

import ray
import torch

from opd_ray.batch import RolloutBatch, supervised_batch
from opd_ray.diagnostics import masked_sums, token_diagnostics
from opd_ray.objectives import OBJECTIVES, ObjectiveInputs, aggregate, reverse_kl_advantages, token_logprobs
from opd_ray.spec import AlgorithmSpec, LearnerSpec, ModelSpec
from opd_ray.weight_sync import pack_state_dict

LEARNER_ENV = {"DS_ACCELERATOR": "cpu"} if not torch.cuda.is_available() else {}


def learner_threads(num_ranks: int) -> int:
    """Ranks on one CPU machine split its cores: oversubscribed ranks were ~2x slower here."""
    return max(1, (os.cpu_count() or 1) // num_ranks)


def deepspeed_config(learner: LearnerSpec, model: ModelSpec, micro_batch: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": learner.grad_clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": learner.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": model.dtype == "bfloat16"},
        "fp16": {"enabled": model.dtype == "float16"},
        "wall_clock_breakdown": False,
    }
    config.update(learner.deepspeed)
    return config


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class LearnerWorker:
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
    ) -> None:
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
        on_gpu = torch.cuda.is_available()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        backend = learner.backend if learner.backend != "auto" else ("nccl" if on_gpu else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
        config = deepspeed_config(learner, model, micro_batch)
        # Must be alive while the model is built, or ZeRO-3 skips transformers' weight init.
        self._hf_ds_config = HfDeepSpeedConfig(config) if learner.zero_stage == 3 else None
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model.dtype]
        module = AutoModelForCausalLM.from_pretrained(
            model.path, dtype=dtype, trust_remote_code=model.trust_remote_code, use_safetensors=True
        )
        optimizer = torch.optim.AdamW(module.parameters(), lr=learner.lr, weight_decay=learner.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(learner, total_steps))
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.device = self.engine.device

    def _forward_logits(self, batch: RolloutBatch) -> torch.Tensor:
        output = self.engine(
            input_ids=batch.input_ids_BL.to(self.device), attention_mask=batch.attention_mask_BL.to(self.device)
        )
        return output.logits[:, :-1].float()

    def _train_on(
        self, full: RolloutBatch, algorithm: AlgorithmSpec, diagnostics_k: int | None = None
    ) -> dict[str, Any]:
        """One optimizer step on this rank's rows of `full`; returns shares the driver adds across ranks."""
        global_tokens = full.num_response_tokens
        if algorithm.objective == "sampled_token":  # batch statistics need every rank's rows
            advantages_BL = reverse_kl_advantages(
                full.teacher_logprobs_BL,
                full.rollout_logprobs_BL,
                full.response_mask_BL,
                algorithm.discount,
                algorithm.standardize_rewards,
            )
            full = replace(full, advantages_BL=advantages_BL)
        batch = full.select(slice(self.rank, None, self.world_size))
        self.engine.train()

        def shifted(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[:, 1:].to(self.device)

        inputs = ObjectiveInputs(
            student_logits_BTV=self._forward_logits(batch),
            target_ids_BT=shifted(batch.input_ids_BL),
            mask_BT=shifted(batch.response_mask_BL),
            rollout_logprobs_BT=shifted(batch.rollout_logprobs_BL),
            teacher_logprobs_BT=shifted(batch.teacher_logprobs_BL),
            teacher_topk_ids_BTK=shifted(batch.teacher_topk_ids_BLK),
            teacher_topk_logprobs_BTK=shifted(batch.teacher_topk_logprobs_BLK),
            advantage_BT=shifted(batch.advantages_BL),
        )
        scale = 1.0 / max(1, global_tokens)
        metrics = {"response_tokens": batch.num_response_tokens, "truncated_responses": int((~batch.finished_B).sum())}
        with torch.no_grad():
            mask_BT = inputs.mask_BT
            student_logprobs_BT = token_logprobs(inputs.student_logits_BTV, inputs.target_ids_BT)
            metrics["student_logprob"] = float((student_logprobs_BT * mask_BT).sum()) * scale
            if inputs.teacher_logprobs_BT is not None:
                teacher_minus_rollout_BT = inputs.teacher_logprobs_BT - inputs.rollout_logprobs_BT
                metrics["sampled_reverse_kl"] = -float((teacher_minus_rollout_BT * mask_BT).sum()) * scale
                metrics["teacher_logprob"] = float((inputs.teacher_logprobs_BT * mask_BT).sum()) * scale
            if diagnostics_k and inputs.teacher_topk_ids_BTK is not None:
                per_token = token_diagnostics(
                    inputs.student_logits_BTV,
                    inputs.teacher_topk_ids_BTK,
                    inputs.teacher_topk_logprobs_BTK,
                    student_logprobs_BT,
                    inputs.teacher_logprobs_BT,
                    diagnostics_k,
                )
                metrics.update(masked_sums(per_token, mask_BT))
        loss_BT = OBJECTIVES[algorithm.objective](inputs, algorithm)
        loss = aggregate(loss_BT, mask_BT, algorithm.aggregation, global_tokens, full.num_sequences)
        self.engine.backward(loss * self.world_size)  # DeepSpeed averages gradients over ranks
        self.engine.step()
        metrics["loss"] = float(loss.detach())
        metrics["lr"] = float(self.engine.get_lr()[0])
        return metrics

    def train_step(
        self, batch_refs: list[ray.ObjectRef], algorithm: AlgorithmSpec, diagnostics_k: int | None
    ) -> dict[str, Any]:
        return self._train_on(RolloutBatch.concat(ray.get(batch_refs)), algorithm, diagnostics_k)

    def sft(self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, seed: int) -> list[float]:
        """Supervised steps on answer tokens; every rank draws the same rows and keeps its share."""
        rng = random.Random(seed)
        algorithm = AlgorithmSpec(objective="sft")
        losses = []
        for _ in range(steps):
            rows = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            losses.append(self._train_on(supervised_batch(rows), algorithm)["loss"])
        return losses

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All ranks must call this (ZeRO-3 gathers shards collectively); rank 0 gets the weights."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank != 0:
                return None
            return {name: p.detach().to("cpu").clone() for name, p in module.named_parameters()}

    def export_weights(self) -> bytes | None:
        state_dict = self.full_state_dict()
        return pack_state_dict(state_dict) if state_dict is not None else None

    def save_pretrained(self, directory: str, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        state_dict = self.full_state_dict()
        if state_dict is None:
            return
        self.engine.module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(directory)

    def sequence_logprobs(self, sequence: list[int]) -> list[float]:
        """Student log-probs of a fixed sequence, for checking that weight sync is exact."""
        self.engine.eval()
        ids = torch.tensor([sequence], device=self.device)
        with torch.no_grad():
            logits = self.engine(input_ids=ids).logits[:, :-1].float()
            return token_logprobs(logits, ids[:, 1:])[0].tolist()


def combine_rank_metrics(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """Ranks report shares of a global mean (added) or (sum, count) pairs (added, then divided)."""
    totals: dict[str, float] = {}
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        if isinstance(values[0], tuple):
            count = sum(v[1] for v in values)
            if count:
                totals[key] = sum(v[0] for v in values) / count
        else:
            totals[key] = sum(values)
    totals["lr"] = per_rank[0]["lr"]  # the same on every rank
    return totals


class LearnerGroup:
    """N learner ranks behind one handle: a call fans out to every rank."""

    def __init__(
        self, model: ModelSpec, learner: LearnerSpec, micro_batch: int, total_steps: int, runtime_env: dict
    ) -> None:
        options = {
            "num_cpus": learner.resources.num_cpus,
            "num_gpus": learner.resources.num_gpus,
            "runtime_env": {"env_vars": {**runtime_env.get("env_vars", {}), **LEARNER_ENV}},
        }
        threads = str(learner_threads(learner.num_ranks))
        options["runtime_env"]["env_vars"].update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        self.workers = [LearnerWorker.options(**options).remote() for _ in range(learner.num_ranks)]
        master = ray.get(self.workers[0].address.remote())
        ray.get(
            [
                w.setup.remote(rank, learner.num_ranks, master, model, learner, micro_batch, total_steps)
                for rank, w in enumerate(self.workers)
            ]
        )

    def call(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        return [getattr(w, method).remote(*args) for w in self.workers]

    def train_step(
        self, batch_refs: list[ray.ObjectRef], algorithm: AlgorithmSpec, diagnostics_k: int | None = None
    ) -> dict[str, float]:
        per_rank = ray.get(self.call("train_step", batch_refs, algorithm, diagnostics_k))
        return combine_rank_metrics(per_rank)

    def export_weights(self) -> ray.ObjectRef:
        """ObjectRef of rank 0's packed weights; the bytes stay in the object store."""
        refs = self.call("export_weights")
        ray.wait(refs[1:], num_returns=len(refs) - 1)
        return refs[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
