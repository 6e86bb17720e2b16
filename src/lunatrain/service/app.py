"""The trainer service's HTTP app: health, a FIFO job queue (one running job per device), job views.

    lunatrain trainer [--host 127.0.0.1] [--port 5051]   (--port 0: a free port, recorded in data/trainer/trainer.url)

Endpoints: `GET /health`, `POST /jobs`, `POST /jobs/check` (the same checks, nothing queued), `GET /jobs`,
`GET /jobs/{id}`, `GET /jobs/{id}/events?after=N`, `POST /jobs/{id}/cancel` (shapes in `jobs.py`); every job
route refuses a request that names another data root (`X-Lunatrain-Data-Root`). Jobs and events persist in `data/trainer/jobs.db`; each job
runs in a child process (`runner.py`, `worker.py`) that logs to `data/trainer/logs/<job>.log`. A restart
settles what the previous trainer left unfinished (`recovery.py`). One trainer per data root (`lock.py`),
and /health names that root so a client never submits into another project's data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Response
from fastapi import Path as PathParam
from pydantic import ConfigDict, Field
from starlette.convertors import StringConvertor, register_url_convertor

from .. import __version__, memplan, registry
from ..errors import Conflict, ServiceUnavailable, UsageError
from ..evalgate import GateThresholds
from ..params import FlowOptions, LoraParams
from ..settings import Settings, check_data_root
from ..templates import load_template
from ..web import listen
from ..web.handlers import no_body, service_app
from ..web.security import TRAINER_REALM, DataRootMiddleware, GuardMiddleware, allowed_hostnames, check_bind
from ..wire import INT_MAX, AcceptFailures, UtcLogFormatter
from . import lock
from .device import DeviceProbe
from .jobs import (
    DATA_ROOT_HEADER,
    JOB_ID_PATTERN,
    EventPage,
    Health,
    Job,
    JobCheck,
    JobList,
    JobStore,
    RequestId,
    Status,
    data_root_id,
    jobs_db_path,
)
from .recovery import recover
from .runner import Runner
from .spawn import job_ranks
from .warm import WarmWorker

log = logging.getLogger("lunatrain.trainer")


class _JobIdPath(StringConvertor):
    """A job id in a path, never `check`: `GET /jobs/check` (the wrong method for `POST /jobs/check`) is a 405
    naming POST, not a lookup of a job named "check"."""

    regex = "(?!check$)[^/]+"


register_url_convertor("jobid", _JobIdPath())

_MAX_BODY = 256 * 1024  # a job body is a few hundred bytes
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, max_length=64)]


# Strict JSON, as the assistant API's bodies: `"3"` is no number and `"yes"` no boolean. A model's strict
# setting does not reach the models nested in it, hence the strict twins of the two nested ones.
class _StrictOptions(FlowOptions):
    model_config = ConfigDict(strict=True)


class _StrictThresholds(GateThresholds):
    model_config = ConfigDict(strict=True)


class JobCreate(LoraParams):
    """`POST /jobs` body: the LoRA parameters (wire form; `baseModel` resolved by the client, never filled in
    from the trainer's own environment), the flow options, an optional idempotency key and the eval gate's
    thresholds for this job (a profile's [gate]; omitted: the defaults)."""

    model_config = ConfigDict(strict=True)
    options: _StrictOptions = Field(default_factory=_StrictOptions, description="gate on/off, minCurated")
    request_id: RequestId | None = None
    gate_thresholds: _StrictThresholds | None = Field(default=None, description="eval gate thresholds")

    def params(self) -> LoraParams:
        if self.base_model is None:
            raise UsageError(
                "baseModel is required: the submitting client resolves it (flag, profile, or its own "
                "ASSISTANT_BASE_MODEL), so a job never trains on the trainer's default by accident."
            )
        return LoraParams.model_validate(self.model_dump(exclude={"options", "request_id", "gate_thresholds"}))

    def thresholds(self) -> dict[str, Any] | None:
        """None for the defaults, however spelled (`{}`, every default written out): a retry that spells them
        is the same request as one that leaves them out, as default LoRA parameters are."""
        given = self.gate_thresholds.model_dump(by_alias=True) if self.gate_thresholds is not None else None
        return None if given == GateThresholds().model_dump(by_alias=True) else given


def create_app(settings: Settings, *, host: str = "127.0.0.1") -> FastAPI:
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = JobStore(jobs_db_path(settings.data_dir))
        recover(settings, store)
        warm = WarmWorker(settings)
        device = DeviceProbe(settings, warm)
        runner = Runner(settings, store, gpus=device.gpus, warm=warm)

        def found() -> None:  # a probe that failed at the start worked later
            runner.gpus = device.gpus

        device.found = found
        state.update(store=store, runner=runner, device=device)
        app.state.runner = runner  # for a look from outside (tests); requests use `state`
        runner.start()
        lock.write_pid(settings)
        try:
            yield
        finally:
            runner.stop()
            device.close()
            store.close()
            lock.remove_pid(settings)

    app = service_app("lunatrain trainer", __version__, lifespan)
    # A data root moved aside and made again at its path: requests of the new one's clients are refused (its
    # jobs would go into the moved job database) until the runner, done with its job, stops this trainer.
    app.add_middleware(DataRootMiddleware, home=settings.home, service="trainer")
    app.add_middleware(
        GuardMiddleware,
        hosts=allowed_hostnames(settings, host),
        token=settings.api_token,
        max_body_bytes=min(settings.max_body_bytes, _MAX_BODY),
        realm=TRAINER_REALM,
    )

    def store() -> JobStore:
        return state["store"]

    own_root = data_root_id(settings.home)

    def same_data_root(
        expected: Annotated[str | None, Header(alias=DATA_ROOT_HEADER, description="the client's data root id")] = None,
    ) -> None:
        # Checked before a job is read, submitted or cancelled: a client whose trainer died and whose address
        # another project's trainer now holds must not list, follow or cancel that project's jobs.
        if expected is not None and expected != own_root:
            raise Conflict(
                f"This trainer serves {settings.home}, not the data root the request was made for.",
                details={"dataRoot": {"id": own_root, "path": str(settings.home)}},
            )

    checked = [Depends(same_data_root)]

    @app.get("/health", response_model=Health, response_model_by_alias=True)
    def health() -> Health:
        device = state["device"]
        failure, info = device.failure, device.current()
        device.retry_aside()  # after the facts this answer says: it does not wait for a probe
        counts = store().counts()
        problem = state["runner"].storage_problem
        return Health.model_validate(
            {
                "status": "degraded" if problem or failure else "ok",
                "cudaAvailable": bool(info.get("cudaAvailable")),
                "device": info
                | {
                    "ranks": job_ranks(settings, "auto", state["runner"].gpus),
                    "gpus": state["runner"].gpus,
                    "ranksSetting": settings.lora_gpus,
                },
                "version": __version__,
                "queue": {
                    "running": counts.get("running", 0) + counts.get("cancelling", 0),
                    "queued": counts.get("queued", 0) + counts.get("validating", 0),
                },
                # Non-loopback binds require the token for every request, so the path only reaches loopback or
                # authorised callers.
                "dataRoot": {"id": data_root_id(settings.home), "path": str(settings.home)},
                "storage": problem,
                "canTrain": [failure] if failure else memplan.capabilities(info),
                "codeChanged": state["runner"].code_changed,
            }
        )

    def accepted(body: JobCreate) -> LoraParams:
        """The job's parameters, if this trainer can run them; the 422 otherwise."""
        params = body.params()
        state["device"].refuse_if_unknown()
        # The memory plan before the job is queued: one that no data could fit on this device is refused now
        # (409, naming the option that would make it fit) instead of running until it dies out of memory. The
        # data's own plan is the run's, before it loads the model, and prepare's: the same verdict.
        memplan.check_fits(settings, params, state["device"].current(), least=True)
        job_ranks(settings, params.device, state["runner"].gpus)  # 422 when more ranks than GPUs are set
        if params.chat_template:
            load_template(params.chat_template, settings)  # an unknown name: 422 now, not a failed job later
        from ..models import check_targets_of, resolve_base
        from ..params import check_adapter_name

        check_adapter_name(params, str(params.base_model))  # an adapter named as its base: 422, as the API says
        check_targets_of(params, settings)  # a mistyped layer name, no bitsandbytes: 422 now, as prepare says it
        if params.adapter_strategy == "overwrite":  # a slot holding another base's run: 409 now, as prepare says
            registry.check_slot_base(
                settings, params.adapter_name, "overwrite", resolve_base(params.base_model, settings)
            )
        return params

    @app.post("/jobs/check", dependencies=checked, response_model=JobCheck, response_model_by_alias=True)
    def check(body: JobCreate) -> JobCheck:
        """Whether `POST /jobs` would accept this body (its 4xx otherwise), creating nothing: a client checks
        before it exports, so a refused start changes nothing. `job`: the one its requestId already names."""
        params = accepted(body)
        return JobCheck(job=store().existing(params, body.request_id, body.thresholds(), options=body.options))

    @app.post("/jobs", dependencies=checked, status_code=202, response_model=Job, response_model_by_alias=True)
    def submit(body: JobCreate, response: Response) -> Job:
        params = accepted(body)
        thresholds = body.thresholds()
        if store().existing(params, body.request_id, thresholds, options=body.options) is None:
            # The data a new job needs, as the submitting client checked it (a direct client may not have):
            # options.minCurated is a promise the job record makes. A retry returns its job whatever changed.
            from ..flow import check_data

            check_data(settings, params, body.options)
        runner: Runner = state["runner"]
        with runner.admission:
            if runner.stopping_for_update:
                raise ServiceUnavailable(
                    "The trainer is stopping to start again with lunatrain's updated code; run the command "
                    "again (it starts the updated trainer).",
                    params={"detail": "trainer.updating"},
                )
            job, created = store().create(params, body.request_id, thresholds, options=body.options)
            if created:  # queued under the lock: the runner's decision to stop for an update sees it
                job = store().set_status(job.id, "queued")
        if created:
            runner.wake()
        else:
            response.status_code = 200
        return job

    @app.get("/jobs", dependencies=checked, response_model=JobList, response_model_by_alias=True)
    def list_jobs(
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
        offset: Annotated[int, Query(ge=0, le=INT_MAX)] = 0,
        status: Annotated[Status | None, Query()] = None,
    ) -> JobList:
        return store().page(limit=limit, offset=offset, status=status)

    @app.get("/jobs/{job_id:jobid}", dependencies=checked, response_model=Job, response_model_by_alias=True)
    def get_job(job_id: JobId) -> Job:
        return store().get(job_id)

    @app.get("/jobs/{job_id}/events", dependencies=checked, response_model=EventPage, response_model_by_alias=True)
    def job_events(
        job_id: JobId,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> EventPage:
        return store().events(job_id, after=after, limit=limit)

    @app.post(
        "/jobs/{job_id}/cancel",
        dependencies=[*checked, Depends(no_body)],
        response_model=Job,
        response_model_by_alias=True,
    )
    def cancel(job_id: JobId) -> Job:
        return state["runner"].cancel(job_id)

    return app


def log_handler(path: Path | None, max_bytes: int = lock.TRAINER_LOG_BYTES) -> logging.Handler:
    """Where the trainer logs: a file that rolls over to `<name>.1` at `max_bytes` (so a long-running or
    misbehaving trainer never fills the disk with its log), or stderr."""
    if path is None:
        return logging.StreamHandler()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return RotatingFileHandler(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"Cannot write the log file {path}: {exc.strerror or exc}.") from None


def stream_into_log(logger: str = "lunatrain.output") -> threading.Thread:
    """What this process and its children write to stdout and stderr (a library's warning, the warm worker's
    traceback) goes through the log's handler from now on: timestamped, and rolled over with the log. The
    descriptors a trainer is started with point at trainer.log as it was then; a rollover renames that file,
    and what was written there grew trainer.log.1 without bound (and, at the next rollover, a deleted file)."""
    read_fd, write_fd = os.pipe()
    for fd in (1, 2):
        os.dup2(write_fd, fd)
    os.close(write_fd)
    out = logging.getLogger(logger)
    # A handler that fails (a full disk) reports on stderr, which comes back here: it must stay quiet instead.
    logging.raiseExceptions = False

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as lines:
            for line in lines:
                out.info("%s", line.decode("utf-8", "replace").rstrip("\n"))

    pumping = threading.Thread(target=pump, name="trainer-output", daemon=True)
    pumping.start()
    return pumping  # it ends once every writer has closed the pipe


def serve(settings: Settings, host: str, port: int, log_file: Path | None = None) -> None:
    """Run the trainer in the foreground until SIGINT/SIGTERM (`lunatrain trainer`); port 0: a free port.

    The address it serves is recorded in data/trainer/trainer.url (where clients of this data root look)
    once the socket listens and the data root is ours: never before, so a trainer that cannot start (port
    taken, data root held by another trainer) leaves the record alone."""
    check_bind(host, settings.api_token)
    if log_file is not None and log_file.is_dir():  # said before the data root is written to
        raise UsageError(f"Cannot write the log file {log_file}: it is a folder.")
    try:
        sock = listen.bind(host, port)  # first: a port in use changes nothing
    except UsageError:
        # Taken, most likely by this data root's own trainer (started twice on the port the address names):
        # that is the news, not "pick another port", which would start a second trainer on one data root.
        if lock.trainer_lock_held(settings):
            raise lock.another_trainer(settings) from None
        raise
    try:
        check_data_root(settings)  # a read-only or missing data root: one sentence (exit 2), no traceback
        lock.claim_data_root(settings)
        handler = log_handler(log_file)  # before the record: a log that cannot be written leaves none behind
        # A job database it cannot open is one sentence now (exit 1), not a traceback from the app's startup.
        JobStore(jobs_db_path(settings.data_dir)).close()
    except BaseException:
        sock.close()
        raise
    address = listen.record(sock, settings.trainer_url_file)
    handler.setFormatter(UtcLogFormatter())
    handler.addFilter(AcceptFailures())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if log_file is not None:
        stream_into_log()
    log.info("trainer for %s on %s", settings.home, address)
    # log_config=None: uvicorn's loggers propagate to the handler above instead of configuring their own.
    listen.serve(
        create_app(settings, host=host),
        sock,
        settings.trainer_url_file,
        log_level="info",
        access_log=False,
        log_config=None,
    )
