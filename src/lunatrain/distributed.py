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

A rank that fails on its own (an out-of-memory on its GPU, a memory plan its GPU refuses) cannot tell the
others: they wait in a collective it will never join. It raises `RankFailed`, its process exits non-zero
with its error written beside torchrun's per-rank files (`write_rank_error`), and torchrun stops the others;
the trainer then reports the error of the rank that failed first (`service.runner._rank_crash_error`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LunaError

RANK_ERROR_FILE = "lunatrain-error.json"  # beside torchrun's own error file of the rank


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


class PeerLost(RuntimeError):
    """A collective failed: another rank is gone (its failure is the cause, this is the consequence)."""


# How a collective says its peer is gone: gloo's transport ("Connection reset by peer", "Connection closed by
# peer", a read or write error), NCCL's remote error or abort, a store whose other side closed.
_PEER_GONE = ("by peer", "Read error", "Write error", "remote process", "NCCL communicator was aborted", "Broken pipe")


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """A collective whose failure says another rank is gone raises PeerLost; anything else (this rank's own
    out-of-memory, a CUDA error surfacing at the sync) is this rank's failure, raised as it is."""
    import torch.distributed as dist

    try:
        yield
    except Exception as exc:
        said = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, dist.DistNetworkError) or any(mark in said for mark in _PEER_GONE):
            raise PeerLost(said) from exc
        raise


def sum_floats(world: World, values: list[float], device: str) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    if not world.active:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    with _collective():
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
    with _collective():
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

    with _collective():
        for p in params:
            dist.broadcast(p.data, src=0)


def share(world: World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not world.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    with _collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        with _collective():
            dist.barrier()


class RankFailed(LunaError):
    """This rank's run failed while the others may still train: it must leave the group, not share. `at`:
    when, taken before the group is left (the peers' errors follow the moment it is), on the host's monotonic
    clock (every rank runs on this host). `lost_peer`: it failed because another rank had gone."""

    def __init__(self, error: dict[str, Any], cause: BaseException | None = None) -> None:
        super().__init__(str(error.get("message") or "training failed"), code=str(error.get("code") or "error"))
        self.error = error  # as the run's report records it
        self.params = error.get("params") if isinstance(error.get("params"), dict) else None
        self.exit_code = getattr(cause, "exit_code", 1)  # a usage error stays one (exit 2)
        self.at = time.monotonic()
        self.lost_peer = isinstance(cause, PeerLost)


def leave(world: World, exc: BaseException, error: dict[str, Any]) -> RankFailed:
    """What this rank raises to leave the group after `exc`: `error`, unless `exc` is a lost peer, whose
    error says another process failed (`peer_lost_error`)."""
    return RankFailed(peer_lost_error(world, exc) if isinstance(exc, PeerLost) else error, exc)


def peer_lost_error(world: World, exc: BaseException) -> dict[str, Any]:
    """The run's error when a collective failed: another process failed, which its own error says."""
    return {
        "code": "rank_peer_lost",
        "message": f"another of the {world.size} training processes failed, so this one stopped too (it lost its "
        f"connection: {exc}); the failed process's error is in the job's log",
        "params": {"ranks": world.size},
    }


def write_rank_error(world: World, error: dict[str, Any], at: float | None = None, *, lost_peer: bool = False) -> None:
    """Record this rank's error where the trainer finds it: beside the error file torchrun gives each rank
    (in the job's torchrun log folder), with when it happened, so the first failure is told from the peers'
    lost-connection errors that follow it."""
    torchrun_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not world.active or not torchrun_file:
        return
    path = Path(torchrun_file).with_name(RANK_ERROR_FILE)
    record = {"rank": world.rank, "at": time.monotonic() if at is None else at, "error": error, "lostPeer": lost_peer}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record), encoding="utf-8")


def _rank_error_files(log_dir: Path) -> Iterator[Path]:
    """The rank error files under a job's torchrun log folder (`write_rank_error`)."""
    return log_dir.glob(f"*/attempt_*/*/{RANK_ERROR_FILE}")


def clear_rank_errors(log_dir: Path) -> None:
    """Before a launch: the errors an earlier try of the job recorded are not this one's."""
    for path in _rank_error_files(log_dir):
        with contextlib.suppress(OSError):
            path.unlink()


def rank_errors(log_dir: Path) -> dict[int, tuple[float, dict[str, Any], bool]]:
    """{rank: (when, error, lost its peer)} of the ranks of one launch that recorded their failure
    (`write_rank_error`)."""
    found: dict[int, tuple[float, dict[str, Any], bool]] = {}
    for path in _rank_error_files(log_dir):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            found[int(data["rank"])] = (float(data["at"]), dict(data["error"]), bool(data.get("lostPeer")))
    return found
