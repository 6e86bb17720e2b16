"""Data parallelism for the training loop under `torchrun` (NCCL on CUDA, gloo on CPU).

Launch: `torchrun --nproc-per-node N -m lunatrain lora ...` (under torchrun `lora` trains in-process).
Every rank runs the same loop on the same LoRA initialisation (same seed); each optimizer step's
micro-batches are dealt out across ranks, and after the backward pass the LoRA gradients are summed over
all ranks in one flat all-reduce. The loss of every micro-batch is already divided by the supervised-token
count of the whole step on all ranks, so the summed gradient is exactly the single-process gradient of
that step: N ranks with `batchSize` b train like one process with `batchSize` N·b. (torch's DistributedDataParallel averages gradients, which is right
only when every rank holds the same number of supervised tokens.) LoRA gradients are a few MB, so one
all-reduce per step costs little next to the forward and backward passes.

Only rank 0 writes: checkpoints, the adapter, reports and the registry. Without `WORLD_SIZE` > 1 in the
environment everything here is a no-op and the loop is the single-process loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env() -> World:
    """The torchrun world this process belongs to (SINGLE outside torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(world: World, device: str) -> Iterator[None]:
    """Join the process group for the duration of a run (unless the caller already did)."""
    import torch
    import torch.distributed as dist

    if not world.active or dist.is_initialized():
        yield
        return
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)  # "cuda" then means this rank's GPU everywhere in the loop
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sum_floats(world: World, values: list[float], device: str) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    if not world.active:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_grads(world: World, params: list[Any]) -> None:
    """Sum the gradients of `params` over all ranks in place. A rank that had no samples in this step
    (the last step of an epoch may be short) contributes zeros."""
    if not world.active:
        return
    import torch
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def share_params(world: World, params: list[Any]) -> None:
    """Rank 0's values of `params` on every rank: the same seed already gives every rank the same LoRA
    initialisation; this makes it so even where an initialiser is not reproducible across devices."""
    if not world.active:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def share(world: World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not world.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()
