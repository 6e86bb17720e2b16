"""Fault injection for tests: a trainer started with `LUNATRAIN_FAULT` and this folder on PYTHONPATH (see
`sitecustomize.py` beside it) makes its job processes fail on purpose. Production code carries none of this.

`LUNATRAIN_FAULT=KIND` applies to every job, `LUNATRAIN_FAULT=KIND=NAME[,…]` only to jobs whose adapterName is
NAME. KIND is one of
  crash  the process aborts (SIGABRT) at the first progress event, like a native crash in a kernel;
  error  an exception is raised inside the training loop at the first progress event;
  nan    the loss turns NaN from the first step on (cross-entropy returns NaN);
  oom    an out-of-memory error is raised at the first progress event;
  crash_after_epoch  the process aborts at the first progress event after an epoch's checkpoint was saved,
         unless the job resumes (so that its resume trains on);
  rank_error  under torchrun, rank 1 alone raises inside the training loop (its second micro-batch), as a
         CUDA out-of-memory on one GPU does, while rank 0 goes on to the step's all-reduce;
  rank_refuses  under torchrun, rank 1 alone refuses the job in its memory plan (its GPU has less free).
"""

from __future__ import annotations

import os
import sys
from typing import Any

FAULT_ENV = "LUNATRAIN_FAULT"
FAULTS = ("crash", "error", "nan", "oom", "crash_after_epoch", "rank_error", "rank_refuses")


class InjectedFault(RuntimeError):
    pass


def fault_for(adapter_name: str, spec: str | None = None) -> str | None:
    """The fault injected for a job with `adapter_name` under `spec` (default: the environment)."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, name = item.partition("=")
        if kind in FAULTS and (not name or name == adapter_name):
            return kind
    return None


def _fire(fault: str) -> None:
    if fault in ("crash", "crash_after_epoch"):
        sys.stderr.flush()
        os.abort()
    if fault == "oom":
        raise MemoryError("injected out-of-memory fault")
    raise InjectedFault("injected training error")


def _inject_nan() -> None:
    # A NaN from the loss function itself, so the real loop sees a real non-finite loss.
    import torch.nn.functional as F

    real = F.cross_entropy

    def nan_cross_entropy(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **kwargs) * float("nan")

    F.cross_entropy = nan_cross_entropy


def _fail_rank(fault: str) -> None:
    from lunatrain import memplan, train
    from lunatrain.errors import CheckFailed

    if fault == "rank_refuses":

        def refuse(*_args: Any, **_kwargs: Any) -> Any:
            raise CheckFailed("This job needs about 20 GiB on cuda, but only 9 GiB is usable on this rank's GPU.")

        memplan.check_fits = refuse
        return
    real, calls = train.loss_sum, [0]

    def failing(run: Any, batch: Any) -> Any:
        if run.model.training:
            calls[0] += 1
            if calls[0] == 2:
                raise InjectedFault("injected out-of-memory on rank 1")
        return real(run, batch)

    train.loss_sum = failing


def install() -> None:
    """Wrap `lunatrain.flow.train_and_gate` (what a job's worker runs) to inject the configured fault."""
    from lunatrain import flow

    real = flow.train_and_gate

    def faulty(settings: Any, params: Any, options: Any, **kwargs: Any) -> Any:
        fault = fault_for(params.adapter_name)
        if fault == "crash_after_epoch" and params.resume:
            fault = None
        if fault in ("rank_error", "rank_refuses"):
            if os.environ.get("RANK") == "1":
                _fail_rank(fault)
        elif fault == "nan":
            _inject_nan()
        elif fault is not None:
            emit = kwargs.get("on_event") or (lambda _e: None)
            saved = [fault != "crash_after_epoch"]  # whether the fault may fire yet

            def on_event(event: dict[str, Any]) -> None:
                if event.get("type") == "progress" and saved[0]:
                    _fire(fault)
                if str(event.get("code", "")).startswith("log.epoch_done"):
                    saved[0] = True
                emit(event)

            kwargs["on_event"] = on_event
        return real(settings, params, options, **kwargs)

    flow.train_and_gate = faulty
