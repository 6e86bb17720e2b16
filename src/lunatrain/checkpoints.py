"""Epoch checkpoints of a training run, for resuming after a crash or a kill: the adapter and optimizer
state as safetensors, the scheduler and progress as JSON, in `<work dir>/checkpoints/epoch-NNN/`. Only the
newest complete checkpoint is kept; the dropout stream is reseeded per epoch by the loop, so no RNG state
is needed to resume exactly.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fsio import atomic_write_bytes, atomic_write_json, read_json
from .messages import coded

if TYPE_CHECKING:
    from .train import Event, LoopState, Run


def save(run: Run) -> Path:
    """adapter + optimizer (safetensors) and scheduler/progress (JSON) for the finished
    epoch; written to a temp dir and renamed, `state.json` last, so a checkpoint dir is always complete."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    ckpts = run.work_dir / "checkpoints"
    final = ckpts / f"epoch-{run.epoch:03d}"
    tmp = ckpts / f".epoch-{run.epoch:03d}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(run.model).items()}
    atomic_write_bytes(tmp / "adapter.safetensors", save(adapter))
    opt_state = run.optimizer.state_dict()
    opt_tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous()
        for i, st in opt_state["state"].items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor)
    }
    atomic_write_bytes(tmp / "optimizer.safetensors", save(opt_tensors))
    state = {
        "epoch": run.epoch,
        "step": run.step,
        "paramGroups": opt_state["param_groups"],
        "scheduler": run.scheduler.state_dict(),
        "baseValLoss": run.base_val_loss,
        "epochs": run.epochs,
        "curve": run.curve,
        "tokensSeen": run.tokens_seen,
        "trainSeconds": run.train_seconds,
    }
    atomic_write_json(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in ckpts.glob("epoch-*"):  # keep the newest complete one only
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(run: Run, emit: Callable[[Event], None]) -> LoopState | None:
    """Load the newest complete checkpoint of this run's work dir into its model, optimizer and scheduler;
    return the loop state to continue from, or None when there is none."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = sorted((run.work_dir / "checkpoints").glob("epoch-*/state.json"))
    if not found:
        emit({"type": "log", "message": "no checkpoint to resume from; starting fresh", **coded("log.resume_fresh")})
        return None
    ckpt = found[-1].parent
    state = read_json(ckpt / "state.json")
    set_peft_model_state_dict(run.model, load_file(str(ckpt / "adapter.safetensors"), device=run.device))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["paramGroups"]}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    run.optimizer.load_state_dict(opt_state)
    run.scheduler.load_state_dict(state["scheduler"])
    from .train import LoopState

    emit(
        {
            "type": "log",
            "message": f"resumed from epoch {state['epoch']} (step {state['step']})",
            **coded("log.resumed", epoch=state["epoch"], step=state["step"]),
        }
    )
    return LoopState(
        epoch=state["epoch"],
        step=state["step"],
        base_val_loss=state["baseValLoss"],
        epochs=state["epochs"],
        curve=state["curve"],
        tokens_seen=state["tokensSeen"],
        train_seconds=state["trainSeconds"],
        resumed_from=state["epoch"],
    )
