"""The job runner: queued jobs one at a time, each in its own child process (`worker.py`) and process
group, the child's event lines turned into job state, and every ending (result, crash, cancel, shutdown,
storage error) recorded as exactly one terminal state. A job on several GPUs (ASSISTANT_LORA_GPUS, see
spawn.job_ranks) has torchrun as that child, with one worker per rank under it; rank 0's lines are the
job's, and a rank that dies fails the job naming it."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

from .. import procs
from ..distributed import clear_rank_errors, rank_errors
from ..errors import LunaError, StorageError
from ..fsio import identity
from ..settings import Settings
from ..wire import now_iso
from .jobs import TERMINAL, Job, JobStore, Progress, job_log_path, ranks_log_dir
from .recovery import published_adapter, recorded_gate, resumable, resume_hint, settle_interrupted, signal_group
from .spawn import child_env, code_signature, job_ranks, worker_argv
from .warm import Forked, WarmWorker

log = logging.getLogger("lunatrain.trainer")

# A trainer that stops tells its job so with SIGUSR1, a cancel with SIGTERM: the worker records the one as
# interrupted (to be resumed or submitted again), the other as cancelled. Not SIGHUP, which a trainer started
# under nohup hands its children ignored. torchrun's agent ends on SIGUSR1 and takes its ranks with it.
SHUTDOWN_SIGNAL = signal.SIGUSR1
# A trainer outdated by an update stops only once its last job ended this long ago: a dashboard polling every
# two seconds (and a CLI following the job) sees the job end before the trainer goes.
UPDATE_GRACE_S = 10.0
CANCEL_GRACE_S = 15.0  # SIGTERM -> SIGKILL: the engine stops at the next step, a step rarely takes longer
_MAX_LINE = 1 << 20  # an event line longer than this is a broken child, not an event


def storage_error(exc: BaseException) -> dict[str, Any]:
    """A job error for a storage fault: `disk_full` for ENOSPC/"database or disk is full", else `storage_error`;
    a StorageError (the job store's) keeps its own code and sentence."""
    if isinstance(exc, StorageError):  # with its values, as `train.failure` keeps them
        return {"code": exc.code, "message": exc.message, **({"params": exc.params} if exc.params else {})}
    text = f"{type(exc).__name__}: {exc}"
    full = getattr(exc, "errno", None) == errno.ENOSPC or "disk is full" in text or "No space left" in text
    if full:
        return {
            "code": "disk_full",
            "message": f"The disk of the data root is full ({exc}); free space and submit again.",
        }
    return {
        "code": "storage_error",
        "message": f"The data root's storage failed ({text}); check the disk and submit again.",
    }


class Runner:
    """Runs queued jobs one at a time, each in a child process, turning its event lines into job state."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        *,
        cancel_grace: float = CANCEL_GRACE_S,
        gpus: int = 0,
        warm: WarmWorker | None = None,
    ) -> None:
        self.settings = settings
        self.root = identity(settings.home)  # the folder it serves: one made again at its path is another
        self.code = code_signature()  # the lunatrain it runs; an update on disk makes it outdated (_updated)
        # Held while a job is admitted and while the runner decides to stop for an update: a job is either
        # queued before that decision (and runs here) or refused after it, never left queued behind.
        self.admission = threading.Lock()
        self.stopping_for_update = False
        self.idle_since = time.monotonic()  # when its last job ended (or it started)
        self.warm = warm  # forks single-process jobs while it lives (warm.py); None: every job starts fresh
        self.store = store
        self.cancel_grace = cancel_grace
        self.gpus = gpus  # visible CUDA devices (device probe): the default number of ranks per job
        self.logs_dir = settings.trainer_logs_dir
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _job_id/_proc between the runner thread and cancel requests
        self._job_id: str | None = None
        self._proc: Forked | subprocess.Popen[bytes] | None = None
        self._storage_problem: str | None = None
        self._backoff = 0.0
        # Jobs that ended on a storage error whose end could not be written either (the disk full for the job
        # database too): each is settled at the next round that can write, not left `running` until a restart.
        self._unsettled: dict[str, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Shutdown: stop the running child; its job is settled like an interrupted one (or resumed later)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._terminate(proc, SHUTDOWN_SIGNAL)
        self._thread.join(timeout=self.cancel_grace + 10)
        if self.warm is not None:
            self.warm.close()

    def cancel(self, job_id: str) -> Job:
        job = self.store.request_cancel(job_id)
        if job.status == "cancelling":
            self._signal_if_current(job_id)
        return job

    def _signal_if_current(self, job_id: str) -> None:
        with self._lock:
            proc = self._proc if self._job_id == job_id else None
        if proc is not None:
            self._terminate(proc)

    def _terminate(self, proc: Forked | subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Ask the job's process group to stop at its next step (SIGTERM: a cancel; SHUTDOWN_SIGNAL: this
        trainer is stopping, which the run records as interrupted), then SIGKILL after the grace."""
        signal_group(proc.pid, sig)

        def kill_late() -> None:
            if proc.poll() is None:
                log.warning(
                    "child %s ignored %s for %.0fs; killing its group",
                    proc.pid,
                    signal.Signals(sig).name,
                    self.cancel_grace,
                )
                signal_group(proc.pid, signal.SIGKILL)

        timer = threading.Timer(self.cancel_grace, kill_late)
        timer.daemon = True
        timer.start()

    @property
    def storage_problem(self) -> str | None:
        """The storage error that keeps the runner backing off, for /health; None when it works."""
        return self._storage_problem

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._settle_unsettled()
                job = self.store.next_queued()
            except (sqlite3.Error, OSError, StorageError) as exc:  # the jobs database is unusable: wait, never spin
                self._back_off(exc)
                continue
            if self._root_gone():
                # Deleted (e.g. a temp dir), or moved and made again at its path (`mv luna luna.old && mkdir
                # luna`): its job database went with it, and a job run now would record itself there while its
                # files land in the new folder. A queued job stays queued where it belongs; exit cleanly.
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if job is None and self._updated():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if job is None:
                self._wake.wait(timeout=2.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
                self.idle_since = time.monotonic()
                self._storage_problem, self._backoff = None, 0.0
            except (sqlite3.Error, OSError, StorageError) as exc:  # disk full, I/O error, a refused write
                log.error("storage error on job %s: %s", job.id, exc)
                self._unsettled[job.id] = storage_error(exc)
                with contextlib.suppress(Exception):
                    self._settle_unsettled()
                self._back_off(exc)
            except Exception:  # the service must outlive any one job, whatever went wrong
                log.exception("runner error on job %s", job.id)
                with contextlib.suppress(Exception):
                    self.store.set_status(
                        job.id,
                        "failed",
                        error={"code": "trainer_error", "message": "Internal trainer error; see trainer.log."},
                    )

    def _settle_unsettled(self) -> None:
        """End each job whose storage error could not be recorded: `succeeded` when its adapter was registered,
        else `failed` with that error (`cancelled` when a cancel came meanwhile); its process is gone. Raises the
        storage error while the store still refuses."""
        for job_id, error in list(self._unsettled.items()):
            job = self.store.get(job_id)
            status = job.status
            if status not in TERMINAL and published_adapter(self.settings, self.store, job) is not None:
                # registered before the storage error: it succeeded (as a restarted trainer's recovery says);
                # "train again" would make a second version of the same run
                stopped = "the storage error that stopped its job"
                settle_interrupted(self.settings, self.store, job_id, cancel_requested=False, stopped=stopped)
            elif status == "cancelling":
                self.store.set_status(job_id, "cancelled", message="cancelled (its run had stopped on a storage error)")
            elif status not in TERMINAL:
                self.store.set_status(job_id, "failed", error=error)
            del self._unsettled[job_id]

    def _root_gone(self) -> bool:
        home = self.settings.home
        if not home.is_dir():
            log.error("data root %s is gone; shutting down", home)
            return True
        if self.root is not None and identity(home) != self.root:
            log.error("data root %s was moved or replaced; shutting down", home)
            return True
        return False

    @property
    def code_changed(self) -> bool:
        """lunatrain's code on disk is no longer the code this trainer runs (for /health)."""
        return code_signature() != self.code

    def _updated(self) -> bool:
        """Whether to stop because lunatrain was updated since this trainer started: its jobs would train
        with the code it imported then (its warm worker's too), whatever the user installed since. Only
        when idle: jobs queued before run here first. The next command that needs a trainer starts the
        updated one (ensure.py waits for this one to go)."""
        if time.monotonic() - self.idle_since < UPDATE_GRACE_S or not self.code_changed:
            return False
        with self.admission:
            if self.store.next_queued() is not None:
                return False  # admitted just now: it runs first
            self.stopping_for_update = True
        log.warning(
            "lunatrain's code changed on disk since this trainer started (an update); stopping, so that the "
            "next command starts the trainer with the updated code"
        )
        return True

    def _back_off(self, exc: BaseException) -> None:
        """Wait before the next try after a storage error (1 s doubling to 60 s): a full disk must leave the
        trainer idle and healthy, never looping hot on the same failing job."""
        self._storage_problem = storage_error(exc)["message"]
        self._backoff = min(60.0, max(1.0, self._backoff * 2))
        log.warning("storage problem, retrying in %.0fs: %s", self._backoff, self._storage_problem)
        self._wake.wait(timeout=self._backoff)
        self._wake.clear()

    def _run(self, job: Job) -> None:
        if not self.store.claim(job.id):
            return  # cancelled between listing and claiming
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = job_log_path(self.logs_dir, job.id)
        args = ["--job", job.id, "--params", json.dumps(job.params), "--options", json.dumps(job.options.wire())]
        if job.gate_thresholds is not None:
            args += ["--gate-thresholds", json.dumps(job.gate_thresholds)]
        try:
            ranks = job_ranks(self.settings, job.params.get("device"), self.gpus)
        except LunaError as err:  # queued before a restart with another ASSISTANT_LORA_GPUS
            self.store.set_status(job.id, "failed", error={"code": err.code, "message": err.message})
            return
        argv = worker_argv(*args, ranks=ranks, log_dir=ranks_log_dir(self.logs_dir, job.id))
        clear_rank_errors(ranks_log_dir(self.logs_dir, job.id))
        try:
            with open(log_path, "ab") as log_file:
                # A single-process job forks from the warm worker when it can (milliseconds instead of a
                # fresh interpreter's imports); else, and for torchrun, a fresh process. So does a quantized
                # job: the warm worker has PEFT loaded without bitsandbytes (warm._preload).
                warm = self.warm if ranks == 1 and job.params.get("quantize", "none") == "none" else None
                proc: Forked | subprocess.Popen[bytes] | None = warm.spawn(args, log_file) if warm is not None else None
                how = "forked from the warm worker" if proc is not None else " ".join(argv[: len(argv) - len(args) + 2])
                if proc is None and self._stopping.is_set():
                    # Shutting down while the warm worker was asked: leave the claimed job to recovery.
                    log.info("job %s not started: the trainer is stopping", job.id)
                    return
                if proc is None:
                    env = child_env(self.settings)
                    if ranks > 1:  # torchrun's own default, said instead of a banner atop every job's log
                        env.setdefault("OMP_NUM_THREADS", "1")
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        env=env,
                        cwd=self.settings.home,
                        start_new_session=True,
                    )
            log.info("job %s running on %d process(es): %s", job.id, ranks, how)
            with self._lock:
                self._proc, self._job_id = proc, job.id
            if self._stopping.is_set():  # stop() ran while the process was starting: it saw no _proc
                self._terminate(proc, SHUTDOWN_SIGNAL)
        except OSError as exc:
            self.store.set_status(job.id, "failed", error={"code": "child_start_failed", "message": str(exc)})
            return
        try:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.store.set_fields(job.id, pid=proc.pid, pid_started=procs.started(proc.pid))
            if self.store.get(job.id).status == "cancelling":  # cancel arrived before the child existed
                self._terminate(proc)
            assert proc.stdout is not None
            result, trained = self._pump(job.id, proc.stdout)
            code = proc.wait()
        finally:
            signal_group(proc.pid, signal.SIGKILL)  # anything the child started and left behind
            with self._lock:
                self._proc, self._job_id = None, None
        self._finish(job.id, result, trained, code, log_path, ranks)

    def _pump(self, job_id: str, stdout: IO[bytes]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Record the child's event lines until it closes stdout; return its result and trained lines."""
        result = trained = None
        progress = Progress()
        while raw := stdout.readline(_MAX_LINE):
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                self.store.add_event(job_id, "log", {"message": raw.decode("utf-8", "replace").strip()[:2000]})
                continue
            kind = str(event.pop("type", "log"))[:32]
            if kind == "result":
                result = event
                continue
            if kind == "trained":
                trained = event
            snapshot = metrics = None
            if kind == "progress":
                with contextlib.suppress(ValueError):
                    snapshot = progress = Progress.model_validate(progress.wire() | event)
            elif kind == "eval":
                metrics = {k: v for k, v in event.items() if isinstance(v, int | float) and k != "step"}
            self.store.add_event(job_id, kind, event, progress=snapshot, metrics=metrics)
        return result, trained

    def _finish(
        self,
        job_id: str,
        result: dict[str, Any] | None,
        trained: dict[str, Any] | None,
        code: int,
        log_path: Path,
        ranks: int = 1,
    ) -> None:
        cancel_requested = self.store.get(job_id).status == "cancelling"
        status = (result or {}).get("status")
        metrics = (result or {}).get("metrics") or {}
        if status != "succeeded" and trained is None:
            # A child killed after registering its adapter but before its `trained` line reached us: the
            # registry entry carrying this job id is the fact, so the job succeeded with that version (a
            # "failed, submit it again" would make a second version of what exists).
            registered = published_adapter(self.settings, self.store, self.store.get(job_id))
            trained = {"adapter": registered} if registered is not None else None
        if status == "succeeded" or trained is not None:
            # An adapter was registered: that stands, even if a cancel or a crash hit the eval gate after it.
            # Without a result, a gate that recorded its outcome on the version before the child died is what
            # happened (it may have promoted the version); else the gate was interrupted.
            gate = (result or {}).get("gate") if status == "succeeded" else recorded_gate(self.settings, job_id)
            job = self.store.set_status(
                job_id,
                "succeeded",
                adapter=_adapter(result if status == "succeeded" else trained, self.settings),
                metrics=metrics or (trained or {}).get("metrics") or {},
                gate=gate,
            )
        elif cancel_requested:
            job = self.store.set_status(job_id, "cancelled", metrics=metrics or None, message="cancelled")
        elif self._stopping.is_set():
            job = settle_interrupted(self.settings, self.store, job_id, cancel_requested=False)
        elif ranks > 1 and code != 0:
            # Every rank exits 0 after an orderly ending (worker.py), so torchrun failing means a rank died;
            # rank 0's own result then only reports losing its peer, the dead rank is the cause.
            ranks_dir = ranks_log_dir(self.logs_dir, job_id)
            error = _rank_crash_error(code, ranks, log_path, self.settings.shown(log_path), rank_errors(ranks_dir))
            _say_last(log_path, error["message"])
            job = self.store.set_status(job_id, "failed", error=self._resumable(job_id, error))
        elif status == "failed" and (result or {}).get("error"):
            err = result["error"]  # type: ignore[index]
            params = err["params"] if isinstance(err.get("params"), dict) else None
            if err.get("code") == "interrupted" and resumable(self.settings, self.store, self.store.get(job_id)):
                # its sentence says how to resume; the dashboard says it in its language from this
                params = (params or {}) | {"resumeJob": job_id}
            job = self.store.set_status(
                job_id,
                "failed",
                metrics=metrics or None,
                error={
                    "code": str(err.get("code") or "training_error"),
                    "message": str(err.get("message") or ""),
                    **({"params": params} if params is not None else {}),
                },
            )
        elif status == "cancelled":
            # The child stopped on its own (it lost contact with us): the run was cut short.
            error = {"code": "interrupted", "message": "The training process stopped early."}
            job = self.store.set_status(job_id, "failed", error=self._resumable(job_id, error))
        else:
            error = _crash_error(code, log_path, self.settings.shown(log_path))
            _say_last(log_path, error["message"])
            job = self.store.set_status(job_id, "failed", error=self._resumable(job_id, error))
        log.info("job %s %s", job_id, job.status + (f" ({job.error.code})" if job.error else ""))
        # a job that did not succeed keeps the checkpoint its error may have just offered to resume from
        self._collect(None if job.status == "succeeded" else job.params.get("adapterName"))

    def _resumable(self, job_id: str, error: dict[str, Any]) -> dict[str, Any]:
        """A crash's error, and how to resume the job when it saved a checkpoint first (a crash an epoch in
        need not cost that epoch); `resumeJob` in its params lets the dashboard say so in its language."""
        if not resumable(self.settings, self.store, self.store.get(job_id)):
            return error
        hint = resume_hint(job_id)
        params = error.get("params") or {}
        return error | {
            "message": f"{error['message']} {hint[0].upper()}{hint[1:]}.",
            "params": params | {"resumeJob": job_id},
        }

    def _collect(self, resumable: str | None = None) -> None:
        from ..retention import after_run

        after_run(self.settings, log, resumable=resumable)


def _adapter(result: dict[str, Any] | None, settings: Settings) -> dict[str, Any] | None:
    adapter = (result or {}).get("adapter")
    if not isinstance(adapter, dict):
        return None
    path = settings.shown(Path(str(adapter.get("path", ""))))
    ref = {"name": str(adapter.get("name")), "version": str(adapter.get("version")), "path": str(path)}
    # The overwrite slot's run: without it a reader takes the slot's kept revision for this run's (a refused
    # run would be described with the metrics and gate of the revision it did not replace).
    revision = adapter.get("revision")
    return ref | ({"revision": revision} if isinstance(revision, int) and not isinstance(revision, bool) else {})


def _say_last(log_path: Path, message: str) -> None:
    """End a job's log with how its process ended, where nothing in it says so (killed, out of memory): the
    job's error sends the reader to this log. (Read for the error first: its last line is the child's.)"""
    with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"{now_iso()} {message}\n")


def _crash_error(code: int, log_path: Path, shown: Path) -> dict[str, Any]:
    """A crashed child (no result line): name the signal or exit status and quote the log's last line. The
    params say the same for the dashboard, in its language (`detail`: which of the ways it ended)."""
    last = _last_line(log_path)
    return {
        "code": "child_crashed",
        "message": f"The training process {_how(code)}"
        + (f"; last log line: {last!r}" if last else "")
        + f"; see {shown}.",
        "params": _ended("crash", code, log=str(shown)) | ({"lastLine": last} if last else {}),
    }


def _how(code: int) -> str:
    """How a process ended, from its exit status (negative: the signal that killed it)."""
    if code < 0:
        how = f"was killed by {_signal_name(code)}"
        if -code == signal.SIGKILL:
            how += " (often the system's out-of-memory killer)"
        return how
    return f"exited with status {code} without a result"


def _signal_name(code: int) -> str:
    return signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)


def _ended(prefix: str, code: int, **params: Any) -> dict[str, Any]:
    """`_how` as message params: the sub-code `detail` (PREFIX.oom, PREFIX.signal or PREFIX.status) and the
    signal's name or the exit status."""
    if code < 0 and -code == signal.SIGKILL:
        return {"detail": f"{prefix}.oom", **params}
    if code < 0:
        return {"detail": f"{prefix}.signal", "signal": _signal_name(code), **params}
    return {"detail": f"{prefix}.status", "status": code, **params}


# torchrun's report of the first rank that failed ("Root Cause (first observed failure)"), in the job log
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL)
_RANK_STATUS = re.compile(r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE | re.DOTALL)


def _rank_crash_error(
    code: int,
    ranks: int,
    log_path: Path,
    shown: Path,
    recorded: dict[int, tuple[float, dict[str, Any], bool]] | None = None,
) -> dict[str, Any]:
    """A data-parallel job whose torchrun failed: the error of the rank that failed first on its own, as it
    recorded it (`distributed.write_rank_error`; a rank that only lost its connection to it recorded that
    too, marked, and torchrun lists the ranks it stopped afterwards as failed as well). Without one, the rank
    that died without a record (a signal, a native crash) and how, as torchrun reported it in the job log;
    else torchrun's own exit status."""
    tail = _tail(log_path, 16384)  # the last report: a resumed job appends to its log
    recorded = recorded or {}
    own = {rank: record for rank, record in recorded.items() if not record[2]}

    def first(records: dict[int, tuple[float, dict[str, Any], bool]]) -> dict[str, Any]:
        rank, (_, error, _) = min(records.items(), key=lambda item: item[1][0])
        return error | {"message": f"Rank {rank} of the {ranks} training processes failed: {error.get('message', '')}"}

    if own:
        errors = [error for _, error, _ in own.values()]
        if len(own) == ranks and all(e == errors[0] for e in errors):  # every rank alike (bad data, a plan
            return errors[0]  # every GPU refuses): the job's error as it is
        return first(own)
    report = tail.rpartition("FAILED")[2] or tail
    statuses = {int(rank): int(status) for rank, status in _RANK_STATUS.findall(report)}
    root = _ROOT_CAUSE.findall(report)
    unrecorded = [rank for rank in statuses if rank not in recorded]  # died: the others lost it
    if len(recorded) == ranks and not unrecorded:  # every rank says it lost a peer: say the first
        return first(recorded)
    if unrecorded:
        rank = int(root[-1][0]) if root and int(root[-1][0]) in unrecorded else min(unrecorded)
        found: tuple[int, int] | None = (rank, statuses[rank])
    else:
        found = (int(root[-1][0]), int(root[-1][1])) if root else None
    if found:
        rank, status = found
        what = f"rank {rank} of the {ranks} training processes {_how(status)}; the other ranks were stopped"
        params = _ended("crash.rank", status, rank=rank, ranks=ranks, log=str(shown))
    else:
        what = f"the torchrun launcher of the {ranks} training processes {_how(code)}"
        params = _ended("crash.launcher", code, ranks=ranks, log=str(shown))
    return {"code": "child_crashed", "message": f"{what[0].upper()}{what[1:]}; see {shown}.", "params": params}


def _tail(path: Path, size: int) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - size))
        return fh.read().decode("utf-8", "replace")
    return ""


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in _tail(path, 8192).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
