"""Weight sync over a process group: learner rank 0 broadcasts the student, bucket by bucket, to every engine.

The object-store path (weight_sync.py) needs the whole model serialized once in host
memory and suits one machine; across GPU nodes a broadcast moves the weights GPU to GPU
over NCCL without the host copy. The group holds learner rank 0 (group rank 0) and every
rollout engine's vLLM worker (ranks 1..W). It is formed with vLLM's stateless helper,
outside torch.distributed's global state, so it lives beside the learners' DeepSpeed group
and the engine's own. The same code runs over gloo on CPU, which is how CI tests it.

Buckets: parameters of one dtype are packed into flat buffers of at most `bucket_mb` and
sent one after another. Under ZeRO-3 each bucket is gathered just before it is sent, so
neither side ever holds a second full copy of the model, only one bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from datetime import timedelta

import ray
import torch
from torch.distributed import BroadcastOptions, ProcessGroup

from opd_ray.spec import ExperimentSpec, WeightSyncSpec

WeightEntry = tuple[str, str, tuple[int, ...]]  # parameter name, dtype name, full shape
BucketPlan = list[list[WeightEntry]]


def weight_entries(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> list[WeightEntry]:
    """Names, dtypes and full shapes (ZeRO-3 keeps a partitioned parameter's real shape in `ds_shape`)."""
    return [
        (name, str(p.dtype).removeprefix("torch."), tuple(getattr(p, "ds_shape", p.shape)))
        for name, p in named_parameters
    ]


def plan_buckets(entries: list[WeightEntry], bucket_bytes: int) -> BucketPlan:
    """Consecutive parameters of one dtype, up to `bucket_bytes` a bucket; a larger one goes alone."""
    plan: BucketPlan = []
    size = 0
    for entry in entries:
        _, dtype_name, shape = entry
        nbytes = math.prod(shape) * getattr(torch, dtype_name).itemsize
        if not plan or plan[-1][0][1] != dtype_name or size + nbytes > bucket_bytes:
            plan.append([])
            size = 0
        plan[-1].append(entry)
        size += nbytes
    return plan


def join_group(address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float) -> ProcessGroup:
    """Blocks until all `world_size` members have joined; rank 0 hosts the rendezvous at `address`."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        address[0], address[1], rank, world_size, backend, timeout=timedelta(seconds=timeout_s)
    )


def broadcast_from_rank0(group: ProcessGroup, tensor: torch.Tensor) -> None:
    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send_bucket(group: ProcessGroup, tensors: list[torch.Tensor]) -> None:
    """One flat copy of the bucket (the only extra memory on the sender), then one broadcast."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    broadcast_from_rank0(group, flat)


def receive_buckets(group: ProcessGroup, plan: BucketPlan, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) as each bucket arrives: a generator, so the engine loads a bucket before
    the next one is received and only one bucket is held at a time."""
    for bucket in plan:
        dtype = getattr(torch, bucket[0][1])
        flat = torch.empty(sum(math.prod(shape) for _, _, shape in bucket), dtype=dtype, device=device)
        broadcast_from_rank0(group, flat)
        offset = 0
        for name, _, shape in bucket:
            count = math.prod(shape)
            yield name, flat[offset : offset + count].view(shape)
            offset += count


def group_backend(spec: ExperimentSpec) -> str:
    """Decided from the spec, not on each member, so every member agrees: NCCL when both ends hold GPUs."""
    if spec.weight_sync.backend != "auto":
        return spec.weight_sync.backend
    on_gpus = spec.rollout.resources.num_gpus > 0 and spec.learner.resources.num_gpus > 0
    return "nccl" if on_gpus else "gloo"


class WeightBroadcast:
    """Driver side of the collective path: forms the group and launches one broadcast per sync.

    A rollout worker restarted by Ray is not in the group any more; `regroup` marks the group
    to be formed again (every member re-joins on a fresh port) before the next broadcast.
    """

    def __init__(self, settings: WeightSyncSpec, backend: str, learner_ranks: list, rollout_workers: list) -> None:
        self.settings, self.backend = settings, backend
        self.learner_ranks, self.rollout_workers = learner_ranks, rollout_workers
        self.plan: BucketPlan = []
        self.needs_group = True

    def regroup(self) -> None:
        self.needs_group = True

    def _form(self) -> None:
        rank0 = self.learner_ranks[0]
        address = ray.get(rank0.address.remote(), timeout=self.settings.timeout_s)
        world_size = 1 + len(self.rollout_workers)
        timeout = self.settings.timeout_s
        bucket_bytes = int(self.settings.bucket_mb * 2**20)
        joins = [rank0.join_weight_group.remote(address, world_size, self.backend, timeout, bucket_bytes)]
        joins += [
            worker.join_weight_group.remote(address, 1 + i, world_size, self.backend, timeout)
            for i, worker in enumerate(self.rollout_workers)
        ]
        # the process group's own timeout ends a join that cannot complete; this bounds the call around it
        self.plan = ray.get(joins, timeout=2 * timeout)[0]
        self.needs_group = False

    def launch(self, version: int) -> list[ray.ObjectRef]:
        """Every learner rank takes part (ZeRO-3 gathers collectively); rank 0 sends, each engine receives."""
        if self.needs_group:
            self._form()
        sends = [rank.broadcast_weights.remote(self.plan) for rank in self.learner_ranks]
        receives = [worker.receive_weights.remote(self.plan, version) for worker in self.rollout_workers]
        return sends + receives
