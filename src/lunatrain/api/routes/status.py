"""`GET /assistant/training/status`: the data status the guide's §9 names (counts, readiness per tier, the
trainer's health, last export, last job, active adapter), straight from `status.training_status`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from ... import status as status_stage
from ...messages import coded
from ...params import MIN_CURATED_MAX
from ...service.spawn import code_signature
from ..cache import json_response, rendered
from ..deps import ReadsDep, SettingsDep, errors
from ..schemas import Report

router = APIRouter(prefix="/assistant/training", tags=["status"])


@router.get("/status", response_model=Report, responses=errors(503))
async def training_status(
    request: Request,
    settings: SettingsDep,
    reads: ReadsDep,
    min_curated: Annotated[
        int | None,
        Query(
            alias="minCurated", ge=0, le=MIN_CURATED_MAX, description="ready threshold (default: the Luna profile's)"
        ),
    ] = None,
) -> Response:
    """Polled by every open dashboard: identical polls within half a second share one computation."""

    def fetch() -> bytes:
        report = status_stage.training_status(settings, min_curated)
        if code_signature() != request.app.state.code:
            # The trainer restarts itself once idle (runner.py); this server cannot without dropping the page.
            report["problems"].append(
                "lunatrain was updated since this API server started, and it still runs the code from before; "
                "restart `lunatrain serve`."
            )
            report["problemCodes"].append(coded("status.api_outdated"))
        return rendered(Report.model_validate(report))

    return json_response(await reads.get(("training-status", min_curated), fetch))
