"""The child process that runs one LoRA job for the trainer service.

    python -m lunatrain.worker --job JOBID --params '{"epochs": 1, ...}'

The trainer starts one per job, in its own process group, with `ASSISTANT_HOME` set; it can also be run by
hand to debug a job. `python -m lunatrain.worker --device-info` prints the device facts as JSON (the trainer
asks a child for them, so that it never creates a CUDA context of its own). Protocol: one JSON object per line on the original stdout — the engine's events
(`progress`, `eval`, `log`), `{"type": "trained", "adapter", "metrics"}` as soon as an adapter is registered
(before the eval gate runs on it), then exactly one `{"type": "result", "status", "adapter", "metrics",
"error", "gate"}` as the last line. Everything else anything prints goes to stderr (the job's log file), so a stray
`print` in a library can never corrupt the stream. A child that ends without a result line has crashed.

Stopping: SIGTERM asks the engine to stop at the next step (result `cancelled`, nothing registered). When
the parent trainer dies, the next event write fails (broken pipe) and a watchdog notices the new parent, and
both stop the run the same way, so no orphan keeps training.

Fault injection (tests only): `LUNATRAIN_FAULT=KIND` applies to every job, `LUNATRAIN_FAULT=KIND=NAME[,…]`
only to jobs whose adapterName is NAME. KIND is one of
  crash  the process aborts (SIGABRT) at the first progress event, like a native crash in a kernel;
  error  an exception is raised inside the training loop at the first progress event;
  nan    the loss turns NaN from the first step on (cross-entropy returns NaN);
  oom    an out-of-memory error is raised at the first progress event.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from .jobs import finite

FAULT_ENV = "LUNATRAIN_FAULT"
FAULTS = ("crash", "error", "nan", "oom")


class InjectedFault(RuntimeError):
    pass


def fault_for(adapter_name: str, spec: str | None = None) -> str | None:
    """The fault injected for a job with `adapter_name` under `LUNATRAIN_FAULT` (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, name = item.partition("=")
        if kind in FAULTS and (not name or name == adapter_name):
            return kind
    return None


class Channel:
    """The event stream to the parent: the original stdout, one JSON line per event, flushed each time."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def send(self, event: dict[str, Any]) -> None:
        line = json.dumps(finite(event), ensure_ascii=False, default=str)
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.broken = True  # the trainer is gone: nobody will record anything we do from here


def _take_stdout() -> IO[str]:
    # Keep the real stdout for events only; fd 1 becomes stderr for everything else (C code included).
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def _watch_parent(stop: threading.Event, parent: int) -> None:
    def loop() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                print("worker: the trainer process is gone; stopping", file=sys.stderr, flush=True)
                stop.set()
                # If the engine never checks should_stop again (stuck in a long step), do not linger.
                time.sleep(30)
                os._exit(75)

    threading.Thread(target=loop, name="parent-watchdog", daemon=True).start()


def error_code(exc: BaseException) -> str:
    """Map an exception from the engine to a job error code."""
    if _is_oom(f"{type(exc).__name__}: {exc}"):
        return "out_of_memory"
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else "training_error"


def _is_oom(text: str) -> bool:
    return any(s in text for s in ("OutOfMemoryError", "MemoryError", "out of memory"))


def _normalize_error(error: dict[str, Any] | None) -> dict[str, str]:
    """The engine reports a crash inside its loop as code `error`; name the common cause when it is one."""
    error = error or {}
    code, message = str(error.get("code") or "error"), str(error.get("message") or "")
    if code == "error":
        code = "out_of_memory" if _is_oom(message) else "training_error"
    return {"code": code, "message": message or "training failed"}


def _inject_nan() -> None:
    # A NaN from the loss function itself, so the real loop sees a real non-finite loss.
    import torch
    import torch.nn.functional as F

    real = F.cross_entropy

    def nan_cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real(*args, **kwargs) * float("nan")

    F.cross_entropy = nan_cross_entropy  # type: ignore[assignment]
    torch.nn.functional.cross_entropy = nan_cross_entropy  # type: ignore[assignment]


def run(job_id: str, params_json: dict[str, Any], channel: Channel, stop: threading.Event,
        gate_thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the job and return the result event (never raises for a failure of the run itself)."""
    from .params import parse_params
    from .settings import load_settings

    settings = load_settings()
    params = parse_params(params_json)
    fault = fault_for(params.adapter_name)
    if fault == "nan":
        _inject_nan()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == "progress" and fault in ("crash", "error", "oom"):
            _fire(fault)
        channel.send(event)
        if channel.broken:
            stop.set()

    from .train import run_lora

    try:
        # The engine itself stops with `nan_loss` on a non-finite loss and with `cancelled` on should_stop.
        # Checked before every step: an orphan (its trainer killed) must not train on and publish a version
        # that the restarted trainer will produce again; the watchdog alone polls only once a second.
        parent = os.getppid()
        result = run_lora(params, settings, on_event=on_event, job_id=job_id,
                          should_stop=lambda: stop.is_set() or os.getppid() != parent)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes data in the result line
        traceback.print_exc(file=sys.stderr)
        return _failed(error_code(exc), getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
    out = _result_dict(result, settings.home)
    if out["status"] == "succeeded" and out.get("adapter"):
        # Registered now: tell the trainer before the gate, so a cancel or crash during the gate cannot
        # make a registered adapter look like a job that produced nothing.
        channel.send({"type": "trained", "adapter": out["adapter"], "metrics": out["metrics"]})
        if params.gate:
            out["gate"] = _gate(settings, out["adapter"], channel, gate_thresholds)
    return out


def _fire(fault: str) -> None:
    if fault == "crash":
        sys.stderr.flush()
        os.abort()
    if fault == "oom":
        raise MemoryError("injected out-of-memory fault")
    raise InjectedFault("injected training error")


def _gate(settings: Any, adapter: dict[str, Any], channel: Channel, thresholds: dict[str, Any] | None) -> dict[str, Any]:
    """Run the eval gate on the new version (promote on pass); its failure never undoes the adapter."""
    from .evalgate import gate_candidate

    channel.send({"type": "log", "message": f"eval gate for {adapter['name']}@{adapter['version']}"})
    try:
        report = gate_candidate(settings, adapter["name"], adapter["version"], promote=True, thresholds=thresholds)
    except Exception as exc:  # noqa: BLE001 - a broken gate leaves the adapter registered, inactive
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "passed": False, "reasons": [f"{type(exc).__name__}: {exc}"]}
    record = report.gate_record()
    channel.send({"type": "log", "message": f"eval gate {record['status']}"
                  + (f": {'; '.join(record['reasons'])}" if record.get("reasons") else "")})
    return finite(record)


def _result_dict(result: Any, home: Any) -> dict[str, Any]:
    """The engine's TrainResult as the result line."""
    status = getattr(result.status, "value", result.status)
    adapter = None
    if status == "succeeded" and result.version:
        path = Path(result.path)
        rel = path.relative_to(home) if path.is_relative_to(home) else path  # no machine layout in job JSON
        adapter = {"name": result.adapter_name, "version": result.version, "path": str(rel)}
    metrics = (result.report or {}).get("metrics") or {}
    error = None if status == "succeeded" else _normalize_error(result.error)
    return {"type": "result", "status": status, "adapter": adapter, "metrics": metrics, "error": error}


def _failed(code: str, message: str) -> dict[str, Any]:
    return {"type": "result", "status": "failed", "adapter": None, "metrics": {}, "error": {"code": code, "message": message}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lunatrain.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--job", help="job id (recorded with the adapter)")
    parser.add_argument("--params", help="LoRA parameters, JSON object (wire form)")
    parser.add_argument("--gate-thresholds", help="eval gate thresholds, JSON object (default: the defaults)")
    parser.add_argument("--device-info", action="store_true", help="print the device facts as JSON and exit")
    args = parser.parse_args(argv)
    if args.device_info:
        from .models import device_info

        print(json.dumps(finite(device_info())), flush=True)
        return 0
    if not args.job or not args.params:
        parser.error("--job and --params are required")
    channel = Channel(_take_stdout())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _watch_parent(stop, os.getppid())
    channel.send({"type": "log", "message": f"worker {os.getpid()} started for {args.job}"})
    try:
        thresholds = json.loads(args.gate_thresholds) if args.gate_thresholds else None
        result = run(args.job, json.loads(args.params), channel, stop, thresholds)
    except BaseException as exc:  # noqa: BLE001 - bad params or settings: still one result line
        traceback.print_exc(file=sys.stderr)
        result = _failed(error_code(exc), getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
    channel.send(result)
    return 0 if result["status"] == "succeeded" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with torch and tokenizer thread pools loaded it takes seconds, during
    # which the job would wait for nothing. Everything the job wrote is already closed (atomic writes).
    os._exit(code)
