"""Data and training status: what `GET /assistant/training/status?minCurated=…` and `lunatrain status` show.

Read-only: counts come from the store, the last job from the trainer's job store (`data/trainer/jobs.db`,
failed jobs included) or the last in-process run's report (lora-latest.json), whichever is newer; the rest
from the artifacts the stages wrote (export summary, the registry, prepare-latest.json,
eval-gate-latest.json), plus a short health probe of the trainer. A fresh data root (no database file yet)
reports zeros instead of creating one.

Names: `examples` holds the examples per source (`examples.memory`: examples whose source is memory) and
`memoryItems` the memory items (facts the assistant remembers). `counts` and `memory` are the same two
objects under their old names, deprecated (see docs/api.md), as is `curated` (now `curatedApproved`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from .formats import STATUSES, json_type
from .fsio import nearly_full, read_json
from .messages import coded, counted
from .settings import Settings
from .wire import iso, parse_iso

DEFAULT_PROFILE = "luna"  # whose minCurated applies when none is given, as in `lunatrain luna`
PROBE_TIMEOUT = 0.5  # seconds: status is polled, and an unreachable trainer must not hold it up


def default_min_curated(settings: Settings, problems: Problems, given: int | None = None) -> int:
    """The Luna profile's minCurated (30 as shipped; a profile of your own in <data root>/profiles wins), or
    `given`. One of the user's that does not load is a problem status names, not its refusal: status is where a
    user looks for what is wrong (also when the caller gives its own minCurated, as the dashboard does: `luna`
    refuses to run all the same); the bundled profile's value stands in meanwhile."""
    from .errors import LunaError
    from .profiles import load_profile, profile_path

    try:
        own = load_profile(settings, DEFAULT_PROFILE).resolve()[1].min_curated
        return own if given is None else given
    except LunaError as err:
        bundled = load_profile(settings, DEFAULT_PROFILE, bundled_only=True).resolve()[1].min_curated
        path = str(profile_path(settings, DEFAULT_PROFILE))
        reason = err.message.rstrip(".").removeprefix(f"Profile {path} ").removeprefix(f"Profile {path}: ")
        if given is not None:
            problems.add(
                f"The profile {path} cannot be used ({reason}); `lunatrain luna` refuses to run until it is fixed.",
                "status.profile_broken",
                path=path,
                reason=reason,
            )
            return given
        problems.add(
            f"The profile {path} cannot be used ({reason}); minCurated is the bundled {DEFAULT_PROFILE} "
            f"profile's ({bundled}) until it is fixed.",
            "status.profile_unusable",
            path=path,
            reason=reason,
            minCurated=bundled,
        )
        return bundled


class Problems(list[str]):
    """`status`'s problems: one sentence each, and beside it its message code and values (`codes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[dict[str, Any] | None] = []

    def add(self, sentence: str, code: str | None = None, **params: Any) -> None:
        self.append(sentence)
        self.codes.append(coded(code, **params) if code else None)


def training_status(settings: Settings, min_curated: int | None = None) -> dict[str, Any]:
    """Counts per source and curation status, readiness per tier, the trainer's health, and the last export
    / job / prepare / gate plus the active adapter(s), with camelCase keys. `min_curated` None: the Luna
    profile's."""
    from . import store

    problems = Problems()
    min_curated = default_min_curated(settings, problems, min_curated)
    if min_curated < 0:
        from .errors import UsageError

        raise UsageError(f"minCurated must be 0 or more, got {min_curated}.")
    have_db = store.has_database(settings)
    raw = store.counts(settings) if have_db else None
    counts = {source: _with_total((raw or {}).get("examples", {}).get(source, {})) for source in store.SOURCES}
    memory = _with_total((raw or {}).get("memory", {}))
    curated = counts["curated"]["approved"]
    revision = store.revision(settings) if have_db else None

    summary = _safe(lambda: _export_summary(settings, problems))
    last_export = None
    changed: bool | None = None
    if isinstance(summary, dict):
        # No database to compare with (deleted, moved, not restored yet): unknown, not "up to date".
        changed = None if revision is None else summary.get("store_revision") != revision
        if revision is None:
            db = store.database_shown(settings).removeprefix("sqlite ")
            problems.add(
                f"There is no database at {db}, so every count is 0 and the export (made from one) cannot be "
                "compared with it: restore it, or import the examples again and export.",
                "status.no_database",
                db=db,
            )
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

    active, base_known, active_known = _active_adapters(settings, problems)
    tiers = _tiers(counts, memory, (raw or {}).get("approved_twice", {}), min_curated)
    if changed is False and last_export is not None:
        # The export is the store as it is now: its split says whether a tier has anything to train on (a few
        # memory items may all fall in val, which the counts alone cannot tell).
        for name, tier in tiers.items():
            split = (last_export.get("counts") or {}).get(name) or {}
            if tier["ready"] and split.get("train") == 0:
                tier |= {"ready": False, "reason": f"the current export's {name} tier has no train sample"}
                tier |= coded("tier.no_train_sample", tier=name)
    return {
        "examples": counts,
        "memoryItems": memory,
        "curatedApproved": curated,
        "counts": counts,  # deprecated name of `examples`
        "memory": memory,  # deprecated name of `memoryItems`
        "curated": curated,  # deprecated name of `curatedApproved`
        "minCurated": min_curated,
        "ready": curated >= min_curated,  # the volume rule; `tiers` also asks for something to train on
        "tiers": tiers,
        "trainer": _trainer(settings, problems),
        "storeRevision": revision,
        "lastExport": last_export,
        "changedSinceExport": changed,
        "lastJob": _last_job(settings, problems),
        "activeAdapter": _preferred(active, base_known, settings.base_model),
        "activeAdapters": active,
        "activeAdaptersKnown": active_known,  # false: the registry cannot be read (said under `problems`)
        "lastPrepare": _last_prepare(
            settings, summary.get("fingerprint") if isinstance(summary, dict) else None, problems
        ),
        "lastGate": _last_gate(settings, problems),
        "problems": list(problems),
        # beside each problem its message code and values (null: said in English only), as tiers and gate
        # reasons carry theirs, so the dashboard says it in its language
        "problemCodes": problems.codes,
    }


def approved_per_tier(
    counts: dict[str, dict[str, int]], memory: dict[str, int], twice: dict[str, int]
) -> dict[str, int]:
    """The samples an export would write to each tier, from `store.counts` (`examples`, `memory`,
    `approved_twice`): approved ones, a memory item and an example of the same content once."""
    return {
        "curated": counts["curated"]["approved"],
        "memory": counts["memory"]["approved"] + memory["approved"] - twice.get("memory", 0),
        "merged": sum(c["approved"] for c in counts.values()) + memory["approved"] - sum(twice.values()),
    }


def _tiers(
    counts: dict[str, dict[str, int]], memory: dict[str, int], twice: dict[str, int], min_curated: int
) -> dict[str, Any]:
    """Per tier: the samples an export would write to it (approved, a memory item and an example of the same
    content once) and whether a run on it passes the volume check (approved curated examples >= minCurated,
    the same rule `prepare` applies to every tier) and has anything to train on. `reason` says what is
    missing."""
    curated = counts["curated"]["approved"]
    out = {}
    for tier, n in approved_per_tier(counts, memory, twice).items():
        if curated < min_curated:
            reason = f"{counted(curated, 'approved curated example')}, {min_curated} required (minCurated)"
            why = coded("tier.too_few_curated", curated=curated, minCurated=min_curated)
        elif n == 0:
            reason = f"no approved samples for the {tier} tier"
            why = coded("tier.no_samples", tier=tier)
        else:
            reason, why = None, {"code": None, "params": {}}
        out[tier] = {"approved": n, "ready": reason is None, "reason": reason} | why
    return out


def _trainer(settings: Settings, problems: Problems) -> dict[str, Any]:
    """Whether the trainer service answers, and its label (Aktiv (CUDA) / Online (CPU) / Offline)."""
    from .errors import LunaError
    from .service import client as trainer_client

    # Another project's trainer (or another service) at this root's address is not this root's trainer:
    # Offline, and a problem that says what holds it and the way out (the usual advice would fail there).
    held = health = None
    try:
        health = trainer_client.own_health(settings, timeout=PROBE_TIMEOUT)
    except trainer_client.OtherDataRoot as exc:
        held, detail = exc, dict(exc.params or {})
        problems.add(exc.message, str(detail.pop("detail", "")) or None, **detail)
    except (LunaError, ValueError, OSError):  # not there, or not answering: Offline (`_safe`'s errors)
        pass
    return {
        "reachable": health is not None,
        "label": trainer_client.label(health),
        "url": trainer_client.base_url(settings),
        "cudaAvailable": bool(health and health.cuda_available),
        "device": health.device.name if health else None,
        "queue": health.queue.wire() if health else None,
        "onDemand": settings.lora_ensure_on_demand,  # whether a submit starts it when it is down
        "heldBy": held.holder if held else None,  # what answers at its address instead (said under problems)
    }


def _with_total(row: dict[str, int]) -> dict[str, int]:
    out = {s: int(row.get(s, 0)) for s in STATUSES}
    out["total"] = sum(out.values())
    return out


def _export_summary(settings: Settings, problems: Problems) -> dict[str, Any] | None:
    """The current export's summary; None when there is none, or when it cannot be read: then it is one of the
    `problems` (every step that trains refuses it, and status says why where the user looks first)."""
    from . import export
    from .errors import LunaError

    try:
        return export.read_summary(settings)
    except LunaError as err:
        params = err.params or {"path": str(export.export_dir(settings) / export.SUMMARY_FILE), "reason": err.message}
        problems.add(err.message, "status.export_unreadable", **params)
        return None


def _safe(fn: Any) -> Any:
    """Status must answer even when one artifact is unreadable: that part is reported as missing."""
    from .errors import LunaError

    try:
        return fn()
    except (LunaError, ValueError, OSError):
        return None


def _of(kind: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or isinstance(value, kind)


def _list_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, list) and all(isinstance(v, kind) for v in value))


# What status takes from each report without checking (a field may be absent or null): a report where one has
# another JSON type (edited by hand) is shown as one that cannot be read, not as a traceback of status.
PREPARE_FIELDS = {"checks": _list_of(dict), "dataset": _of(dict)}
RUN_FIELDS = {
    "adapterName": _of(str),
    "version": _of(str),
    "revision": _of(int),
    "baseModel": _of(dict),
    "params": _of(dict),
    "metrics": _of(dict),
}
GATE_FIELDS = {"candidate": _of(dict), "baseline": _of(dict), "metrics": _of(dict), "reasons": _list_of(str)}


def _report(path: Path, problems: Problems, command: str, fields: dict[str, Callable[[Any], bool]]) -> Any:
    """A stage's last report; None when there is none, or when it cannot be read or has a field of another type
    than `fields` says: then it is one of the `problems`. Such a report only says what happened, so status
    answers all the same, and `command` (the stage) writes it anew."""
    from .errors import LunaError

    try:
        report = read_json(path)
    except LunaError as err:  # damaged (its `why`), or not to be read at all
        why = getattr(err, "why", None) or err.message.rstrip(".")
    else:
        if report is None:
            return None
        if not isinstance(report, dict):
            why = f"a JSON {json_type(report)}, not an object"
        else:
            wrong = [key for key, fits in fields.items() if not fits(report.get(key))]
            if not wrong:
                return report
            why = f'its "{wrong[0]}" has the wrong type'
    problems.add(
        f"The report {path} cannot be read ({why}); `{command}` writes it anew.",
        "status.report_unreadable",
        path=str(path),
        reason=why,
        command=command,
    )
    return None


def _last_job(settings: Settings, problems: Problems) -> dict[str, Any] | None:
    """The newest of: the trainer's last job (any state) and the last in-process run (lora-latest.json)."""
    (job, active_at, resumes), run = _last_store_job(settings, problems), _last_local_run(settings, problems)
    last = _chosen_job(settings, job, active_at, run, resumes=resumes)
    if last is not None and last is job and job["status"] in ("running", "cancelling", "validating"):
        from .service.lock import trainer_lock_held

        if not trainer_lock_held(settings):  # killed with its trainer: only the next trainer's recovery settles it
            problems.add(
                f"Job {job['jobId']} is recorded as {job['status']}, but no trainer holds this data root (it was "
                "stopped or killed with the job); the next trainer settles it: `lunatrain health --ensure-trainer`.",
                "status.job_without_trainer",
                jobId=job["jobId"],
                status=job["status"],
            )
    return last


def _chosen_job(
    settings: Settings,
    job: dict[str, Any] | None,
    active_at: str | None,
    run: dict[str, Any] | None,
    *,
    resumes: bool = False,
) -> dict[str, Any] | None:
    """`_last_job`'s choice between the trainer's last job and the last in-process run. `resumes`: the job is
    one a trainer's stop requeues (`recovery.requeued_when_stopped`)."""
    if job is not None and run is not None and run["jobId"] and _holds_job(settings, job, run["jobId"]):
        # The report of a trainer job (this one, or one before it that a queued job waited behind): the
        # trainer's record is the whole story (finish, gate) and knows which of its jobs came last. Unless it
        # still says this job runs while no trainer does (one killed, and none started since whose recovery
        # would settle it): the report, written by the job's own process as it ended, says what happened.
        from .service.recovery import ended_by_its_report

        running = job.get("status") in ("running", "cancelling")
        ended = ended_by_its_report(settings, job["jobId"], active_at, run, resumes=resumes)
        return run if running and ended else job
    if job is None or run is None:
        return job or run
    # An in-process run beside the trainer's jobs: two numbered versions of one adapter on one base (or two
    # runs of its overwrite slot) say by their numbers which came last, whatever the clock said meanwhile (an
    # NTP step back between them). Otherwise whichever did something last: a job by its finish (else its
    # start, else its submission), the run by its report, written when it ended.
    order = _made_after(job, run)
    if order is not None:
        return job if order else run
    return job if str(active_at or "") >= str(run.get("finished") or "") else run


def _holds_job(settings: Settings, newest: dict[str, Any], job_id: str) -> bool:
    """Whether the trainer's job database knows job `job_id` (`newest`: its newest job). One restored from an
    older backup lacks the jobs that ran since: their report is then compared like an in-process run's."""
    from .errors import LunaError, NotFound
    from .service.jobs import existing_store

    if newest.get("jobId") == job_id:
        return True
    try:
        with existing_store(settings.data_dir) as store:
            if store is not None:
                store.get(job_id)
        return True
    except NotFound:
        return False
    except (LunaError, OSError, sqlite3.Error):  # unreadable now: the record stays the story, as before
        return True


def _made_after(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether `a` made its version after `b` made its own, where their numbers say it: numbered versions are
    given in order (v3 after v2), and so are the overwrite slot's revisions; a numbered version and a slot
    revision say nothing about each other (a run chooses its strategy). None when they cannot say."""
    from .registry import SLOT, version_number

    if not (a.get("version") and b.get("version")) or not _same_adapter(a, b):
        return None
    if a["version"] == b["version"] == SLOT:
        first, second = a.get("revision") or 0, b.get("revision") or 0
    elif SLOT not in (a["version"], b["version"]):
        first, second = version_number(a["version"]), version_number(b["version"])
    else:
        return None
    return None if first == second else first > second


def _same_adapter(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["adapterName"], a["baseModel"]) == (b["adapterName"], b["baseModel"])


def _last_store_job(settings: Settings, problems: Problems) -> tuple[dict[str, Any] | None, str | None, bool]:
    """The trainer's newest job as `lastJob` says it, when it last did something (its finish, else its start,
    else its submission), and whether a trainer's stop requeues it (`recovery.requeued_when_stopped`). A job
    database that cannot be read is one of the `problems`."""
    from .service.jobs import existing_store, jobs_db_path

    def latest() -> Any:
        path = jobs_db_path(settings.data_dir)
        if path.is_dir():  # a read takes it for "no database yet", but the trainer refuses to start on it
            problems.add(
                f"The trainer's job database {path} is a folder, not a file, so the trainer cannot start; remove or "
                "rename that folder and start the trainer again.",
                "status.jobs_db_folder",
                path=str(path),
            )
            return None
        try:
            with existing_store(settings.data_dir) as db:
                jobs = db.list(limit=1) if db is not None else []
        except sqlite3.Error as exc:  # the rest of the status still answers
            reason = " ".join(str(exc).split()).rstrip(".")
            error = getattr(exc, "sqlite_errorname", "")
            if error.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):  # held by a writer: it goes away by itself
                kind, what, fix = "busy", "is locked by another process", "ask again in a moment"
            elif error in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                kind, what = "damaged", "cannot be read"
                fix = "move it aside (the trainer starts an empty one) or restore a backup"
            elif str(exc).startswith("no such table"):  # emptied, or a table dropped: no permission is missing
                kind, what = "empty", "holds no job table"
                fix = "start the trainer, which creates it, or restore a backup"
            elif error == "SQLITE_FULL" or (error.startswith("SQLITE_IOERR") and nearly_full(path.parent)):
                # its -shm file cannot grow on a full disk, even to read: no permission would mend that
                kind, what = "disk_full", "cannot be read while its disk is full"
                fix = "free some space (`lunatrain gc` removes what the retention policy allows)"
            else:  # not to be opened (permissions, its log): moving it aside would lose the history
                kind, what = "no_access", "cannot be read by this process"
                fix = (
                    "give this user read access to it and the -wal/-shm files beside it (`chmod`), or run status "
                    "as the trainer's user"
                )
            problems.add(
                f"The trainer's job database {path} {what} ({reason}), so the trainer's last job is unknown; {fix}.",
                f"status.jobs_db_{kind}",
                path=str(path),
                reason=reason,
            )
            return None
        return jobs[0] if jobs else None

    job = _safe(latest)
    if job is None:
        return None, None, False
    from .service.recovery import as_read_now, requeued_when_stopped

    job = as_read_now(settings, job)  # as `jobs show` says it: a resume hint whose checkpoint is gone goes
    metrics = job.metrics or {}
    return (
        {
            "jobId": job.id,
            "status": job.status,
            "source": "trainer",
            "adapterName": (job.adapter.name if job.adapter else None) or job.params.get("adapterName"),
            "version": job.adapter.version if job.adapter else None,
            "revision": job.adapter.revision if job.adapter else None,
            # Which base it trained on: after a switch of base model the last job may be for another one.
            "baseModel": job.params.get("baseModel"),
            "created": job.created_at,
            "finished": job.finished_at,
            # The trainer's measure of the last try, as the job API says it: None where its trainer stopped
            # meanwhile (the time to when the next trainer settled it would count the time no trainer ran).
            "durationSeconds": job.duration_seconds,
            "metrics": {k: metrics.get(k) for k in ("valLoss", "baseValLoss", "trainLoss", "steps", "tokensPerSec")},
            "error": job.error.wire() if job.error else None,
            "gate": {
                "passed": job.gate.get("passed"),
                "promoted": job.gate.get("promoted"),
                "reasons": job.gate.get("reasons", []),
            }
            if isinstance(job.gate, dict)
            else None,
        },
        job.finished_at or job.started_at or job.created_at,
        requeued_when_stopped(job),
    )


def _last_local_run(settings: Settings, problems: Problems) -> dict[str, Any] | None:
    report = _report(settings.lora_latest_report, problems, "lunatrain lora", RUN_FIELDS)
    if not isinstance(report, dict):
        return None
    metrics = report.get("metrics") or {}
    # The report is written as the run ends: its `created` is when it finished, and it started its duration before.
    # (A trainer job's `created` is when it was submitted, `finished` when it ended: the same fields, the same facts.)
    ended, took = report.get("created"), report.get("durationSeconds")
    try:
        began = (
            iso(parse_iso(ended) - timedelta(seconds=took))
            if isinstance(ended, str) and type(took) in (int, float)
            else None
        )
    except (ValueError, OverflowError):  # a report edited by hand: no start to tell
        began = None
    return {
        "jobId": report.get("jobId"),
        "status": report.get("status"),
        "source": "report",
        "adapterName": report.get("adapterName"),
        "version": report.get("version"),
        "revision": report.get("revision"),
        "baseModel": (report.get("baseModel") or {}).get("id") or (report.get("params") or {}).get("baseModel"),
        "created": began,
        "finished": ended,
        "durationSeconds": took,
        "metrics": {k: metrics.get(k) for k in ("valLoss", "baseValLoss", "trainLoss", "steps", "tokensPerSec")},
        "error": report.get("error"),
        "gate": _gate_of(settings, report),
    }


def _gate_of(settings: Settings, report: dict[str, Any]) -> dict[str, Any] | None:
    """The eval gate's decision on the version an in-process run made, as a trainer job carries its own: it is
    kept on that version's registry entry (the revision's, for the overwrite slot). None: no version, no gate
    ran (`--no-gate`), or a registry that cannot be read (said under `problems`)."""
    from . import registry
    from .errors import LunaError

    name, version = report.get("adapterName"), report.get("version")
    if not name or not version:
        return None
    try:
        entries = registry.list_adapters(settings).get(name, {}).get("versions", [])
    except (LunaError, ValueError, OSError):
        return None
    revision = report.get("revision")
    for entry in reversed(entries):
        if entry.get("version") == version and (revision is None or entry.get("revision") == revision):
            gate = entry.get("gate")
            if not isinstance(gate, dict):
                return None
            return {"passed": gate.get("passed"), "promoted": gate.get("promoted"), "reasons": gate.get("reasons", [])}
    return None


def _active_adapters(settings: Settings, problems: Problems) -> tuple[list[dict[str, Any]], bool, bool]:
    """Every active version on every base model; `matchesBaseModel` marks the configured base's. A registry
    that cannot be read is a problem named with its fix (`problems`), not "nothing is active". Also says
    whether the configured base could be identified (else no entry can match it), and whether what is active
    is known at all (the registry could be read)."""
    from . import models, registry
    from .errors import LunaError, RegistryUnreadable

    known = True
    where = str(registry.registry_path(settings))
    try:
        active = registry.list_active(settings)
    except RegistryUnreadable as err:  # damaged or missing beside trained versions: a repair rebuilds it
        problems.add(err.message, "status.registry_unreadable", path=where)
        active, known = [], False
    except OSError as err:  # a registry this user may not read: said, as above
        reason = err.strerror or str(err)
        problems.add(
            f"The adapter registry {where} cannot be read by this process ({reason}); give this user read "
            "access to it (`chmod`).",
            "status.registry_no_access",
            path=where,
            reason=reason,
        )
        active, known = [], False
    except (LunaError, ValueError) as err:  # a storage fault (EIO), a value it cannot take: said as it is
        said = getattr(err, "message", None) or f"The adapter registry {where} cannot be read ({err})."
        problems.add(said, "status.registry_error", path=where, reason=said.rstrip("."))
        active, known = [], False
    # resolve_base builds luna-tiny when missing: a status read must not. The base is known all the same (the
    # configured luna-tiny, built the same way wherever it is): what is active on it is named by its id.
    unbuilt = (
        settings.base_model == models.TINY_ID and not (settings.models_dir / models.TINY_ID / "config.json").exists()
    )
    configured = None
    if active and not unbuilt:
        try:
            configured = models.resolve_base(None, settings)
        except (LunaError, ValueError, OSError) as err:
            # Which adapter is served depends on it: say why it is unknown, and that the one shown is a guess.
            reason = getattr(err, "message", None) or str(err)
            problems.add(
                f"The configured base model cannot be used ({reason.rstrip('.')}), so the active adapter "
                "shown is a guess; set ASSISTANT_BASE_MODEL to the base model in use.",
                "status.base_model_unusable",
                reason=reason.rstrip("."),
            )
    out = []
    for a in active:
        entry = a["entry"]
        gate = entry.get("gate") or {}
        out.append(
            {
                "name": a["name"],
                "version": a["version"],
                "baseModel": a["baseModel"],
                # the configured base's id with other weights: not served (the id alone read as "active here")
                "baseLabel": registry.base_label(settings, a["baseModel"], a["base"], configured, entry),
                "matchesBaseModel": (configured is not None and a["base"] == configured.fingerprint)
                or (unbuilt and a["baseModel"] == models.TINY_ID),
                "datasetTier": entry.get("datasetTier"),
                "stale": bool(entry.get("stale")),
                # what is active yet cannot be served (its files deleted by hand): said here as `adapters list` says it
                "filesMissing": not registry.loadable(settings, entry),
                "gate": {"passed": gate.get("passed"), "reasons": gate.get("reasons", [])} if gate else None,
            }
        )
    return out, configured is not None or unbuilt, known


def _preferred(active: list[dict[str, Any]], base_known: bool, configured_id: str) -> dict[str, Any] | None:
    """The adapter the assistant uses: luna-adapter when active, else the first active one on this base. An
    adapter active only on another base is not it (the served base cannot load it; it is under
    `activeAdapters`); only when the configured base cannot be identified is an active one the best guess: one
    recorded on the configured id first (a folder moved away), else any."""
    guess = [a for a in active if a["baseModel"] == configured_id] or active
    on_base = [a for a in active if a["matchesBaseModel"]] or ([] if base_known else guess)
    luna = [a for a in on_base if a["name"] == "luna-adapter"]
    return (luna or on_base or [None])[0]


def _last_prepare(settings: Settings, exported: str | None, problems: Problems) -> dict[str, Any] | None:
    """The last preflight, with the export it checked: `matchesExport` false when that is not the current
    one (`exported`, its fingerprint), whose data it says nothing about."""
    report = _report(settings.prepare_report, problems, "lunatrain prepare", PREPARE_FIELDS)
    if not isinstance(report, dict):
        return None
    checks = report.get("checks") or []
    dataset = report.get("dataset") or {}
    # The export's own fingerprint: where files were edited prepare recomputes `fingerprint` from them, and
    # that export is the current one all the same.
    fingerprint = dataset.get("summaryFingerprint") or dataset.get("fingerprint")
    return {
        "status": report.get("status"),
        "created": report.get("created"),
        "fingerprint": fingerprint,
        "matchesExport": None if exported is None or fingerprint is None else fingerprint == exported,
        "tier": report.get("tier"),
        "baseModel": report.get("baseModel"),
        "failed": [c.get("id") for c in checks if c.get("severity") == "fail"],
        "warned": [c.get("id") for c in checks if c.get("severity") == "warn"],
    }


def _last_gate(settings: Settings, problems: Problems) -> dict[str, Any] | None:
    report = _report(settings.eval_report, problems, "lunatrain eval-gate", GATE_FIELDS)
    if not isinstance(report, dict):
        return None
    metrics = report.get("metrics") or {}
    return {
        "decision": report.get("decision"),
        "passed": report.get("passed"),
        "candidate": (report.get("candidate") or {}).get("ref"),
        "baseModel": (report.get("candidate") or {}).get("baseModel"),  # the base it was gated on
        "baseline": (report.get("baseline") or {}).get("ref"),
        "created": report.get("created"),
        "reasons": report.get("reasons", []),
        "reasonCodes": report.get("reasonCodes", []),
        "promoted": report.get("promoted"),
        "goldenPassRate": metrics.get("goldenPassRate"),
        "valLoss": metrics.get("valLoss"),
    }
