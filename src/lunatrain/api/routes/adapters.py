"""The adapter registry: list (grouped by base model), show, activate (with force), deactivate, rollback.

Activation is per base model. In a base model's group, `aliases.active` is the version active on that base;
in a single adapter's view it is the one active on the configured base model, and `activeByBase` has all.
Every version carries `state` {active, code, params, reason}: why it is not active when it is not.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from ... import registry
from ...errors import LunaError, NotFound
from ...settings import Settings
from ...wire import camel
from ..deps import AdapterName, Fresh, SettingsDep, Version, errors
from ..schemas import ActivateRequest, AdapterGroups, AdapterOut, DeactivateRequest, Report, RollbackRequest

router = APIRouter(prefix="/assistant/training/adapters", tags=["adapters"], dependencies=[Fresh])


def _configured(settings: Settings) -> tuple[str | None, str | None]:
    """The configured base model's (fingerprint, id)."""
    try:
        base = registry.configured_base(settings)
    except LunaError:  # a configured base that cannot be read: nothing is active on it
        return None, None
    return base.fingerprint, base.id


def _view(
    settings: Settings,
    name: str,
    adapter: dict[str, Any],
    versions: list[dict],
    base: str | None,
    base_id: str | None = None,
    *,
    configured: bool = True,
) -> dict:
    """One adapter as seen from base fingerprint `base` (id `base_id`, when it is the configured one; else
    `configured` False: another base's group): its active version there and each version's state."""
    active = adapter.get("activeByBase", {}).get(base or "")
    # Both keys always: `active: null` says "none active here" (the file's `aliases.active` is another base's).
    aliases = {"latest": adapter.get("aliases", {}).get("latest"), "active": active["version"] if active else None}
    # `filesMissing` also on an active version: it stays active, but cannot be served until retrained.
    states = [
        e
        | {
            "state": registry.activation_state(
                settings, e, base or "", base_id, configured=configured, adapter=adapter
            ),
        }
        | registry.files_marks(settings, e)
        for e in versions
    ]
    return {
        "name": name,
        "aliases": aliases,
        "activeByBase": adapter.get("activeByBase", {}),
        "rollbackTo": _rollback_to(settings, adapter, versions, base or ""),
        "versions": states,
    }


def _rollback_to(settings: Settings, adapter: dict[str, Any], versions: list[dict], base: str) -> str | None:
    """The version a rollback on `base` returns to; null when there is none, or when its files are gone (the
    rollback refuses it then, as activate does: the version is marked `filesMissing`)."""
    target = registry.rollback_target(adapter, base)
    entry = next((e for e in adapter.get("versions", []) if e["version"] == target), None)
    return target if entry is not None and registry.loadable(settings, entry) else None


def _adapter(settings: Settings, name: str) -> AdapterOut:
    adapter = registry.list_adapters(settings).get(name)
    if adapter is None:
        raise NotFound(f"No adapter named {name!r} is registered.")
    return AdapterOut.model_validate(camel(_view(settings, name, adapter, adapter["versions"], *_configured(settings))))


def _groups(settings: Settings) -> AdapterGroups:
    """Per base model (by fingerprint: the same id with other weights is another base), its adapters, and
    whether it is the configured one (activate and rollback act on that one only)."""
    served, served_id = _configured(settings)
    bases: dict[str, dict[str, Any]] = {}
    adapters = registry.list_adapters(settings)
    for name, adapter in sorted(adapters.items()):
        for entry in adapter.get("versions", []):
            base = entry.get("baseModel") or {}
            group = bases.setdefault(
                base.get("fingerprint", "?"),
                {
                    "baseModel": base.get("id", "?"),
                    "fingerprint": base.get("fingerprint"),
                    "configured": served is not None and base.get("fingerprint") == served,
                    # the configured id with other weights (updated in place): --baseModel would name the new ones
                    "anotherBuild": served is not None
                    and base.get("fingerprint") != served
                    and registry.same_base_id(settings, base.get("id"), served_id),
                    "adapters": {},
                },
            )
            group["adapters"].setdefault(name, []).append(entry)
    out = [
        g
        | {
            "adapters": [
                _view(settings, name, adapters[name], versions, fp, configured=g["configured"])
                for name, versions in g["adapters"].items()
            ]
        }
        for fp, g in bases.items()
    ]
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

    def read() -> dict[str, Any]:
        entry = registry.get_version(settings, name, version)
        return entry | registry.files_marks(settings, entry)  # as the adapter's list says it (a gone file is news)

    return Report.model_validate(camel(await run_in_threadpool(read)))


@router.post("/{name}/activate", response_model=AdapterOut, responses=errors(404, 409, 503))
async def activate(
    name: AdapterName, settings: SettingsDep, body: Annotated[ActivateRequest | None, Body()] = None
) -> AdapterOut:
    """Make a version (default: the newest trained on this server's base model, else latest) active; refused
    (409) when it was trained on another base model than the configured one, unless `force`."""
    body = body or ActivateRequest()

    def run() -> AdapterOut:
        version = body.version or registry.latest_on_base(settings, name)
        registry.activate(settings, name, version, force=body.force, reason="api")
        return _adapter(settings, name)

    return await run_in_threadpool(run)


@router.post("/{name}/deactivate", response_model=AdapterOut, responses=errors(404, 503))
async def deactivate(
    name: AdapterName, settings: SettingsDep, body: Annotated[DeactivateRequest | None, Body()] = None
) -> AdapterOut:
    """Stop using an adapter: without `version` it is no longer active on the configured base model; with
    `version`, that version is no longer active on any base, or on the configured one with `configuredBaseOnly`
    (422 when it is not active)."""
    body = body or DeactivateRequest()

    def run() -> AdapterOut:
        registry.deactivate(settings, name, body.version or "", configured_base_only=body.configured_base_only)
        return _adapter(settings, name)

    return await run_in_threadpool(run)


@router.post("/{name}/rollback", response_model=AdapterOut, responses=errors(404, 409, 503))
async def rollback(
    name: AdapterName, settings: SettingsDep, body: Annotated[RollbackRequest | None, Body()] = None
) -> AdapterOut:
    """On the configured base model, active goes back to the version active before it (422 when there is none);
    with `version` and `to`, only while that version is the active one and the rollback returns to `to` (409
    when either changed since)."""
    body = body or RollbackRequest()

    def run() -> AdapterOut:
        registry.rollback(settings, name, version=body.version, to=body.to)
        return _adapter(settings, name)

    return await run_in_threadpool(run)
