"""The child process that runs one LoRA job for the trainer service (internal protocol, started by runner.py).

    python -m lunatrain.service.worker --job JOBID --params '{"epochs": 1, ...}' [--options '{"gate": true}']

It runs `flow.train_and_gate` in its own process group, with `ASSISTANT_HOME` set. `--warm FD` makes it the
trainer's warm worker instead (warm.py: it measures the device, so that the trainer never creates a CUDA
context of its own, and on CPU machines forks jobs that run this same `main`).

Protocol: one JSON object per line on the original stdout — the engine's events (`progress`, `eval`,
`log`), `{"type": "trained", "adapter", "metrics"}` as soon as an adapter is registered (before the eval
gate runs on it), then exactly one `{"type": "result", "status", "adapter", "metrics", "error", "gate"}` as
the last line. Everything else anything prints goes to stderr (the job's log file), so a stray `print` in a
library can never corrupt the stream. A child that ends without a result line has crashed.

Under torchrun (the trainer starts N > 1 ranks, see spawn.worker_argv) every rank runs this same module;
only rank 0 speaks the protocol on stdout, the other ranks' stdout goes to stderr (the job log) and their
events are dropped: they train in lockstep with rank 0, which reports for all. A rank's exit status says
only whether it ended in order (0, its outcome is in rank 0's result line) or crashed, so torchrun's own
exit status tells the trainer whether some rank died.

Stopping: SIGTERM asks the engine to stop at the next step (result `cancelled`, nothing registered). When
the parent trainer dies, the next event write fails (broken pipe) and a watchdog notices the new parent;
both stop the run the same way, so no orphan keeps training, and an orphan whose adapter was already
registered does not run the gate (the restarted trainer records the job from the registry, and the gate as
interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import IO, Any

from .. import distributed
from ..compat import without_bitsandbytes
from ..errors import LunaError, is_out_of_memory
from ..messages import coded
from ..startup import import_training_stack
from ..wire import finite, now_iso

_LABEL = [""]  # "[rank N] " in a rank other than 0 under torchrun: its lines in the job's log are told apart


def say(text: str) -> None:
    """One line into the job's log (stderr), stamped as every record is and labelled with this rank."""
    print(f"{now_iso()} {_LABEL[0]}{text}", file=sys.stderr, flush=True)


class Channel:
    """The event stream to the parent: the original stdout, one JSON line per event, flushed each time.
    Without a stream (a rank other than 0) events go nowhere."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def send(self, event: dict[str, Any]) -> None:
        if self._stream is None:  # another rank: rank 0 says each step for all (they train in lockstep)
            return
        if event.get("type") == "log" and event.get("message"):
            # The job's log file (stderr) gets the log events too: it is what a crash message quotes the last
            # line of, and without them it held only the start line, as if the job had died starting. Stamped
            # as every record is, so the log read afterwards says when each step happened.
            say(event["message"])
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


def _silence_stdout() -> None:
    # A rank other than 0: it inherited the event pipe as fd 1; nothing of it may reach the trainer.
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def die_with_parent() -> None:
    """A rank's parent is torchrun's agent, which starts each rank in a session of its own, out of reach of
    a signal to the job's process group. SIGTERM to the group reaches the agent, which passes it on to the
    ranks (they stop like one worker on cancel). SIGKILL to the group (a cancel past its grace, recovery
    after a trainer restart) kills only the agent: the kernel then kills this rank too, as it would the one
    worker of a single-process job. Linux only; elsewhere the parent watchdog stops an orphaned rank."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# What this process's parent going means, for the sentence that says why the run stopped: the trainer is
# gone; or, for a job the trainer's warm worker forked (warm.py sets it), that worker, which nothing but a kill
# ends while a job runs: the trainer itself may well run on.
PARENT_GONE = ["the trainer process is gone"]
WARM_PARENT_GONE = (
    "the trainer's warm worker, this job's parent process, is gone (killed with the trainer, or alone: then often "
    "by the system's out-of-memory killer)"
)


def _watch_parent(stop: threading.Event, parent: int) -> None:
    def loop() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                say(f"worker: {PARENT_GONE[0]}; stopping")
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
    """A job error's "Type: message" that says the device ran out of memory (errors.is_out_of_memory)."""
    kind, _, message = text.partition(": ")
    return is_out_of_memory(kind, message)


def _normalize_error(error: dict[str, Any] | None) -> dict[str, str]:
    """The engine reports a crash inside its loop as code `error`; name the common cause when it is one."""
    error = error or {}
    code, message = str(error.get("code") or "error"), str(error.get("message") or "")
    if code == "error":
        code = "out_of_memory" if _is_oom(message) else "training_error"
    params = error.get("params") if code == error.get("code") else None
    return {"code": code, "message": message or "training failed", **({"params": params} if params else {})}


def run(
    job_id: str,
    params_json: dict[str, Any],
    options_json: dict[str, Any],
    channel: Channel,
    stop: threading.Event,
    gate_thresholds: dict[str, Any] | None = None,
    shutdown: threading.Event | None = None,
) -> dict[str, Any]:
    """Run the job and return the result event (never raises for a failure of the run itself; bad settings
    or parameters raise, before anything heavy is imported)."""
    from ..params import FlowOptions, parse_params
    from ..settings import load_settings

    settings = load_settings()
    params, options = parse_params(params_json), FlowOptions.model_validate(options_json)
    # the job's log starts with what it runs: every parameter as resolved, the flow's options
    if distributed.from_env().main:  # every rank runs the same ones
        say(f"parameters: {json.dumps(params.wire() | {'options': options.wire()}, sort_keys=True, default=str)}")
    # Checked first: a job with bad parameters fails in a fraction of a second, not after the 4-second import.
    if params.quantize == "none":
        without_bitsandbytes()  # only a quantized job needs it (compat.without_bitsandbytes says why)
    import_training_stack()  # a fresh process: at its least cost (startup.py); forked: loaded already
    from ..flow import train_and_gate

    parent = os.getppid()
    main = distributed.from_env().main  # under torchrun only rank 0 gates (and promotes) the new version

    def on_event(event: dict[str, Any]) -> None:
        channel.send(event)
        if channel.broken:
            stop.set()

    def orphaned() -> bool | str:
        # Checked before every step: an orphan (its trainer killed) must not train on and publish a version
        # that the restarted trainer will produce again; the watchdog alone polls only once a second. Why it
        # stops is said (train.py: a sentence is no cancel): the restarted trainer settles the job interrupted.
        if os.getppid() != parent or channel.broken:
            return PARENT_GONE[0]
        if shutdown is not None and shutdown.is_set():
            return "the trainer is stopping"
        return stop.is_set()

    def on_trained(outcome: dict[str, Any]) -> None:
        # Registered now: tell the trainer before the gate, so a cancel or crash during the gate cannot
        # make a registered adapter look like a job that produced nothing.
        channel.send({"type": "trained", "adapter": outcome["adapter"], "metrics": outcome["metrics"]})

    try:
        outcome = train_and_gate(
            settings,
            params,
            options,
            thresholds=gate_thresholds,
            on_event=on_event,
            should_stop=orphaned,
            job_id=job_id,
            on_trained=on_trained,
            may_gate=lambda: main and not (channel.broken or orphaned()),
        )
    except BaseException as exc:  # every failure becomes data in the result line
        if isinstance(exc, distributed.RankFailed):  # under torchrun this rank leaves the group (main)
            raise
        log_failure(exc)
        return _failed_by(exc)
    return _result_dict(outcome)


def log_failure(exc: BaseException) -> None:
    """Into the job's log: a failure the run states (LunaError: no export, bad data, a damaged base) as one
    line with its code; anything else with its traceback, which is what a bug report needs."""
    if isinstance(exc, distributed.RankFailed) and exc.__cause__ is not None:
        exc = exc.__cause__  # what ended the rank
    if isinstance(exc, LunaError):
        say(f"error {exc.code}: {exc.message}")
    else:  # a bug (also one that ended a rank): its traceback
        lines = "".join(traceback.format_exception(exc)).splitlines()
        print("\n".join(_LABEL[0] + line for line in lines), file=sys.stderr, flush=True)


def _result_dict(outcome: dict[str, Any]) -> dict[str, Any]:
    """The flow's outcome as the result line."""
    error = None if outcome["status"] == "succeeded" else _normalize_error(outcome.get("error"))
    return {
        "type": "result",
        "status": outcome["status"],
        "adapter": outcome.get("adapter"),
        "metrics": outcome.get("metrics") or {},
        "error": error,
        "gate": finite(outcome.get("gate")),
    }


def _failed(code: str, message: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "result",
        "status": "failed",
        "adapter": None,
        "metrics": {},
        "error": {"code": code, "message": message, **({"params": params} if params else {})},
    }


def _failed_by(exc: BaseException) -> dict[str, Any]:
    """The result line of a run that raised: its code, sentence and (for its own code) the values it names."""
    code = error_code(exc)
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    params = getattr(exc, "params", None) if code == getattr(exc, "code", None) else None
    return _failed(code, message, params if isinstance(params, dict) else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lunatrain.service.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--job", help="job id (recorded with the adapter)")
    parser.add_argument("--params", help="LoRA parameters, JSON object (wire form)")
    parser.add_argument("--options", default="{}", help="flow options, JSON object (gate, minCurated)")
    parser.add_argument("--gate-thresholds", help="eval gate thresholds, JSON object (default: the defaults)")
    parser.add_argument("--warm", type=int, metavar="FD", help="serve as the warm worker on this socket (warm.py)")
    parser.add_argument("--no-forks", action="store_true", help="with --warm: report the device facts, then exit")
    args = parser.parse_args(argv)
    if args.warm is not None:
        from .warm import serve

        return serve(args.warm, forks=not args.no_forks)
    if not args.job or not args.params:
        parser.error("--job and --params are required")
    world = distributed.from_env()
    if world.main:
        channel = Channel(_take_stdout())  # rank 0 (or the only process) speaks for the job
    else:
        _silence_stdout()
        channel = Channel(None)
        _LABEL[0] = f"[rank {world.rank}] "
    stop, shutdown = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a cancel

    def trainer_stopping(*_: object) -> None:  # runner.SHUTDOWN_SIGNAL: not a cancel, the run is interrupted
        shutdown.set()
        stop.set()

    signal.signal(signal.SIGUSR1, trainer_stopping)
    parent = os.getppid()
    if world.active:
        die_with_parent()
        if os.getppid() != parent:  # the agent died before the line above took effect
            stop.set()
    _watch_parent(stop, parent)
    rank = f" (rank {world.rank} of {world.size})" if world.active else ""
    started = (
        coded("log.rank_started", pid=os.getpid(), rank=world.rank, size=world.size)
        if world.active
        else coded("log.worker_started", pid=os.getpid())
    )
    channel.send({"type": "log", "message": f"worker {os.getpid()} started for {args.job}{rank}", **started})
    if not world.main:  # said by each rank itself: which processes ran the job
        say(f"worker {os.getpid()} started for {args.job}{rank}")
    left: distributed.RankFailed | None = None  # this rank's run failed on its own: it leaves the group
    try:
        thresholds = json.loads(args.gate_thresholds) if args.gate_thresholds else None
        result = run(args.job, json.loads(args.params), json.loads(args.options), channel, stop, thresholds, shutdown)
    except BaseException as exc:  # bad params or settings, a rank's own failure: still one result line
        log_failure(exc)
        result = _failed_by(exc)
        left = exc if isinstance(exc, distributed.RankFailed) else None
    channel.send(result)
    if world.active:
        # Under torchrun a run that ended in order is 0 on every rank whatever the outcome (rank 0's result
        # line carries it). A rank whose run failed on its own leaves with its error recorded: the others may
        # be waiting for it in a collective, and torchrun stops them (distributed.py).
        if left is not None:
            error = _normalize_error(result.get("error"))
            distributed.write_rank_error(world, error, left.at, lost_peer=left.lost_peer)
            return 1
        return 0
    return 0 if result["status"] == "succeeded" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with torch and tokenizer thread pools loaded it takes seconds, during
    # which the job would wait for nothing. Everything the job wrote is already closed (atomic writes).
    os._exit(code)
