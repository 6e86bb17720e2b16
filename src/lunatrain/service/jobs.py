"""Training jobs: the wire models (job, event, health), the states, and their SQLite persistence.

A job follows the OpenAI fine-tuning states: `validating -> queued -> running -> succeeded | failed |
cancelled`, with `cancelling` while a running job's child process is being stopped. The trainer service is
the only writer; jobs and their append-only event log live in `data/trainer/jobs.db` (WAL) so that a
restarted trainer still knows every job and every event. Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from ..errors import Conflict, DiskFull, NotFound, StorageBusy, StorageDenied, StorageError, pattern
from ..fsio import SQLITE_BUSY_TIMEOUT_S, check_sqlite_path, create_plain, sqlite_wal, writable_beside
from ..fsio import storage_error as fsio_storage_error
from ..params import FlowOptions, LoraParams
from ..settings import TRAINER_DIR
from ..wire import finite, now_iso

Status = Literal["validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"validating", "queued", "running", "cancelling"})
# Idempotency keys: what a client may send as `requestId` (no spaces, no path characters, bounded).
REQUEST_ID_PATTERN = pattern(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
    "should be 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit",
)
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN, description="client key for idempotent retries")]
JOB_ID_PREFIX = "ftjob-"
# What a job id may look like in a URL or a query (ours are `ftjob-` + 24 hex digits).
JOB_ID_PATTERN = pattern(
    r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
    "should be a job id: 1-64 letters, digits, '_' or '-', starting with a letter or digit (e.g. ftjob-…)",
)


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown keys from the other side are ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class Progress(WireModel):
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    percent: float = 0.0
    tokens_per_sec: float | None = None
    eta_seconds: float | None = None
    loss: float | None = None


class AdapterRef(WireModel):
    name: str
    version: str
    path: str
    revision: int | None = Field(default=None, description="the overwrite slot's run (null for a versioned adapter)")


class JobError(WireModel):
    code: str
    message: str
    params: dict[str, Any] | None = Field(
        default=None, description="the values the message names, so a client can say it in its language (messages.py)"
    )


class Job(WireModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    status: Status
    request_id: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    params: dict[str, Any] = Field(description="the LoRA parameters (wire form), baseModel always resolved")
    options: FlowOptions = Field(default_factory=FlowOptions, description="gate on/off, minCurated")
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, Any] = Field(default_factory=dict)
    adapter: AdapterRef | None = None
    error: JobError | None = None
    gate: dict[str, Any] | None = Field(default=None, description="eval-gate outcome after a successful run")
    gate_thresholds: dict[str, Any] | None = Field(
        default=None, description="thresholds of the eval gate after the run (a profile's [gate]); null: the defaults"
    )
    attempts: int = Field(default=0, description="child processes started for this job (>1 after a resume)")
    duration_seconds: float | None = Field(
        default=None,
        description="how long its last try ran, on a clock that never steps (startedAt/finishedAt are wall time); "
        "null while it runs, or when a trainer that stopped meanwhile started that try",
    )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def lora_params(self) -> LoraParams:
        return LoraParams.model_validate(self.params)


class Event(WireModel):
    """One entry of a job's append-only log; `seq` is the cursor for `GET /jobs/{id}/events?after=N`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    seq: int
    created_at: str
    type: str


class EventPage(WireModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool
    last_seq: int = Field(description="pass as `after` to continue; unchanged when no new events")


class JobList(WireModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool = Field(False, description="more jobs follow: ask again with `offset` + the page's length")


class JobCheck(WireModel):
    """`POST /jobs/check`: the job would be accepted; `job` is the one its requestId already names (an
    idempotent retry), else null."""

    job: Job | None = None


class DeviceView(WireModel):
    type: str = "cpu"
    name: str = "cpu"
    memory_total: int | None = None
    memory_free: int | None = None
    bf16: bool = False
    ranks: int = Field(default=1, description="processes a job trains on: one per GPU (ASSISTANT_LORA_GPUS)")
    gpus: int | None = Field(default=None, description="the GPUs the trainer sees (the device probe's count)")
    ranks_setting: int | None = Field(
        default=None, description="the trainer's own ASSISTANT_LORA_GPUS (null: unset, one process per GPU)"
    )


class QueueView(WireModel):
    running: int = 0
    queued: int = 0


class DataRootView(WireModel):
    id: str = Field(description="data_root_id() of the data root the trainer serves")
    path: str = ""


class Health(WireModel):
    status: str = Field(default="ok", description="ok, or degraded while a storage problem keeps jobs waiting")
    cuda_available: bool = False
    device: DeviceView = Field(default_factory=DeviceView)
    version: str = ""
    queue: QueueView = Field(default_factory=QueueView)
    data_root: DataRootView | None = None
    storage: str | None = Field(default=None, description="the storage problem, when there is one")
    can_train: list[str] = Field(default_factory=list, description="what this device can train (memplan)")
    code_changed: bool = Field(
        default=False,
        description="lunatrain was updated on disk since this trainer started: it finishes its queue, then stops",
    )


class ProviderHealth(Health):
    """The trainer's health as the assistant API (`GET /lora/provider-health`) and `lunatrain health --json`
    answer it: the trainer's own fields, whether it was reached, the guide's label, its address and, offline,
    the sentence that says why (`client.provider_health` builds it)."""

    status: Literal["ok", "degraded", "offline"]
    reachable: bool
    label: Literal["Aktiv (CUDA)", "Online (CPU)", "Offline"]
    device: DeviceView | None = Field(default=None, description="the trainer's device: type, name, memory, bf16")
    queue: QueueView | None = None
    version: str | None = None
    trainer_url: str
    error: str | None = None


# The header a client names its data root in (its id); the trainer refuses job requests for another root.
DATA_ROOT_HEADER = "X-Lunatrain-Data-Root"


def data_root_id(home: Path) -> str:
    """A short id of a data root (its resolved path): what the trainer serves and a client compares with."""
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,       -- FIFO order of submission
    id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    params TEXT NOT NULL,
    options TEXT,                                -- FlowOptions (gate on/off, minCurated)
    progress TEXT,
    metrics TEXT,
    adapter TEXT,
    error TEXT,
    gate TEXT,
    gate_thresholds TEXT,                        -- the eval gate's thresholds for this job (NULL: defaults)
    attempts INTEGER NOT NULL DEFAULT 0,
    duration_seconds REAL,                       -- the last try's run, measured on the monotonic clock
    pid INTEGER,                                 -- the running child, its own process group leader
    pid_started REAL,                            -- its start (procs.started): a reused pid is never killed by mistake
    ended INTEGER                                -- the order jobs ended in (1, 2, …): no clock's, unlike finished_at
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

_JSON_COLUMNS = ("params", "options", "progress", "metrics", "adapter", "error", "gate", "gate_thresholds")


def _unopenable(path: Path, exc: sqlite3.Error | OSError) -> StorageError:
    """One sentence for a job database the trainer cannot open (it died in a traceback at startup): what is
    there instead, damaged, or out of reach. It holds the job history only: adapters and their registry stay."""
    if path.is_dir():
        return StorageError(
            f"The trainer's job database {path} is a folder, not a file; remove or rename that folder and start "
            "the trainer again."
        )
    if isinstance(exc, OSError):
        return fsio_storage_error(exc, f"the trainer's job database {path}")
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return StorageError(
            f"The trainer's job database {path} is damaged ({exc}); move it aside (it holds the job history only: "
            "the adapters and their registry stay) and start the trainer again."
        )
    return StorageError(
        f"The trainer's job database {path} cannot be opened ({exc}); check that this user may read and write it "
        "and its folder."
    )


class JobStore:
    """The jobs database. One connection guarded by a lock: the service's request threads and its runner
    thread share it, and SQLite serializes writers anyway."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: a reader beside the trainer (or after it): no schema, no journal-mode change, no write."""
        self.path = path
        self._lock = threading.RLock()
        # When each try this store claimed began, on the monotonic clock: a wall clock stepped meanwhile (an NTP
        # correction) would make finish minus start negative, or an hour too long.
        self._claimed: dict[str, float] = {}
        if read_only:
            self._db = read_only_connection(path)
            self._db.row_factory = sqlite3.Row
            return
        check_sqlite_path(path, "the trainer's job database")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            create_plain(path)
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S
            )
            self._db.row_factory = sqlite3.Row
            sqlite_wal(self._db)
            # NORMAL is durable across process crashes in WAL mode (only a power loss may drop the last commit).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            added = (
                ("gate_thresholds", "TEXT"),
                ("options", "TEXT"),
                ("duration_seconds", "REAL"),
                ("ended", "INTEGER"),
            )
            for column, kind in added:
                if column not in columns:  # a jobs.db from before this column
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        except (sqlite3.Error, OSError) as exc:
            raise _unopenable(path, exc) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- reading ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"No job {job_id!r}; `lunatrain jobs list` lists the jobs.")
        return _job(row)

    def list(self, *, limit: int = 20, status: str | None = None) -> list[Job]:
        return self.page(limit=limit, status=status).data

    def page(self, *, limit: int = 20, offset: int = 0, status: str | None = None) -> JobList:
        """Newest first, `offset` jobs skipped; one row more than asked tells whether another page follows."""
        sql, args = "SELECT * FROM jobs", []
        if status:
            sql, args = sql + " WHERE status = ?", [status]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit + 1, offset)).fetchall()
        return JobList(data=[_job(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def with_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses).fetchall()
        return [_job(r) for r in rows]

    def next_queued(self) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
        return _job(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    def child(self, job_id: str) -> tuple[int | None, float | None]:
        with self._lock:
            row = self._db.execute("SELECT pid, pid_started FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> EventPage:
        self.get(job_id)  # 404 for unknown jobs rather than an empty page
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, created_at, type, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, limit + 1),
            ).fetchall()
            # An empty page gives back the cursor, but never one past the job's last event: a client going on
            # from it would miss the events still to come up to there.
            newest = (
                None
                if rows
                else self._db.execute("SELECT MAX(seq) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
            )
        data = [Event(seq=r[0], created_at=r[1], **(json.loads(r[3]) | {"type": r[2]})) for r in rows[:limit]]
        last = data[-1].seq if data else min(after, newest) if newest is not None else after
        return EventPage(data=data, has_more=len(rows) > limit, last_seq=last)

    def last_event(self, job_id: str, type_: str) -> dict[str, Any] | None:
        """The data of the job's newest event of `type_`, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM events WHERE job_id = ? AND type = ? ORDER BY seq DESC LIMIT 1", (job_id, type_)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def logged(self, job_id: str, code_prefix: str) -> bool:
        """Whether the job logged an event whose message code starts with `code_prefix` (messages.py)."""
        with self._lock:
            rows = self._db.execute("SELECT data FROM events WHERE job_id = ? AND type = 'log'", (job_id,)).fetchall()
        return any(str(json.loads(row[0]).get("code", "")).startswith(code_prefix) for row in rows)

    # --- writing ---------------------------------------------------------------------------------
    def create(
        self,
        params: LoraParams,
        request_id: str | None = None,
        gate_thresholds: dict[str, Any] | None = None,
        *,
        options: FlowOptions | None = None,
    ) -> tuple[Job, bool]:
        """Insert a new job in `validating`; with a known `request_id` return that job instead.

        Returns (job, created). Reusing a request id for different parameters (or gate thresholds) is a
        Conflict: silently returning the old job would hide that the new parameters were never trained.
        """
        wire, opts = params.wire(), (options or FlowOptions()).wire()
        with self._lock, self._tx():
            job = self._same_request(request_id, wire, opts, gate_thresholds)
            if job is not None:
                return job, False
            job_id = JOB_ID_PREFIX + uuid.uuid4().hex[:24]
            self._db.execute(
                "INSERT INTO jobs (id, request_id, status, created_at, params, options, progress, gate_thresholds)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    request_id,
                    "validating",
                    now_iso(),
                    _dump(wire),
                    _dump(opts),
                    _dump(Progress().wire()),
                    _dump(gate_thresholds),
                ),
            )
            self._event(job_id, "status", {"status": "validating"})
        return self.get(job_id), True

    def existing(
        self,
        params: LoraParams,
        request_id: str | None,
        gate_thresholds: dict[str, Any] | None = None,
        *,
        options: FlowOptions | None = None,
    ) -> Job | None:
        """What `create` would return for a known `request_id` (or its Conflict), without creating anything."""
        with self._lock:
            return self._same_request(request_id, params.wire(), (options or FlowOptions()).wire(), gate_thresholds)

    def _same_request(
        self, request_id: str | None, wire: dict[str, Any], opts: dict[str, Any], thresholds: dict[str, Any] | None
    ) -> Job | None:
        if request_id is None:
            return None
        row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        job = _job(row)
        if job.params != wire or job.options.wire() != opts or job.gate_thresholds != thresholds:
            raise Conflict(
                f"requestId {request_id!r} was already used for job {job.id} with other parameters; "
                "use a new requestId."
            )
        return job

    def set_status(self, job_id: str, status: Status, *, message: str | None = None, **fields: Any) -> Job:
        """Move a job to `status` (and set columns in `fields`), appending a status event."""
        cols = {"status": status} | {k: _dump(v) if k in _JSON_COLUMNS else v for k, v in fields.items()}
        if status in TERMINAL:
            cols.setdefault("finished_at", now_iso())
            cols |= {"pid": None, "pid_started": None}
            began = self._claimed.pop(job_id, None)
            if began is not None:
                cols["duration_seconds"] = round(time.monotonic() - began, 3)
        assign = ", ".join(f"{k} = ?" for k in cols)
        data: dict[str, Any] = {"status": status}
        if message:
            data["message"] = message
        if fields.get("error"):
            data["error"] = fields["error"]
        with self._lock, self._tx():
            self._db.execute(f"UPDATE jobs SET {assign} WHERE id = ?", (*cols.values(), job_id))
            if status in TERMINAL:
                # The order jobs ended in, which no clock writes: retention keeps the last ones (a trainer whose
                # clock ran a year ahead stamped its jobs later than every one ended since).
                self._db.execute(
                    "UPDATE jobs SET ended = (SELECT COALESCE(MAX(ended), 0) + 1 FROM jobs) WHERE id = ?", (job_id,)
                )
            if status in TERMINAL:  # an ended job has no time left, whatever its last progress event estimated
                row = self._db.execute("SELECT progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row and row[0]:
                    progress = json.loads(row[0]) | {"etaSeconds": None}
                    self._db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (_dump(progress), job_id))
            self._event(job_id, "status", data)
        return self.get(job_id)

    def claim(self, job_id: str) -> bool:
        """queued -> running, only if still queued (a cancel may have won the race); True if claimed."""
        with self._lock, self._tx():
            # A try starts without the steps of the one before it (a resume job requeued by a trainer's stop):
            # its run resumes from an epoch checkpoint, behind where that try got, and says where it is.
            cur = self._db.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), attempts = attempts + 1, "
                "duration_seconds = NULL, progress = NULL "
                "WHERE id = ? AND status = 'queued'",
                (now_iso(), job_id),
            )
            if cur.rowcount != 1:
                return False
            self._event(job_id, "status", {"status": "running"})
            self._claimed[job_id] = time.monotonic()
        return True

    def add_event(
        self,
        job_id: str,
        type_: str,
        data: dict[str, Any],
        *,
        progress: Progress | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> int:
        """Append one event; update the job's progress snapshot / merge metrics in the same transaction."""
        with self._lock, self._tx():
            seq = self._event(job_id, type_, data)
            if progress is not None:
                self._db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (_dump(progress.wire()), job_id))
            if metrics:
                row = self._db.execute("SELECT metrics FROM jobs WHERE id = ?", (job_id,)).fetchone()
                merged = (json.loads(row[0]) if row and row[0] else {}) | metrics
                self._db.execute("UPDATE jobs SET metrics = ? WHERE id = ?", (_dump(merged), job_id))
        return seq

    def set_fields(self, job_id: str, **fields: Any) -> None:
        cols = {k: _dump(v) if k in _JSON_COLUMNS else v for k, v in fields.items()}
        assign = ", ".join(f"{k} = ?" for k in cols)
        with self._lock, self._tx():
            self._db.execute(f"UPDATE jobs SET {assign} WHERE id = ?", (*cols.values(), job_id))

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job that has not started, or mark a running one `cancelling` (the runner stops its child).

        Cancelling a job already cancelled or cancelling returns it unchanged; a finished job is a Conflict.
        """
        with self._lock:
            job = self.get(job_id)
            if job.status in ("cancelled", "cancelling"):
                return job
            if job.status in TERMINAL:
                raise Conflict(
                    f"Job {job_id} already {job.status}; only queued or running jobs can be cancelled.",
                    code=f"job.already_{job.status}",
                    params={"jobId": job_id},
                )
            if job.status == "running":
                return self.set_status(job_id, "cancelling", message="cancel requested")
            return self.set_status(job_id, "cancelled", message="cancelled before it started")

    # --- internals -------------------------------------------------------------------------------
    def _event(self, job_id: str, type_: str, data: dict[str, Any]) -> int:
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
        payload = {k: v for k, v in finite(data).items() if k not in ("seq", "createdAt", "type")}
        self._db.execute(
            "INSERT INTO events (job_id, seq, created_at, type, data) VALUES (?, ?, ?, ?, ?)",
            (job_id, seq, now_iso(), type_, _dump(payload)),
        )
        return seq

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self.path)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): each write is all-or-nothing. A write the database
    refuses (a read-only file, a full disk) is a StorageError naming the file: the trainer answers it 503
    in one sentence, not 500."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db, self._path = db, path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _storage_error(exc, self._path) from exc

    def __exit__(self, exc_type: object, exc: BaseException | None, _tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as failed:
                exc = failed
        # SQLite has rolled some failures back itself (a full disk): a ROLLBACK then would fail and hide the cause
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise _storage_error(exc, self._path) from exc


def _storage_error(exc: sqlite3.Error, path: Path) -> StorageError:
    reason = " ".join(str(exc).split()).rstrip(".")
    if "readonly" in reason:
        return StorageDenied(
            f"The trainer's job database {path} cannot be written by this process ({reason}), so nothing was "
            "changed; give this user write access to it and its folder (`chown`/`chmod`)."
        )
    if "full" in reason:
        return DiskFull(f"The disk is full: the trainer's job database {path} cannot be written ({reason}).")
    if "locked" in reason or "busy" in reason:
        return StorageBusy(f"The trainer's job database {path} is held by another process ({reason}); try again.")
    return StorageError(f"The trainer's job database {path} failed ({reason}), so nothing was changed.")


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True, mode="json")
    return json.dumps(finite(value), ensure_ascii=False, sort_keys=True)


def _job(row: sqlite3.Row) -> Job:
    data = {k: row[k] for k in row.keys() if k not in ("seq", "pid", "pid_started")}
    for key in _JSON_COLUMNS:  # .get: a database from before a column, read without migrating it
        data[key] = json.loads(data[key]) if data.get(key) else None
    if data["options"] is None:  # a job from before FlowOptions carried them among its params
        data["options"] = {k: data["params"].pop(k) for k in ("minCurated", "gate") if k in data["params"]}
    data["progress"] = data["progress"] or {}
    data["metrics"] = data["metrics"] or {}
    return Job.model_validate(data)


def jobs_db_path(data_dir: Path) -> Path:
    return data_dir / TRAINER_DIR / "jobs.db"


def read_only_connection(path: Path) -> sqlite3.Connection:
    """The jobs database opened for reading only. SQLite opens a WAL-mode file only with its index (-shm) beside it,
    which it cannot create in a folder it may not write (a read-only data root): there, when no write-ahead
    log is left over either (every job store closed cleanly), the file alone is the whole database and is
    read as immutable. (Immutable skips the log, so with one left over it is not used.)"""
    logged = Path(f"{path}-wal").exists()
    writable = os.access(path.parent, os.W_OK)
    if writable and not logged:
        # No connection is open (none left a log): a read-only reader would create the log and its index
        # and could not remove them on close. A read-write one that may not write removes both as it closes,
        # like any last connection, so a reader (`gc --dry-run`, `status`) leaves the folder as it was.
        db = sqlite3.connect(
            f"{path.as_uri()}?mode=rw", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
        )
        db.execute("PRAGMA query_only = ON")
    else:
        frozen = "&immutable=1" if not writable and not logged else ""
        db = sqlite3.connect(
            f"{path.as_uri()}?mode=ro{frozen}", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
        )
    if writable:  # a file it may not write (a root a group shares) is opened read-only even so
        db.execute("PRAGMA schema_version")  # a first read: SQLite makes its -wal/-shm files now
        writable_beside(path)
    return db


@contextlib.contextmanager
def existing_store(data_dir: Path) -> Iterator[JobStore | None]:
    """The trainer's database, for a read from outside the trainer (`status`, a follower whose trainer is
    away); None when there is none: a read never creates it."""
    path = jobs_db_path(data_dir)
    if not path.is_file():
        yield None
        return
    store = JobStore(path, read_only=True)
    try:
        yield store
    finally:
        store.close()


def job_log_path(logs: Path, job_id: str) -> Path:
    """A job's log (its worker's stdout and stderr), in the trainer's `logs` folder."""
    return logs / f"{job_id}.log"


def ranks_log_dir(logs: Path, job_id: str) -> Path:
    """torchrun's per-rank files of a data-parallel job, in the trainer's `logs` folder beside the job's log."""
    return logs / f"{job_id}.torchrun"
