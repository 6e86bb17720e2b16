"""The adapter registry: `reports/training/lora-adapters.json` and `reports/training/lora-latest.json`.

Shape of lora-adapters.json:

    {"format": "lunatrain-registry/1",
     "adapters": {NAME: {"versions": [ENTRY, ...],
                         "aliases": {"latest": "v3", "active": "v2"},
                         "activeByBase": {BASE_FINGERPRINT: {"version": "v2", "baseModel": "luna-tiny"}, ...},
                         "activations": [{"version", "previous", "base", "at", "forced", "reason"}, ...]}}}

`active` is kept per adapter name and base model (keyed by the base's fingerprint: the same id with other
weights is another base), so training on a new base never takes the old base's adapter away. An older file
with one `aliases.active` is read as that version's base entry and written back in the new shape on the
next update. `aliases.active` is still written for readers of the old format (deprecated): the version
whose activation is the most recent one still standing, on whichever base.

An ENTRY records one trained adapter: name, version, baseModel {id, fingerprint, revision, configSha256},
datasetTier, datasetFingerprint, params, metrics {valLoss, baseValLoss, trainLoss}, path (relative to the
data root), jobId, created, tokenizerHash, templateHash. Entries are append-only: a version name is never
reused and its training facts never change; only annotations (`gate`, `merged`, `stale`, `replaced`) are
added later. Strategy `overwrite` keeps one slot named `current`; each run is still appended (with a
`revision` number) and older ones are marked `replaced`, so the history stays complete. A run that the
eval gate will judge is first `staged` (its files beside the slot, the entry not yet what `current`
names): the slot takes it only when the gate passes, and a failing one never reaches what is served. A
staged run records its process (`stagedBy`); one whose process stopped before the gate decided is settled
as not kept by the next publish to that adapter or by `lunatrain adapters repair` (a job's, by the trainer).

Every read-modify-write holds one file lock and replaces the file atomically, so concurrent jobs never
lose an entry and a crash never leaves a torn file. Version numbers are allocated and the adapter directory
is moved into place under the same lock, so two jobs can never claim the same version.

A file that cannot be read (not JSON, cut short, the wrong shape) is never replaced: every reader raises
RegistryUnreadable naming it and the fix, `lunatrain adapters repair`, which keeps the damaged file as
`lora-adapters.json.damaged-<time>` and rebuilds the registry from each version folder's
training-report.json and gate.json, each adapter's activations.jsonl (what is active, and the history), and
the merged models' markers.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import re
import shlex
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import procs
from .errors import (
    JSON_FAULTS,
    Conflict,
    DamagedFile,
    LunaError,
    NotFound,
    RegistryUnreadable,
    StorageError,
    UsageError,
)
from .formats import json_type
from .fsio import atomic_write_json, atomic_write_text, file_lock, read_json, storage_guard
from .messages import coded, counted
from .params import MAX_RANK
from .settings import Settings, check_name, inside
from .wire import camel, compact_stamp
from .wire import now_iso as now

log = logging.getLogger("lunatrain.registry")

# What each version folder holds besides the PEFT files: written by train.py, read by repair, the CLI and the API.
REPORT_FILE = "training-report.json"
LOSS_CURVE_FILE = "loss-curve.png"
TRAIN_HASHES_FILE = "train-hashes.txt"  # the content hashes of the examples trained on (stale marking)
MERGE_FILE = "lunatrain-merge.json"  # in a merged model's folder: what it was merged from (merge.py writes it)
CARD_FILE = "README.md"  # the version's model card (train.model_card), in place of PEFT's
WORK_DIR = ".work"  # beside an adapter's versions: a folder per run (its work dir: checkpoints, the files to publish)
GATE_FILE = "gate.json"  # the eval gate's outcome for this version, as the registry records it (for repair)
# Beside the version folders (data/adapters/NAME/): one line per change of what is active, as the registry's
# `activations` records it plus the base's id, so `adapters repair` restores what was active and the history.
ACTIVATIONS_FILE = "activations.jsonl"

FORMAT = "lunatrain-registry/1"
# The registry's `copies`: which folder copies repair reads (gate.json, activations.jsonl) it has written for
# everything it records. A registry from before them has none; its first read writes them (`_keep_copies`).
COPIES = 1
SLOT = "current"  # the single version of the overwrite strategy
ALIASES = ("latest", "active")  # names get_version resolves to a version; never a version's own name
_VERSION_RE = re.compile(r"^v(\d+)$")
# Fields a later step may add or change on an existing entry; everything else is immutable.
ANNOTATIONS = ("gate", "merged", "stale", "replaced")


def registry_path(settings: Settings) -> Path:
    return settings.registry_file


_held = threading.local()  # how deep this thread is in the registry's lock (flock does not nest)


@contextlib.contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    with file_lock(settings.reports_training_dir / ".lora-adapters.lock"):
        _held.depth = getattr(_held, "depth", 0) + 1
        try:
            yield
        finally:
            _held.depth -= 1


def load(settings: Settings) -> dict[str, Any]:
    """The registry as a dict (an empty one when no adapter was ever registered). A file that exists but
    cannot be used raises RegistryUnreadable: it is never read as empty, so no write can replace it."""
    path = registry_path(settings)
    missing = object()  # not None: a file holding `null` is a damaged registry, not an absent one
    try:
        data = read_json(path, missing)
    except DamagedFile as err:
        raise _unreadable(path, err.why) from None
    except StorageError:
        if path.is_dir():  # made by hand or by a tool: as unreadable as a damaged file, and a repair moves it aside
            raise _unreadable(path, "a folder stands in its place") from None
        raise
    if data is missing:
        # No file, yet trained versions on disk (a file deleted by hand or lost with a backup): read as empty,
        # the next run's save would leave every earlier version unregistered and gate against the base model.
        found = _report_files(settings)
        if found:
            why = f"missing, although {counted(len(found), 'adapter version')} {'lies' if len(found) == 1 else 'lie'} in {settings.adapters_dir}"
            raise RegistryUnreadable(
                f"The adapter registry {path} is {why}; nothing was changed. "
                "Run `lunatrain adapters repair` to rebuild it from the adapter folders.",
                params={"path": str(path), "reason": why},
            )
        return {"format": FORMAT, "adapters": {}}
    problem = shape_problem(data)
    if problem:
        raise _unreadable(path, problem)
    for adapter in data["adapters"].values():
        _migrate_active(adapter)
        _camel_thresholds(adapter)
    if data.get("copies") != COPIES and data["adapters"]:
        _keep_copies(settings, data)
    return data


def _camel_thresholds(adapter: dict[str, Any]) -> None:
    """A gate recorded before thresholds were written in camelCase (`min_golden_pass_rate`) reads as one
    recorded since: a script reading `minGoldenPassRate` finds it for every version, as the API shows it."""
    for entry in adapter.get("versions", []):
        gate = entry.get("gate")
        if isinstance(gate, dict) and isinstance(gate.get("thresholds"), dict):
            gate["thresholds"] = camel(gate["thresholds"])


def _keep_copies(settings: Settings, data: dict[str, Any]) -> None:
    """Write the folder copies a registry from before them lacks, then record that it has them: once, at the
    first read by this version, while the registry can still be read (a repair restores only what the folders
    keep). A copy that cannot be written (a read-only data root) is tried again at the next read."""
    try:
        if getattr(_held, "depth", 0):  # the caller holds the lock and will save `data`; save it now as well
            _save(settings, data)
        else:
            with _lock(settings):  # read again under the lock, which saves (unless another process did)
                data["copies"] = load(settings).get("copies")
    except (OSError, LunaError) as exc:
        # Not a warning: a read-only data root (a backup) would say it at every read; the registry is intact.
        log.info("could not save the adapter registry with its folder copies: %s", exc)


def _write_copies(settings: Settings, data: dict[str, Any]) -> None:
    """Each version's gate outcome in its folder and each adapter's whole activation history in its journal,
    as `record_gate` and `_journal` write them from now on (the registry is the record: its history holds
    every journaled line and any a full disk kept out)."""
    for name, adapter in data["adapters"].items():
        for entry in adapter["versions"]:
            folder = settings.home / entry["path"]
            gate = entry.get("gate")
            current = not entry.get("replaced") and not entry.get("staged")  # what record_gate would write for
            if isinstance(gate, dict) and current and folder.is_dir() and not (folder / GATE_FILE).exists():
                atomic_write_json(folder.resolve() / GATE_FILE, gate)
        records = [r for r in adapter.get("activations", []) if isinstance(r, dict)]
        if records:
            ids = {fp: (a or {}).get("baseModel") for fp, a in adapter.get("activeByBase", {}).items()}
            lines = [json.dumps(r | {"baseModel": ids.get(r.get("base"))}, ensure_ascii=False) for r in records]
            atomic_write_text(settings.adapters_dir / name / ACTIVATIONS_FILE, "".join(f"{ln}\n" for ln in lines))


def _unreadable(path: Path, why: str) -> RegistryUnreadable:
    # With its path and reason as parameters, the dashboard says the sentence in its language, once (without
    # them it put its label before the server's English sentence, which says the same).
    return RegistryUnreadable(
        f"The adapter registry {path} cannot be read ({why}); it was left untouched. "
        "Run `lunatrain adapters repair` to rebuild it from the adapter folders.",
        params={"path": str(path), "reason": why},
    )


def shape_problem(data: Any) -> str | None:
    """What makes `data` not a registry, or None. Checks the structure every reader and writer relies on."""
    if not isinstance(data, dict):
        return f"a JSON {json_type(data)}, not an object"
    if data.get("format", FORMAT) != FORMAT:
        return f"format {data.get('format')!r}, expected {FORMAT!r}"
    adapters = data.get("adapters")
    if not isinstance(adapters, dict):
        return 'no "adapters" object' if adapters is None else '"adapters" is not an object'
    for name, adapter in adapters.items():
        if not isinstance(adapter, dict) or not isinstance(adapter.get("versions"), list):
            return f"adapter {name!r} has no list of versions"
        for i, entry in enumerate(adapter["versions"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
                return f"entry {i + 1} of adapter {name!r} has no version name"
            problem = _entry_problem(name, entry)
            if problem:
                return f"{name}@{entry['version']} {problem}"
        aliases, activations = adapter.get("aliases", {}), adapter.get("activations", [])
        if not isinstance(aliases, dict) or not isinstance(activations, list):
            return f"the aliases or activations of adapter {name!r} have the wrong type"
        # Each alias names a version; each activation record names a version (none: a deactivation), the
        # base's fingerprint and the version before: rollback, deactivate and the listings take them as such.
        if not all(isinstance(v, str) for v in aliases.values()):
            return f"an alias of adapter {name!r} names no version"
        if not all(
            isinstance(r, dict) and all(isinstance(r.get(k), str | None) for k in ("version", "base", "previous"))
            for r in activations
        ):
            return f"an activation record of adapter {name!r} has the wrong type"
        active = adapter.get("activeByBase", {})
        # Every reader of what is active takes each value's version name without checking.
        if not isinstance(active, dict) or not all(
            isinstance(a, dict) and isinstance(a.get("version"), str) for a in active.values()
        ):
            return f"the activeByBase of adapter {name!r} has the wrong type"
    return None


def _entry_problem(name: str, entry: dict[str, Any]) -> str | None:
    """What every reader takes from an entry without checking: its name, the folder of its files, the base
    model it was trained on (id and fingerprint), its metrics and its gate outcome."""
    if entry.get("name") != name:
        return f"names another adapter ({entry.get('name')!r})"
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        return "has no path"
    base = entry.get("baseModel")
    if not (isinstance(base, dict) and isinstance(base.get("id"), str) and isinstance(base.get("fingerprint"), str)):
        return "has no base model (id and fingerprint)"
    metrics = entry.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(metrics.get(k), int | float | None) for k in ("valLoss", "baseValLoss", "trainLoss")
    ):
        return "has metrics that are not numbers"
    if not isinstance(entry.get("gate"), dict | None):
        return "has a gate outcome that is not an object"
    if not isinstance(entry.get("created"), str | None):  # a timestamp: the listings and /v1/models parse it
        return "has a creation time that is not a timestamp"
    return None


def _migrate_active(adapter: dict[str, Any]) -> None:
    """A file from before per-base activation has one `aliases.active`: it becomes the entry for the base
    that version was trained on (every write saves the new shape)."""
    if "activeByBase" in adapter:
        return
    adapter["activeByBase"] = {}
    version = adapter.get("aliases", {}).get("active")
    entry = _entry(adapter, version) if version else None
    if entry is not None:
        base = entry.get("baseModel") or {}
        adapter["activeByBase"][base.get("fingerprint", "?")] = {"version": version, "baseModel": base.get("id")}


def _entry(adapter: dict[str, Any], version: str) -> dict[str, Any] | None:
    # A staged overwrite revision is not yet what its version name (`current`) stands for, and one the gate
    # refused never was: the slot holds the newest revision that is neither.
    matches = [e for e in adapter.get("versions", []) if e.get("version") == version and not e.get("staged")]
    if version == SLOT:
        matches = [e for e in matches if not e.get("replaced")] or matches
    return matches[-1] if matches else None


def same_entry(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two entries are one run: the same version and, for the overwrite slot, the same revision."""
    return a is not None and b is not None and (a["version"], a.get("revision")) == (b["version"], b.get("revision"))


def _sync_legacy_alias(adapter: dict[str, Any]) -> None:
    """`aliases.active` for readers of the old format: the most recent activation still standing."""
    standing = {(fp, a["version"]) for fp, a in adapter["activeByBase"].items()}
    latest = next(
        (
            h["version"]
            for h in reversed(adapter.get("activations", []))
            if (h.get("base"), h.get("version")) in standing
        ),
        None,
    )
    if latest is None and standing:
        latest = sorted(standing)[0][1]
    if latest is None:
        adapter.get("aliases", {}).pop("active", None)
    else:
        adapter["aliases"]["active"] = latest


def _save(settings: Settings, data: dict[str, Any]) -> None:
    if data.get("copies") != COPIES:  # a registry from before the folder copies (or a new one): write them first
        try:
            _write_copies(settings, data)
            data["copies"] = COPIES
        except (OSError, LunaError) as exc:  # the registry is the record: a copy never fails its write
            log.info("could not write the adapters' gate.json and %s copies: %s", ACTIVATIONS_FILE, exc)
    atomic_write_json(registry_path(settings), data)


def _adapter(data: dict[str, Any], name: str) -> dict[str, Any]:
    adapter = data["adapters"].setdefault(name, {"versions": [], "aliases": {}, "activeByBase": {}, "activations": []})
    adapter.setdefault("aliases", {})
    adapter.setdefault("activations", [])
    adapter.setdefault("activeByBase", {})
    return adapter


def _save_activations(
    settings: Settings, data: dict[str, Any], name: str, changes: list[tuple[dict[str, Any], str | None]]
) -> None:
    """Record activation changes (each a history record and its base's id; `activeByBase` already updated):
    in the registry's history, saved, then in the adapter's journal. The caller holds the lock."""
    adapter = data["adapters"][name]
    adapter["activations"] += [record for record, _ in changes]
    _sync_legacy_alias(adapter)
    _save(settings, data)
    for record, base_id in changes:
        _journal(settings, name, record, base_id)


def _journal(settings: Settings, name: str, record: dict[str, Any], base_id: str | None) -> None:
    """Append an activation change (saved in the registry already) to the adapter's activations.jsonl, under
    the registry's lock. The registry stays the record: a line that cannot be written costs only `adapters
    repair` that step, so a full disk here does not turn a change that was made into an error."""
    line = json.dumps(record | {"baseModel": base_id}, ensure_ascii=False) + "\n"
    try:
        with (settings.adapters_dir / name / ACTIVATIONS_FILE).open("a+b") as f:
            if f.tell() > 0:  # after a line a crash cut short, start a new one (the torn one is read past)
                f.seek(-1, os.SEEK_END)
                line = line if f.read(1) == b"\n" else "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        log.warning("could not record %s's activation change in %s: %s", name, ACTIVATIONS_FILE, exc)


def _journal_records(settings: Settings, name: str) -> list[Any]:
    """The records of adapter `name`'s activations.jsonl as written (`_journal`); a line that cannot be read
    (the torn last line of a crash) is left out, and a journal that cannot be read gives none."""
    try:
        lines = (settings.adapters_dir / name / ACTIVATIONS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        with contextlib.suppress(*JSON_FAULTS):
            records.append(json.loads(line))
    return records


def _next_version(settings: Settings, name: str, adapter: dict[str, Any]) -> str:
    # Directories count too: a version dir left by a crash between move and register is never reused. So do
    # the versions the activation history names: one whose folder was removed (and that a repair therefore
    # left out) would otherwise come back under its number, and a rollback would walk into the newcomer.
    # The adapter's journal too: with every version's folder gone, repair leaves the adapter out of the
    # registry altogether, and its history lives on only there.
    named = [e["version"] for e in adapter["versions"]]
    for record in (r for r in adapter.get("activations", []) + _journal_records(settings, name) if isinstance(r, dict)):
        named += [v for v in (record.get("version"), record.get("previous")) if isinstance(v, str)]
    used = [int(m.group(1)) for v in named if (m := _VERSION_RE.fullmatch(v))]
    root = settings.adapters_dir / name
    if root.is_dir():
        used += [int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.fullmatch(p.name))]
    return f"v{max(used, default=0) + 1}"


def work_root(settings: Settings, name: str) -> Path:
    """The folder of adapter `name`'s run work dirs (each run's checkpoints and the files it publishes)."""
    return settings.adapters_dir / name / WORK_DIR


def publish_folders(settings: Settings, name: str) -> list[Path]:
    """Where a run of adapter `name` writes on its way to `publish`: its work dir and checkpoints, the version
    folder or the overwrite slot, the registry and its lock. Training checks them before it starts."""
    root = settings.adapters_dir / name
    return [work_root(settings, name), root / ".slots", root, settings.reports_training_dir]


def check_slot_base(settings: Settings, name: str, strategy: str, base: Any) -> None:
    """Conflict for an overwrite run of `name` on another base model (`base`, models.BaseModelInfo) than the
    run its slot holds: the slot keeps one run, and what is active on each base names it by `current`, so the
    new run would take the other base's adapter away and be served there. The same base, moved (same weights)
    or updated in place under its name (same id), goes on."""
    if strategy != "overwrite":
        return
    held = [
        e
        for e in load(settings)["adapters"].get(name, {}).get("versions", [])
        if e["version"] == SLOT and not e.get("replaced") and not e.get("staged")
    ]
    trained = (held[-1].get("baseModel") or {}) if held else {}
    if not held or base.fingerprint == trained.get("fingerprint") or same_base_id(settings, base.id, trained.get("id")):
        return
    raise Conflict(
        f"{name}@{SLOT} holds a run on base model {trained.get('id')!r}; an overwrite run on {base.id!r} would "
        "replace it, and with it the adapter that base serves: train under another --adapterName, or with "
        "--adapterStrategy versioned.",
        code="adapter.slot_other_base",
        params={"name": name, "slotBase": trained.get("id"), "baseModel": base.id},
    )


def publish(
    settings: Settings,
    name: str,
    strategy: str,
    work_dir: Path,
    entry: dict[str, Any],
    before_move: Callable[[dict[str, Any]], None] | None = None,
    *,
    stage: bool = False,
) -> dict[str, Any]:
    """Allocate the version, move `work_dir` into data/adapters/NAME/VERSION and register `entry`, all under
    the registry lock. `before_move(entry)` runs once the version is known (to write the final report into
    the work dir). `stage` (overwrite only: a gate will judge the run): the run waits beside the slot until
    `settle_slot`. Returns the registered entry."""
    check_name(name, "adapter name")
    root = settings.adapters_dir / name
    root.mkdir(parents=True, exist_ok=True)
    with _lock(settings):
        data = load(settings)
        if not registry_path(settings).exists():
            # The first version of a data root: the file exists before its folder does, so a reader between the
            # move and the save below (or after a crash there) never finds versions without a registry, which
            # `load` refuses as a lost registry.
            _save(settings, data)
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
            entry["version"] = _next_version(settings, name, adapter)
        entry["path"] = str(Path("data", "adapters", name, entry["version"]))
        staged = root / ".slots" / f"{SLOT}-{uuid.uuid4().hex[:12]}" if strategy == "overwrite" and stage else None
        if staged is not None:
            entry["staged"] = str(Path("data", "adapters", name, ".slots", staged.name))
            entry["stagedBy"] = _this_process()
        _settle_orphans(settings, adapter)  # a staged run whose process stopped before its gate decided
        if before_move:
            before_move(entry)
        target = inside(settings.home, entry["path"])
        swapped = strategy == "overwrite" and staged is None  # `current` points at the new run at once
        left = None  # the slot's folder the new one replaces: removed once registered
        if staged is not None:
            staged.parent.mkdir(exist_ok=True)
            moved = staged
        elif strategy == "overwrite":
            (root / ".slots").mkdir(exist_ok=True)
            moved = root / ".slots" / f"{SLOT}-{uuid.uuid4().hex[:12]}"
        else:
            moved = target
        os.replace(work_dir, moved)
        if swapped:
            left = _point_slot(root, moved, remove_left=False)
            _replace_older(adapter)
        adapter["versions"].append(entry)
        adapter["aliases"]["latest"] = entry["version"]
        try:
            _save(settings, data)
        except BaseException:
            # Not registered (a full disk, say): the run goes back to its work folder, its checkpoints with it,
            # so that "the previous data is intact" holds and a resume finds them; the slot serves what it did.
            # (A save that failed after its rename, in the folder's fsync, did register it: it stays.)
            if _not_registered_on_disk(settings, name, entry):
                if swapped:
                    if left is not None:
                        _point_slot(root, left, remove_left=False)  # not removing `moved`: it goes back
                    else:
                        (root / SLOT).unlink(missing_ok=True)
                os.replace(moved, work_dir)
            elif left is not None:
                shutil.rmtree(left, ignore_errors=True)
            raise
        if left is not None:
            shutil.rmtree(left, ignore_errors=True)
    return entry


def _not_registered_on_disk(settings: Settings, name: str, entry: dict[str, Any]) -> bool:
    """Whether the registry file, as read now, lacks `entry` (a publish whose save failed); False when it
    cannot be read, which leaves the published folder where the registry may name it."""
    try:
        versions = load(settings)["adapters"].get(name, {}).get("versions", [])
    except (LunaError, OSError):
        return False
    return not any(
        e.get("version") == entry["version"] and e.get("revision") == entry.get("revision") for e in versions
    )


def _by_job(data: dict[str, Any], job_id: str | None) -> dict[str, Any] | None:
    if not job_id:
        return None
    found = [e for a in data["adapters"].values() for e in a["versions"] if e.get("jobId") == job_id]
    return found[-1] if found else None


def find_by_job(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """The version a job registered, or None (publishing is idempotent per job id)."""
    return _by_job(load(settings), job_id)


class ActiveMoved(Conflict):
    """`activate` or `settle_slot` (`replacing=...`) found another entry active than the one it may replace (`active`; None: none)."""

    def __init__(self, active: dict[str, Any] | None) -> None:
        super().__init__("the active version changed meanwhile")
        self.active = active


def settle_slot(
    settings: Settings,
    name: str,
    revision: int,
    *,
    keep: bool,
    replacing: Callable[[dict[str, Any] | None], bool] | None = None,
) -> dict[str, Any]:
    """A staged overwrite revision after its gate: `keep` (it passed) puts it in the slot, replacing the
    older revisions, unless a newer run took the slot meanwhile; otherwise its files go and the slot keeps
    serving what it held (the entry stays in the history, `replaced`, with its gate outcome). Settling twice
    changes nothing. `replacing`: as `activate`'s, asked under the lock before a kept revision takes the
    slot; when it says no, the revision is not kept, and ActiveMoved says what is active."""
    moved: ActiveMoved | None = None
    with _lock(settings):
        data = load(settings)
        adapter = _adapter(data, name)
        entry = next((e for e in adapter["versions"] if e["version"] == SLOT and e.get("revision") == revision), None)
        if entry is None:
            raise NotFound(f"Adapter {name}@{SLOT} has no revision {revision}.")
        if keep and replacing is not None and "staged" in entry:
            active = active_of(adapter, (entry.get("baseModel") or {}).get("fingerprint", "?"))
            if not replacing(active):
                keep, moved = False, ActiveMoved(active)
        staged = entry.pop("staged", None)
        entry.pop("stagedBy", None)
        if staged is None:
            return entry
        # A newer run took the slot while this one waited for its gate (an ungated publish marks every older
        # revision replaced): the newest stays, whatever this gate decided.
        if keep and not entry.get("replaced"):
            _point_slot(settings.adapters_dir / name, inside(settings.home, staged))
            _replace_older(adapter, entry)
        else:
            shutil.rmtree(inside(settings.home, staged), ignore_errors=True)
            entry["replaced"] = True
            if not keep:  # refused (or its run ended before the gate): it never held the slot
                entry["notKept"] = True
        _save(settings, data)
    if moved is not None:
        raise moved
    return entry


def _this_process() -> dict[str, Any]:
    """Who will settle a staged run: this process (a pid alone may be reused, so its start too), on this
    host (a data root on a shared disk may be written from several)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": procs.started(os.getpid())}


def _gone(owner: Any) -> bool:
    """True only when `owner` ran on this host and that process no longer runs; unsure means False."""
    import psutil

    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    try:
        pid = int(owner["pid"])
        return not procs.is_same(pid, float(owner["started"])) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _settle_orphans(settings: Settings, adapter: dict[str, Any]) -> list[dict[str, Any]]:
    """Settle each staged run of `adapter` whose process stopped before its gate decided (a `lunatrain lora
    --local` killed mid-gate), as an unjudged run is settled: the slot keeps what it held, the run's files go,
    its entry stays in the history, replaced. A job's run is left to the trainer's recovery, which also records
    the job's gate. Call under the lock; the caller saves. Returns the entries settled."""
    settled = []
    for entry in adapter["versions"]:
        if entry.get("staged") and not entry.get("jobId") and _gone(entry.get("stagedBy")):
            shutil.rmtree(inside(settings.home, entry.pop("staged")), ignore_errors=True)
            entry.pop("stagedBy", None)
            entry["replaced"] = True
            settled.append(entry)
    return settled


def _replace_older(adapter: dict[str, Any], newest: dict[str, Any] | None = None) -> None:
    """Mark the slot's revisions before `newest` replaced (all of them without one). A newer revision staged
    for its own gate is left to it: two runs at once, the older one judged first, and the newer one that passes
    takes the slot after it, as it would have run after it."""
    below = newest.get("revision") if newest is not None else None
    for old in adapter["versions"]:
        if old["version"] == SLOT and old is not newest:
            if below is not None and old.get("staged") and (old.get("revision") or 0) > below:
                continue
            old["replaced"] = True


def _point_slot(root: Path, new: Path, *, remove_left: bool = True) -> Path | None:
    """Repoint the `current` link at `new` (a folder in .slots) with one atomic rename of a symlink, so that
    readers see either the old adapter or the new one, never a missing or half-copied directory; and remove
    the folder it left (`remove_left`; else return it, None when it left none)."""
    link = root / SLOT
    old = link.resolve() if link.is_symlink() else None
    if link.exists() and not link.is_symlink():  # a plain directory from an older layout: into .slots
        old = root / ".slots" / f"{SLOT}-{uuid.uuid4().hex[:12]}"
        old.parent.mkdir(exist_ok=True)
        os.replace(link, old)
    tmp = root / f".{SLOT}.{uuid.uuid4().hex[:8]}"
    os.symlink(Path(".slots", new.name), tmp)
    os.replace(tmp, link)
    left = old if old is not None and old != new else None
    if left is not None and remove_left:
        shutil.rmtree(left, ignore_errors=True)
        return None
    return left


def write_latest(settings: Settings, report: dict[str, Any]) -> None:
    with _latest_lock(settings):  # annotate_latest reads, then writes: never across another run's report
        atomic_write_json(settings.lora_latest_report, report)


def _latest_lock(settings: Settings) -> Any:
    return file_lock(settings.lora_latest_report.with_name(".lora-latest.lock"))


_RUN_KEYS = ("adapterName", "version", "revision", "jobId", "created")  # what tells one run's report from another's


def annotate_latest(settings: Settings, run: dict[str, Any], **fields: Any) -> None:
    """Add `fields` (the gate's decision, once it ran) to lora-latest.json while it is still the report of
    `run`: another run may have written it since, and that report is not this run's to change. Best effort:
    the registry entry already holds the decision, so an unreadable report is left as it is."""
    with _latest_lock(settings):
        try:
            latest = read_json(settings.lora_latest_report)
        except LunaError:
            return
        if isinstance(latest, dict) and all(latest.get(k) == run.get(k) for k in _RUN_KEYS):
            atomic_write_json(settings.lora_latest_report, latest | fields)


# --- reading --------------------------------------------------------------------------------------


def list_adapters(settings: Settings) -> dict[str, Any]:
    """{name: {"versions": [...], "aliases": {...}, "activations": [...]}}."""
    return load(settings)["adapters"]


def parse_ref(ref: str) -> tuple[str, str]:
    """'name@version' (or 'name', meaning its active version, else latest) → (name, version-or-alias)."""
    name, at, version = ref.partition("@")
    check_name(name, "adapter name")
    if at and not version:
        raise UsageError(f"{ref!r} names no version after '@': use NAME or NAME@VERSION (such as {name}@v1).")
    if version:
        check_name(version, "adapter version")
    return name, version


def latest_on_base(settings: Settings, name: str) -> str:
    """The newest version of `name` trained on the configured base model, else `latest` (whose refusal then
    says why): an activation without a version, after a base switch, means one of the base it serves."""
    adapter = list_adapters(settings).get(name)
    if adapter is None:
        raise _not_registered(name)
    fingerprint = configured_base(settings).fingerprint
    own = [
        e["version"]
        for e in adapter["versions"]
        if (e.get("baseModel") or {}).get("fingerprint") == fingerprint
        and not (e.get("replaced") or e.get("notKept") or e.get("staged"))
    ]
    return own[-1] if own else "latest"  # versions are kept in the order they were registered


def get_version(settings: Settings, name: str, version: str = "", *, base: str | None = None) -> dict[str, Any]:
    """One registry entry by version (`v3`, `current`) or alias (`latest`, `active`: the version active on
    base fingerprint `base`, default the configured base model); empty: active, else latest. For `current`
    the newest revision is returned."""
    adapter = list_adapters(settings).get(name)
    if adapter is None:
        raise _not_registered(name)
    wanted = version or ("active" if adapter["activeByBase"] else "latest")  # nothing active: no base to resolve
    if wanted == "active":
        fingerprint = base or configured_base(settings).fingerprint
        active = adapter["activeByBase"].get(fingerprint)
        if active is None and not version:
            wanted = "latest"
        elif active is None:
            # Active on another base (a base switch): that version is named with its base, as merge says it.
            others = [(a, base_flag(settings, a.get("baseModel"))) for fp, a in adapter["activeByBase"].items()]
            elsewhere = "".join(
                f"; on base model {a.get('baseModel')!r} it is {a['version']} (`{name}@{a['version']}` with "
                f"`{flag.strip()}`)"
                for a, flag in others
                if flag  # another build under the configured base's own id: no --baseModel can name it
            )
            raise NotFound(
                f"Adapter {name!r} has no active version on {_base_label(settings, fingerprint)}{elsewhere}; "
                f"to use one here, activate a version trained on it with `lunatrain adapters activate {name}@VERSION`."
            )
        else:
            wanted = active["version"]
    resolved = adapter.get("aliases", {}).get(wanted, wanted) if wanted == "latest" else wanted
    entry = _entry(adapter, resolved)
    if entry is None:
        raise NotFound(f"Adapter {name!r} has no version {wanted!r}; `lunatrain adapters list` shows its versions.")
    return entry


def _not_registered(name: str) -> NotFound:
    return NotFound(
        f"No adapter named {name!r} is registered; see `lunatrain adapters list` (GET /assistant/training/adapters)."
    )


def same_base_id(settings: Settings, a: str | None, b: str | None) -> bool:
    """Whether two base ids name one base: the same id, or the same local directory however it is written
    (`--baseModel data/models/merged/x` is recorded absolute, `ASSISTANT_BASE_MODEL` keeps it as written)."""
    if a == b:
        return True
    if not a or not b:
        return False
    from .models import local_dir

    here = local_dir(a, settings.home)
    return here is not None and here == local_dir(b, settings.home)


def base_label(
    settings: Settings, base_id: str | None, fingerprint: str, configured: Any, entry: dict[str, Any] | None = None
) -> str:
    """How a base an activation names is shown: its id, or "another build of ID" where the configured base
    (`configured`, models.BaseModelInfo, None: unknown) has that id with other weights (updated in place,
    another hub commit), so that a version no longer served does not read as active on the served base. The
    revision is that of `entry`'s training base, when it was trained on that build. A local directory is the
    configured one however either is written; the configured base's weights at another place (a folder moved
    and configured there) are named by the place configured now."""
    if configured is not None and fingerprint == configured.fingerprint:
        return str(base_id) if same_base_id(settings, base_id, configured.id) else str(configured.id)
    if configured is None or not same_base_id(settings, base_id, configured.id):
        return str(base_id)
    trained_on = (entry or {}).get("baseModel") or {}
    revision = trained_on.get("revision") if trained_on.get("fingerprint") == fingerprint else None
    return f"another build of {base_id}" + (f" (revision {revision[:12]})" if revision else "")


def base_flag(settings: Settings, base_id: str | None) -> str:
    """` --baseModel BASE` for a command that acts on base `base_id`, where that is not the configured base
    model (without it the command would act on the configured one); else nothing."""
    if not base_id or base_id == settings.base_model:
        return ""
    from .models import local_dir

    here = local_dir(base_id, settings.home)
    if here is not None and here == local_dir(settings.base_model, settings.home):
        return ""
    return f" --baseModel {shlex.quote(base_id)}"


def named_flag(base_id: str, named: bool) -> str:
    """` --baseModel BASE` for a command suggested by one that named its base (`--baseModel`): without it the
    suggested command would act on the configured base, not the one named."""
    return f" --baseModel {shlex.quote(base_id)}" if named else ""


def configured_base(settings: Settings, ref: str | None = None) -> Any:
    """The base model runs use (ASSISTANT_BASE_MODEL unless `ref`), with its fingerprint."""
    from .models import resolve_base

    return resolve_base(ref, settings)


def trained_base(settings: Settings, entry: dict[str, Any], to_do: str) -> Any:
    """The base model `entry` was trained on, as found now. When it cannot be used (a directory moved away), the
    command was right and the base is missing: one sentence naming the version, and what to do (`to_do`)."""
    from .models import resolve_base

    recorded = entry.get("baseModel") or {}
    base_id = recorded.get("id")
    moved = _moved_in(settings, base_id, recorded.get("fingerprint"), entry.get("path"))
    if isinstance(moved, tuple):  # this root is a copy of the recorded one, without the base
        old_root, missing = moved
        raise NotFound(
            f"{entry.get('name')}@{entry.get('version')} was trained on base model {base_id!r}, which is gone "
            f"from this data root ({missing}), a copy of {str(old_root)!r}; "
            f"put that base model back to {to_do}."
        )
    if moved is not None:
        return moved
    try:
        return resolve_base(base_id, settings)
    except UsageError as err:
        configured = _configured_with(settings, recorded.get("fingerprint"))
        if configured is not None:
            return configured
        raise NotFound(
            f"{entry.get('name')}@{entry.get('version')} was trained on base model {base_id!r}, which cannot be "
            f"used now ({err.message.rstrip('.')}); put that base model back to {to_do}."
        ) from None


def _configured_with(settings: Settings, fingerprint: str | None) -> Any:
    """The configured base model when it holds the weights `fingerprint` names, else None: the folder trained on
    was moved and ASSISTANT_BASE_MODEL (or --baseModel) names where it lies now, as status and chat find it."""
    from .models import TINY_ID

    if not fingerprint or settings.base_model == TINY_ID:  # built on first use: no folder moved there
        return None
    try:
        base = configured_base(settings)
    except LunaError:  # the configured base cannot be read either: the recorded one is what the sentence names
        return None
    return base if base.fingerprint == fingerprint else None


def _moved_in(settings: Settings, base_id: str | None, fingerprint: str | None, adapter_path: str | None = None) -> Any:
    """The base recorded as an absolute path outside this data root, found at the same relative place inside
    it with the same weights: the data root was moved or copied with its base inside (a merged model used as
    the next base), and the path recorded is the old root's. Preferred even where the old path still exists,
    so that a copy never reads another data root's files: where the base at that place here has other weights
    now and this root is a copy of the recorded one (the adapter's weights at `adapter_path` are the same in
    both) or the recorded path is gone, it is returned all the same, for the caller to refuse as a changed
    base. Where nothing is at that place and this root is a copy of the recorded one, (recorded root, missing
    place within it), for the caller to refuse as a missing base. None when there is none (then the recorded path is
    used: a base of another data root this one trained on, not a copy of it)."""
    from .models import resolve_base

    if not base_id or not fingerprint or not Path(base_id).is_absolute():
        return None
    path = Path(base_id)
    if path.is_relative_to(settings.home):
        return None
    changed = missing = None
    for i in range(1, len(path.parts)):
        candidate = settings.home.joinpath(*path.parts[i:])
        if not candidate.is_dir():
            old_root = Path(*path.parts[:i])
            if missing is None and not candidate.exists() and _same_adapter(old_root, settings.home, adapter_path):
                missing = (old_root, Path(*path.parts[i:]))
            continue
        with contextlib.suppress(LunaError):
            found = resolve_base(str(candidate), settings)
            if found.fingerprint == fingerprint:
                return found
            copied = not path.is_dir() or _same_adapter(Path(*path.parts[:i]), settings.home, adapter_path)
            if changed is None and copied:
                changed = found  # the longest such place in a copy: the one most like the recorded path
    return changed or missing


def _same_adapter(old_root: Path, root: Path, adapter_path: str | None) -> bool:
    """Whether the adapter at `adapter_path` (relative to a data root) has the same weights under both roots:
    this root is a copy (or the moved original) of the one recorded."""
    if not adapter_path:
        return False
    mine, theirs = (
        root / adapter_path / "adapter_model.safetensors",
        old_root / adapter_path / "adapter_model.safetensors",
    )
    try:
        return mine.is_file() and theirs.is_file() and filecmp.cmp(mine, theirs, shallow=False)
    except OSError:
        return False


def _base_label(settings: Settings, fingerprint: str) -> str:
    for adapter in list_adapters(settings).values():
        for e in adapter["versions"]:
            if (e.get("baseModel") or {}).get("fingerprint") == fingerprint:
                return f"base model {e['baseModel'].get('id')!r}"
    return "this base model"


def active_version(settings: Settings, name: str, base: str) -> dict[str, Any] | None:
    """The entry of NAME active on base fingerprint `base`; None when none is."""
    adapter = list_adapters(settings).get(name)
    return active_of(adapter, base) if adapter else None


def active_of(adapter: dict[str, Any], base: str) -> dict[str, Any] | None:
    """active_version for an adapter already read (one of list_adapters' values)."""
    active = adapter.get("activeByBase", {}).get(base)
    return _entry(adapter, active["version"]) if active else None


def list_active(settings: Settings, base: str | None = None) -> list[dict[str, Any]]:
    """Every active version, as {"name", "version", "base" (fingerprint), "baseModel" (id), "entry"}, sorted
    by name then base model; only those on base fingerprint `base` when given."""
    out = []
    for name, adapter in sorted(list_adapters(settings).items()):
        for fingerprint, active in sorted(adapter["activeByBase"].items(), key=lambda kv: str(kv[1].get("baseModel"))):
            entry = _entry(adapter, active["version"])
            if entry is None or (base is not None and fingerprint != base):
                continue
            out.append(
                {
                    "name": name,
                    "version": active["version"],
                    "base": fingerprint,
                    "baseModel": active.get("baseModel"),
                    "entry": entry,
                }
            )
    return out


def activation_state(
    settings: Settings,
    entry: dict[str, Any],
    base: str,
    base_id: str | None = None,
    *,
    configured: bool = True,
    adapter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Whether a version is active on base fingerprint `base` (whose id is `base_id`, when known), and if not,
    why, as {"active": bool, "code": str, "params": {...}, "reason": "one sentence"}. `configured`: `base` is
    the configured base model (else another base's group of the adapter list). `adapter`: the entry's
    adapter as the caller read it (a list of every version reads the registry once, not once per version)."""
    name, version = entry["name"], entry["version"]
    if adapter is None:
        adapter = list_adapters(settings).get(name) or {}
    trained_on = entry.get("baseModel") or {}
    params: dict[str, Any] = {"name": name, "version": version, "baseModel": trained_on.get("id")}
    active_here = adapter.get("activeByBase", {}).get(base, {}).get("version")
    elsewhere = [
        a.get("baseModel")
        for fp, a in adapter.get("activeByBase", {}).items()
        if fp != base and a.get("version") == version
    ]
    gate = entry.get("gate") or {}

    def state(active: bool, code: str, reason: str, **extra: Any) -> dict[str, Any]:
        return {"active": active, **coded(code, **params, **extra), "reason": reason}

    # A replaced or staged revision shares the slot's name but is not what the slot holds: never active.
    if entry.get("notKept"):
        why = "the eval gate refused this revision" if gate and not gate.get("passed") else "its run ended unjudged"
        return state(False, "adapter.not_kept", f"not kept: {why}, so the slot kept the revision before it")
    if entry.get("replaced"):
        return state(False, "adapter.replaced", "replaced by a newer revision of the same slot")
    if active_here == version and not entry.get("staged"):
        if not configured:
            return state(
                True, "adapter.active_unserved", "active on this base model, which is not the one configured here"
            )
        return state(True, "adapter.active", "active on the configured base model")
    # Before the other reasons: activating it would be refused (404) whatever else holds.
    if gone := gone_files(settings, entry):
        return state(
            False,
            "adapter.files_missing",
            f"its files are missing under data/adapters ({', '.join(gone)}); train it again",
            missing=gone,
        )
    # The same id with other weights (updated in place, another hub revision): the base changed, not the model.
    if (
        base_id is not None
        and same_base_id(settings, base_id, trained_on.get("id"))
        and trained_on.get("fingerprint") != base
    ):
        return state(
            False,
            "adapter.base_changed",
            f"base model {base_id!r} has changed since this version was trained on it (fingerprints differ); "
            "retrain it",
        )
    # Force-activated on an earlier build of the configured base, trained on another one: it was never trained
    # here, so only the activation is out of date.
    if base_id is not None and base_id in elsewhere:
        return state(
            False,
            "adapter.activated_base_changed",
            f"force-activated on base model {base_id!r} before its weights changed (fingerprints differ), and "
            f"trained on {trained_on.get('id')!r}; activate it again with --force, or retrain it",
            activeOn=base_id,
        )
    if elsewhere:
        return state(
            False,
            "adapter.active_on_other_base",
            f"active on base model {elsewhere[0]!r}, not on the configured one",
            activeOn=elsewhere[0],
        )
    if trained_on.get("fingerprint") != base:
        return state(False, "adapter.other_base", f"trained on another base model ({trained_on.get('id')!r})")
    if gate and not gate.get("passed"):
        reasons = "; ".join(gate.get("reasons") or []) or "no reason recorded"
        return state(
            False, "adapter.gate_failed", f"the eval gate refused it: {reasons}", reasons=gate.get("reasons") or []
        )
    if active_here:
        return state(
            False,
            "adapter.other_version_active",
            f"{name}@{active_here} is the active version",
            activeVersion=active_here,
        )
    flag = base_flag(settings, trained_on.get("id"))  # its own base, when not the configured one
    if gate and gate.get("passed"):
        return state(
            False,
            "adapter.deactivated",
            f"deactivated; activate it with `lunatrain adapters activate {name}@{version}{flag}`",
        )
    return state(
        False,
        "adapter.not_gated",
        f"not activated (no eval gate ran); activate it with `lunatrain adapters activate {name}@{version}{flag}`",
    )


def adapter_dir(settings: Settings, entry: dict[str, Any]) -> Path:
    return inside(settings.home, entry.get("staged") or entry["path"])


# What PEFT needs to load an adapter folder (train.py saves the weights as safetensors).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def missing_files(settings: Settings, entry: dict[str, Any]) -> list[str]:
    """The files PEFT needs that `entry`'s folder lacks (none: it can be loaded). A file of the folder linked
    out of the data root is refused as a linked folder is (UsageError): loading would read it from there."""
    path = adapter_dir(settings, entry)
    with contextlib.suppress(OSError):
        for child in path.iterdir():
            if child.is_symlink():
                inside(settings.home, entry.get("staged") or entry["path"], child.name)
    return [f for f in ADAPTER_FILES if not (path / f).is_file()]


def gone_files(settings: Settings, entry: dict[str, Any]) -> list[str]:
    """`missing_files`, every one of them for a path that leaves the data root (it holds nothing)."""
    try:
        return missing_files(settings, entry)
    except LunaError:
        return list(ADAPTER_FILES)


def loadable(settings: Settings, entry: dict[str, Any]) -> bool:
    """Whether `entry`'s folder holds what PEFT loads (a path that leaves the data root holds nothing)."""
    return not gone_files(settings, entry)


def loadable_dir(settings: Settings, entry: dict[str, Any]) -> Path:
    """`entry`'s folder for loading its weights (merge, the gate, serving); NotFound naming the version when a
    file PEFT needs is gone (deleted by hand, a disk restored in part), instead of PEFT's own error."""
    path = adapter_dir(settings, entry)
    if missing := missing_files(settings, entry):
        raise NotFound(
            f"The files of {entry.get('name')}@{entry.get('version')} are missing under data/adapters "
            f"({', '.join(missing)}); train it again.",
            code="adapter.files_gone",  # said in the dashboard's language, naming the version as this sentence
            params={"name": entry.get("name"), "version": entry.get("version"), "missing": missing},
        )
    return path


def files_marks(settings: Settings, entry: dict[str, Any]) -> dict[str, Any]:
    """What is gone of a version's files, as every view of a version says it: `filesMissing` (it cannot be
    served until retrained), and `merged.folderMissing` when its merged model's folder is gone."""
    gone = {"merged": entry["merged"] | {"folderMissing": True}} if merge_gone(settings, entry) else {}
    return {"filesMissing": not loadable(settings, entry)} | gone


def merge_gone(settings: Settings, entry: dict[str, Any]) -> bool:
    """Merged once, and the merged model's folder is not there any more (deleted or moved by hand): the
    registry's `merged` record is history, not a model to load."""
    merged = entry.get("merged")
    return isinstance(merged, dict) and not (settings.home / str(merged.get("path", ""))).is_dir()


def readable_dir(settings: Settings, entry: dict[str, Any]) -> Path:
    """`loadable_dir`, and DamagedFile when a file there cannot be read (cut short, edited by hand): the gate
    and merge load the weights and the tokenizer in the same process, where safetensors, PEFT or the tokenizer
    would end it with a traceback. (Serving catches a failed load itself and stays up.)"""
    path = loadable_dir(settings, entry)
    if problem := files_problem(path):
        damaged = DamagedFile(
            f"The files of {entry.get('name')}@{entry.get('version')} under data/adapters are damaged ({problem}); "
            "train it again, or roll back to another version."
        )
        damaged.why = problem
        raise damaged
    return path


def unusable_files(settings: Settings, entry: dict[str, Any]) -> str | None:
    """Why `entry`'s files cannot be loaded, as the end of a sentence about it ("its files are missing under
    data/adapters (adapter_config.json)", "its files are damaged (…)"), or None when they can."""
    if missing := missing_files(settings, entry):
        return f"its files are missing under data/adapters ({', '.join(missing)})"
    if problem := files_problem(adapter_dir(settings, entry)):
        return f"its files are damaged ({problem})"
    return None


def files_problem(path: Path) -> str | None:
    """What makes the adapter files in `path` unloadable, found cheaply (the JSON files parsed, the weights'
    header read and their length checked against it, the config's rank against the weights'), or None.
    `readable_dir` says it as DamagedFile; serving checks it before PEFT loads."""
    config: dict[str, Any] = {}
    for name in ("adapter_config.json", "tokenizer_config.json", "tokenizer.json"):
        if not (path / name).is_file():
            continue
        try:
            data = read_json(path / name)
        except (DamagedFile, OSError) as exc:
            return f"{name}: {_why(exc)}"
        if not isinstance(data, dict):
            return f"{name}: a JSON {json_type(data)}, not an object"
        if name == "adapter_config.json":
            config = data
    # A fast tokenizer's file, or a slow one's vocabulary (SentencePiece, BPE, WordPiece, tiktoken)
    vocabularies = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken")
    if (path / "tokenizer_config.json").is_file() and not any(any(path.glob(f)) for f in vocabularies):
        return "the tokenizer's vocabulary, tokenizer.json, is missing"
    problem, header = weights_header(path / "adapter_model.safetensors")
    return problem or _rank_problem(config, header) or _not_finite(path / "adapter_model.safetensors")


def _not_finite(weights: Path) -> str | None:
    """Weights overwritten in place keep a sound header: NaN or inf in them is what a merge would write into the
    merged model and chat would sample from. Each caller is about to load them anyway (an adapter is small)."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            bad = [key for key in f.keys() if not bool(torch.isfinite(f.get_tensor(key)).all())]
            total = len(f.keys())
    except Exception as exc:
        return f"{weights.name}: {' '.join(str(exc).split())[:200]}"
    if bad:
        return f"{weights.name} holds values that are not finite (NaN or inf) in {len(bad)} of {total} tensors"
    return None


@contextlib.contextmanager
def loading(settings: Settings, path: Path) -> Iterator[None]:
    """Around attaching the adapter in `path` to a model (merge, the gate): what `readable_dir` cannot see
    cheaply, a config PEFT cannot use (no peft_type, a rank the weights do not have, target modules the model
    lacks), becomes one sentence instead of PEFT's traceback. What the files cannot have caused (a driver
    fault, out of memory, a disk error) passes on as it is. (Serving words its own, per request.)"""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        said = " ".join(str(exc).split())[:200] or "no message"
        # A RuntimeError is the files' only when torch's state-dict load says so (a rank the weights do not
        # have); otherwise it is the machine's (a CUDA driver fault, out of memory) and retraining cannot help.
        if isinstance(exc, RuntimeError) and not (
            type(exc) is RuntimeError and ("size mismatch" in said or "state_dict" in said)
        ):
            raise
        where = settings.shown(path)
        misfits = base_misfits(exc)
        if misfits:  # sound files of another base model (one force-activated on this base by an older release)
            name = path.parent.name if path.parent.parent == settings.adapters_dir else None
            raise Conflict(
                f"The LoRA weights in {where} do not fit this base model ({counted(len(misfits), 'tensor')} "
                f"differ in shape, first {misfits[0]}): they were trained on another one; "
                + (f"deactivate it here (`lunatrain adapters deactivate {name}`) or " if name else "")
                + "train it again on this base model.",
                code="adapter.does_not_fit",
            ) from exc
        damaged = DamagedFile(
            f"The adapter in {where} cannot be loaded ({type(exc).__name__}: {said}); its files are damaged: "
            "train it again, or roll back to another version."
        )
        damaged.why = f"{type(exc).__name__}: {said}"
        raise damaged from exc


_MISMATCH = re.compile(
    r"(?P<key>\S+lora_(?P<ab>[AB])\S*): copying a param with shape torch\.Size\(\[(?P<a1>\d+), (?P<b1>\d+)\]\) "
    r"from checkpoint, the shape in current model is torch\.Size\(\[(?P<a2>\d+), (?P<b2>\d+)\]\)"
)


def base_misfits(exc: BaseException) -> list[str]:
    """The size mismatches of a LoRA load that are the base model's: lora_A's inputs or lora_B's outputs differ
    from the layer's (weights of another base). Another rank (the config against its own weights) is not.
    torch lists every tensor whose shape differs, one line each (kilobytes for an adapter of another base):
    the lines without their lead-in, for a sentence to name the first."""
    out = []
    for line in (line.strip() for line in str(exc).splitlines()):
        line = line.removeprefix("size mismatch for ").rstrip(".")
        m = _MISMATCH.match(line)
        if m and (m["b1"] != m["b2"] if m["ab"] == "A" else m["a1"] != m["a2"]):
            out.append(line)
    return out


def _why(exc: DamagedFile | OSError) -> str:
    """Why a file could not be read, without its path (the caller's sentence names the file)."""
    return exc.why if isinstance(exc, DamagedFile) else exc.strerror or str(exc)


def weights_header(path: Path) -> tuple[str | None, dict[str, Any]]:
    """What makes a safetensors file unreadable, else None with its header. The file is an 8-byte header
    length, a JSON header naming each tensor's byte range, then the data: a file cut short or overwritten
    shows in the first two, without reading the weights."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            # safetensors' own cap on a header: a damaged length never makes this read gigabytes
            if not 0 < length <= min(size - 8, 100 << 20):
                return f"{path.name} is cut short or not safetensors", {}
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"{path.name}: {_why(exc)}", {}
    except (*JSON_FAULTS, UnicodeDecodeError):
        return f"{path.name} has an unreadable header", {}
    if not isinstance(header, dict):
        return f"{path.name} has an unreadable header", {}
    ends = [
        t["data_offsets"][1]
        for key, t in header.items()
        if key != "__metadata__"
        and isinstance(t, dict)
        and isinstance(t.get("data_offsets"), list)
        and t["data_offsets"]
    ]
    if not all(isinstance(end, int) for end in ends) or 8 + length + max(ends, default=0) > size:
        return f"{path.name} is cut short", {}
    return None, header


def _rank_problem(config: dict[str, Any], header: dict[str, Any]) -> str | None:
    """A rank in adapter_config.json (`config`) that the weights (`header`) do not have: PEFT builds the layers
    at that rank before it loads the weights, so r = 10**9 ends in an allocation failure, not a size mismatch."""
    if not config:  # no adapter_config.json: missing_files says so
        return None
    r = config.get("r")
    pattern = config.get("rank_pattern") or {}
    declared = [r, *(pattern.values() if isinstance(pattern, dict) else [None])]
    ranks = sorted(
        {t["shape"][0] for k, t in header.items() if ".lora_A." in k and isinstance(t, dict) and t.get("shape")}
    )
    for rank in declared:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            return f"adapter_config.json gives rank {rank!r}"
    # LoRA on fused parameters (target_parameters: a mixture's experts) keeps one A row block per expert: its
    # lora_A has rank x experts rows, so there a rank is one that divides a row count.
    fused = bool(config.get("target_parameters"))

    def has(rank: int) -> bool:
        return rank in ranks or (fused and any(rows % rank == 0 for rows in ranks))

    if ranks and not pattern and not has(r):
        return f"adapter_config.json gives rank {r!r}, but its weights have rank {ranks[0]}"
    # Per-layer ranks (rank_pattern): each rank it gives must be one the weights have; `r` builds only the layers
    # it does not name, perhaps none, so it is held to the largest rank a run may ask for.
    if ranks and (bad := [k for k in declared[1:] if not has(k)]):
        return f"adapter_config.json gives rank {bad[0]!r} in its rank_pattern, but its weights have rank {ranks[-1]} at most"
    if r > MAX_RANK:
        return f"adapter_config.json gives rank {r!r}, over the largest a run may ask for ({MAX_RANK})"
    return None


def get_revision(settings: Settings, name: str, revision: int) -> dict[str, Any]:
    """One revision of NAME's overwrite slot, staged or not (the eval gate's candidate)."""
    adapter = list_adapters(settings).get(name)
    if adapter is None:
        raise _not_registered(name)
    for entry in adapter["versions"]:
        if entry["version"] == SLOT and entry.get("revision") == revision:
            return entry
    raise NotFound(f"Adapter {name}@{SLOT} has no revision {revision}.")


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


def activate(
    settings: Settings,
    name: str,
    version: str,
    *,
    force: bool = False,
    reason: str = "",
    own_base: bool = False,
    gate: dict[str, Any] | None = None,
    replacing: Callable[[dict[str, Any] | None], bool] | None = None,
    base_named: bool = False,
) -> dict[str, Any]:
    """Make NAME@VERSION the active version of NAME on the configured base model (other bases keep theirs).
    Refused when it was trained on a different base model than the configured one (its LoRA weights would
    not fit), unless `force`. `own_base`: activate it on the base it was trained on, whichever that is (the
    eval gate's promotion after training on a new base). `gate`: the gate's outcome, recorded on the version
    in the same write (`record_gate`): a version never becomes active without the outcome that promoted it.
    `replacing`: whether the entry active now (None: none) is the one this activation may replace, asked under
    the registry's lock; ActiveMoved when not (the gate judged against another, activated by hand meanwhile).
    `base_named`: the command named the base (`--baseModel`): its refusals say so, and suggest commands with it."""
    entry = get_version(settings, name, version)
    if entry.get("replaced"):
        raise Conflict(f"{name}@{entry['version']} revision {entry.get('revision')} was replaced and is gone.")
    loadable_dir(settings, entry)  # an active version whose files are gone would be listed and never served
    trained_on = entry.get("baseModel", {})
    if own_base:
        fingerprint, base_id = trained_on.get("fingerprint", "?"), trained_on.get("id")
    else:
        base = configured_base(settings)
        fingerprint, base_id = base.fingerprint, base.id
        said = {"name": name, "version": entry["version"], "baseModel": trained_on.get("id"), "configured": base.id}
        foreign = trained_on.get("fingerprint") != base.fingerprint
        flag = named_flag(base.id, base_named)
        which = "the base model named" if base_named else "the configured base model"
        if foreign and not force and same_base_id(settings, trained_on.get("id"), base.id):  # other weights now
            revision = trained_on.get("revision")
            then = f"revision {revision[:12]}; " if revision else ""
            raise Conflict(
                f"{name}@{entry['version']} was trained on another build of base model {base.id!r} ({then}the "
                f"weights under that name differ now): retrain it here (`lunatrain luna --adapterName {name}{flag}`), "
                f"or, only if it is the same model, force the activation (`lunatrain adapters activate "
                f"{name}@{entry['version']} --force{flag}`).",
                code="adapter.another_build",
                params=said | {"revision": revision},
            )
        if foreign and not force:
            raise Conflict(
                f"{name}@{entry['version']} was trained on base model {trained_on.get('id')!r}, but {which} "
                f"is {base.id!r} (fingerprints differ); to serve it, activate it on its base "
                f"(`lunatrain adapters activate {name}@{entry['version']}{base_flag(settings, trained_on.get('id'))}`) "
                f"and configure that base (ASSISTANT_BASE_MODEL={trained_on.get('id')!r}); to use this base, retrain "
                f"it here (`lunatrain luna "
                f"--adapterName {name}{flag}`); only if it is the same model changed since (re-downloaded, updated in "
                f"place), force the activation (`lunatrain adapters activate {name}@{entry['version']} --force{flag}`; API: "
                "`force: true`).",
                code="adapter.foreign_base",
                params=said,
            )
        if foreign:
            from .models import lora_misfits

            # --force takes the owner's word that the weights fit; weights of another shape never can.
            misfits = lora_misfits(loadable_dir(settings, entry) / "adapter_model.safetensors", base)
            if misfits:
                raise Conflict(
                    f"{name}@{entry['version']} cannot be active on base model {base.id!r} even with --force: its "
                    f"LoRA weights do not fit it ({counted(len(misfits), 'tensor')} of another shape, first "
                    f"{misfits[0]}); to serve it, configure its base (ASSISTANT_BASE_MODEL={trained_on.get('id')!r}).",
                    code="adapter.does_not_fit",
                    params=said,
                )
    with _lock(settings):
        data = load(settings)
        adapter = _adapter(data, name)
        if replacing is not None and not replacing(now_active := active_of(adapter, fingerprint)):
            raise ActiveMoved(now_active)
        previous = adapter["activeByBase"].get(fingerprint, {}).get("version")
        if previous == entry["version"] and gate is None:  # active there already: no change, no history line
            return entry
        adapter["activeByBase"][fingerprint] = {"version": entry["version"], "baseModel": base_id}
        record = {
            "version": entry["version"],
            "previous": previous,
            "base": fingerprint,
            "at": now(),
            "forced": force,
            "reason": reason,
        }
        if gate is not None:
            entry = _set_gate(data, name, entry["version"], gate, entry.get("revision"))
        _save_activations(settings, data, name, [(record, base_id)])
        if gate is not None:
            _keep_gate_file(settings, entry, entry["gate"])
    return entry


def deactivate(
    settings: Settings, name: str, version: str = "", *, configured_base_only: bool = False
) -> list[dict[str, Any]]:
    """NAME is no longer active on the configured base model; with VERSION, that version is no longer active
    on any base, or with `configured_base_only` on the configured one (the dashboard's button on the row it
    shows active there: a version forced onto another base stays there). Returns what was deactivated
    ({"name", "version", "base", "baseModel"})."""
    adapter = list_adapters(settings).get(name)
    if adapter is None:
        raise _not_registered(name)
    if version == "active":  # the alias activate and show resolve: the version active on the configured base
        version = ""
    fingerprint = configured_base(settings).fingerprint if configured_base_only or not version else None
    with _lock(settings):
        data = load(settings)
        adapter = _adapter(data, name)
        if version:
            version = adapter.get("aliases", {}).get(version, version) if version == "latest" else version
            if _entry(adapter, version) is None:  # a version that does not exist is a 404, as for activate
                raise NotFound(
                    f"Adapter {name!r} has no version {version!r}; `lunatrain adapters list` shows its versions."
                )
            hits = [fp for fp, a in adapter["activeByBase"].items() if a["version"] == version]
            if fingerprint is not None:
                hits = [fp for fp in hits if fp == fingerprint]
        else:
            hits = [fingerprint] if fingerprint in adapter["activeByBase"] else []
        if not hits:
            # the version, when one was named, is in the dashboard's sentence too
            if not version:
                what, code = f"{name} is not active on the configured base model", "adapter.not_active"
            elif fingerprint is not None:
                what, code = (
                    f"{name}@{version} is not active on the configured base model",
                    "adapter.version_not_active_here",
                )
            else:
                what, code = f"{name}@{version} is not active", "adapter.version_not_active"
            raise UsageError(
                f"{what}; see `lunatrain adapters list` (GET /assistant/training/adapters).",
                code=code,
                params={"name": name, "version": version or None},
            )
        done, records = [], []
        for fp in hits:
            gone = adapter["activeByBase"].pop(fp)
            record = {
                "version": None,
                "previous": gone["version"],
                "base": fp,
                "at": now(),
                "forced": False,
                "reason": "deactivated",
            }
            records.append((record, gone.get("baseModel")))
            done.append({"name": name, "version": gone["version"], "base": fp, "baseModel": gone.get("baseModel")})
        _save_activations(settings, data, name, records)
    return done


def rollback(
    settings: Settings, name: str, *, base_named: bool = False, version: str | None = None, to: str | None = None
) -> dict[str, Any]:
    """The active version on the configured base model → the one active there before it (walking that
    base's activation history). `base_named`: the command named the base (`--baseModel`), so the commands a
    refusal suggests name it too. `version` and `to`: the version the caller saw active and the one it was
    shown it returns to; Conflict when either differs by now (a second rollback from a page out of date would
    otherwise go one version further back than anyone asked, or to one nobody was shown)."""
    if name not in list_adapters(settings):
        raise _not_registered(name)
    base = configured_base(settings)
    fingerprint = base.fingerprint
    # Another base's versions are rolled back with that base named (a run's --baseModel does not stay). Where
    # the command named one, the commands suggested name it too: without, they act on the configured one.
    flag = named_flag(base.id, base_named)
    elsewhere = (
        "the API acts on its server's base model"
        if base_named
        # read by CLI and API users alike: the route has no such switch, it acts on its server's base model
        else "for another base model, name it with `--baseModel` (the API acts on its server's, ASSISTANT_BASE_MODEL)"
    )
    with _lock(settings):
        data = load(settings)
        adapter = _adapter(data, name)
        current = adapter["activeByBase"].get(fingerprint, {}).get("version")
        previous = _earlier_version(adapter, fingerprint, current)
        if current is None:
            raise UsageError(
                f"Adapter {name!r} is not active on {'' if base_named else 'the configured '}base model {base.id!r}, "
                "so there is nothing to "
                f"roll back; activate a version with `lunatrain adapters activate {name}@VERSION{flag}` "
                f"(POST /assistant/training/adapters/{name}/activate); {elsewhere}.",
                code="adapter.not_active",
                params={"name": name, "version": None},
            )
        for named in (version, to):  # a version that was never registered was neither active nor shown
            if named and _entry(adapter, named) is None:
                raise NotFound(
                    f"Adapter {name!r} has no version {named!r}; `lunatrain adapters list` shows its versions."
                )
        if version and version != current:
            raise Conflict(
                f"{name}@{version} is no longer active on base model {base.id!r}: {name}@{current} is, since another "
                f"change; nothing was rolled back (look again, and roll {name} back if that is still what you mean).",
                code="adapter.rollback_moved",
                params={"name": name, "version": version, "active": current},
            )
        if to and previous != to:
            raise Conflict(
                f"A rollback of {name} on base model {base.id!r} would now return to {previous or 'no version'}, not "
                f"to {to}: its history changed since another change; nothing was rolled back (look again, and roll "
                f"{name} back if that is still what you mean).",
                code="adapter.rollback_target_moved",
                params={"name": name, "to": to, "target": previous},
            )
        if previous is None:
            raise UsageError(
                f"Adapter {name!r} has no earlier active version on base model {base.id!r} to roll back to; "
                f"to stop using it, run `lunatrain adapters deactivate {name}{flag}` "
                f"(POST /assistant/training/adapters/{name}/deactivate); {elsewhere}.",
                code="adapter.no_earlier_version",
                params={"name": name},
            )
        # as activate refuses it: a version whose files are gone would be listed as active and never served
        if (target := _entry(adapter, previous)) is not None and (missing := missing_files(settings, target)):
            raise UsageError(
                f"A rollback of {name} on base model {base.id!r} would return to {name}@{previous}, whose files are "
                f"missing under data/adapters ({', '.join(missing)}); nothing was rolled back: activate another "
                f"version with `lunatrain adapters activate {name}@VERSION{flag}`, or stop using {name} with "
                f"`lunatrain adapters deactivate {name}{flag}`.",
                code="adapter.rollback_files_missing",
                params={"name": name, "version": previous, "files": ", ".join(missing)},
            )
        base_id = adapter["activeByBase"][fingerprint].get("baseModel")
        adapter["activeByBase"][fingerprint] = {"version": previous, "baseModel": base_id}
        record = {
            "version": previous,
            "previous": current,
            "base": fingerprint,
            "at": now(),
            "forced": False,
            "reason": "rollback",
        }
        _save_activations(settings, data, name, [(record, base_id)])
    return get_version(settings, name, previous)


def rollback_target(adapter: dict[str, Any], fingerprint: str) -> str | None:
    """The version a rollback of this adapter on base `fingerprint` would make active (None: nothing to go
    back to, or nothing active there)."""
    current = adapter.get("activeByBase", {}).get(fingerprint, {}).get("version")
    return _earlier_version(adapter, fingerprint, current) if current else None


def _earlier_version(adapter: dict[str, Any], fingerprint: str, current: str | None) -> str | None:
    """The version a rollback returns to: the base's activations replayed as a stack (an activation pushes,
    a rollback pops back to its target), so each rollback goes one step further back and never returns to
    the version it just left. A version no longer registered (left out by `adapters repair`) is passed over."""
    stack: list[str] = []
    for record in adapter["activations"]:
        version = record.get("version")
        if not version or _history_base(adapter, record) != fingerprint:
            continue
        if record.get("reason") == "rollback":
            while stack and stack[-1] != version:
                stack.pop()
        if not stack or stack[-1] != version:  # activating the active version again is no step
            stack.append(version)
    # The history outlives the entries: a version it names may be gone from the registry, and activating it
    # would name nothing that can be shown or served.
    while stack and (stack[-1] == current or _entry(adapter, stack[-1]) is None):
        stack.pop()
    return stack[-1] if stack else None


def _history_base(adapter: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The base an activation record was for (older records name none: the version's own base)."""
    if record.get("base"):
        return record["base"]
    entry = _entry(adapter, record.get("version") or "")
    return (entry or {}).get("baseModel", {}).get("fingerprint")


def annotate(
    settings: Settings, name: str, version: str, field: str, value: Any, *, revision: int | None = None
) -> dict[str, Any]:
    """Set an annotation (`gate`, `merged`, `stale`, `replaced`) on one entry (of the overwrite slot: the
    revision it holds, or `revision`); facts stay untouched."""
    if field not in ANNOTATIONS:
        raise UsageError(f"Registry field {field!r} cannot be changed; only {', '.join(ANNOTATIONS)} can.")
    with _lock(settings):
        data = load(settings)
        target = _annotate(data, name, version, field, value, revision)
        _save(settings, data)
    return target


def _target(adapter: dict[str, Any], name: str, version: str, revision: int | None) -> dict[str, Any]:
    """The entry `annotate` changes: `version` (of the overwrite slot: the revision it holds, or `revision`)."""
    entries = [
        e
        for e in adapter.get("versions", [])
        if e["version"] == version and (revision is None or e.get("revision") == revision)
    ]
    if not entries:
        raise NotFound(f"Adapter {name}@{version} is not registered.")
    return entries[-1] if revision is not None else (_entry(adapter, version) or entries[-1])


def _annotate(
    data: dict[str, Any], name: str, version: str, field: str, value: Any, revision: int | None
) -> dict[str, Any]:
    """`annotate` on a loaded registry (the caller holds the lock and saves it)."""
    adapter = data["adapters"].get(name) or {}
    target = _target(adapter, name, version, revision)
    target[field] = value
    if field == "merged" and isinstance(value, dict):
        # Every revision of the overwrite slot merges into the same folder (NAME-current): the one merged
        # before no longer lies there, and listing it as merged would name another revision's model.
        for other in adapter.get("versions", []):
            if other is not target and (other.get("merged") or {}).get("path") == value.get("path"):
                del other["merged"]
    return target


def record_gate(
    settings: Settings, name: str, version: str, result: dict[str, Any], *, revision: int | None = None
) -> dict[str, Any]:
    """Store the eval gate's outcome on a version (e.g. {"status": "passed", "reason": ..., "at": ...}), and a
    copy in its folder (gate.json), from which `adapters repair` restores every version's outcome. Not for a
    slot revision that is staged or was not kept: its folder is not (or no longer) the one `current` names."""
    with _lock(settings):  # one lock for both: no publish can point `current` elsewhere in between
        data = load(settings)
        entry = _set_gate(data, name, version, result, revision)
        _save(settings, data)
        _keep_gate_file(settings, entry, entry["gate"])
    return entry


def _set_gate(data: dict[str, Any], name: str, version: str, result: dict[str, Any], revision: int | None) -> dict:
    """Set a gate outcome on a loaded registry's entry (the caller holds the lock and saves it), keeping a
    refusal that a pass follows (`_with_refusal`)."""
    earlier = _target(data["adapters"].get(name) or {}, name, version, revision).get("gate")
    return _annotate(data, name, version, "gate", _with_refusal(earlier, result), revision)


# What a pass keeps of a refusal it follows: why it was refused, against what, when, under which thresholds.
_REFUSAL_FIELDS = ("status", "passed", "reasons", "reasonCodes", "at", "baseline", "thresholds")


def _with_refusal(earlier: Any, result: dict[str, Any]) -> dict[str, Any]:
    """`result`, keeping the last refusal of the version when a pass follows it (`earlierRefusal`): a version
    activated by hand against its refusal is judged against the base model by later flows, and that pass
    must not erase why the gate refused it against the version then active (`adapters show` says both)."""
    if not result.get("passed") or not isinstance(earlier, dict):
        return result
    refusal = earlier if earlier.get("passed") is False else earlier.get("earlierRefusal")
    if not isinstance(refusal, dict):
        return result
    return result | {"earlierRefusal": {k: refusal[k] for k in _REFUSAL_FIELDS if k in refusal}}


def _keep_gate_file(settings: Settings, entry: dict[str, Any], result: dict[str, Any]) -> None:
    """The copy of a gate outcome in the version's folder (under the registry's lock, after its write)."""
    folder = settings.home / entry["path"]
    if not entry.get("replaced") and not entry.get("staged") and folder.is_dir():
        try:
            atomic_write_json(folder.resolve() / GATE_FILE, result)
        except (OSError, LunaError) as exc:  # the registry holds the outcome; only a repair would miss it
            log.warning(
                "could not keep the gate outcome of %s@%s in its folder: %s", entry["name"], entry["version"], exc
            )


def refresh_stale(settings: Settings, deleted: Iterable[str] = ()) -> list[str]:
    """Mark versions trained on any content the store has deleted (its tombstones); call after a delete.
    Returns the versions marked now, and every version trained on the `deleted` hashes (those of the delete
    just made), whether marked now or by an earlier delete."""
    from .store import deleted_hashes, has_database

    if not registry_path(settings).exists() or not has_database(settings):  # no store: nothing was deleted
        return []
    try:
        # read under the registry's lock: a mark set by a delete that commits meanwhile must not be cleared
        # from an older reading of the tombstones
        return mark_stale(settings, lambda: set(deleted_hashes(settings)), trained_on=set(deleted))
    except RegistryUnreadable:
        # The delete itself succeeded; its tombstones stay in the store, and `adapters repair` marks the
        # versions once the registry can be written again.
        return []


STALE_LISTED = 20  # the content hashes a stale mark lists (`count` says how many are missing in all)


def mark_stale(
    settings: Settings,
    deleted_hashes: set[str] | Callable[[], set[str]],
    reason: str = "trained on deleted content",
    *,
    trained_on: Iterable[str] = (),
) -> list[str]:
    """Mark every version whose train-hashes.txt (in its own folder: a staged revision's beside the slot)
    contains one of `deleted_hashes` as stale ("retrain needed"); returns the refs marked, plus those of the
    versions (stale already or not) trained on one of `trained_on`. A stale version none of whose content is
    deleted any more (it was added back) is whole again: its mark goes; one whose content is partly back
    names what is still missing."""
    out, changed, trained_on = [], False, set(trained_on)
    with _lock(settings):
        if callable(deleted_hashes):  # the store's tombstones, read now that no other marking runs
            deleted_hashes = deleted_hashes()
        data = load(settings)
        for name, adapter in data["adapters"].items():
            for e in adapter["versions"]:
                if e.get("replaced"):
                    continue
                try:
                    # Each revision's own folder: every revision of the overwrite slot has the slot's path,
                    # which holds another revision's files while a newer one waits for its gate (`staged`).
                    hashes_file = adapter_dir(settings, e) / TRAIN_HASHES_FILE
                    trained = set(hashes_file.read_text(encoding="utf-8").split())
                except (OSError, LunaError):  # files gone, or a path that leaves the data root: nothing to judge
                    continue
                hit = trained & deleted_hashes
                # what is missing of its data: the first 20 content hashes and how many in all
                missing = {"hashes": sorted(hit)[:STALE_LISTED], "count": len(hit)}
                if hit and not e.get("stale"):
                    e["stale"] = {"reason": reason, **missing, "at": now()}
                    changed = True
                    out.append(f"{name}@{e['version']}")
                    continue
                if e.get("stale") and not hit:
                    del e["stale"]
                    changed = True
                elif e.get("stale") and {k: e["stale"].get(k) for k in missing} != missing:
                    e["stale"] |= missing  # more deleted since, or some added back: its reason and time stay
                    changed = True
                if trained & trained_on:
                    out.append(f"{name}@{e['version']}")
        if changed:
            _save(settings, data)
    return out


# --- repair ---------------------------------------------------------------------------------------


def _second_name(path: Path, other: Path) -> None:
    """`path` kept as `other` too. Not a file (a folder in its place): moved aside, as nothing can replace
    it where it is."""
    if path.is_dir() and not path.is_symlink():
        os.replace(path, other)
        return
    try:
        os.link(path, other, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError:  # no hard links here (some network and FAT file systems)
        shutil.copy2(path, other, follow_symlinks=False)


def repair(settings: Settings) -> dict[str, Any]:
    """Rebuild lora-adapters.json from the version folders when it cannot be read (see module docstring).
    Returns {"repaired": bool, "damagedFile": path or None, "versions": n, "adapters": [...], "settled": [...],
    "stale": [...]}; in a readable registry only the staged runs whose process stopped before its gate decided
    are settled (`settled` names them), as the next run of the same adapter would. Either way the versions
    trained on content the store has deleted are marked stale (`stale` names those marked now): a delete
    stopped between its commit and its marking leaves them to this."""
    path = registry_path(settings)
    with _lock(settings):
        try:
            data = load(settings)
        except RegistryUnreadable:
            data = None
        if data is not None:
            settled = [
                f"{e['name']}@{SLOT} revision {e['revision']}"
                for a in data["adapters"].values()
                for e in _settle_orphans(settings, a)
            ]
            added, skipped = _add_unregistered(settings, data)
            if settled or added:
                _save(settings, data)
            count = sum(len(a["versions"]) for a in data["adapters"].values())
            readable = {
                "repaired": False,
                "damagedFile": None,
                "versions": count,
                "adapters": sorted(data["adapters"]),
                "settled": settled,
                "added": added,
                "skipped": skipped,
            }
        else:
            rebuilt = rebuild(settings)
            skipped = rebuilt.pop("skipped")
            aside: Path | None = path.with_name(f"{path.name}.damaged-{compact_stamp()}")
            with storage_guard(path):
                try:
                    # Kept for a person to look at: a second name for the same file (a copy where the file
                    # system has no hard links), so that the damaged registry stays in place until the
                    # rebuilt one replaces it. Interrupted in between, the next command finds it as it was.
                    _second_name(path, aside)
                except FileNotFoundError:  # a missing registry: nothing to keep
                    aside = None
            rebuilt["repaired"] = {"at": now(), "damagedFile": aside.name if aside else None}
            _save(settings, rebuilt)
    stale = _marked_stale(settings)  # outside the lock: it takes it itself
    if data is not None:
        return readable | {"stale": stale}
    count = sum(len(a["versions"]) for a in rebuilt["adapters"].values())
    return {
        "repaired": True,
        "damagedFile": str(aside) if aside else None,
        "versions": count,
        "adapters": sorted(rebuilt["adapters"]),
        "settled": [],
        "skipped": skipped,
        "stale": stale,
    }


def _add_unregistered(settings: Settings, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Version folders holding a finished run that a readable registry lacks (an older registry restored from a
    backup beside newer folders), added to `data` as `rebuild` describes them: a numbered version it does not
    name, and a revision of the overwrite slot it does not know (then the slot's own; the others it knew are
    replaced). Returns ("NAME@VERSION" added, "NAME/VERSION (why)" left out). What is active stays as it was."""
    added: list[str] = []
    skipped: list[str] = []
    for report_path in _report_files(settings):
        folder = report_path.parent
        versions = data["adapters"].get(folder.parent.name, {}).get("versions", [])
        if folder.name != SLOT and any(e["version"] == folder.name for e in versions):
            continue
        entry, left_out = _folder_entry(report_path)
        if entry is None:
            skipped += [left_out] if left_out else []
            continue
        slot = [e for e in versions if e["version"] == SLOT]
        if folder.name == SLOT and any(e.get("revision") == entry.get("revision") for e in slot):
            continue
        for old in slot:  # the folder holds the slot's run: the revisions the registry knew were replaced
            old["replaced"] = True
        adapter = _adapter(data, entry["name"])
        adapter["versions"].append(entry)
        adapter["versions"].sort(key=lambda e: (version_number(e["version"]), e.get("revision") or 0))
        latest = adapter["aliases"].get("latest")
        # A higher number is later; a slot run and a numbered version say nothing of their order: kept as it was.
        if latest is None or (
            SLOT not in (latest, folder.name) and version_number(folder.name) > version_number(latest)
        ):
            adapter["aliases"]["latest"] = folder.name
        revision = f" revision {entry['revision']}" if folder.name == SLOT and entry.get("revision") else ""
        added.append(f"{entry['name']}@{folder.name}{revision}")
    return added, skipped


def _folder_entry(report_path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The registry entry a version folder's training report describes (with the gate outcome its gate.json
    keeps), or None and why it is left out ("NAME/VERSION (why)"; None too when the folder holds no finished
    run: a failed run's report describes no adapter). A folder left out stays on disk."""
    folder = report_path.parent
    name = folder.parent.name
    where = f"{name}/{folder.name}"
    try:
        report = read_json(report_path)
    except (DamagedFile, OSError) as exc:
        return None, f"{where} (its {REPORT_FILE} cannot be read: {_why(exc)})"
    if not isinstance(report, dict) or report.get("status") != "succeeded" or not report.get("version"):
        return None, None
    # A folder copied under another adapter's or version's name: the run is registered under its own already.
    if report.get("adapterName") not in (None, name):
        return None, f"{where} (its {REPORT_FILE} is of adapter {report['adapterName']!r})"
    if report["version"] != folder.name:
        return None, f"{where} (its {REPORT_FILE} is of version {report['version']!r})"
    entry = _entry_from_report(name, folder, report)
    entry["gate"] = _kept_gate(folder)
    if problem := _entry_problem(name, entry):  # a report that cannot say what it was trained on
        return None, f"{where} (its {REPORT_FILE} {problem})"
    return entry, None


def _marked_stale(settings: Settings) -> list[str]:
    """The versions `refresh_stale` marks now (from the store's tombstones, when the store can be read)."""
    try:
        return refresh_stale(settings)
    except LunaError:
        return []


def rebuild(settings: Settings) -> dict[str, Any]:
    """A registry made from what lies on disk: each data/adapters/NAME/VERSION/training-report.json of a
    succeeded run is one entry, with the gate outcome its gate.json keeps; `latest` is the newest; each
    adapter's activations.jsonl restores what is active on each base and the activation history; merged
    models restore `merged`. For folders from before gate.json and activations.jsonl, the last eval gate
    report restores its candidate's outcome (and `active`, when it promoted it). `skipped`: "NAME/VERSION
    (why)" of each version folder left out, for the user to look at (it stays on disk)."""
    data: dict[str, Any] = {"format": FORMAT, "adapters": {}, "skipped": []}
    for report_path in _report_files(settings):
        entry, left_out = _folder_entry(report_path)
        if entry is not None:
            _adapter(data, entry["name"])["versions"].append(entry)
        elif left_out:
            data["skipped"].append(left_out)
    for adapter in data["adapters"].values():
        adapter["versions"].sort(
            key=lambda e: (version_number(e["version"]), e.get("revision") or 0, e.get("created") or "")
        )
        current = [e for e in adapter["versions"] if e["version"] == SLOT]
        for old in current[:-1]:
            old["replaced"] = True
        adapter["aliases"]["latest"] = adapter["versions"][-1]["version"]
    journaled = _restore_activations(settings, data)
    _restore_gate(settings, data, journaled)
    _restore_merges(settings, data)
    return data


def _report_files(settings: Settings) -> list[Path]:
    """The training report of every version folder (data/adapters/NAME/vN or NAME/current), sorted."""
    root = settings.adapters_dir
    found = sorted(root.glob(f"*/*/{REPORT_FILE}")) if root.is_dir() else []
    # Not .work/ (unfinished runs) nor .slots/ (reached through the `current` link).
    return [
        p
        for p in found
        if (_VERSION_RE.fullmatch(p.parent.name) or p.parent.name == SLOT) and not p.parent.parent.name.startswith(".")
    ]


def _kept_gate(folder: Path) -> dict[str, Any] | None:
    """The gate outcome `record_gate` kept in a version folder; None when it has none (or an unreadable one)."""
    try:
        gate = read_json(folder / GATE_FILE)
    except (DamagedFile, OSError):
        return None
    return gate if isinstance(gate, dict) else None


def _restore_activations(settings: Settings, data: dict[str, Any]) -> set[tuple[str, str]]:
    """Replay each adapter's activations.jsonl: its `activations` history and what is active on each base.
    A line that cannot be read (the torn last line of a crash) is skipped; a version whose folder is gone
    is not made active. Returns the (adapter, base fingerprint) pairs the journals speak for."""
    restored: set[tuple[str, str]] = set()
    for name, adapter in data["adapters"].items():
        for record in _journal_records(settings, name):
            if not isinstance(record, dict) or not isinstance(record.get("base"), str):
                continue
            version = record.get("version")
            if not isinstance(version, str | None):
                continue
            base_id = record.pop("baseModel", None)
            if version is None:
                adapter["activeByBase"].pop(record["base"], None)
            else:
                adapter["activeByBase"][record["base"]] = {"version": version, "baseModel": base_id}
            adapter["activations"].append(record)
            restored.add((name, record["base"]))
        known = {e["version"] for e in adapter["versions"]}
        for fingerprint in [fp for fp, a in adapter["activeByBase"].items() if a["version"] not in known]:
            del adapter["activeByBase"][fingerprint]
        _sync_legacy_alias(adapter)
    return restored


def version_number(version: str) -> int:
    """`v12` → 12; 0 for a name that is not a number (the overwrite slot's `current`)."""
    m = _VERSION_RE.fullmatch(version)
    return int(m.group(1)) if m else 0


def _entry_from_report(name: str, folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The registry entry `train.finish` wrote for this run, from its training report."""
    dataset = report.get("dataset") or {}
    params = report.get("params") or {}
    metrics = report.get("metrics") or {}
    entry = {
        "jobId": report.get("jobId"),
        "status": "succeeded",
        "strategy": report.get("adapterStrategy"),
        "baseModel": report.get("baseModel"),
        "datasetTier": dataset.get("tier") or params.get("datasetTier"),
        "datasetFingerprint": dataset.get("fingerprint"),
        "params": params,
        "metrics": {k: metrics.get(k) for k in ("valLoss", "baseValLoss", "trainLoss")},
        "tokenizerHash": report.get("tokenizerHash"),
        "templateHash": report.get("templateHash"),
        "runKey": report.get("runKey"),
        "trainedKey": report.get("trainedKey"),
        "trainSamples": dataset.get("trainSamples"),
        "resumedFromEpoch": report.get("resumedFromEpoch"),
        "gate": None,
        "quantization": report.get("quantization"),  # as train.finish registers it: the README says it is kept
        "name": name,
        "version": folder.name,
        "path": str(Path("data", "adapters", name, folder.name)),
        "created": report.get("created"),
    }
    if report.get("revision") is not None:
        entry["revision"] = report["revision"]
    return entry


def _restore_gate(settings: Settings, data: dict[str, Any], journaled: set[tuple[str, str]]) -> None:
    """The last eval gate report's outcome for its candidate, when its folder kept none; and its promotion,
    when the adapter's activations.jsonl says nothing of that base (a promotion from before the journal)."""
    try:
        gate = read_json(settings.eval_report)
    except (DamagedFile, OSError):
        return
    if not isinstance(gate, dict):
        return
    ref = (gate.get("candidate") or {}).get("ref")
    if not isinstance(ref, str) or "@" not in ref:
        return
    name, _, version = ref.partition("@")
    adapter = data["adapters"].get(name)
    entries = [e for e in (adapter or {}).get("versions", []) if e["version"] == version]
    revision = (gate.get("candidate") or {}).get("revision")
    if not entries or (revision is not None and entries[-1].get("revision") != revision):
        return  # the overwrite slot holds another revision than the one this report judged
    if entries[-1]["gate"] is None:
        entries[-1]["gate"] = {
            "status": "passed" if gate.get("passed") else "failed",
            "passed": gate.get("passed"),
            "reasons": gate.get("reasons", []),
            "at": gate.get("created"),
            "metrics": gate.get("metrics"),
            "baseMetrics": gate.get("baseMetrics"),
            "context": gate.get("context"),
            "baseline": (gate.get("baseline") or {}).get("ref"),
            "promoted": gate.get("promoted"),
            "thresholds": camel(gate.get("thresholds")),  # a report from before camelCase: as the API says it
        }
    base = entries[-1].get("baseModel") or {}
    fingerprint = base.get("fingerprint", "?")
    if gate.get("promoted") and (name, fingerprint) not in journaled:
        adapter["aliases"]["active"] = version
        adapter["activeByBase"][fingerprint] = {"version": version, "baseModel": base.get("id")}
        adapter["activations"].append(
            {
                "version": version,
                "previous": None,
                "at": gate.get("created") or now(),
                "forced": False,
                "base": fingerprint,
                "reason": "restored by repair from the last eval gate report",
            }
        )


def _restore_merges(settings: Settings, data: dict[str, Any]) -> None:
    merged_root = settings.merged_dir
    for marker in sorted(merged_root.glob(f"*/{MERGE_FILE}")) if merged_root.is_dir() else []:
        try:
            info = read_json(marker)
        except (LunaError, OSError):  # damaged, a folder in its place, unreadable: no merge to restore
            continue
        ref = info.get("adapter") if isinstance(info, dict) else None
        if not isinstance(ref, str) or "@" not in ref:
            continue
        name, _, version = ref.partition("@")
        for entry in reversed(data["adapters"].get(name, {}).get("versions", [])):
            # an overwrite slot's merged folder may hold an older revision than the slot: not this entry's model
            if entry["version"] == version and info.get("revision") in (None, entry.get("revision")):
                entry["merged"] = {"path": str(marker.parent.relative_to(settings.home)), "at": info.get("created")}
                if info.get("forced"):  # merged into a base other than the one trained on (merge --force)
                    entry["merged"]["forced"] = True
                break
