"""The two files a person opens from the dashboard for one adapter version: its `training-report.json` and
its `loss-curve.png`. The version is looked up in the registry and the file path is built from the entry's
own directory, verified to stay under the data root, so a request names ids only — never a path.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from ... import registry
from ...errors import DamagedFile, NotFound
from ...formats import json_type
from ...fsio import read_json
from ...settings import Settings, inside
from ...web.files import served
from ..deps import AdapterName, SettingsDep, Version, errors

router = APIRouter(prefix="/assistant/training/adapters", tags=["adapters"])

_FILES = {
    "report": (registry.REPORT_FILE, "application/json"),
    "loss-curve.png": (registry.LOSS_CURVE_FILE, "image/png"),
}


def _file(request: Request, settings: Settings, name: str, version: str, kind: str) -> Response:
    filename, media_type = _FILES[kind]
    entry = registry.get_version(settings, name, version)  # NotFound for an unknown name or version
    path = inside(registry.adapter_dir(settings, entry), filename)
    if not path.is_file():
        raise NotFound(f"{name}@{entry['version']} has no {filename}.")
    _check(path, kind)
    # Immutable per version (overwrite's `current` slot excepted), but cheap: let the browser revalidate.
    return served(request, path, media_type)


_PNG = b"\x89PNG\r\n\x1a\n"


def _check(path: Path, kind: str) -> None:
    """A damaged file is said as the CLI says it (503), not handed to the browser as what it should be."""
    if kind == "report":
        report = read_json(path)  # DamagedFile when it is not JSON
        if not isinstance(report, dict):
            raise DamagedFile(f"{path} is damaged (a JSON {json_type(report)}, not an object).")
        return
    with path.open("rb") as f:
        if f.read(len(_PNG)) != _PNG:
            raise DamagedFile(f"{path} is damaged (not a PNG image).")


@router.get("/{name}/versions/{version}/report", response_class=FileResponse, responses=errors(404, 503))
async def training_report(request: Request, name: AdapterName, version: Version, settings: SettingsDep) -> Response:
    """The version's training report (params, dataset fingerprint, metrics, loss curve, provenance)."""
    return await run_in_threadpool(_file, request, settings, name, version, "report")


@router.get("/{name}/versions/{version}/loss-curve.png", response_class=FileResponse, responses=errors(404, 503))
async def loss_curve(request: Request, name: AdapterName, version: Version, settings: SettingsDep) -> Response:
    """The version's loss curve image (train and val loss per step)."""
    return await run_in_threadpool(_file, request, settings, name, version, "loss-curve.png")
