"""The guide's pipeline steps over HTTP: export and prepare (and the eval gate), each returning its report.

They are CPU and disk bound, so they run in the thread pool and the event loop keeps answering status polls.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from ... import export as export_stage
from ..deps import SettingsDep, errors
from ..schemas import ExportRequest, Report, camel

router = APIRouter(prefix="/assistant/training", tags=["pipeline"])


@router.post("/export", response_model=Report, responses=errors(409))
async def export(settings: SettingsDep, body: Annotated[ExportRequest | None, Body()] = None) -> Report:
    body = body or ExportRequest()
    summary = await run_in_threadpool(
        export_stage.export, settings, val_ratio=body.val_ratio, test_ratio=body.test_ratio
    )
    return Report.model_validate(camel(summary.to_dict()))
