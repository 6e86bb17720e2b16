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

from .errors import CheckFailed, DamagedFile, LunaError, NotFound, StorageError, is_out_of_memory
from .fsio import atomic_write_bytes, atomic_write_json, read_json, storage_error
from .messages import coded, counted

# How a job stopped after a checkpoint says it can go on (train.py); the trainer's reads put another sentence in
# its place once no checkpoint of it is left (service.recovery.as_read_now).
RESUME_SAID = (
    "`lunatrain jobs resume` with the job's id continues it from its last checkpoint (in the API: submit its "
    'parameters again with `"resume": true`).'
)

if TYPE_CHECKING:
    from .settings import Settings
    from .train import Event, LoopState, Run

CHECKPOINTS_DIR = "checkpoints"  # in a run's work dir: epoch-NNN/ folders, each complete once state.json is in it


def run_states(work_dir: Path) -> list[Path]:
    """The state.json of each complete epoch checkpoint of one run's work dir, oldest epoch first."""
    return sorted((work_dir / CHECKPOINTS_DIR).glob("epoch-*/state.json"))


def saved_states(work_root: Path, runs: str = "*") -> list[Path]:
    """The state.json of each complete epoch checkpoint of the runs under an adapter's `work_root`
    (`registry.work_root`) whose work dir's name matches `runs`."""
    return list(work_root.glob(f"{runs}/{CHECKPOINTS_DIR}/epoch-*/state.json"))


def save(run: Run) -> Path:
    """adapter + optimizer (safetensors) and scheduler/progress (JSON) for the finished
    epoch; written to a temp dir and renamed, `state.json` last, so a checkpoint dir is always complete."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    ckpts = run.work_dir / CHECKPOINTS_DIR
    final = ckpts / f"epoch-{run.epoch:03d}"
    tmp = ckpts / f".epoch-{run.epoch:03d}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise storage_error(exc, f"the checkpoint {final}") from exc
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
        "run": run.identity,  # so that a resume of another run can say what differs
        "jobId": run.job_id,  # so that recovery knows its job's checkpoint without trusting clocks
        # The data-parallel processes that trained it: N of batchSize b are one of N·b, another schedule
        # (`load`); not in the run identity, so that a checkpoint of the others is found and named.
        "ranks": run.world.size,
    }
    atomic_write_json(tmp / "state.json", state)
    try:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as exc:  # named like every file inside it; the half-made folder goes, the last one stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(exc, f"the checkpoint {final}") from exc
    for old in ckpts.glob("epoch-*"):  # keep the newest complete one only
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(run: Run, emit: Callable[[Event], None]) -> LoopState | None:
    """Load the newest complete checkpoint of this run's work dir into its model, optimizer and scheduler;
    return the loop state to continue from, or None when there is none."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = run_states(run.work_dir)
    if not found:
        emit(_no_checkpoint(run))
        return None
    ckpt = found[-1].parent
    file = "state.json"
    try:  # each part as it is read: a damaged one is named, with the way out, never a library's traceback
        state = read_json(ckpt / file)
        if wrong := _wrong_types(state):
            raise ValueError(f'its "{wrong}" has the wrong type')
        file = "adapter.safetensors"
        set_peft_model_state_dict(run.model, load_file(str(ckpt / file), device=run.device))
        file = "optimizer.safetensors"
        tensors = load_file(str(ckpt / file))
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["paramGroups"]}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            opt_state["state"].setdefault(int(idx), {})[name] = value
        run.optimizer.load_state_dict(opt_state)
        file = "state.json"
        run.scheduler.load_state_dict(state["scheduler"])
    except Exception as exc:
        if not _the_files(exc):  # out of memory, a disk that cannot be read: the checkpoint may well be sound
            raise
        raise damaged(run.settings, ckpt, file, exc) from None
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


# What `load` takes from a state.json without checking it again (`save` writes them so).
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "epoch": int,
    "step": int,
    "paramGroups": list,
    "scheduler": dict,
    "baseValLoss": (int, float, type(None)),
    "epochs": list,
    "curve": list,
    "tokensSeen": int,
    "trainSeconds": (int, float),
}


def _wrong_types(state: Any) -> str | None:
    """The first field of a checkpoint's state that is missing or of the wrong type; None when all fit."""
    if not isinstance(state, dict):
        return "state"
    for key, kind in _STATE_TYPES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return key
    groups = state["paramGroups"]
    return None if all(isinstance(g, dict) for g in groups) else "paramGroups"


def _the_files(exc: Exception) -> bool:
    """Whether `exc` says something of the checkpoint's files (missing, cut short, garbage, of another shape)
    rather than of the machine (out of memory; a disk or permission error, said by the storage sentences)."""
    if is_out_of_memory(type(exc).__name__, str(exc)):
        return False
    if isinstance(exc, StorageError):
        return isinstance(exc, DamagedFile)
    return isinstance(exc, FileNotFoundError) or not isinstance(exc, OSError)


def damaged(settings: Settings, ckpt: Path, file: str, exc: Exception) -> LunaError:
    """The one sentence for a checkpoint of this run that cannot be resumed from: which folder and file, why,
    and the ways out (the folder stays: the user decides whether its run is worth keeping)."""
    if isinstance(exc, DamagedFile) and getattr(exc, "why", None):
        why = exc.why
    elif isinstance(exc, FileNotFoundError | NotFound):
        why = "missing"
    elif isinstance(exc, LunaError):
        why = exc.message.rstrip(".")
    else:
        why = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    where = settings.shown(ckpt)
    return CheckFailed(
        f"The checkpoint {where} is damaged ({file}: {why}); train again without --resume to start over, or remove "
        "that folder (a resume then starts fresh).",
        code="checkpoint.damaged",
        params={"checkpoint": str(where), "file": file, "reason": why},
    )


def check_state(settings: Settings, state: Path) -> None:
    """Refuse (`damaged`) a checkpoint's state.json that cannot be read (cut short, garbage): passed over, a
    resume would start afresh beside it and say nothing of the work it lost. Its fields `load` checks."""
    try:
        saved = read_json(state)
    except LunaError as exc:
        if not _the_files(exc):  # unreadable (permissions, an I/O error): said as such, the folder may be sound
            raise
        raise damaged(settings, state.parent, state.name, exc) from None
    if not isinstance(saved, dict):
        raise damaged(settings, state.parent, state.name, ValueError("not a JSON object"))


def same_world(state: Path, ranks: int) -> bool:
    """Whether the checkpoint was saved by `ranks` data-parallel processes: N of batchSize b are one of N·b,
    another schedule, so only those continue it. One saved before checkpoints recorded the number counts as
    one process's (nearly every run; its step cannot tell: a maxSteps cut moves it)."""
    try:
        saved = read_json(state)
    except LunaError:
        return False
    return isinstance(saved, dict) and saved.get("ranks", 1) == ranks


def furthest(states: list[Path]) -> Path:
    """Of several checkpoints' state.json files, the one that got furthest (epoch names are zero-padded),
    the newest of equals."""
    return max(states, key=lambda p: (p.parent.name, p.stat().st_mtime_ns))


def recorded_run(state: Path) -> dict[str, Any] | None:
    """The run identity a checkpoint's state.json recorded; None when it recorded none (saved before
    checkpoints did) or cannot be read."""
    try:
        saved = read_json(state)
    except LunaError:
        return None
    run = saved.get("run") if isinstance(saved, dict) else None
    return run if isinstance(run, dict) and run else None


_PARTS = {
    "data": "other training data",
    "base": "other base model weights",
    "tokenizer": "another tokenizer",
    "template": "another chat template",
}


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], str]:
    """Which parts of two run identities (`train.run_identity`) differ, and the same in words."""
    from pydantic.alias_generators import to_camel

    if not theirs:
        return [], "made before checkpoints recorded their run"
    # An earlier release's identity held the base's name too: its weights (`base`) are what count.
    ours, theirs = (
        {**i, "params": {k: v for k, v in (i.get("params") or {}).items() if k != "base_model"}} for i in (ours, theirs)
    )
    differs = [
        part for part in ("params", "data", "base", "tokenizer", "template") if ours.get(part) != theirs.get(part)
    ]
    words = []
    for part in differs:
        if part == "params":
            mine, other = ours.get("params") or {}, theirs.get("params") or {}
            names = sorted(to_camel(k) for k in mine.keys() | other.keys() if mine.get(k) != other.get(k))
            words.append(f"other parameters: {', '.join(names)}")
        elif part == "data":
            words.append(f"{_PARTS[part]}: the {(ours.get('params') or {}).get('dataset_tier')} tier changed")
        else:
            words.append(_PARTS[part])
    return differs, "; ".join(words) or "another run"


def _no_checkpoint(run: Run) -> dict[str, Any]:
    """The log line of a resume that found no checkpoint of its run: when another run of the adapter left
    one, which (the furthest) and what differs, so that a user does not take "none" for lost work."""
    others = [p for p in saved_states(run.work_dir.parent) if run.work_dir not in p.parents]
    if not others:
        return {"type": "log", "message": "no checkpoint to resume from; starting fresh", **coded("log.resume_fresh")}
    state = furthest(others)
    differs, said = differences(run.identity, recorded_run(state) or {})
    if not differs and recorded_run(state) and not same_world(state, run.world.size):
        saved = (read_json(state) or {}).get("ranks", 1)
        by = counted(saved, "training process", "training processes")
        differs, said = ["ranks"], f"saved by {by}, this run has {run.world.size}: resume with {saved} to continue it"
    folder = state.parents[2]
    where = run.settings.shown(folder)
    epoch = int(state.parent.name.removeprefix("epoch-"))
    return {
        "type": "log",
        "message": f"the checkpoint of epoch {epoch} in {where} is of another run ({said}); starting fresh",
        **coded("log.resume_other_run", checkpoint=str(where), epoch=epoch, differs=differs),
    }
