"""Retention: what `lunatrain gc` removes so that disk use stays bounded while the history that matters stays.

The policy (settings, ASSISTANT_* variables):

- **Job events and logs** (`data/trainer/jobs.db` table `events`, `data/trainer/logs/<job>.log` and, for a
  data-parallel job, torchrun's per-rank files in `data/trainer/logs/<job>.torchrun/`): of a
  finished job (succeeded, failed, cancelled) once it is not among the `RETAIN_JOBS` (50) most recent finished jobs
  or finished more than `RETAIN_JOB_DAYS` (30) days ago. The job row itself stays (status, metrics,
  adapter, error: one small row per job), so every job id still answers. Jobs that have not finished are
  never touched.
- **Exports** (`data/training/.exports/<id>/`): all but the `RETAIN_EXPORTS` (3) newest; the current one
  always stays. Done after every export as well.
- **Token caches** (`data/cache/tokens/*.safetensors`): every cache not made from the current export's
  dataset fingerprint (it is rebuilt on demand, so the worst case is one re-tokenization).
- **Run work directories** (`data/adapters/<name>/.work/<run>/`, epoch checkpoints of unfinished or failed
  runs kept for `resume`): once nothing in them changed for `RETAIN_CHECKPOINT_DAYS` (7) days, and never
  while a job of that adapter is queued or running (one requeued to resume continues from them), nor while a
  run trains in it (a local run too: it holds its folder, `fsio.holding`).
- **Staging folders** (`data/models/merged/.<name>.<host>-<pid>.<random>/` and the like in `data/models`): what
  a killed merge (or model build) left half-written, once its process has ended; one made on another machine
  once nothing in it changed for a day (`fsio.abandoned_staging`). A folder without the host-pid part is
  never one of them. A merge removes those of `data/models/merged` before it writes.
- **Never**: the registry and its history, adapter versions, reports, the example database.

`collect(settings, dry_run=True)` lists what would go with sizes; without dry_run it deletes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import export
from .errors import StorageError
from .fsio import SQLITE_BUSY_TIMEOUT_S, abandoned_staging, in_use, nearly_full, remove_tree, tree_size
from .messages import counted
from .registry import WORK_DIR
from .service.jobs import TERMINAL, job_log_path, jobs_db_path, ranks_log_dir, read_only_connection
from .settings import Settings
from .wire import parse_iso, utc_now


@dataclass(frozen=True)
class Item:
    kind: str  # job-events | job-log | export | token-cache | run-workdir | staging
    path: str  # relative to the data root (for job events: the database and the job id)
    bytes: int
    reason: str


@dataclass
class GcReport:
    dry_run: bool
    items: list[Item] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one sentence each: what could not be judged, and kept

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for i in self.items:
            n, b = out.get(i.kind, (0, 0))
            out[i.kind] = (n + 1, b + i.bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "dryRun": self.dry_run,
            "bytes": self.bytes,
            "items": [{"kind": i.kind, "path": i.path, "bytes": i.bytes, "reason": i.reason} for i in self.items],
            "problems": self.problems,
        }


def collect(
    settings: Settings, *, dry_run: bool = False, now: datetime | None = None, keep: Collection[str] = ()
) -> GcReport:
    """Apply the retention policy (module docstring); with `dry_run` only list what would go. The work
    directories of the adapters in `keep` stay whatever their age (`after_run`)."""
    files_now = now.timestamp() if now is not None else None  # a time the caller gives: that, for files too
    now = now or utc_now()
    report = GcReport(dry_run)
    try:
        with _one_at_a_time(settings, shared=dry_run):
            _collect(settings, report, now, dry_run, keep, files_now)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise StorageError(f"Cleaning up under {settings.home} failed: {exc.strerror or exc}{where}.") from None
    return report


@contextlib.contextmanager
def _one_at_a_time(settings: Settings, *, shared: bool) -> Iterator[None]:
    """One collection at a time per data root: a user's `gc` beside the one a trainer runs after each job
    measured and claimed what the other was removing (and failed on a folder gone under it). The second
    waits, then finds what the first left. A lock on the data root folder itself (flock on its descriptor),
    so nothing is written for it: a dry run on a read-only root takes it shared."""
    if not settings.home.is_dir():  # no data root (yet): nothing to collect, and no one to take turns with
        yield
        return
    fd = os.open(settings.home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor


def _collect(
    settings: Settings,
    report: GcReport,
    now: datetime,
    dry_run: bool,
    keep: Collection[str],
    files_now: float | None = None,
) -> None:
    """The policy's steps, in order (`collect` holds the lock and turns an OSError into one sentence).
    `files_now`: the time files are measured against (default: the files' own clock, `_files_clock`)."""
    # A damaged jobs database keeps what depends on it (job events; run work directories, which a job
    # still queued may resume from); exports, caches and staging folders do not, and still go.
    damaged, kept = None, "the run work directories and job events were kept"
    stuck: Stuck = {}  # folders that could not be removed: they stay, the rest goes on
    # First what needs no jobs database: on a full disk, SQLite cannot even read it (a WAL database needs its
    # index file), and the room these free is what lets the job steps below run.
    report.items += _exports(settings, dry_run, stuck)  # may wait for an export in progress (its lock)
    report.items += _token_caches(settings, dry_run, stuck)
    report.items += _staging(settings, dry_run, stuck)
    try:
        report.items += _jobs(settings, now, dry_run, stuck)
    except sqlite3.Error as exc:
        damaged = exc
    if damaged is None:
        try:  # read now, not before the wait: a resume queued meanwhile keeps its checkpoint
            files_now = files_now if files_now is not None else _files_clock(settings, dry_run)
            waiting = _unfinished_adapters(settings) | set(keep)
            report.items += _work_dirs(settings, files_now, dry_run, waiting, stuck)
        except sqlite3.Error as exc:  # damaged where the first read did not look: its job events went
            damaged, kept = exc, "the run work directories were kept"
    if damaged is not None:
        path = jobs_db_path(settings.data_dir)
        if nearly_full(path):  # a healthy database SQLite cannot read or change for want of room
            report.problems.append(
                f"The disk holding the jobs database {path} is full ({damaged}), so {kept}; free some space "
                "and run `lunatrain gc` again."
            )
        else:
            report.problems.append(f"The jobs database {path} cannot be used ({damaged}); {kept}.")
    for path, (exc, before) in stuck.items():
        report.problems.append(_stuck_problem(settings, path, exc, before))


def size_text(n: int) -> str:
    """Bytes on disk as `df -H` says them (decimal units): "12.3 kB", "45.6 MB", "7.8 GB"."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


# Folders gc could not remove: the error, and the bytes each held before (None: not measured). They stay,
# the rest goes on; `fsio.remove_tree` removes all it can first, so one may be left in part.
Stuck = dict[Path, tuple[OSError, int | None]]


def _removed(path: Path, stuck: Stuck, size: int | None) -> bool:
    """`path` removed (`fsio.remove_tree`), or noted in `stuck` with the `size` it had when it could not be."""
    try:
        remove_tree(path)
    except OSError as exc:
        stuck[path] = (exc, size)
        return False
    return True


def _stuck_problem(settings: Settings, path: Path, exc: OSError, before: int | None) -> str:
    """The sentence for a folder gc could not remove: as it is, or (what went is gone for good, and a folder
    emptied in part is no longer what it was) with what went and what is left."""
    where = exc.filename if exc.filename and exc.filename != str(path) else None
    cause = f"({exc.strerror or exc}" + (f": {settings.shown(Path(where))}" if where else "") + ")"
    fix = "give this user the right to remove it, or remove it as its owner."
    left = tree_size(path) if path.exists() or path.is_symlink() else 0
    if before is not None and left < before:
        rest = f"what is left ({size_text(left)})" if left else "what is left (empty folders)"
        return (
            f"{settings.shown(path)} could only be removed in part {cause}: {size_text(before - left)} of it went, "
            f"{rest} stays: {fix}"
        )
    return f"{settings.shown(path)} could not be removed {cause}; it stays: {fix}"


def after_run(settings: Settings, log: logging.Logger | None = None, *, resumable: str | None = None) -> None:
    """The policy when a run ends (a trainer job, a local run), so growth stays bounded without anyone
    running `lunatrain gc`. A failure to clean up never touches the run's outcome: it is logged (with what
    went, by name) where there is a log, and otherwise left for `gc` to say. `resumable`: the adapter of a run
    that ended before it finished, whose checkpoint the message just offered to resume from (kept, even with
    ASSISTANT_RETAIN_CHECKPOINT_DAYS=0; a later `gc` judges it by its age)."""
    from .errors import LunaError

    try:
        report = collect(settings, keep=[resumable] if resumable else ())
    except LunaError as err:
        if log:
            log.warning("retention skipped: %s", err.message)
        return
    if log:
        for item in report.items:  # named, so that what went can be told afterwards
            log.info("retention removed %s %s (%s)", item.kind, item.path, item.reason)
        for problem in report.problems:
            log.warning("retention: %s", problem)


def _jobs_db(settings: Settings) -> Path | None:
    """The jobs database; None when there is none yet. Something else in its place (a link to a volume that is
    not mounted, a folder) is a database that cannot be read, not "no jobs": what depends on it is kept."""
    path = jobs_db_path(settings.data_dir)
    if path.is_file():
        return path
    if path.exists() or path.is_symlink():
        raise sqlite3.OperationalError(f"{path} is no file" + (" (a link to nothing)" if path.is_symlink() else ""))
    return None


def _jobs(settings: Settings, now: datetime, dry_run: bool, stuck: Stuck) -> list[Item]:
    path = _jobs_db(settings)
    if path is None:
        return []
    logs = settings.trainer_logs_dir
    cutoff = now - timedelta(days=settings.retain_job_days)
    db = _open_jobs(path, dry_run)
    try:
        has_order = any(r[1] == "ended" for r in db.execute("PRAGMA table_info(jobs)"))
        order = "ended" if has_order else "NULL"
        rows = db.execute(f"SELECT id, status, finished_at, created_at, {order} FROM jobs ORDER BY seq DESC").fetchall()
        # The most recently *finished* jobs are kept: jobs still queued or running take no place among them, and
        # a job cancelled while queued (submitted later, ended first) ranks by when it ended: by the order jobs
        # ended in (no clock's), then, for jobs ended before that was recorded, by their stamps.
        ended = sorted(
            (row for row in rows if row[1] in TERMINAL),
            key=lambda r: (r[4] is not None, r[4] or 0, _parse(r[2] or r[3])),
            reverse=True,
        )
        doomed: list[tuple[str, str]] = []
        keep = settings.retain_jobs
        beyond = (
            "no finished job is kept (ASSISTANT_RETAIN_JOBS=0)"
            if keep == 0
            else f"beyond the {'most recent finished job' if keep == 1 else f'{keep} most recent finished jobs'}"
        )
        for rank, (job_id, _status, finished_at, created_at, _ended) in enumerate(ended):
            if rank >= keep:
                doomed.append((job_id, beyond))
            elif _parse(finished_at or created_at) < cutoff:
                doomed.append((job_id, f"finished more than {settings.retain_job_days:g} days ago"))
        items = []
        files: list[tuple[Path, Item]] = []
        for job_id, reason in doomed:
            n, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(data) + LENGTH(type) + LENGTH(created_at)), 0) FROM events WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            if n:
                items.append(
                    Item("job-events", f"{str(settings.shown(path))}#{job_id} ({n} events)", int(size), reason)
                )
            # A log that is a folder (damage, a stray mkdir) goes as one too: a job's log goes with its events.
            for log in (job_log_path(logs, job_id), ranks_log_dir(logs, job_id)):
                if log.exists() or log.is_symlink():
                    files.append((log, Item("job-log", str(settings.shown(log)), tree_size(log), reason)))
        if not dry_run and doomed:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM events WHERE job_id = ?", [(j,) for j, _ in doomed])
            db.execute("COMMIT")
            _give_back(db)
            # The events are gone for good now: a log that cannot be removed is one of the problems, never a
            # stop that would leave the other logs behind on this gc and every later one.
            files = [(log, item) for log, item in files if _removed(log, stuck, item.bytes)]
        return items + [item for _log, item in files]
    finally:
        db.close()


def _give_back(db: sqlite3.Connection) -> None:
    """The space of the deleted events back to the disk, as gc says it removed them: SQLite keeps a deleted
    row's pages in its file for later rows. VACUUM rewrites the file (milliseconds for a jobs database); a
    trainer writing meanwhile makes it wait a second at most, then it is left for the next gc."""
    with contextlib.suppress(sqlite3.OperationalError):
        db.execute("PRAGMA busy_timeout = 1000")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log VACUUM wrote, back to nothing


def _open_jobs(path: Path, dry_run: bool) -> sqlite3.Connection:
    """The jobs database; for a dry run read-only (`jobs.read_only_connection`)."""
    if not dry_run:
        return sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
    return read_only_connection(path)


def _parse(stamp: str | None) -> datetime:
    if not stamp:
        return datetime.max.replace(tzinfo=UTC)  # no time recorded: never "too old"
    return parse_iso(stamp)


def _exports(settings: Settings, dry_run: bool, stuck: Stuck) -> list[Item]:
    sizes: dict[Path, int] = {}  # measured under the export lock, as they are listed and removed
    failed: dict[Path, OSError] = {}
    doomed = export.prune_exports(settings, settings.retain_exports, dry_run=dry_run, sizes=sizes, failed=failed)
    stuck.update({path: (exc, sizes.get(path)) for path, exc in failed.items()})
    return [
        Item(
            "export",
            str(settings.shown(p)),
            sizes[p],
            "left by an interrupted export"
            if p.name.endswith(".partial")
            else "older than the newest export"
            if settings.retain_exports == 1
            else f"older than the {settings.retain_exports} newest exports",
        )
        for p in doomed
    ]


def cache_fingerprint(path: Path) -> str | None:
    """The dataset fingerprint a token cache was made from (its safetensors metadata), without torch."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta.get("fingerprint") if isinstance(meta, dict) else None


def _token_caches(settings: Settings, dry_run: bool, stuck: Stuck) -> list[Item]:
    root = settings.cache_dir / "tokens"
    if not root.is_dir():
        return []
    try:
        summary = export.read_summary(settings)
    except Exception:  # an unreadable export: no cache can be matched to it, but none is removed either
        return []
    current = summary.get("fingerprint") if summary else None
    items = []
    for path in sorted(root.glob("*.safetensors")):
        if current is not None and cache_fingerprint(path) == current:
            continue
        size = tree_size(path)  # a folder in a cache file's place goes like one (`fsio.remove_tree`)
        if dry_run or _removed(path, stuck, size):
            items.append(Item("token-cache", str(settings.shown(path)), size, "not made from the current export"))
    return items


def _unfinished_adapters(settings: Settings) -> set[str]:
    """The adapter names of jobs not ended yet (queued, running, requeued to resume): their work directories
    hold the checkpoint a resume continues from, however long the trainer was down."""
    path = _jobs_db(settings)
    if path is None:
        return set()
    db = read_only_connection(path)
    try:
        rows = db.execute("SELECT status, params FROM jobs").fetchall()
    finally:
        db.close()
    names = set()
    for status, params in rows:
        if status in TERMINAL:
            continue
        try:
            names.add(str(json.loads(params)["adapterName"]))
        except (ValueError, TypeError, KeyError):  # a row no trainer could run either: keep every work dir
            return {run.parent.parent.name for run in settings.adapters_dir.glob(f"*/{WORK_DIR}/*")}
    return names


def _files_clock(settings: Settings, dry_run: bool) -> float:
    """Now, as the clock that stamps the data root's files says it: the time of a file written (and removed)
    now under it. A process whose own clock runs ahead of the files' (another machine on a shared data root, a
    clock not yet set) removed a checkpoint written seconds before as idle for days. This process's clock for
    a dry run, which writes nothing, and where nothing can be written."""
    if dry_run:
        return time.time()
    probe = settings.data_dir / f".gc-clock-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink()
    except OSError:
        return time.time()


def _work_dirs(settings: Settings, now: float, dry_run: bool, waiting: set[str], stuck: Stuck) -> list[Item]:
    """Idle run work directories, but none of an adapter in `waiting` (`_unfinished_adapters`); idle measured
    against `now`, in the files' clock."""
    root = settings.adapters_dir
    if not root.is_dir():
        return []
    cutoff = now - settings.retain_checkpoint_days * 86400
    items = []
    for run in sorted(root.glob(f"*/{WORK_DIR}/*")):
        if not run.is_dir() or run.parent.parent.name in waiting or in_use(run):  # in_use: a run trains there
            continue
        newest = max([p.lstat().st_mtime for p in run.rglob("*")] + [run.lstat().st_mtime])
        if newest >= cutoff:
            continue
        age = (now - newest) / 86400
        # under a day in hours, under an hour in minutes: a run folder of this morning is no "0 days" old,
        # and one of a minute ago (ASSISTANT_RETAIN_CHECKPOINT_DAYS=0) no hour
        days, hours, minutes = round(age), round(age * 24), max(1, round(age * 1440))
        unchanged = (
            counted(days, "day") if age >= 1 else counted(hours, "hour") if hours >= 1 else counted(minutes, "minute")
        )
        kept = settings.retain_checkpoint_days
        size = tree_size(run)
        if dry_run or _removed(run, stuck, size):
            items.append(
                Item(
                    "run-workdir",
                    str(settings.shown(run)),
                    size,
                    f"unchanged for {unchanged} (kept {kept:g} {'day' if kept == 1 else 'days'})",
                )
            )
    return items


def _staging(settings: Settings, dry_run: bool, stuck: Stuck) -> list[Item]:
    items = []
    for parent in (settings.models_dir, settings.merged_dir):
        for path, reason in abandoned_staging(parent):
            size = tree_size(path)
            if dry_run or _removed(path, stuck, size):
                items.append(Item("staging", str(settings.shown(path)), size, reason))
    return items
