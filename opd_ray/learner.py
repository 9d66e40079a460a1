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
from typing import Any

import ray
import torch

from opd_ray.batch import RolloutBatch
from opd_ray.objectives import ObjectiveInputs, objective_sum, sft_cross_entropy, token_logprobs
from opd_ray.spec import LearnerSpec, ModelSpec
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

    def _step(self, loss_sum: torch.Tensor, global_tokens: int) -> float:
        loss = loss_sum * self.world_size / max(1, global_tokens)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss_sum.detach()) / max(1, global_tokens)

    def train_step(self, batch_refs: list[ray.ObjectRef], objective: str, clip_eps: float) -> dict[str, float]:
        """One optimizer step on this rank's rows; returns sums the driver adds across ranks."""
        full = RolloutBatch.concat(ray.get(batch_refs))
        global_tokens = full.num_response_tokens
        batch = full.select(slice(self.rank, None, self.world_size))
        self.engine.train()
        logits_BTV = self._forward_logits(batch)

        def shifted(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[:, 1:].to(self.device)

        inputs = ObjectiveInputs(
            student_logits_BTV=logits_BTV,
            target_ids_BT=shifted(batch.input_ids_BL),
            mask_BT=shifted(batch.response_mask_BL),
            rollout_logprobs_BT=shifted(batch.rollout_logprobs_BL),
            teacher_logprobs_BT=shifted(batch.teacher_logprobs_BL),
            teacher_topk_ids_BTK=shifted(batch.teacher_topk_ids_BLK),
            teacher_topk_logprobs_BTK=shifted(batch.teacher_topk_logprobs_BLK),
        )
        mask_BT = inputs.mask_BT
        with torch.no_grad():
            student_logprobs_BT = token_logprobs(logits_BTV, inputs.target_ids_BT)
            sampled_kl_sum = float(((inputs.rollout_logprobs_BT - inputs.teacher_logprobs_BT) * mask_BT).sum())
            teacher_logprob_sum = float((inputs.teacher_logprobs_BT * mask_BT).sum())
            student_logprob_sum = float((student_logprobs_BT * mask_BT).sum())
        loss_mean = self._step(objective_sum(objective, inputs, clip_eps), global_tokens)
        scale = 1.0 / max(1, global_tokens)
        return {
            "loss": loss_mean,
            "sampled_reverse_kl": sampled_kl_sum * scale,
            "teacher_logprob": teacher_logprob_sum * scale,
            "student_logprob": student_logprob_sum * scale,
            "lr": float(self.engine.get_lr()[0]),
            "response_tokens": batch.num_response_tokens,
            "truncated_responses": int((~batch.finished_B).sum()),
        }

    def sft(self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, seed: int) -> list[float]:
        """Cross-entropy on answer tokens for `steps` steps; every rank draws the same rows, keeps its share."""
        rng = random.Random(seed)
        losses = []
        self.engine.train()
        for _ in range(steps):
            rows = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            batch = sft_batch(rows)
            global_tokens = batch.num_response_tokens
            shard = batch.select(slice(self.rank, None, self.world_size))
            logits_BTV = self._forward_logits(shard)
            loss_sum = sft_cross_entropy(
                logits_BTV, shard.input_ids_BL[:, 1:].to(self.device), shard.response_mask_BL[:, 1:].to(self.device)
            )
            losses.append(self._step(loss_sum, global_tokens))
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


def sft_batch(rows: list[tuple[list[int], list[int]]]) -> RolloutBatch:
    """Prompt + answer (+ end-of-sequence inside the answer ids); loss only on the answer."""
    length = max(len(p) + len(a) for p, a in rows)
    input_ids_BL = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask_BL = torch.zeros(len(rows), length, dtype=torch.long)
    response_mask_BL = torch.zeros(len(rows), length)
    for b, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids_BL[b, :n] = torch.tensor(prompt + answer)
        attention_mask_BL[b, :n] = 1
        response_mask_BL[b, len(prompt) : n] = 1
    return RolloutBatch(
        input_ids_BL=input_ids_BL,
        attention_mask_BL=attention_mask_BL,
        response_mask_BL=response_mask_BL,
        rollout_logprobs_BL=torch.zeros(len(rows), length),
        prompt_index_B=torch.full((len(rows),), -1),
        finished_B=torch.ones(len(rows), dtype=torch.bool),
        policy_version=0,
    )


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

    def train_step(self, batch_refs: list[ray.ObjectRef], objective: str, clip_eps: float) -> dict[str, float]:
        per_rank = ray.get(self.call("train_step", batch_refs, objective, clip_eps))
        totals = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
        totals["lr"] = per_rank[0]["lr"]  # the same on every rank; the rest are shares of a global mean
        return totals

    def export_weights(self) -> ray.ObjectRef:
        """ObjectRef of rank 0's packed weights; the bytes stay in the object store."""
        refs = self.call("export_weights")
        ray.wait(refs[1:], num_returns=len(refs) - 1)
        return refs[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
