"""LoRA jobs: the guide's endpoints (provider-health, start, quick-start, example-adapter, status) and the
job resource (list, show, events, cancel). Jobs run in the trainer service; this module only forwards.

The trainer client is synchronous (httpx) and ensuring a trainer waits for it to become healthy, so every
call goes through the thread pool and the event loop keeps serving status polls meanwhile.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response
from starlette.concurrency import run_in_threadpool

from ... import flow, profiles
from ...errors import Conflict, NotFound, ServiceUnavailable
from ...params import FlowOptions, LoraParams, run_keys
from ...service import client as trainer_client
from ...service import ensure
from ...service.jobs import JOB_ID_PATTERN, EventPage, Job, JobList, ProviderHealth, Status
from ...settings import NAME_MAX, NAME_PATTERN, Settings
from ...wire import INT_MAX, camel
from ..cache import json_response, rendered
from ..deps import Fresh, JobId, NoBody, ReadsDep, SettingsDep, check_base_model, errors
from ..schemas import (
    Defaults,
    ExampleAdapterRequest,
    JobAccepted,
    QuickStartRequest,
    StartRequest,
)

router = APIRouter(prefix="/assistant/training/lora", tags=["lora"], dependencies=[Fresh])


def _with_base(params: LoraParams, settings: Settings, requested: str | None) -> LoraParams:
    """The base model the job trains on. Only one the request names is held to what a request may name (no path
    outside the data root); the server's own (ASSISTANT_BASE_MODEL, a profile's table) is the operator's choice."""
    base = check_base_model(requested, settings) if requested else params.base_model or settings.base_model
    return params.model_copy(update={"base_model": base})


@router.get("/provider-health", response_model=ProviderHealth, responses=errors(503))
async def provider_health(
    settings: SettingsDep,
    ensure_trainer: Annotated[bool, Query(alias="ensureTrainer", description="start the trainer first")] = False,
) -> ProviderHealth:
    """Always 200 with `label` Offline when this data root's trainer is down (another project's trainer at
    its address included); 503 only when an asked-for start fails."""
    if ensure_trainer:
        try:
            health = await run_in_threadpool(lambda: ensure.ensure_trainer(settings, explicit=True))
        except Conflict as err:  # the chosen address is held by something else: no trainer could be started
            raise ServiceUnavailable(err.message, params=err.params) from None
    else:
        try:
            health = await run_in_threadpool(trainer_client.own_health, settings)
        except (ServiceUnavailable, Conflict) as err:
            return trainer_client.provider_health(trainer_client.base_url(settings), None, err.message)
    # The address after the ensure: a trainer it started may listen on a port of its own (recorded).
    return trainer_client.provider_health(trainer_client.base_url(settings), health)


@router.post("/start", status_code=202, response_model=JobAccepted, responses=errors(404, 409, 503))
async def start(settings: SettingsDep, body: Annotated[StartRequest | None, Body()] = None) -> JobAccepted:
    """Submit a LoRA job with these parameters (over a profile's values when `profile` is named); the same
    `requestId` again returns the same job. No body: the defaults, as `{}` (and as the other two starts)."""
    body = body or StartRequest()
    fields = set(LoraParams.model_fields) | set(FlowOptions.model_fields)
    thresholds = None
    given = body.model_dump(mode="json", include=fields, exclude_unset=True, by_alias=True)
    if body.profile is None:
        params = LoraParams.model_validate(body.model_dump(include=set(LoraParams.model_fields)))
        options = FlowOptions.model_validate(body.model_dump(include=set(FlowOptions.model_fields)))
        params = await run_in_threadpool(profiles.fit_dropout, settings, params, run_keys(given))
    else:  # as the CLI resolves it: profile, its table for the base in use, then what the body gives
        profile = await run_in_threadpool(profiles.load_profile, settings, body.profile)
        params, options = await run_in_threadpool(lambda: profile.resolve(given, for_run=True))
        thresholds = profile.gate
    # ensure_trainer inside returns at once when the trainer answers; with on-demand off it raises a clear 503.
    job, joined = await run_in_threadpool(
        lambda: flow.submit_or_join(
            settings,
            _with_base(params, settings, body.base_model),
            options,
            thresholds=thresholds,
            request_id=body.request_id,
        )
    )
    return JobAccepted(job_id=job.id, job=job, joined=joined)


@router.post("/quick-start", status_code=202, response_model=JobAccepted, responses=errors(404, 409, 503))
async def quick_start(settings: SettingsDep, body: Annotated[QuickStartRequest | None, Body()] = None) -> JobAccepted:
    """The profile's parameters on its short schedule, on a fresh export of the store."""
    body = body or QuickStartRequest()
    overrides = body.model_dump(
        include={"adapter_name", "dataset_tier", "base_model"}, exclude_none=True, by_alias=True
    )
    if "baseModel" in overrides:
        overrides["baseModel"] = check_base_model(overrides["baseModel"], settings)
    started = await run_in_threadpool(flow.quick_start, settings, body.profile, overrides, body.request_id)
    return _accepted(started)


@router.post("/example-adapter", status_code=202, response_model=JobAccepted, responses=errors(409, 503))
async def example_adapter(
    settings: SettingsDep, body: Annotated[ExampleAdapterRequest | None, Body()] = None
) -> JobAccepted:
    """Train an example adapter on the bundled dataset: seeded into an empty store, exported, submitted."""
    body = body or ExampleAdapterRequest()
    started = await run_in_threadpool(flow.example_adapter, settings, body.adapter_name, body.request_id)
    return _accepted(started)


def _accepted(started: flow.Started) -> JobAccepted:
    summary = started.export
    return JobAccepted(
        job_id=started.job.id,
        job=started.job,
        joined=started.joined,
        seeded=started.seeded,
        export=camel(summary.answer()) if summary else None,
    )


@router.get("/status", response_model=Job, responses=errors(404, 503))
async def status(
    settings: SettingsDep,
    reads: ReadsDep,
    job_id: Annotated[str | None, Query(alias="jobId", pattern=JOB_ID_PATTERN)] = None,
) -> Response:
    """One job (the latest without `jobId`): state, progress, metrics, adapter, error. Polled by every
    open dashboard, so identical polls within half a second share one trainer call and one rendering."""

    def fetch() -> bytes:
        if job_id is not None:
            return rendered(trainer_client.get_job(settings, job_id))
        latest = trainer_client.list_jobs(settings, limit=1)
        if not latest:
            raise NotFound("No LoRA job has been submitted yet.")
        return rendered(latest[0])

    return json_response(await reads.get(("lora-status", job_id), fetch))


@router.get("/defaults", response_model=Defaults, responses=errors(404))
async def defaults(
    settings: SettingsDep,
    profile: Annotated[str, Query(pattern=NAME_PATTERN, max_length=NAME_MAX)] = "luna",
    base_model: Annotated[str | None, Query(alias="baseModel", min_length=1, max_length=512)] = None,
) -> Defaults:
    """A profile's resolved parameters (wire form), for pre-filling a start form; with `baseModel`, as a run
    on that base model resolves them (its `[bases."…"]` table), which a start naming it gets."""
    prof = await run_in_threadpool(profiles.load_profile, settings, profile)
    given = {"baseModel": check_base_model(base_model, settings)} if base_model is not None else {}
    # as the starts resolve them (a mixture's experts take no dropout: the form shows the 0 a run would take)
    (params, options), (quick, quick_options) = await run_in_threadpool(
        lambda: (prof.resolve(given, for_run=True), prof.resolve(given, quick=True, for_run=True))
    )
    return Defaults(
        profile=prof.name, params=params.wire() | options.wire(), quick_start=quick.wire() | quick_options.wire()
    )


@router.get("/jobs", response_model=JobList, responses=errors(503))
async def list_jobs(
    settings: SettingsDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT_MAX)] = 0,
) -> JobList:
    return await run_in_threadpool(lambda: trainer_client.job_page(settings, limit=limit, offset=offset, status=status))


@router.get("/jobs/{jobId}", response_model=Job, responses=errors(404, 503))
async def get_job(job_id: JobId, settings: SettingsDep) -> Job:
    return await run_in_threadpool(trainer_client.get_job, settings, job_id)


@router.get("/jobs/{jobId}/events", response_model=EventPage, responses=errors(404, 503))
async def job_events(
    job_id: JobId,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=2**62, description="cursor: the last seq seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> EventPage:
    return await run_in_threadpool(lambda: trainer_client.events(settings, job_id, after=after, limit=limit))


@router.post(
    "/jobs/{jobId}/cancel", status_code=202, response_model=Job, dependencies=[NoBody], responses=errors(404, 409, 503)
)
async def cancel_job(job_id: JobId, settings: SettingsDep) -> Job:
    return await run_in_threadpool(trainer_client.cancel, settings, job_id)
