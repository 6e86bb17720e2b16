"""Data and training status: what `GET /assistant/training/status?minCurated=…` and `lunatrain status` show.

Read-only: counts come from the store, everything else from the artifacts the stages wrote (export
summary, lora-latest.json, the registry, prepare-latest.json, eval-gate-latest.json). A fresh data root
(no database file yet) reports zeros instead of creating one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fsio import read_json
from .settings import Settings

STATUSES = ("approved", "pending", "rejected")


def training_status(settings: Settings, min_curated: int) -> dict[str, Any]:
    """Counts per source and curation status, readiness, and the last export / job / prepare / gate plus the
    active adapter(s), with camelCase keys."""
    from . import export, store

    if min_curated < 0:
        from .errors import UsageError

        raise UsageError(f"minCurated must be 0 or more, got {min_curated}.")
    have_db = _has_database(settings)
    raw = store.counts(settings) if have_db else None
    counts = {
        source: _with_total((raw or {}).get("examples", {}).get(source, {})) for source in store.SOURCES
    }
    memory = _with_total((raw or {}).get("memory", {}))
    curated = counts["curated"]["approved"]
    revision = store.revision(settings) if have_db else None

    summary = _safe(lambda: export.read_summary(settings))
    last_export = None
    changed: bool | None = None
    if isinstance(summary, dict):
        changed = revision is not None and summary.get("store_revision") != revision
        last_export = {
            "time": summary.get("exported_at"),
            "fingerprint": summary.get("fingerprint"),
            "storeRevision": summary.get("store_revision"),
            "counts": summary.get("counts"),
            "ratios": summary.get("ratios"),
            "changedSince": changed,
        }
    elif revision is not None:
        changed = counts["curated"]["total"] + memory["total"] > 0 or None

    active = _active_adapters(settings)
    return {
        "counts": counts,
        "memory": memory,
        "curated": curated,
        "minCurated": min_curated,
        "ready": curated >= min_curated,
        "storeRevision": revision,
        "lastExport": last_export,
        "changedSinceExport": changed,
        "lastJob": _last_job(settings),
        "activeAdapter": _preferred(active),
        "activeAdapters": active,
        "lastPrepare": _last_prepare(settings),
        "lastGate": _last_gate(settings),
    }


def _has_database(settings: Settings) -> bool:
    url = settings.database_url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).exists()
    return True  # a server database: the store opens (and migrates) it


def _with_total(row: dict[str, int]) -> dict[str, int]:
    out = {s: int(row.get(s, 0)) for s in STATUSES}
    out["total"] = sum(out.values())
    return out


def _safe(fn: Any) -> Any:
    """Status must answer even when one artifact is unreadable: that part is reported as missing."""
    from .errors import LunaError

    try:
        return fn()
    except (LunaError, ValueError, OSError):
        return None


def _read(path: Path) -> Any:
    return _safe(lambda: read_json(path))


def _last_job(settings: Settings) -> dict[str, Any] | None:
    report = _read(settings.reports_training_dir / "lora-latest.json")
    if not isinstance(report, dict):
        return None
    metrics = report.get("metrics") or {}
    return {
        "jobId": report.get("jobId"),
        "state": report.get("status"),
        "adapterName": report.get("adapterName"),
        "version": report.get("version"),
        "created": report.get("created"),
        "durationSeconds": report.get("durationSeconds"),
        "metrics": {k: metrics.get(k) for k in ("valLoss", "baseValLoss", "trainLoss", "steps", "tokensPerSec")},
        "error": report.get("error"),
    }


def _active_adapters(settings: Settings) -> list[dict[str, Any]]:
    from . import models, registry

    adapters = _safe(lambda: registry.list_adapters(settings)) or {}
    # resolve_base builds luna-tiny when missing: a status read must not, so an unbuilt one matches nothing.
    unbuilt = settings.base_model == models.TINY_ID and not (settings.models_dir / models.TINY_ID / "config.json").exists()
    configured = _safe(lambda: models.resolve_base(None, settings)) if adapters and not unbuilt else None
    out = []
    for name, adapter in sorted(adapters.items()):
        version = (adapter.get("aliases") or {}).get("active")
        if not version:
            continue
        entry = next((e for e in reversed(adapter.get("versions", [])) if e.get("version") == version), {})
        base = entry.get("baseModel") or {}
        gate = entry.get("gate") or {}
        out.append({
            "name": name,
            "version": version,
            "baseModel": base.get("id"),
            "matchesBaseModel": configured is not None and base.get("fingerprint") == configured.fingerprint,
            "datasetTier": entry.get("datasetTier"),
            "stale": bool(entry.get("stale")),
            "gate": {"passed": gate.get("passed"), "reasons": gate.get("reasons", [])} if gate else None,
        })
    return out


def _preferred(active: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The adapter the assistant uses: luna-adapter when active, else the first active one on this base."""
    on_base = [a for a in active if a["matchesBaseModel"]] or active
    luna = [a for a in on_base if a["name"] == "luna-adapter"]
    return (luna or on_base or [None])[0]


def _last_prepare(settings: Settings) -> dict[str, Any] | None:
    report = _read(settings.reports_training_dir / "prepare-latest.json")
    if not isinstance(report, dict):
        return None
    checks = report.get("checks") or []
    return {
        "status": report.get("status"),
        "created": report.get("created"),
        "tier": report.get("tier"),
        "baseModel": report.get("baseModel"),
        "failed": [c.get("id") for c in checks if c.get("severity") == "fail"],
        "warned": [c.get("id") for c in checks if c.get("severity") == "warn"],
    }


def _last_gate(settings: Settings) -> dict[str, Any] | None:
    report = _read(settings.reports_eval_dir / "eval-gate-latest.json")
    if not isinstance(report, dict):
        return None
    metrics = report.get("metrics") or {}
    return {
        "decision": report.get("decision"),
        "passed": report.get("passed"),
        "candidate": (report.get("candidate") or {}).get("ref"),
        "baseline": (report.get("baseline") or {}).get("ref"),
        "created": report.get("created"),
        "reasons": report.get("reasons", []),
        "promoted": report.get("promoted"),
        "goldenPassRate": metrics.get("goldenPassRate"),
        "valLoss": metrics.get("valLoss"),
    }
