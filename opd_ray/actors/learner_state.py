"""A learner rank's state outside the training step: its checkpoints, the student's whole weights (to export,
save or broadcast), its parameter counts, and the storage mark that proves the driver sees its disk.

LearnerWorker (learner.py) holds one `RankState` after setup and hands each such call to it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from opd_ray.actors.collective_sync import BucketPlan, join_group, plan_buckets, send_bucket, weight_entries
from opd_ray.actors.lora import ADAPTER_DIR, merged_state_dict, trainable_parameters
from opd_ray.actors.runtime import actor_location
from opd_ray.errors import UserError
from opd_ray.files import manifest_faults

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


@dataclass
class RankState:
    engine: Any  # the rank's DeepSpeed engine
    rank: int
    lora: bool  # the engine trains LoRA adapters over a frozen base
    trust_remote_code: bool  # for the tokenizer saved beside the student
    weight_group: Any = None  # rank 0's member of the weight-broadcast group (collective weight sync)

    def full_state_dict(self, copy: bool = True) -> dict[str, torch.Tensor] | None:
        """All ranks must call this (ZeRO-3 gathers shards collectively); rank 0 gets the weights.

        `copy=False` returns the live parameters where they are whole on CPU (ZeRO 0-2): for a
        caller that serializes them before this rank trains again (Ray does, on return)."""
        import deepspeed

        module = self.engine.module
        if self.lora:  # ZeRO 0-2 only (the spec says so): every rank holds the whole model
            return merged_state_dict(module) if self.rank == 0 else None
        params = list(module.parameters())
        on_cpu = torch.device(self.engine.device).type == "cpu"
        live = not copy and on_cpu and self.engine.zero_optimization_stage() < 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank != 0:
                return None
            if live:
                return {name: p.detach() for name, p in module.named_parameters()}
            return {name: p.detach().to("cpu").clone() for name, p in module.named_parameters()}

    def save_pretrained(self, directory: str, tokenizer_path: str) -> None:
        """The student as a Hugging Face folder (rank 0 writes; all gather); a LoRA student merged, its adapters
        beside it."""
        from transformers import AutoTokenizer

        state_dict = self.full_state_dict()
        if state_dict is None:
            return
        module = self.engine.module
        if self.lora:
            module.save_pretrained(os.path.join(directory, ADAPTER_DIR))
            module = module.get_base_model()
        module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=self.trust_remote_code)
        tokenizer.save_pretrained(directory)

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

    def write_storage_mark(self, directory: str, token: str) -> str:
        """Writes `<token>-rank<r>` into the run directory as this rank sees it: the driver must see it too,
        or this rank's checkpoints would land on a disk the run never reads back."""
        path = os.path.join(directory, f"{token}-rank{self.rank}")
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as handle:
            handle.write(actor_location()["node_ip"])
        return path

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
