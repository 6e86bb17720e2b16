"""The adapter registry: `reports/training/lora-adapters.json` and `reports/training/lora-latest.json`.

Shape of lora-adapters.json:

    {"format": "lunatrain-registry/1",
     "adapters": {NAME: {"versions": [ENTRY, ...],
                         "aliases": {"latest": "v3", "active": "v2"},
                         "activations": [{"version", "previous", "at", "forced", "reason"}, ...]}}}

An ENTRY records one trained adapter: name, version, baseModel {id, fingerprint, revision, configSha256},
datasetTier, datasetFingerprint, params, metrics {valLoss, baseValLoss, trainLoss}, path (relative to the
data root), jobId, created, tokenizerHash, templateHash. Entries are append-only: a version name is never
reused and its training facts never change; only annotations (`gate`, `merged`, `stale`, `replaced`) are
added later. Strategy `overwrite` keeps one slot named `current`; each run is still appended (with a
`revision` number) and older ones are marked `replaced`, so the history stays complete.

Every read-modify-write holds one file lock and replaces the file atomically, so concurrent jobs never
lose an entry and a crash never leaves a torn file. Version numbers are allocated and the adapter directory
is moved into place under the same lock, so two jobs can never claim the same version.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import Conflict, NotFound, UsageError
from .fsio import atomic_write_json, file_lock, read_json
from .settings import Settings, check_name, inside

FORMAT = "lunatrain-registry/1"
SLOT = "current"  # the single version of the overwrite strategy
_VERSION_RE = re.compile(r"^v(\d+)$")
# Fields a later step may add or change on an existing entry; everything else is immutable.
ANNOTATIONS = ("gate", "merged", "stale", "replaced")


def registry_path(settings: Settings) -> Path:
    return settings.reports_training_dir / "lora-adapters.json"


def latest_report_path(settings: Settings) -> Path:
    return settings.reports_training_dir / "lora-latest.json"


def _lock(settings: Settings):
    return file_lock(settings.reports_training_dir / ".lora-adapters.lock")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load(settings: Settings) -> dict[str, Any]:
    """The registry as a dict (an empty one when no adapter was ever registered)."""
    data = read_json(registry_path(settings), None)
    if not isinstance(data, dict) or "adapters" not in data:
        data = {"format": FORMAT, "adapters": {}}
    return data


def _save(settings: Settings, data: dict[str, Any]) -> None:
    atomic_write_json(registry_path(settings), data)


def _adapter(data: dict[str, Any], name: str) -> dict[str, Any]:
    return data["adapters"].setdefault(name, {"versions": [], "aliases": {}, "activations": []})


def _next_version(settings: Settings, name: str, entry_list: list[dict]) -> str:
    # Directories count too: a version dir left by a crash between move and register is never reused.
    used = [int(m.group(1)) for e in entry_list if (m := _VERSION_RE.match(e["version"]))]
    root = settings.adapters_dir / name
    if root.is_dir():
        used += [int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name))]
    return f"v{max(used, default=0) + 1}"


def publish(
    settings: Settings,
    name: str,
    strategy: str,
    work_dir: Path,
    entry: dict[str, Any],
    before_move: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Allocate the version, move `work_dir` into data/adapters/NAME/VERSION and register `entry`, all under
    the registry lock. `before_move(entry)` runs once the version is known (to write the final report into
    the work dir). Returns the registered entry."""
    check_name(name, "adapter name")
    root = settings.adapters_dir / name
    root.mkdir(parents=True, exist_ok=True)
    with _lock(settings):
        data = load(settings)
        adapter = _adapter(data, name)
        done = _by_job(data, entry.get("jobId"))
        if done is not None:  # this job published already (a retried or resumed run): one job, one version
            shutil.rmtree(work_dir, ignore_errors=True)
            return done
        entry = dict(entry, name=name, created=entry.get("created") or now())
        if strategy == "overwrite":
            entry["version"] = SLOT
            entry["revision"] = 1 + sum(1 for e in adapter["versions"] if e["version"] == SLOT)
        else:
            entry["version"] = _next_version(settings, name, adapter["versions"])
        entry["path"] = str(Path("data", "adapters", name, entry["version"]))
        if before_move:
            before_move(entry)
        target = inside(settings.home, entry["path"])
        if strategy == "overwrite":
            _swap_slot(root, work_dir)
            for old in adapter["versions"]:
                if old["version"] == SLOT:
                    old["replaced"] = True
        else:
            os.replace(work_dir, target)
        adapter["versions"].append(entry)
        adapter["aliases"]["latest"] = entry["version"]
        _save(settings, data)
    return entry


def _by_job(data: dict[str, Any], job_id: str | None) -> dict[str, Any] | None:
    if not job_id:
        return None
    found = [e for a in data["adapters"].values() for e in a["versions"] if e.get("jobId") == job_id]
    return found[-1] if found else None


def find_by_job(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """The version a job registered, or None (publishing is idempotent per job id)."""
    return _by_job(load(settings), job_id)


def _swap_slot(root: Path, work_dir: Path) -> None:
    """Point the `current` slot at the new run with one atomic rename of a symlink: readers see either the
    old adapter or the new one, never a missing or half-copied directory."""
    slots = root / ".slots"
    slots.mkdir(exist_ok=True)
    new = slots / f"{SLOT}-{uuid.uuid4().hex[:12]}"
    os.replace(work_dir, new)
    link = root / SLOT
    old = link.resolve() if link.is_symlink() else None
    tmp = root / f".{SLOT}.{uuid.uuid4().hex[:8]}"
    os.symlink(Path(".slots", new.name), tmp)
    if link.exists() and not link.is_symlink():  # a plain directory from an older layout
        shutil.rmtree(link)
    os.replace(tmp, link)
    if old is not None and old != new:
        shutil.rmtree(old, ignore_errors=True)


def write_latest(settings: Settings, report: dict[str, Any]) -> None:
    atomic_write_json(latest_report_path(settings), report)


# --- reading --------------------------------------------------------------------------------------


def list_adapters(settings: Settings) -> dict[str, Any]:
    """{name: {"versions": [...], "aliases": {...}, "activations": [...]}}."""
    return load(settings)["adapters"]


def parse_ref(ref: str) -> tuple[str, str]:
    """'name@version' (or 'name', meaning its active version, else latest) → (name, version-or-alias)."""
    name, _, version = ref.partition("@")
    check_name(name, "adapter name")
    if version:
        check_name(version, "adapter version")
    return name, version or ""


def get_version(settings: Settings, name: str, version: str = "") -> dict[str, Any]:
    """One registry entry by version (`v3`, `current`) or alias (`latest`, `active`); empty: active, else
    latest. For `current` the newest revision is returned."""
    adapter = list_adapters(settings).get(name)
    if adapter is None:
        raise NotFound(f"No adapter named {name!r} is registered; see `lunatrain adapters list`.")
    aliases = adapter.get("aliases", {})
    wanted = version or ("active" if aliases.get("active") else "latest")
    resolved = aliases.get(wanted, wanted)
    matches = [e for e in adapter["versions"] if e["version"] == resolved]
    if not matches:
        raise NotFound(f"Adapter {name!r} has no version {wanted!r}; see `lunatrain adapters show {name}`.")
    return matches[-1]


def adapter_dir(settings: Settings, entry: dict[str, Any]) -> Path:
    return inside(settings.home, entry["path"])


def by_base(settings: Settings) -> dict[str, dict[str, Any]]:
    """Versions grouped by base model fingerprint: {fingerprint: {"baseModel": id, "versions": [entry]}}."""
    groups: dict[str, dict[str, Any]] = {}
    for adapter in list_adapters(settings).values():
        for e in adapter["versions"]:
            base = e.get("baseModel", {})
            g = groups.setdefault(base.get("fingerprint", "?"), {"baseModel": base.get("id", "?"), "versions": []})
            g["versions"].append(e)
    return groups


# --- mutable aliases and annotations --------------------------------------------------------------


def activate(settings: Settings, name: str, version: str, *, force: bool = False, reason: str = "") -> dict[str, Any]:
    """Make NAME@VERSION the active adapter. Refused when it was trained on a different base model than the
    configured one (its LoRA weights would not fit), unless `force`."""
    from .models import resolve_base

    entry = get_version(settings, name, version)
    if entry.get("replaced"):
        raise Conflict(f"{name}@{entry['version']} revision {entry.get('revision')} was replaced and is gone.")
    base = resolve_base(None, settings)
    trained_on = entry.get("baseModel", {})
    if trained_on.get("fingerprint") != base.fingerprint and not force:
        raise Conflict(
            f"{name}@{entry['version']} was trained on base model {trained_on.get('id')!r}, but the configured base "
            f"model is {base.id!r} (fingerprints differ); retrain on the new base or pass --force."
        )
    with _lock(settings):
        data = load(settings)
        adapter = _adapter(data, name)
        previous = adapter["aliases"].get("active")
        adapter["aliases"]["active"] = entry["version"]
        adapter["activations"].append(
            {"version": entry["version"], "previous": previous, "at": now(), "forced": force, "reason": reason}
        )
        _save(settings, data)
    return entry


def rollback(settings: Settings, name: str) -> dict[str, Any]:
    """Active → the version that was active before it (walking the activation history)."""
    with _lock(settings):
        data = load(settings)
        adapter = data["adapters"].get(name)
        if adapter is None:
            raise NotFound(f"No adapter named {name!r} is registered.")
        current = adapter["aliases"].get("active")
        history = [a["version"] for a in adapter["activations"]]
        # The most recent activation of something other than the current one, skipping rolled-back hops.
        previous = next((v for v in reversed(history) if v != current), None)
        if current is None or previous is None:
            raise UsageError(f"Adapter {name!r} has no earlier active version to roll back to.")
        adapter["aliases"]["active"] = previous
        adapter["activations"].append(
            {"version": previous, "previous": current, "at": now(), "forced": False, "reason": "rollback"}
        )
        _save(settings, data)
    return get_version(settings, name, previous)


def annotate(settings: Settings, name: str, version: str, field: str, value: Any) -> dict[str, Any]:
    """Set an annotation (`gate`, `merged`, `stale`, `replaced`) on one entry; facts stay untouched."""
    if field not in ANNOTATIONS:
        raise UsageError(f"Registry field {field!r} cannot be changed; only {', '.join(ANNOTATIONS)} can.")
    with _lock(settings):
        data = load(settings)
        adapter = data["adapters"].get(name)
        entries = [e for e in (adapter or {}).get("versions", []) if e["version"] == version]
        if not entries:
            raise NotFound(f"Adapter {name}@{version} is not registered.")
        entries[-1][field] = value
        _save(settings, data)
    return entries[-1]


def record_gate(settings: Settings, name: str, version: str, result: dict[str, Any]) -> dict[str, Any]:
    """Store the eval gate's outcome on a version (e.g. {"status": "passed", "reason": ..., "at": ...})."""
    return annotate(settings, name, version, "gate", result)


def refresh_stale(settings: Settings) -> list[str]:
    """Mark versions trained on any content the store has deleted (its tombstones); call after a delete."""
    from .store import deleted_hashes

    if not registry_path(settings).exists():
        return []
    return mark_stale(settings, set(deleted_hashes(settings)))


def mark_stale(settings: Settings, deleted_hashes: set[str], reason: str = "trained on a deleted example") -> list[str]:
    """Mark every version whose train-hashes.txt contains one of `deleted_hashes` as stale ("retrain
    needed"); returns the refs marked."""
    marked = []
    with _lock(settings):
        data = load(settings)
        for name, adapter in data["adapters"].items():
            for e in adapter["versions"]:
                if e.get("stale") or e.get("replaced"):
                    continue
                hashes_file = settings.home / e["path"] / "train-hashes.txt"
                try:
                    trained = set(hashes_file.read_text(encoding="utf-8").split())
                except OSError:
                    continue
                hit = trained & deleted_hashes
                if hit:
                    e["stale"] = {"reason": reason, "hashes": sorted(hit)[:20], "at": now()}
                    marked.append(f"{name}@{e['version']}")
        if marked:
            _save(settings, data)
    return marked
