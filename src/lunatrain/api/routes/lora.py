"""LoRA jobs: the guide's endpoints (provider-health, start, quick-start, example-adapter, status) and the
job resource (list, show, events, cancel). Jobs run in the trainer service; this module only forwards.

The trainer client is synchronous (httpx) and ensuring a trainer waits for it to become healthy, so every
call goes through the thread pool and the event loop keeps serving status polls meanwhile.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from starlette.concurrency import run_in_threadpool

from ... import ensure, profiles, store, trainer_client
from ... import export as export_stage
from ...errors import NotFound, ServiceUnavailable
from ...params import LoraParams
from ...settings import Settings
from ..cache import json_response, rendered
from ..deps import Fresh, JobId, ReadsDep, SettingsDep, check_base_model, errors
from ..schemas import (
    Defaults,
    EventPage,
    ExampleAdapterRequest,
    Job,
    JobAccepted,
    JobList,
    JobState,
    ProviderHealth,
    QuickStartRequest,
    StartRequest,
    camel,
)

router = APIRouter(prefix="/assistant/training/lora", tags=["lora"], dependencies=[Fresh])


def job_view(job: Any) -> Job:
    """The trainer's job plus the guide's names: `jobId`, `state`, `progress.total`, `progress.eta`."""
    data = job.wire() if hasattr(job, "wire") else dict(job)
    progress = dict(data.get("progress") or {})
    progress.setdefault("total", progress.get("totalSteps"))
    progress.setdefault("eta", progress.get("etaSeconds"))
    return Job.model_validate(data | {"jobId": data["id"], "state": data["status"], "progress": progress})


async def _submit(settings: Settings, params: LoraParams, request_id: str | None,
                  gate: dict[str, Any] | None = None, **extra: Any) -> JobAccepted:
    # ensure_trainer returns at once when the trainer answers; with on-demand off it raises a clear 503.
    await run_in_threadpool(ensure.ensure_trainer, settings)
    job = job_view(await run_in_threadpool(trainer_client.submit, settings, params, request_id, gate))
    return JobAccepted(job_id=job.job_id, job=job, **extra)


def _with_base(params: LoraParams, settings: Settings) -> LoraParams:
    base = check_base_model(params.base_model, settings)
    return params if base == params.base_model else params.model_copy(update={"base_model": base})


@router.get("/provider-health", response_model=ProviderHealth, responses=errors(503))
async def provider_health(
    settings: SettingsDep,
    ensure_trainer: Annotated[bool, Query(alias="ensureTrainer", description="start the trainer first")] = False,
) -> ProviderHealth:
    """Always 200 with `label` Offline when the trainer is down; 503 only when an asked-for start fails."""
    url = settings.lora_trainer_url
    if ensure_trainer:
        health = await run_in_threadpool(lambda: ensure.ensure_trainer(settings, explicit=True))
    else:
        try:
            health = await run_in_threadpool(trainer_client.health, settings)
        except ServiceUnavailable as err:
            return ProviderHealth(
                status="offline", reachable=False, cuda_available=False, label=trainer_client.LABEL_OFFLINE,
                trainer_url=url, error=err.message,
            )
    wire = health.wire()
    return ProviderHealth.model_validate(
        wire | {"status": "ok", "reachable": True, "label": trainer_client.label(health), "trainerUrl": url}
    )


@router.post("/start", status_code=202, response_model=JobAccepted, responses=errors(409, 503))
async def start(body: StartRequest, settings: SettingsDep) -> JobAccepted:
    """Submit a LoRA job with these parameters; the same `requestId` again returns the same job."""
    params = LoraParams.model_validate(body.model_dump(exclude={"request_id"}))
    return await _submit(settings, _with_base(params, settings), body.request_id)


@router.post("/quick-start", status_code=202, response_model=JobAccepted, responses=errors(404, 409, 503))
async def quick_start(
    settings: SettingsDep, body: Annotated[QuickStartRequest | None, Body()] = None
) -> JobAccepted:
    """The profile's parameters on its short schedule, on a fresh export of the store."""
    body = body or QuickStartRequest()
    overrides = body.model_dump(include={"adapter_name", "dataset_tier", "base_model"}, exclude_none=True, by_alias=True)
    profile = await run_in_threadpool(profiles.load_profile, settings, body.profile)
    params = _with_base(profile.params(overrides, quick=True), settings)
    await run_in_threadpool(ensure.ensure_trainer, settings)  # before the export: a refused start changes nothing
    summary = await run_in_threadpool(export_stage.export, settings)
    return await _submit(settings, params, body.request_id, profile.gate, export=camel(summary.to_dict()))


@router.post("/example-adapter", status_code=202, response_model=JobAccepted, responses=errors(409, 503))
async def example_adapter(
    settings: SettingsDep, body: Annotated[ExampleAdapterRequest | None, Body()] = None
) -> JobAccepted:
    """Train an example adapter on the bundled dataset: seeded into an empty store, exported, submitted."""
    body = body or ExampleAdapterRequest()

    def prepare_data() -> tuple[dict | None, dict]:
        totals = store.counts(settings)["totals"]
        seeded = None
        if totals["examples"] == 0 and totals["memory"] == 0:
            res = store.load_seed(settings)
            seeded = {"examplesAdded": res.examples_added, "memoryAdded": res.memory_added}
        return seeded, camel(export_stage.export(settings).to_dict())

    # Check the trainer first so that a refused start leaves the store and the export untouched.
    await run_in_threadpool(ensure.ensure_trainer, settings)
    seeded, summary = await run_in_threadpool(prepare_data)
    profile = await run_in_threadpool(profiles.load_profile, settings, "luna")
    params = profile.params({"adapterName": body.adapter_name, "datasetTier": "curated", "minCurated": 0}, quick=True)
    return await _submit(settings, params, body.request_id, profile.gate, seeded=seeded, export=summary)


@router.get("/status", response_model=Job, responses=errors(404, 503))
async def status(
    settings: SettingsDep,
    reads: ReadsDep,
    job_id: Annotated[str | None, Query(alias="jobId", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")] = None,
) -> Response:
    """One job (the latest without `jobId`): state, progress, metrics, adapter, error. Polled by every
    open dashboard, so identical polls within half a second share one trainer call and one rendering."""

    def fetch() -> bytes:
        if job_id is not None:
            return rendered(job_view(trainer_client.get_job(settings, job_id)))
        latest = trainer_client.list_jobs(settings, limit=1)
        if not latest:
            raise NotFound("No LoRA job has been submitted yet.")
        return rendered(job_view(latest[0]))

    return json_response(await reads.get(("lora-status", job_id), fetch))


@router.get("/defaults", response_model=Defaults, responses=errors(404))
async def defaults(
    settings: SettingsDep, profile: Annotated[str, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = "luna"
) -> Defaults:
    """A profile's resolved parameters (wire form), for pre-filling a start form."""
    prof = await run_in_threadpool(profiles.load_profile, settings, profile)
    return Defaults(profile=prof.name, params=prof.params().wire(), quick_start=prof.params(quick=True).wire())


@router.get("/jobs", response_model=JobList, responses=errors(503))
async def list_jobs(
    settings: SettingsDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    jobs = await run_in_threadpool(lambda: trainer_client.list_jobs(settings, limit=limit, status=state))
    return JobList(jobs=[job_view(j) for j in jobs])


@router.get("/jobs/{job_id}", response_model=Job, responses=errors(404, 503))
async def get_job(job_id: JobId, settings: SettingsDep) -> Job:
    return job_view(await run_in_threadpool(trainer_client.get_job, settings, job_id))


@router.get("/jobs/{job_id}/events", response_model=EventPage, responses=errors(404, 503))
async def job_events(
    job_id: JobId,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=2**62, description="cursor: the last seq seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> EventPage:
    page = await run_in_threadpool(lambda: trainer_client.events(settings, job_id, after=after, limit=limit))
    wire = page.wire()
    return EventPage(events=wire["data"], next_cursor=wire["lastSeq"], has_more=wire["hasMore"])


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Job, responses=errors(404, 409, 503))
async def cancel_job(job_id: JobId, settings: SettingsDep) -> Job:
    return job_view(await run_in_threadpool(trainer_client.cancel, settings, job_id))
