"""`GET /assistant/training/status`: the data status the guide's §9 names (counts, readiness per tier, the
trainer's health, last export, last job, active adapter), straight from `status.training_status`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from ... import status as status_stage
from ..cache import json_response, rendered
from ..deps import ReadsDep, SettingsDep, errors
from ..schemas import Report

router = APIRouter(prefix="/assistant/training", tags=["status"])


@router.get("/status", response_model=Report, responses=errors(503))
async def training_status(
    settings: SettingsDep,
    reads: ReadsDep,
    min_curated: Annotated[
        int | None,
        Query(alias="minCurated", ge=0, le=10_000_000, description="ready threshold (default: the Luna profile's)"),
    ] = None,
) -> Response:
    """Polled by every open dashboard: identical polls within half a second share one computation."""

    def fetch() -> bytes:
        return rendered(Report.model_validate(status_stage.training_status(settings, min_curated)))

    return json_response(await reads.get(("training-status", min_curated), fetch))
