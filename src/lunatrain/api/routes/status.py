"""`GET /assistant/training/status`: the data status the guide's §9 names (counts, readiness, last export,
last job, active adapter), straight from `status.training_status`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ... import status as status_stage
from ..deps import ReadsDep, SettingsDep, errors
from ..schemas import Report

router = APIRouter(prefix="/assistant/training", tags=["status"])


@router.get("/status", response_model=Report, responses=errors())
async def training_status(
    settings: SettingsDep,
    reads: ReadsDep,
    min_curated: Annotated[int, Query(alias="minCurated", ge=0, le=10_000_000, description="ready threshold")] = 0,
) -> Report:
    """Polled by every open dashboard: identical polls within half a second share one computation."""
    status = await reads.get(("training-status", min_curated), lambda: status_stage.training_status(settings, min_curated))
    return Report.model_validate(status)
