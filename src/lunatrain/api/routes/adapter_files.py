"""The two files a person opens from the dashboard for one adapter version: its `training-report.json` and
its `loss-curve.png`. The version is looked up in the registry and the file path is built from the entry's
own directory, verified to stay under the data root, so a request names ids only — never a path.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ... import registry
from ...errors import NotFound
from ...settings import Settings, inside
from ..deps import AdapterName, SettingsDep, Version, errors

router = APIRouter(prefix="/assistant/training/adapters", tags=["adapters"])

_FILES = {
    "report": (registry.REPORT_FILE, "application/json"),
    "loss-curve.png": (registry.LOSS_CURVE_FILE, "image/png"),
}


def _file(settings: Settings, name: str, version: str, kind: str) -> FileResponse:
    filename, media_type = _FILES[kind]
    entry = registry.get_version(settings, name, version)  # NotFound for an unknown name or version
    path = inside(registry.adapter_dir(settings, entry), filename)
    if not path.is_file():
        raise NotFound(f"{name}@{entry['version']} has no {filename}.")
    # Immutable per version (overwrite's `current` slot excepted), but cheap: let the browser revalidate.
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/{name}/versions/{version}/report", response_class=FileResponse, responses=errors(404, 503))
async def training_report(name: AdapterName, version: Version, settings: SettingsDep) -> FileResponse:
    """The version's training report (params, dataset fingerprint, metrics, loss curve, provenance)."""
    return await run_in_threadpool(_file, settings, name, version, "report")


@router.get("/{name}/versions/{version}/loss-curve.png", response_class=FileResponse, responses=errors(404, 503))
async def loss_curve(name: AdapterName, version: Version, settings: SettingsDep) -> FileResponse:
    """The version's loss curve image (train and val loss per step)."""
    return await run_in_threadpool(_file, settings, name, version, "loss-curve.png")
