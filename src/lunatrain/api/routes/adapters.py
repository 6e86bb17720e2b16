"""The adapter registry: list (grouped by base model), show, activate (with force), rollback."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from ... import registry
from ...errors import NotFound
from ...settings import Settings
from ..deps import AdapterName, Fresh, SettingsDep, Version, errors
from ..schemas import ActivateRequest, AdapterGroups, AdapterOut, Report, camel

router = APIRouter(prefix="/assistant/training/adapters", tags=["adapters"], dependencies=[Fresh])


def _adapter(settings: Settings, name: str) -> AdapterOut:
    adapter = registry.list_adapters(settings).get(name)
    if adapter is None:
        raise NotFound(f"No adapter named {name!r} is registered.")
    return AdapterOut.model_validate(camel({"name": name, **adapter}))


def _groups(settings: Settings) -> AdapterGroups:
    """Per base model (by fingerprint: the same id with other weights is another base), its adapters."""
    bases: dict[str, dict[str, Any]] = {}
    for name, adapter in sorted(registry.list_adapters(settings).items()):
        for entry in adapter.get("versions", []):
            base = entry.get("baseModel") or {}
            group = bases.setdefault(
                base.get("fingerprint", "?"), {"baseModel": base.get("id", "?"), "fingerprint": base.get("fingerprint"), "adapters": {}}
            )
            item = group["adapters"].setdefault(name, {"name": name, "aliases": adapter.get("aliases", {}), "versions": []})
            item["versions"].append(entry)
    out = [g | {"adapters": list(g["adapters"].values())} for g in bases.values()]
    return AdapterGroups(bases=camel(out))


@router.get("", response_model=AdapterGroups, responses=errors(503))
async def list_adapters(settings: SettingsDep) -> AdapterGroups:
    return await run_in_threadpool(_groups, settings)


@router.get("/{name}", response_model=AdapterOut, responses=errors(404, 503))
async def show_adapter(name: AdapterName, settings: SettingsDep) -> AdapterOut:
    return await run_in_threadpool(_adapter, settings, name)


@router.get("/{name}/versions/{version}", response_model=Report, responses=errors(404, 503))
async def show_version(name: AdapterName, version: Version, settings: SettingsDep) -> Report:
    """One registry entry; `version` may also be an alias (`latest`, `active`)."""
    return Report.model_validate(camel(await run_in_threadpool(registry.get_version, settings, name, version)))


@router.post("/{name}/activate", response_model=AdapterOut, responses=errors(404, 409, 503))
async def activate(
    name: AdapterName, settings: SettingsDep, body: Annotated[ActivateRequest | None, Body()] = None
) -> AdapterOut:
    """Make a version (default: latest) active; refused (409) when it was trained on another base model
    than the configured one, unless `force`."""
    body = body or ActivateRequest()

    def run() -> AdapterOut:
        registry.activate(settings, name, body.version or "latest", force=body.force, reason="api")
        return _adapter(settings, name)

    return await run_in_threadpool(run)


@router.post("/{name}/rollback", response_model=AdapterOut, responses=errors(404, 503))
async def rollback(name: AdapterName, settings: SettingsDep) -> AdapterOut:
    """Active goes back to the version active before it (422 when there is none)."""

    def run() -> AdapterOut:
        registry.rollback(settings, name)
        return _adapter(settings, name)

    return await run_in_threadpool(run)
