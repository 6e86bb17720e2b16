"""The guide's pipeline steps over HTTP: export and prepare (and the eval gate), each returning its report.

They are CPU and disk bound, so they run in the thread pool and the event loop keeps answering status polls.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from ... import evalgate, profiles
from ... import export as export_stage
from ... import prepare as prepare_stage
from ...wire import camel
from ..deps import Fresh, SettingsDep, check_base_model, errors
from ..schemas import EvalGateRequest, ExportRequest, PrepareRequest, Report

router = APIRouter(prefix="/assistant/training", tags=["pipeline"], dependencies=[Fresh])


@router.post("/export", response_model=Report, responses=errors(409, 503))
async def export(settings: SettingsDep, body: Annotated[ExportRequest | None, Body()] = None) -> Report:
    body = body or ExportRequest()
    summary = await run_in_threadpool(
        lambda: export_stage.export(settings, **export_stage.kept_ratios(settings, body.val_ratio, body.test_ratio))
    )
    return Report.model_validate(camel(summary.answer()))


@router.post("/prepare", response_model=Report, responses=errors(404, 503))
async def prepare(settings: SettingsDep, body: Annotated[PrepareRequest | None, Body()] = None) -> Report:
    """The preflight report on the last export, whatever its status (`fail` is an answer, not an error);
    404 when nothing has been exported yet. `samples` holds one train sample split into trained and
    context pieces, so the user sees what the loss covers before training."""
    body = body or PrepareRequest()
    # What the body gives, over the profile's values: a field left out keeps the profile's, one given as null
    # clears it (no maxSteps cap, the configured base), as /lora/start with a profile resolves it.
    overrides = body.model_dump(mode="json", exclude={"profile"}, exclude_unset=True, by_alias=True)
    if overrides.get("baseModel") is not None:
        overrides["baseModel"] = check_base_model(overrides["baseModel"], settings)
    if overrides.get("minCurated", 0) is None:  # the threshold has no "cleared": null is the profile's
        del overrides["minCurated"]

    def run():
        params, options = profiles.load_profile(settings, body.profile or "luna").resolve(overrides, for_run=True)
        return prepare_stage.prepare(settings, params, min_curated=options.min_curated, show=1).to_dict()

    return Report.model_validate(camel(await run_in_threadpool(run)))


@router.post("/eval-gate", response_model=Report, responses=errors(404, 503))
async def eval_gate(settings: SettingsDep, body: Annotated[EvalGateRequest | None, Body()] = None) -> Report:
    """Evaluate the active adapter (or `adapter`, NAME or NAME@VERSION) on the eval suite with the
    thresholds of `profile`'s [gate] (default luna); the report says `passed` and why. A failed gate is an
    answer (200), not an error."""
    body = body or EvalGateRequest()

    def run():
        # the luna profile's [gate] and base model unless another is named: what the flow gates with
        profile = profiles.load_profile(settings, body.profile or "luna")
        return evalgate.eval_gate(
            settings, adapter=body.adapter, base_model=profile.base_model, thresholds=profile.gate
        ).to_dict()

    report = await run_in_threadpool(run)
    return Report.model_validate(camel(report))
