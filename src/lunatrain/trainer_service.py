"""The trainer service: health, a FIFO job queue (one running job per device), one child process per job.

    lunatrain trainer [--host 127.0.0.1] [--port 5051]       (or: python -m lunatrain.trainer_service)

Endpoints: `GET /health`, `POST /jobs`, `GET /jobs`, `GET /jobs/{id}`, `GET /jobs/{id}/events?after=N`,
`POST /jobs/{id}/cancel` (see `jobs.py` for the shapes). Jobs and events persist in `data/trainer/jobs.db`;
each job's child (`python -m lunatrain.worker`) logs to `data/trainer/logs/<job>.log`. The child runs in its
own process group so that cancel and recovery can end it together with anything it started.

Restart recovery: a job found `running` when the trainer starts lost its trainer; its child (if still alive
and really the same process) is stopped, and the job ends `failed` with code `interrupted`, or goes back to
`queued` when its params say `resume: true` (the engine then continues from its last complete checkpoint).
One trainer per data root: a second one on the same root exits at once with a clear message.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Annotated, Any

import psutil
from fastapi import FastAPI, Path as PathParam, Query, Response
from pydantic import Field

from . import __version__
from .errors import Conflict, LunaError, UsageError
from .evalgate import GateThresholds
from .jobs import REQUEST_ID_PATTERN, EventPage, Health, Job, JobList, JobStore, Progress, Status, jobs_db_path
from .params import LoraParams
from .settings import Settings, load_settings

log = logging.getLogger("lunatrain.trainer")

CANCEL_GRACE_S = 15.0  # SIGTERM -> SIGKILL: the engine stops at the next step, a step rarely takes longer
_MAX_LINE = 1 << 20  # an event line longer than this is a broken child, not an event
_MAX_BODY = 256 * 1024  # a job body is a few hundred bytes
JobId = Annotated[str, PathParam(min_length=1, max_length=64)]


class JobCreate(LoraParams):
    """`POST /jobs` body: the LoRA parameters (wire form), an optional idempotency key and the eval gate's
    thresholds for this job (a profile's [gate]; omitted: the defaults)."""

    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN, description="retry key")
    gate_thresholds: GateThresholds | None = Field(default=None, description="eval gate thresholds")

    def params(self) -> LoraParams:
        return LoraParams.model_validate(self.model_dump(exclude={"request_id", "gate_thresholds"}))

    def thresholds(self) -> dict[str, Any] | None:
        return self.gate_thresholds.model_dump(by_alias=True) if self.gate_thresholds is not None else None


# --- process groups ------------------------------------------------------------------------------
def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid`; False when the group is already gone."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_orphan(pid: int, started: float | None, grace: float = 5.0) -> bool:
    """Stop a child left behind by a previous trainer, if `pid` is still that very process.

    The create time guards against a pid that was reused by an unrelated process since.
    """
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 0.5:
            return False
    except psutil.NoSuchProcess:
        signal_group(pid, signal.SIGKILL)  # the leader is gone; stragglers of its group may not be
        return False
    signal_group(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([proc], timeout=grace)
    if alive:
        signal_group(pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace)
    return True


def recover(store: JobStore) -> None:
    """Settle jobs that a previous trainer left active (see the module docstring)."""
    for job in store.with_status("running", "cancelling"):
        pid, started = store.child(job.id)
        if pid and stop_orphan(pid, started):
            log.warning("stopped orphaned child %s of job %s", pid, job.id)
        _settle_interrupted(store, job.id, cancel_requested=job.status == "cancelling")
    for job in store.with_status("validating"):  # validated params were stored; only the queueing was lost
        store.set_status(job.id, "queued")


def _settle_interrupted(store: JobStore, job_id: str, *, cancel_requested: bool) -> Job:
    job = store.get(job_id)
    if cancel_requested:
        return store.set_status(job_id, "cancelled", message="cancelled (the trainer stopped meanwhile)")
    if job.lora_params().resume:
        return store.set_status(
            job_id, "queued", message="requeued after the trainer stopped; resuming from the last checkpoint",
            pid=None, pid_started=None,
        )
    return store.set_status(
        job_id,
        "failed",
        error={
            "code": "interrupted",
            "message": "The trainer stopped while this job was running; submit it again "
            "(with resume=true it continues from its last checkpoint).",
        },
    )


# --- the runner ----------------------------------------------------------------------------------
class Runner:
    """Runs queued jobs one at a time, each in a child process, turning its event lines into job state."""

    def __init__(self, settings: Settings, store: JobStore, *, cancel_grace: float = CANCEL_GRACE_S) -> None:
        self.settings = settings
        self.store = store
        self.cancel_grace = cancel_grace
        self.logs_dir = settings.data_dir / "trainer" / "logs"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _job_id/_proc between the runner thread and cancel requests
        self._job_id: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
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
            self._terminate(proc)
        self._thread.join(timeout=self.cancel_grace + 10)

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

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        signal_group(proc.pid, signal.SIGTERM)

        def kill_late() -> None:
            if proc.poll() is None:
                log.warning("child %s ignored SIGTERM for %.0fs; killing its group", proc.pid, self.cancel_grace)
                signal_group(proc.pid, signal.SIGKILL)

        timer = threading.Timer(self.cancel_grace, kill_late)
        timer.daemon = True
        timer.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job = self.store.next_queued()
            if job is None:
                if not self.settings.home.is_dir():
                    # Data root deleted under us (e.g. a temp dir): nothing left to serve; exit cleanly.
                    log.error("data root %s is gone; shutting down", self.settings.home)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                self._wake.wait(timeout=2.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:  # the service must outlive any one job, whatever went wrong
                log.exception("runner error on job %s", job.id)
                with contextlib.suppress(Exception):
                    self.store.set_status(
                        job.id, "failed", error={"code": "trainer_error", "message": "Internal trainer error; see trainer.log."}
                    )

    def _run(self, job: Job) -> None:
        if not self.store.claim(job.id):
            return  # cancelled between listing and claiming
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{job.id}.log"
        argv = [sys.executable, "-m", "lunatrain.worker", "--job", job.id, "--params", json.dumps(job.params)]
        if job.gate_thresholds is not None:
            argv += ["--gate-thresholds", json.dumps(job.gate_thresholds)]
        log.info("job %s running: %s", job.id, " ".join(argv[:5]))
        try:
            with open(log_path, "ab") as log_file, self._lock:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
                    env=child_env(self.settings), cwd=self.settings.home, start_new_session=True,
                )
                self._job_id = job.id
                proc = self._proc
        except OSError as exc:
            self.store.set_status(job.id, "failed", error={"code": "child_start_failed", "message": str(exc)})
            return
        try:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.store.set_fields(job.id, pid=proc.pid, pid_started=psutil.Process(proc.pid).create_time())
            if self.store.get(job.id).status == "cancelling":  # cancel arrived before the child existed
                self._terminate(proc)
            assert proc.stdout is not None
            result, trained = self._pump(job.id, proc.stdout)
            code = proc.wait()
        finally:
            signal_group(proc.pid, signal.SIGKILL)  # anything the child started and left behind
            with self._lock:
                self._proc, self._job_id = None, None
        self._finish(job.id, result, trained, code, log_path)

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
        self, job_id: str, result: dict[str, Any] | None, trained: dict[str, Any] | None, code: int, log_path: Path
    ) -> None:
        cancel_requested = self.store.get(job_id).status == "cancelling"
        status = (result or {}).get("status")
        metrics = (result or {}).get("metrics") or {}
        if status == "succeeded" or trained is not None:
            # An adapter was registered: that stands, even if a cancel or a crash hit the eval gate after it.
            gate = (result or {}).get("gate")
            if status != "succeeded":
                gate = {"status": "interrupted", "passed": False,
                        "reasons": ["the eval gate did not finish; run `lunatrain eval-gate --adapter NAME@VERSION`"]}
            job = self.store.set_status(
                job_id, "succeeded", adapter=_adapter(result if status == "succeeded" else trained, self.settings.home),
                metrics=metrics or (trained or {}).get("metrics") or {}, gate=gate,
            )
        elif cancel_requested:
            job = self.store.set_status(job_id, "cancelled", metrics=metrics or None, message="cancelled")
        elif self._stopping.is_set():
            job = _settle_interrupted(self.store, job_id, cancel_requested=False)
        elif status == "failed" and (result or {}).get("error"):
            err = result["error"]  # type: ignore[index]
            job = self.store.set_status(
                job_id, "failed", metrics=metrics or None,
                error={"code": str(err.get("code") or "training_error"), "message": str(err.get("message") or "")},
            )
        elif status == "cancelled":
            # The child stopped on its own (it lost contact with us): the run was cut short.
            job = self.store.set_status(
                job_id, "failed", error={"code": "interrupted", "message": "The training process stopped early."}
            )
        else:
            job = self.store.set_status(job_id, "failed", error=_crash_error(code, log_path, self.settings.home))
        log.info("job %s %s", job_id, job.status + (f" ({job.error.code})" if job.error else ""))


def _adapter(result: dict[str, Any] | None, home: Path) -> dict[str, Any] | None:
    adapter = (result or {}).get("adapter")
    if not isinstance(adapter, dict):
        return None
    path = Path(str(adapter.get("path", "")))
    with contextlib.suppress(ValueError):
        path = path.relative_to(home)  # a path relative to the data root does not leak the machine's layout
    return {"name": str(adapter.get("name")), "version": str(adapter.get("version")), "path": str(path)}


def _crash_error(code: int, log_path: Path, home: Path) -> dict[str, str]:
    """A crashed child (no result line): name the signal or exit status and quote the log's last line."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        how = f"was killed by {name}"
        if -code == signal.SIGKILL:
            how += " (often the system's out-of-memory killer)"
    else:
        how = f"exited with status {code} without a result"
    last = _last_line(log_path)
    rel = log_path.relative_to(home) if log_path.is_relative_to(home) else log_path
    return {
        "code": "child_crashed",
        "message": f"The training process {how}" + (f"; last log line: {last!r}" if last else "") + f"; see {rel}.",
    }


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 8192))
        lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""
    return ""


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["ASSISTANT_HOME"] = str(settings.home)
    # The child imports the same lunatrain as this process, installed or not.
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --- the HTTP app --------------------------------------------------------------------------------
class DeviceProbe:
    """The device facts for /health, measured once in a child process: creating a CUDA context here would
    hold about half a GiB of GPU memory for the trainer's whole life, memory the jobs need. Free memory is
    refreshed live (psutil on CPU, nvidia-smi on CUDA, at most every 2 s); the startup value otherwise."""

    def __init__(self, settings: Settings) -> None:
        argv = [sys.executable, "-m", "lunatrain.worker", "--device-info"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=child_env(settings), check=True)
            self.info: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            log.warning("device probe failed: %s", detail)
            self.info = {"cudaAvailable": False, "type": "unknown", "name": f"device probe failed: {str(detail)[-200:]}"}
        self._checked = 0.0

    def current(self) -> dict[str, Any]:
        if time.monotonic() - self._checked > 2.0:
            self._checked = time.monotonic()
            free = _free_memory(self.info.get("type"))
            if free is not None:
                total = self.info.get("memoryTotal")  # nvidia-smi rounds to MiB: never report more than total
                self.info = self.info | {"memoryFree": min(free, total) if isinstance(total, int) else free}
        return self.info


def _free_memory(kind: str | None) -> int | None:
    if kind == "cpu":
        return int(psutil.virtual_memory().available)
    if kind != "cuda" or not shutil.which("nvidia-smi"):
        return None
    # The device the jobs see first: CUDA_VISIBLE_DEVICES' first entry (an index or a UUID, both of which
    # nvidia-smi -i accepts), else GPU 0.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    argv = ["nvidia-smi", "-i", visible, "--query-gpu=memory.free", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
        return int(float(out.strip().splitlines()[0])) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def create_app(settings: Settings, *, host: str = "127.0.0.1") -> FastAPI:
    from .api.handlers import install
    from .api.security import GuardMiddleware, allowed_hostnames

    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = JobStore(jobs_db_path(settings.data_dir))
        recover(store)
        runner = Runner(settings, store)
        state.update(store=store, runner=runner, device=DeviceProbe(settings))
        runner.start()
        _write_pid(settings)
        try:
            yield
        finally:
            runner.stop()
            store.close()
            _remove_pid(settings)

    app = FastAPI(title="lunatrain trainer", version=__version__, lifespan=lifespan)
    install(app)
    app.add_middleware(
        GuardMiddleware, hosts=allowed_hostnames(settings, host), token=settings.api_token,
        max_body_bytes=min(settings.max_body_bytes, _MAX_BODY),
    )

    def store() -> JobStore:
        return state["store"]

    @app.get("/health", response_model=Health, response_model_by_alias=True)
    def health() -> Health:
        info = state["device"].current()
        counts = store().counts()
        return Health.model_validate({
            "status": "ok",
            "cudaAvailable": bool(info.get("cudaAvailable")),
            "device": info,
            "version": __version__,
            "queue": {"running": counts.get("running", 0) + counts.get("cancelling", 0),
                      "queued": counts.get("queued", 0) + counts.get("validating", 0)},
        })

    @app.post("/jobs", status_code=202, response_model=Job, response_model_by_alias=True)
    def submit(body: JobCreate, response: Response) -> Job:
        job, created = store().create(body.params(), body.request_id, body.thresholds())
        if created:
            job = store().set_status(job.id, "queued")
            state["runner"].wake()
        else:
            response.status_code = 200
        return job

    @app.get("/jobs", response_model=JobList, response_model_by_alias=True)
    def list_jobs(
        limit: Annotated[int, Query(ge=1, le=500)] = 20, status: Annotated[Status | None, Query()] = None
    ) -> JobList:
        return JobList(data=store().list(limit=limit, status=status))

    @app.get("/jobs/{job_id}", response_model=Job, response_model_by_alias=True)
    def get_job(job_id: JobId) -> Job:
        return store().get(job_id)

    @app.get("/jobs/{job_id}/events", response_model=EventPage, response_model_by_alias=True)
    def job_events(
        job_id: JobId,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> EventPage:
        return store().events(job_id, after=after, limit=limit)

    @app.post("/jobs/{job_id}/cancel", response_model=Job, response_model_by_alias=True)
    def cancel(job_id: JobId) -> Job:
        return state["runner"].cancel(job_id)

    return app


# --- process lifetime ----------------------------------------------------------------------------
_instance_lock: IO[bytes] | None = None


def _claim_data_root(settings: Settings) -> None:
    """Hold an exclusive lock for this process's life: two trainers on one data root would run two jobs
    on one device and race on the same database. The kernel drops it when the process dies, even by -9."""
    global _instance_lock
    path = settings.data_dir / "trainer" / "trainer.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+b")  # noqa: SIM115 - held open on purpose until exit
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise Conflict(f"Another trainer is already running for the data root {settings.home}.") from None
    _instance_lock = fh


def _pid_path(settings: Settings) -> Path:
    return settings.reports_training_dir / "trainer.pid"


def _write_pid(settings: Settings) -> None:
    from .fsio import atomic_write_text

    atomic_write_text(_pid_path(settings), f"{os.getpid()}\n")


def _remove_pid(settings: Settings) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(_pid_path(settings).read_text().strip()) == os.getpid():
            _pid_path(settings).unlink()


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the trainer in the foreground until SIGINT/SIGTERM (the CLI's `lunatrain trainer`)."""
    import uvicorn

    from .api.security import check_bind
    from .trainer_client import trainer_address

    default_host, default_port = trainer_address(settings)
    host, port = host or default_host, port or default_port
    check_bind(host, settings.api_token)
    if not 1 <= port <= 65535:
        raise UsageError(f"Invalid port {port}: use 1-65535.")
    _claim_data_root(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("trainer for %s on http://%s:%s", settings.home, host, port)
    uvicorn.run(create_app(settings, host=host), host=host, port=port, log_level="info", access_log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lunatrain.trainer_service", description="LoRA trainer service")
    parser.add_argument("--host", default=None, help="bind address (default: from ASSISTANT_LORA_TRAINER_URL)")
    parser.add_argument("--port", type=int, default=None, help="port (default: from ASSISTANT_LORA_TRAINER_URL)")
    args = parser.parse_args(argv)
    try:
        serve(load_settings(), args.host, args.port)
    except LunaError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
