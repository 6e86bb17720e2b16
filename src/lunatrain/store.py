"""The example store: training examples and memory items in SQLite (default) or PostgreSQL.

One SQLAlchemy Core schema, the same code for both databases. The schema is created and upgraded by the
Alembic migrations in `lunatrain/migrations/` the first time a process opens a database, under a lock
(SQLite: the database file's own write lock; PostgreSQL: an advisory lock), so a user's database survives
upgrades and two processes never race.

Every change bumps a counter row in the same transaction, so `revision()` tells whether anything changed
since the last export. Deleting an example leaves a tombstone of its content hash (`deleted_hashes()`), so
adapters trained on it can be marked stale.
"""

from __future__ import annotations

import collections
import contextlib
import getpass
import importlib.resources
import itertools
import json
import logging
import os
import re
import shlex
import sqlite3
import threading
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import formats
from .errors import (
    Conflict,
    DiskFull,
    LunaError,
    NotFound,
    StorageBusy,
    StorageDenied,
    StorageError,
    StorageIncompatible,
    StorageUnreachable,
    UsageError,
    some,
)
from .formats import SOURCES, STATUSES, ExampleDraft, RecordError, Source, Status
from .fsio import (
    SQLITE_BUSY_TIMEOUT_S,
    check_sqlite_path,
    create_plain,
    files_exhausted,
    identity,
    nearly_full,
    out_of_files,
    sqlite_wal,
    writable_beside,
)
from .messages import counted
from .schema import deleted_table, examples_table, memory_table, state_table
from .settings import Settings
from .wire import check_page, iso, utc_now

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x4C554E41  # "LUNA": advisory lock key serializing migrations across processes
_PG_WRITE_LOCK = 0x4C554E57  # "LUNW": writers queue, as SQLite's BEGIN IMMEDIATE makes them
# The largest id a row can have: `id` is a 32-bit integer on PostgreSQL (a 64-bit one on SQLite). A larger
# one names no row; the server would refuse the query rather than find nothing.
_PG_MAX_ID = 2**31 - 1
_CHUNK = 500  # ids/hashes per IN (...) clause: far below every driver's parameter limit
_FETCH = 200  # rows a streamed listing holds at a time
T = TypeVar("T")


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- records ------------------------------------------------------------------------------------


class _Record:
    """Shared conversions of the stored records: from a database row, and to JSON-ready dicts."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Any:
        values = {f.name: row[f.name] for f in fields(cls)}  # type: ignore[arg-type]
        for name in ("turns", "tags"):
            if name in values:
                values[name] = tuple(values[name] or ())
        values["created_at"], values["updated_at"] = _aware(values["created_at"]), _aware(values["updated_at"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = [dict(v) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, datetime):
                out[name] = iso(value)  # as every job, event and report says a time
        return out


@dataclass(frozen=True)
class Example(_Record):
    id: int
    hash: str
    prompt: str
    response: str
    system: str | None
    turns: tuple[dict[str, str], ...]
    source: str
    status: str
    rating: int | None
    tags: tuple[str, ...]
    conversation_id: str | None
    created_at: datetime
    updated_at: datetime

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [dict(t) for t in self.turns]
        return msgs + [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


@dataclass(frozen=True)
class MemoryItem(_Record):
    id: int
    hash: str
    topic: str | None
    question: str
    answer: str
    status: str
    tags: tuple[str, ...]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AddResult:
    added: int
    skipped_duplicates: int
    revision: str
    # (N, M): a record of lunatrain's export of ex-N, edited, added as ex-M; ex-N holds its old content still
    kept_beside: tuple[tuple[int, int], ...] = ()
    # (N, status): stored already, not approved, where the add meant the content approved: its status is kept
    not_approved: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class ImportResult:
    path: str
    records: int
    added: int
    skipped_duplicates: int
    formats: dict[str, int]
    revision: str
    bad: tuple[str, ...] = ()  # with skip_bad: the records left out, "FILE line N: problem"
    kept_beside: tuple[tuple[int, int], ...] = ()  # AddResult's
    not_approved: tuple[tuple[int, str], ...] = ()  # AddResult's


@dataclass(frozen=True)
class SeedResult:
    examples_added: int
    examples_skipped: int
    memory_added: int
    memory_skipped: int
    files: list[str] = field(default_factory=list)


# --- engine, transactions, migrations -------------------------------------------------------------


class Store:
    """An engine bound to one database, migrated to head. Use `read()` / `write()` for transactions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.file: tuple[int, int] | None = None  # the SQLite file it opened (device, inode); open_store sets it

    def moved(self) -> bool:
        """Whether the SQLite file at the engine's path is no longer the one it opened (moved aside, as the
        advice for a damaged database says, or replaced by a restored backup): its pooled connections would
        go on writing into the moved file while every new process reads the path."""
        return self.file is not None and _file_identity(self.engine) != self.file

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """One transaction (a consistent snapshot on both databases) that changes nothing. SQLite's WAL gives a
        read transaction one snapshot from its first statement; PostgreSQL does so at REPEATABLE READ (its default,
        READ COMMITTED, lets each statement see what others committed meanwhile: an export would write rows its
        recorded revision does not count). A read-only transaction there never fails to serialize."""
        with _storage_errors(self.engine, reading=True), self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE), so writers
        queue on the busy timeout instead of failing when a read lock cannot be upgraded. On PostgreSQL an
        advisory lock held to the end of the transaction makes writers queue the same way: a writer's check
        ("is this content stored?") and its insert are then never interleaved with another's (two `examples
        seed` at once), and the same data gets the same ids on both databases."""
        with _storage_errors(self.engine), self.engine.connect() as conn:
            conn = conn.execution_options(luna_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    # As SQLite's busy timeout: a writer held up by another process (an import suspended with
                    # Ctrl-Z) gives up and says so, instead of waiting without end with a pooled connection.
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}"))
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_WRITE_LOCK})
                yield conn


def _holds(dialect: str, item_id: int) -> bool:
    """Whether `item_id` fits the id column of this database (see _PG_MAX_ID)."""
    return dialect != "postgresql" or item_id <= _PG_MAX_ID


def database_name(engine: Engine) -> str:
    """The SQLite file, or the server URL without its password: what a message names."""
    url = engine.url
    return url.database if url.get_backend_name() == "sqlite" and url.database else _hidden(url)


def storage_error(exc: sa.exc.DBAPIError, engine: Engine, *, reading: bool = False) -> StorageError:
    """One sentence for a database that is damaged, full, failing underneath a statement, or a server that
    does not answer; `reading`: in a transaction that changes nothing (a full disk stops that too)."""
    orig = getattr(exc, "orig", None)
    reason = " ".join(str(orig or exc).split()).rstrip(".")  # one line: libpq's messages span several
    # the server's own sentence, without libpq's excerpt of the query ("LINE 2: FROM examples … ^")
    said = getattr(getattr(orig, "diag", None), "message_primary", None) or reason
    where = database_name(engine)
    if ("unable to open" in reason or "too many open files" in reason.lower()) and files_exhausted():
        return out_of_files(where)  # a healthy database this process cannot open another file for
    if engine.dialect.name != "sqlite" and isinstance(exc, sa.exc.OperationalError):
        # libpq failing to connect has no SQLSTATE; a server refusing or ending the connection has class 08
        # (connection exception) or 57P (shutting down, starting up). Nothing is wrong with the data then.
        state = getattr(orig, "sqlstate", None)
        # The server answered, but has no connection left for us (53300, or libpq's words for it while
        # connecting, when it gives no SQLSTATE): busy, not unreachable.
        if state == "53300" or _NO_SLOT.search(reason):
            return StorageBusy(
                f"The database server {where} refuses more connections ({reason}), so nothing was changed; try again "
                "when fewer are open, or raise its connection limit."
            )
        if state is None and _LOGIN.search(reason):  # the server answered: it refused this login
            return StorageDenied(
                f"The database server {where} refused the login ({reason}), so nothing was changed; check the user "
                "and password in ASSISTANT_DB_URL."
            )
        if state is None and (missing := _NO_DATABASE.search(reason)):
            return StorageUnreachable(
                f"The database server {where} has no database {missing[1]!r} ({reason}), so nothing was changed; "
                f"create it (`createdb {missing[1]}`) or fix its name in ASSISTANT_DB_URL."
            )
        if state is None or state.startswith(("08", "57P")):
            return StorageUnreachable(
                f"Cannot connect to the database {where} ({reason}), so nothing was changed; check that its "
                "server runs and that ASSISTANT_DB_URL names it."
            )
    # SQLite's lock held past the busy timeout; PostgreSQL's lock_timeout (55P03, lock_not_available)
    if _BUSY.search(reason) if engine.dialect.name == "sqlite" else getattr(orig, "sqlstate", None) == "55P03":
        # Another connection held the lock past the busy timeout (a long import, a second server): the database
        # is healthy, and the advice for a damaged one (move it aside) would throw it away.
        return StorageBusy(
            f"The database {where} is held by another process ({reason}), so nothing was changed; try again "
            "when that process is done."
        )
    if engine.dialect.name == "sqlite" and "readonly database" in reason:
        # SQLite opened the file read-only: this user may not write it (a backup extracted as another user, one
        # `sudo lunatrain`). The data is healthy; the advice for a damaged database would throw it away.
        return StorageDenied(
            f"The database {where} cannot be written by this process ({reason}), so nothing was changed; give "
            "this user write access to it and its folder (`chown`/`chmod`), or point ASSISTANT_HOME at a copy."
        )
    if getattr(orig, "sqlstate", None) == "42P01" and _schema_missing(engine):  # emptied or re-created
        _schema_gone.add(id(engine))  # the next open_store sets it up again, as a new process would
        return StorageError(
            f"The database {where} has no lunatrain tables now (it was emptied or created again while this process "
            "ran), so nothing was changed; try again: the next request sets it up as a new, empty store."
        )
    if getattr(orig, "sqlstate", None) == "42501":  # insufficient_privilege: the server refuses this user
        user, role = _db_user(engine)
        # The GRANT for what was refused: CREATE on the schema (PostgreSQL 15 gives none on public) to set up
        # an empty database; the rows of tables another user made; else what lunatrain needs in general.
        schema = m[1] if (m := re.search(r"for schema (\S+)", reason)) else "public"
        grant = (
            f"`GRANT CREATE ON SCHEMA {schema} TO {role}`"
            if "for schema" in reason
            else f"`GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}` and "
            f"`GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}`"
            if "for table" in reason or "for sequence" in reason
            else "the privileges lunatrain needs (a database it owns has them all)"
        )
        return StorageDenied(
            f"The database user {user} lacks a permission in the database {where} (the server said: {said}), so "
            f"nothing was changed; grant it {grant}, or name another user in ASSISTANT_DB_URL."
        )
    if getattr(orig, "sqlstate", None) == "3F000":  # invalid_schema_name: no schema on the search path it may use
        user, role = _db_user(engine)
        return StorageDenied(
            f"The database user {user} may not use any schema on its search path in the database {where} (the "
            f"server said: {said}), so nothing was changed; grant it the schema (`GRANT USAGE, CREATE ON SCHEMA "
            f"public TO {role}`), or name another user in ASSISTANT_DB_URL."
        )
    # SQLite: "database or disk is full"; PostgreSQL: "could not extend file …: No space left on device" (53100);
    # SQLite reading a WAL database on a full disk: "disk I/O error" (its -shm file cannot grow)
    io_error = engine.dialect.name == "sqlite" and "disk i/o error" in reason.lower()
    if _FULL.search(reason) or getattr(orig, "sqlstate", None) == "53100" or (io_error and _disk_full(engine)):
        # a look at the data (status, a listing) never meant to change anything: say why it needs room at all
        why = (
            ": SQLite needs a little room beside the database even to read it (its -shm file)"
            if reading and engine.dialect.name == "sqlite"
            else ", so nothing was changed"
        )
        return DiskFull(
            f"The disk holding the database {where} is full ({reason}){why}; free some space (`lunatrain gc` "
            "removes what the retention policy allows) and try again."
        )
    if io_error:  # the disk or file system failed under it; the file itself may be whole
        return StorageError(
            f"The database {where} cannot be read or written ({reason}): the disk or file system under it failed, "
            "and the file may well be intact; check the disk (`dmesg`, free space) and try again, and restore a "
            "backup only if the error stays."
        )
    return StorageError(
        f"The database {where} cannot be used ({said}); restore it from a backup, or move it "
        "aside to start with an empty one."
    )


_FULL = re.compile(r"full|no space left", re.IGNORECASE)


def _disk_full(engine: Engine) -> bool:
    """Whether the file system of the SQLite file has (next to) no space left (fsio.nearly_full)."""
    return nearly_full(Path(engine.url.database or "."))


def _schema_missing(engine: Engine) -> bool:
    """Whether lunatrain's schema record is gone too (a database emptied or created again), not one table of
    it (damage, which setting it up again would not mend)."""
    try:
        return not sa.inspect(engine).has_table("alembic_version")
    except sa.exc.SQLAlchemyError:
        return False


# PostgreSQL's words for a server without a connection slot left (max_connections, a role's or database's limit).
_NO_SLOT = re.compile(r"too many (connections|clients)|remaining connection slots are reserved")
# libpq's words, while connecting (no SQLSTATE), for a server that answered but refused the login or lacks
# the database: "check that its server runs" would point the wrong way.
_LOGIN = re.compile(
    r'password authentication failed|no password supplied|authentication failed for user|role "[^"]*" does not exist'
)
_NO_DATABASE = re.compile(r'database "([^"]+)" does not exist')
# SQLite's words for a lock another connection held past the busy timeout (sqlite3.OperationalError).
_BUSY = re.compile(r"\bdatabase (table )?is locked\b")


@contextlib.contextmanager
def _storage_errors(engine: Engine, *, reading: bool = False) -> Iterator[None]:
    # A constraint violation is the caller's business (handled where it happens); anything else the
    # database driver raises means the storage under it failed.
    try:
        yield
    except sa.exc.IntegrityError:
        raise
    except (sa.exc.OperationalError, sa.exc.DatabaseError) as exc:
        raise storage_error(exc, engine, reading=reading) from exc
    except sa.exc.TimeoutError as exc:  # the pool's: every connection of this process stayed in use
        raise StorageBusy(
            f"The database {database_name(engine)} is busy: every connection of this process stayed in use for "
            f"{SQLITE_BUSY_TIMEOUT_S:g}s (writers waiting on another process), so nothing was changed; try again "
            "when that process is done."
        ) from exc


def _sqlite_file(url: str) -> str:
    """The file of a SQLite URL; an in-memory one is refused: each process (each pooled thread, even) would get
    an empty database of its own that ends with it (`examples add` would say "Added", the next command find
    nothing, and a read would show an empty store)."""
    parsed = sa.engine.make_url(url)
    db_path = parsed.database
    if not db_path or db_path == ":memory:" or parsed.query.get("mode") == "memory":
        raise UsageError(
            f"Invalid database URL {unquote(_hidden(url))!r}: an in-memory database keeps nothing between commands; give "
            "ASSISTANT_DB_URL a file path (sqlite:///PATH) or leave it unset."
        )
    return db_path


def _db_user(engine: Engine) -> tuple[str, str]:
    """The user a server connection logs in as (the URL's; else libpq's PGUSER, else the operating system
    user), and the same as a GRANT names it: quoted unless a plain lower-case identifier."""
    name = engine.url.username or os.environ.get("PGUSER") or getpass.getuser()
    role = name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'
    return name, role


def _sqlite_engine(url: str) -> Engine:
    db_path = _sqlite_file(url)
    plain = not sa.engine.make_url(url).query  # a plain file (not mode=ro, not a URI a user composed)
    read_only = plain and _only_readable(Path(db_path))
    if read_only:
        # A connection for each use, each opened as the file is then: one opened immutable while nobody had the
        # database open would never see (and could tear on) the changes of a writer that started later.
        engine = sa.create_engine(url, creator=lambda: _read_only_connection(Path(db_path)), poolclass=sa.pool.NullPool)
    else:
        check_sqlite_path(Path(db_path), "the database")  # before the file is made: SQLite would refuse it
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        if plain:
            create_plain(Path(db_path))
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's BEGIN below control transactions instead of pysqlite's implicit ones.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        if not read_only:  # a read-only file keeps its journal mode: changing it is a write
            sqlite_wal(cur)  # readers never block the writer (export vs. ingest)
            cur.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, much faster commits
        else:
            cur.execute("PRAGMA schema_version")  # a first read: SQLite makes its -wal/-shm files now, if it may
            writable_beside(Path(db_path))
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("luna_write") else "BEGIN")

    return engine


def _only_readable(path: Path) -> bool:
    """Whether the database file is there, readable, but this process may not write it or its folder (a
    read-only mount, a root shared with read access): it is opened read-only rather than not at all."""
    return (
        path.is_file()
        and os.access(path, os.R_OK)
        and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK))
    )


def _read_only_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(_read_only_uri(path), uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)


def _read_only_uri(path: Path) -> str:
    """The URI that opens `path` read-only. SQLite's WAL mode needs a `-shm` file beside the database even to
    read. On a read-only file system (a mounted backup) that nobody has open (no `-shm`), it is opened as
    immutable, which needs none; a writer that may start later through another mount (a `:ro` container
    volume) is why this is decided for each connection. Elsewhere another user may be writing it (a root shared with read access):
    immutable would read a file that changes under it, so only plain read-only is tried, which works while a
    writer keeps its `-shm` file there and otherwise says the folder cannot be written. A `-wal` file left
    with changes would go unread when immutable, so then plain read-only too."""
    from urllib.parse import quote

    shm, wal = Path(f"{path}-shm"), Path(f"{path}-wal")
    try:
        frozen = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        immutable = frozen and not shm.exists() and not (wal.exists() and wal.stat().st_size > 0)
    except OSError:  # gone meanwhile (moved aside): SQLite's own open says so, as a storage error
        immutable = False
    return f"file:{quote(str(path))}?mode=ro{'&immutable=1' if immutable else ''}"


def _refuse_at_in_credentials(url: str) -> None:
    """An '@' in the user name or password splits the URL there: the rest of the password became the host,
    and every message showed it. Said without the URL."""
    try:
        host = sa.engine.make_url(url).host or ""
    except (sa.exc.ArgumentError, ValueError, TypeError):
        return  # said as an invalid URL where the engine is made
    if "@" in host:
        raise UsageError(
            "Invalid database URL in ASSISTANT_DB_URL: its user name or password holds an '@', which ends them "
            "there; write it as %40 (postgresql+psycopg://user:pa%40ss@host/db)."
        )


# A server that accepts connections but never answers (a hung host, a network partition) held every command,
# request and job's last step for good: a connection gives up after PG_CONNECT_TIMEOUT_S, and TCP keepalives
# and an unacknowledged-data timeout find a server that went away under an open one. A URL's own win.
PG_CONNECT_TIMEOUT_S = 10
_PG_TCP = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
_PG_TCP_USER_TIMEOUT_MS = 30_000


def pg_connect_args(url: sa.engine.URL) -> dict[str, Any]:
    """The timeouts a PostgreSQL connection gets unless its URL sets them (nothing for other databases)."""
    if url.get_backend_name() != "postgresql":
        return {}
    wanted = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **_PG_TCP, "tcp_user_timeout": _PG_TCP_USER_TIMEOUT_MS}
    if "connect_timeout" in url.query:
        del wanted["connect_timeout"]
    if any(key in url.query for key in (*_PG_TCP, "tcp_user_timeout")):  # the user's TCP settings, whole
        wanted = {k: v for k, v in wanted.items() if k == "connect_timeout"}
    return wanted


def _server_engine(url: str) -> Engine:
    # SQLAlchemy's pool (5 kept, 10 more while busy): small enough for a server's connection limit with
    # several processes. Writers held up by another process give up after the busy timeout (write()), so
    # their connections come back; a request that finds none for that long is said busy (not a 500).
    engine = sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_timeout=SQLITE_BUSY_TIMEOUT_S,
        connect_args=pg_connect_args(sa.engine.make_url(url)),
    )
    if engine.dialect.name == "postgresql":
        _utf8_only(engine)
    return engine


def _utf8_only(engine: Engine) -> None:
    """Refuse a PostgreSQL database whose encoding is not UTF8, on the engine's first connection: LATIN1 cannot
    store "☕" (a UnicodeEncodeError mid-command), and SQL_ASCII hands the driver bytes where SQLAlchemy expects
    text (it fails before any query of ours). Runs before SQLAlchemy's own first queries on the connection."""
    checked = False

    @sa.event.listens_for(engine, "connect", insert=True)
    def _check(dbapi_conn: Any, _record: Any) -> None:
        nonlocal checked
        if checked:
            return
        cur = dbapi_conn.cursor()
        cur.execute("SHOW server_encoding")
        encoding = cur.fetchone()[0]
        cur.close()
        dbapi_conn.rollback()  # no transaction left open for the dialect's own setup
        if isinstance(encoding, bytes):  # SQL_ASCII: the driver returns bytes
            encoding = encoding.decode("ascii", "replace")
        if encoding.upper() != "UTF8":
            dbapi_conn.close()
            raise StorageIncompatible(
                f"The PostgreSQL database {database_name(engine)} uses encoding {encoding}; lunatrain needs UTF8: "
                "create it with ENCODING 'UTF8'."
            )
        checked = True


# The newest migration's revision (migrations/versions/): a database already there needs no alembic at all,
# which saves every process that opens it a few hundred milliseconds (test_store checks this is alembic's head).
SCHEMA_HEAD = "0002"


def _schema_revision(conn: Connection) -> str | None:
    """The migration the database is at; None for a database without lunatrain's schema."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def _at_head(store: Store) -> bool:
    with store.read() as conn:
        return _schema_revision(conn) == SCHEMA_HEAD


def _migrate(store: Store) -> None:
    if _at_head(store):
        return
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.write() as conn:
        # SQLite: BEGIN IMMEDIATE already holds the file's write lock. PostgreSQL: an advisory lock that
        # ends with the transaction. Either way a second process waits, then finds the schema at head.
        if store.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        found = _schema_revision(conn)
        known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
        if found is not None and found not in known:
            # A newer lunatrain's migration (or a damaged record of it): alembic would end in a traceback, and
            # this version cannot read a schema it does not know anyway.
            raise StorageIncompatible(
                f"The database {database_name(store.engine)} was made by a newer lunatrain (schema revision "
                f"{found!r}; this one knows up to {SCHEMA_HEAD!r}); use that version or a backup."
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


_stores: dict[tuple[int, str], Store] = {}  # the most recently used last
_stores_lock = threading.Lock()
# Databases kept open per process: a process that walks many data roots (a notebook, a script over backups)
# would otherwise hold three files of each open for good, deleted roots' too, until it ran out of files.
_MAX_STORES = 8
# Engines whose database lost lunatrain's tables under them (storage_error sees it; the lock may be held then).
_schema_gone: set[int] = set()


def open_store(settings: Settings) -> Store:
    """The store for `settings.database_url`, created and migrated to head on first use in this process."""
    url = settings.database_url
    key = (os.getpid(), url)  # engines must not cross a fork: the child opens its own
    with _stores_lock:
        store = _stores.get(key)
        if store is not None and (store.moved() or id(store.engine) in _schema_gone):
            _schema_gone.discard(id(store.engine))
            # Closed first, then the path is opened as any new process opens it (a fresh database, or the one put
            # in its place). SQLite writes no WAL into a file moved away: a -wal left at the path holds its last
            # changes, and opening stops there (_refuse_orphan_wal) instead of resetting it.
            store.engine.dispose()
            del _stores[key]
            store = None
        if store is None:
            if url.startswith("sqlite"):
                _refuse_missing_folder(settings, url)
                _refuse_orphan_wal(url)
            else:
                _refuse_at_in_credentials(url)
            try:
                engine = _sqlite_engine(url) if url.startswith("sqlite") else _server_engine(url)
            # ValueError/TypeError: a URL part the dialect converts (a port that is no number, `?timeout=abc`).
            except (sa.exc.ArgumentError, ImportError, ValueError, TypeError) as exc:
                # postgres://, as many hosts write it, names no SQLAlchemy dialect: name the one to use
                fix = "check ASSISTANT_DB_URL"
                if url.startswith("postgres://"):
                    fix = "use the scheme postgresql+psycopg:// instead of postgres://"
                elif isinstance(exc, ImportError) or not url.startswith(("postgresql+psycopg:", "sqlite")):
                    # another database, or another driver's (psycopg2, the default of postgresql://): no module
                    # of it is installed here, and its name alone does not say what works
                    fix = (
                        "lunatrain runs on SQLite (sqlite:///PATH) and on PostgreSQL through psycopg "
                        "(postgresql+psycopg://USER@HOST/DB)"
                    )
                raise UsageError(f"Invalid database URL {_hidden(url)!r}: {exc}; {fix}.") from None
            except OSError as exc:  # the SQLite file's folder cannot be created (a file in its way, no access)
                setting = "ASSISTANT_DB_URL" if settings.db_url else "ASSISTANT_HOME (the data root holds it)"
                raise UsageError(
                    f"Cannot create the folder of the database {_hidden(url)!r} ({exc.strerror or exc}); "
                    f"check {setting}."
                ) from None
            store = Store(engine)
            try:
                _migrate(store)
            except (ValueError, TypeError) as exc:  # some URL parts are only converted when connecting
                engine.dispose()
                raise UsageError(f"Invalid database URL {_hidden(url)!r}: {exc}; check ASSISTANT_DB_URL.") from None
            except StorageError as err:
                engine.dispose()
                if isinstance(err.__cause__, sa.exc.OperationalError) and "unable to open" in str(err.__cause__):
                    if files_exhausted():  # not the path: this process has no file left to open it with
                        raise out_of_files(database_name(engine)) from None
                    # not damage: a path or server that cannot be reached is a configuration mistake
                    raise UsageError(
                        f"Cannot open the database {_hidden(engine.url)!r}: {err.__cause__.orig}"
                        f"{_read_only_note(engine)}."
                    ) from None
                option = _BAD_URL_OPTION.search(str(getattr(err.__cause__, "orig", "")))
                if option:  # libpq refused an option of the URL before connecting: nothing is wrong with the data
                    raise UsageError(
                        f"Invalid database URL {_hidden(url)!r}: {' '.join(option.group(0).split()).rstrip('.')}; check ASSISTANT_DB_URL."
                    ) from None
                raise
            except OSError as exc:  # e.g. the data directory cannot be created
                engine.dispose()
                raise StorageError(
                    f"Cannot open the database {database_name(engine)}: {exc.strerror or exc}."
                ) from None
            store.file = _file_identity(engine)  # once migrated: the file created on first use included
        _stores.pop(key, None)
        _stores[key] = store
        while len(_stores) > _MAX_STORES:
            # The least recently used goes: a caller still holding it goes on (its engine reconnects), and
            # a connection it has checked out is closed when given back. One a parent process opened before a
            # fork is only let go of: closing its connections here could end the parent's SQLite locks.
            oldest = next(iter(_stores))
            _stores.pop(oldest).engine.dispose(close=oldest[0] == os.getpid())
    return store


def _orphan_wal(path: Path) -> Path | None:
    """The -wal file at a SQLite database's path whose database file is gone (moved aside without it): it holds
    changes of that database not yet in its file. Opening the path would create a fresh database there and
    reset that log, and the changes would be lost for good."""
    wal = path.with_name(path.name + "-wal")
    try:
        return wal if not path.exists() and wal.stat().st_size > 0 else None
    except OSError:
        return None


def _missing_folder(settings: Settings, url: str) -> Path | None:
    """The folder of the SQLite file ASSISTANT_DB_URL names, when it does not exist (see _refuse_missing_folder)."""
    if not settings.db_url:
        return None
    try:
        file = _sqlite_file(url)
    except (sa.exc.ArgumentError, ValueError, TypeError, UsageError):  # not a file URL: opening it says why
        return None
    if file.startswith("file:"):  # a SQLite URI (uri=true) a user composed: SQLite reads it, as it is
        return None
    folder = Path(file).parent
    return None if folder in (settings.home, settings.data_dir) or os.path.lexists(folder) else folder


def _refuse_missing_folder(settings: Settings, url: str) -> None:
    """A SQLite file ASSISTANT_DB_URL names in a folder that does not exist: a typo or a volume not mounted, not
    a wish for a fresh, empty store there (PostgreSQL refuses a database that does not exist the same way). The
    data root and its data/ folder are lunatrain's own: those are made on first use."""
    folder = _missing_folder(settings, url)
    if folder is None:
        return
    raise UsageError(
        f"The folder {folder} of the database in ASSISTANT_DB_URL does not exist; nothing was created: "
        f"create it (`mkdir -p {shlex.quote(str(folder))}`) or check ASSISTANT_DB_URL."
    )


def _refuse_orphan_wal(url: str) -> None:
    try:
        path = Path(_sqlite_file(url))
    except (sa.exc.ArgumentError, ValueError, TypeError):  # not a URL at all: opening it says so in one sentence
        return
    wal = _orphan_wal(path)
    if wal is not None:
        raise StorageError(
            f"The database {path} is gone but its write-ahead log {wal.name} is still there, holding changes not yet "
            f"in the database file; nothing was changed: put the database file back, or move {wal.name} (and "
            f"{path.name}-shm) beside the file where it went."
        )


def _file_identity(engine: Engine) -> tuple[int, int] | None:
    """(device, inode) of a SQLite engine's file; None for a server (or no file there)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    return identity(Path(path)) if path else None


def _read_only_note(engine: Engine) -> str:
    """Why SQLite cannot open a database file that is there: its folder cannot be written (a read-only mount,
    a backup restored without write permission); SQLite writes its journal beside the file, even to read."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or not Path(path).is_file():
        return ""
    folder = Path(path).parent
    if os.access(folder, os.W_OK) and os.access(path, os.W_OK):
        return ""
    return f" (its folder {folder} or the file cannot be written, and SQLite writes beside the database even to read)"


# libpq's words for a URL option it refuses while parsing the connection string, before any connection:
# an unknown name, or a value it cannot take (`connect_timeout=abc`, `sslmode=bogus`).
_BAD_URL_OPTION = re.compile(
    r"(invalid connection option|bad value for|invalid integer value|invalid \w+ value)\b.*", re.DOTALL
)


# Query parameters libpq takes a secret from (`?password=…` works as `user:password@` does).
_SECRET_QUERY = ("password", "sslpassword")


def database_shown(settings: Settings) -> str:
    """The database in effect as `status` names it: a SQLite file by its path (within the data root relative
    to it), any other by its URL without the password."""
    url = settings.database_url
    if url.startswith("sqlite"):
        with contextlib.suppress(sa.exc.ArgumentError, ValueError):  # a URL the store refuses: as written
            path = sa.engine.make_url(url).database
            if path and not path.startswith(":"):
                return f"sqlite {settings.shown(Path(path))}"
    return _hidden(url)


def _hidden(url: str | sa.URL) -> str:
    """The URL as a message may show it: without its password, wherever the URL holds it."""
    try:
        parsed = sa.engine.make_url(url)
        query = {k: ("***" if k.lower() in _SECRET_QUERY else v) for k, v in parsed.query.items()}
        return parsed.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    except (sa.exc.ArgumentError, ValueError, TypeError):
        text = str(url)
        return text.split("@")[-1] if "@" in text else text


def dispose_stores() -> None:
    """Close every engine this process opened (tests, and services on shutdown)."""
    with _stores_lock:
        for store in _stores.values():
            store.engine.dispose()
        _stores.clear()


def _bump(conn: Connection) -> None:
    # Each change draws a new id beside the counter: a database restored from a backup counts up from where the
    # backup was, and a counter alone would come back to the revision an export of the newer content recorded.
    values = {"counter": state_table.c.counter + 1, "instance": uuid.uuid4().hex}
    conn.execute(state_table.update().where(state_table.c.id == 1).values(**values))


def revision(settings: Settings) -> str:
    """Changes whenever examples or memory change, never to one it had (not even in a database restored from a
    backup); equal revisions mean equal store content."""
    with open_store(settings).read() as conn:
        return _revision_of(conn)


def _revision_of(conn: Connection) -> str:
    row = conn.execute(sa.select(state_table.c.instance, state_table.c.counter)).one()
    return f"{row.instance[:12]}-{row.counter}"


# --- examples -----------------------------------------------------------------------------------


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UsageError(f"Invalid {what} {value!r}: use one of {', '.join(choices)}.")
    return value


def _check_choices(source: str | None, status: str | None) -> None:
    """A source and a status given for every record are known ones (None: each record's own, or the default)."""
    if source is not None:
        _check_choice(source, SOURCES, "source")
    if status is not None:
        _check_choice(status, STATUSES, "status")


def _default_status(source: str, status: str | None) -> str:
    # Hand-written and imported data is curated by the person adding it; conversation logs need review.
    if status is None:
        return "pending" if source == "conversation" else "approved"
    return _check_choice(status, STATUSES, "status")


def _existing(
    conn: Connection, table: sa.Table, hashes: Sequence[str], *, approved_only: bool = False
) -> dict[str, int]:
    found: dict[str, int] = {}
    for i in range(0, len(hashes), _CHUNK):
        chunk = hashes[i : i + _CHUNK]
        query = sa.select(table.c.hash, table.c.id).where(table.c.hash.in_(chunk))
        if approved_only:
            query = query.where(table.c.status == "approved")
        for row in conn.execute(query):
            found[row.hash] = row.id
    return found


def _stored_earlier(conn: Connection, table: sa.Table, pairs: Iterable[tuple[str | None, str]]) -> dict[str, int]:
    """{hash: id} of the contents `table` holds under an earlier hash: `pairs` are (earlier hash, hash), the
    earlier one None where there is none (`ExampleDraft.earlier_hash`)."""
    earlier = {old: new for old, new in pairs if old}
    if not earlier:
        return {}
    return {earlier[h]: i for h, i in _existing(conn, table, list(earlier)).items()}


def _forget_tombstones(conn: Connection, hashes: Sequence[str]) -> int:
    """Content that is back in the data no longer makes adapters trained on it stale: its tombstones go.
    Back means approved (what an export holds), as `_delete` leaves a tombstone for content held only pending
    or rejected: callers pass the hashes stored or set approved. Returns how many went (then `_settle_stale`
    once the write is committed)."""
    lifted = 0
    for i in range(0, len(hashes), _CHUNK):
        lifted += conn.execute(deleted_table.delete().where(deleted_table.c.hash.in_(hashes[i : i + _CHUNK]))).rowcount
    return lifted


def _settle_stale(settings: Settings) -> None:
    """After content came back: the versions marked stale for it alone are whole again (`registry.mark_stale`)."""
    from . import registry

    try:
        registry.refresh_stale(settings)
    except LunaError as err:  # the add is committed; the next delete, run or `adapters repair` settles the marks
        log.warning("could not update the stale marks of the adapters: %s", err)


def _add_drafts(
    conn: Connection, drafts: Iterable[ExampleDraft], source: str | None, status: str | None
) -> tuple[int, int, int, list[int]]:
    """Insert the drafts whose content is new; returns (added, skipped, tombstones lifted, the ids of stored
    examples a skipped draft would have added approved). `source` None: each draft's own (a record that named
    one of ours; approved unless `status`), else curated; `status` None: each draft's own, else the source's
    default."""
    unique: dict[str, ExampleDraft] = {}
    earlier: set[str] = set()
    # Every earlier hash of the drafts kept under a hash: twins (a CRLF record and its LF one) are one example,
    # and the database may hold it under either's.
    earliers: dict[str, set[str]] = {}
    total = 0
    for draft in drafts:
        total += 1
        # A text and the same text with its first line indented are one example, the first one kept
        # (`ExampleDraft.earlier_hash`), in either order within one file.
        if draft.earlier_hash in unique or draft.hash in earlier:
            continue
        unique.setdefault(draft.hash, draft)
        if draft.earlier_hash:
            earlier.add(draft.earlier_hash)
            earliers.setdefault(draft.hash, set()).add(draft.earlier_hash)
    now = utc_now()
    added = lifted = 0
    meant_approved: list[int] = []  # stored already, as a draft meant to be approved: its status is kept
    hashes = list(unique)
    # In chunks of one transaction: the rows of a large file are never all built at once.
    for i in range(0, len(hashes), _CHUNK):
        chunk = hashes[i : i + _CHUNK]
        existing = _existing(conn, examples_table, chunk) | _stored_earlier(
            conn, examples_table, [(old, h) for h in chunk for old in earliers.get(h, ())]
        )
        rows = [_example_row(h, unique[h], source, status, now) for h in chunk if h not in existing]
        meant_approved += [
            existing[h] for h in chunk if h in existing and _wanted_status(unique[h], source, status) == "approved"
        ]
        # A chunk's drafts are done with once its rows exist: binding a text caches its UTF-8 bytes on the
        # string (CPython), so a large import's drafts would otherwise double in memory until the end.
        for h in chunk:
            del unique[h]
        if not rows:
            continue
        try:
            conn.execute(examples_table.insert(), rows)
        except sa.exc.IntegrityError:
            raise Conflict("Another process added the same examples at the same time; run the command again.") from None
        lifted += _forget_tombstones(conn, [r["hash"] for r in rows if r["status"] == "approved"])
        added += len(rows)
    if added:
        _bump(conn)
    return added, total - added, lifted, meant_approved


def _wanted_status(d: ExampleDraft, source: str | None, status: str | None) -> str:
    """The status a draft is added with (`_example_row`)."""
    # A record's own source comes from lunatrain's export, which holds approved examples only: it stays approved
    # (a conversation example would otherwise go back to review).
    own = status or d.status or ("approved" if source is None and d.source else None)
    return _default_status(source or d.source or "curated", own)


def _example_row(h: str, d: ExampleDraft, source: str | None, status: str | None, now: datetime) -> dict[str, Any]:
    src = source or d.source or "curated"
    return {
        "hash": h,
        "prompt": d.prompt,
        "response": d.response,
        "system": d.system,
        "turns": d.stored_turns(),
        "source": src,
        "status": _wanted_status(d, source, status),
        "rating": d.rating,
        "tags": list(d.tags) or None,
        "conversation_id": d.conversation_id,
        "created_at": now,
        "updated_at": now,
    }


def add_examples(
    settings: Settings,
    drafts: Iterable[ExampleDraft],
    *,
    source: Source | None = "curated",
    status: Status | None = None,
) -> AddResult:
    """Add validated drafts in one transaction; content already stored (or repeated) is skipped. `source`
    None: each draft's own (see _add_drafts)."""
    _check_choices(source, status)
    store = open_store(settings)
    edits: list[tuple[int, str, str]] = []  # (N, the hash ex-N was exported with, the edit's hash)

    def noting(items: Iterable[ExampleDraft]) -> Iterator[ExampleDraft]:
        for d in items:
            if d.edited_from is not None:
                edits.append((*d.edited_from, d.hash))
            yield d

    with store.write() as conn:
        added, skipped, lifted, meant_approved = _add_drafts(conn, noting(drafts), source, status)
        kept = _kept_beside(conn, edits)
        held = _not_approved(conn, examples_table, meant_approved)
        revision = _revision_of(conn)
    if lifted:
        _settle_stale(settings)
    return AddResult(added=added, skipped_duplicates=skipped, revision=revision, kept_beside=kept, not_approved=held)


def _not_approved(conn: Connection, table: sa.Table, ids: Sequence[int]) -> tuple[tuple[int, str], ...]:
    """(id, status) of each of `ids` stored with a status other than approved, by id."""
    found: list[tuple[int, str]] = []
    for i in range(0, len(ids), _CHUNK):
        query = sa.select(table.c.id, table.c.status).where(table.c.id.in_(ids[i : i + _CHUNK]))
        found += [(r.id, r.status) for r in conn.execute(query.where(table.c.status != "approved"))]
    return tuple(sorted(found))


def _kept_beside(conn: Connection, edits: list[tuple[int, str, str]]) -> tuple[tuple[int, int], ...]:
    """(N, M) for each edit of an exported ex-N stored as ex-M while ex-N still holds the content it was exported
    with, approved: it trains beside the edit (a record of another data root's export names an ex-N that is other
    content here, and a rejected or pending ex-N is exported by no tier: nothing to say)."""
    if not edits:
        return ()
    old = _existing(conn, examples_table, [h for _, h, _ in edits])
    new = _existing(conn, examples_table, [h for _, _, h in edits])
    pairs = [(n, new[h]) for n, was, h in edits if old.get(was) == n and new.get(h) is not None and new[h] != n]
    if not pairs:
        return ()
    held = {n for n, _ in _not_approved(conn, examples_table, [n for n, _ in pairs])}
    return tuple((n, m) for n, m in pairs if n not in held)


def _unused(conn: Connection, table: sa.Table, row_id: int, group: str) -> str:
    """What an add refused as a duplicate says of the stored one when it is not approved: the user meant to
    store it for training, and it stays out of every export until approved."""
    status = conn.execute(sa.select(table.c.status).where(table.c.id == row_id)).scalar()
    if status == "approved":
        return ""
    # read on the command line and in the API's 409 alike: both ways to approve it
    return (
        f", {status}: `lunatrain {group} approve {row_id}` (POST /assistant/training/{group}/{row_id}/approve) makes "
        "it trained"
    )


def add_example(
    settings: Settings,
    *,
    prompt: str,
    response: str,
    system: str | None = None,
    turns: Sequence[Mapping[str, Any]] | None = None,
    source: Source = "curated",
    status: Status | None = None,
    rating: int | None = None,
    tags: Sequence[str] = (),
    conversation_id: str | None = None,
) -> Example:
    """Add one example. Status defaults to approved (pending for source=conversation).
    Raises UsageError for invalid fields and Conflict when the same content already exists."""
    try:
        draft = formats.make_draft(
            prompt=prompt,
            response=response,
            system=system,
            turns=turns,
            tags=list(tags),
            conversation_id=conversation_id,
            rating=rating,
        )
    except RecordError as err:
        # An import file may spell it conversation_id; the command line and the API call it conversationId.
        if err.field == "conversation_id":
            err = RecordError("conversationId", err.message)
        raise UsageError(f"Invalid example: {err.describe()}.") from None
    _check_choice(source, SOURCES, "source")
    status_ = _default_status(source, status)
    with open_store(settings).write() as conn:
        dup = _existing(conn, examples_table, [draft.hash]) | _stored_earlier(
            conn, examples_table, [(draft.earlier_hash, draft.hash)]
        )
        if dup:
            said = _unused(conn, examples_table, dup[draft.hash], "examples")
            raise Conflict(f"An example with the same content already exists (id {dup[draft.hash]}){said}.")
        lifted = _add_drafts(conn, [draft], source, status_)[2]
        row = conn.execute(sa.select(examples_table).where(examples_table.c.hash == draft.hash)).mappings().one()
    if lifted:
        _settle_stale(settings)
    return Example.from_row(row)


def import_file(
    settings: Settings,
    path: Path | str,
    *,
    source: Source | None = None,
    status: Status | None = None,
    fmt: str = "auto",
    skip_bad: bool = False,
) -> ImportResult:
    """Import a JSONL/JSON/CSV file in one transaction: any bad record → UsageError, nothing imported; with
    `skip_bad` the good records are imported and the bad ones returned in `bad`. `source` None: a record's
    own when it names one of lunatrain's (its export writes it), else curated."""
    _check_choices(source, status)
    parsed = formats.read_file(Path(path), fmt, skip_bad=skip_bad, own_status=status is None)
    records = len(parsed.drafts)
    # Handed over, not kept: each chunk's drafts are freed once inserted (see _add_drafts).
    drafts, parsed.drafts = collections.deque(parsed.drafts), []
    result = add_examples(settings, _drain(drafts), source=source, status=status)
    return ImportResult(
        path=str(path),
        records=records,
        added=result.added,
        skipped_duplicates=result.skipped_duplicates,
        formats=parsed.formats,
        revision=result.revision,
        bad=tuple(parsed.bad),
        kept_beside=result.kept_beside,
        not_approved=result.not_approved,
    )


def _drain(items: collections.deque[T]) -> Iterator[T]:
    while items:
        yield items.popleft()


def get_example(settings: Settings, example_id: int) -> Example:
    return Example.from_row(_get_row(settings, examples_table, example_id, "example"))


def _get_row(settings: Settings, table: sa.Table, item_id: int, what: str) -> Any:
    store = open_store(settings)
    row = None
    if _holds(store.dialect, item_id):
        with store.read() as conn:
            row = conn.execute(sa.select(table).where(table.c.id == item_id)).mappings().first()
    if row is None:
        raise NotFound(f"No {what} with id {item_id}.")
    return row


def list_examples(
    settings: Settings,
    *,
    source: Source | None = None,
    status: Status | None = None,
    limit: int = 100,
    offset: int = 0,
    search: str | None = None,
) -> list[Example]:
    """Examples in insertion order (id), optionally filtered."""
    return list(iter_examples(settings, source=source, status=status, limit=limit, offset=offset, search=search))


def iter_examples(
    settings: Settings,
    *,
    source: Source | None = None,
    status: Status | None = None,
    limit: int = 100,
    offset: int = 0,
    search: str | None = None,
) -> Iterator[Example]:
    """`list_examples` one at a time, fetched in chunks from one snapshot: a listing of the whole store (the
    CLI takes any --limit) holds a chunk in memory, not every example. The arguments are checked at once.
    `search`: only examples with that text in their prompt, answer, system message, an earlier turn or a tag
    (`_searched`); limit and offset then page the matches."""
    check_page(limit, offset)
    needle = _search_needle(search)
    query = sa.select(examples_table).order_by(examples_table.c.id)
    if source is not None:
        query = query.where(examples_table.c.source == _check_choice(source, SOURCES, "source"))
    if status is not None:
        query = query.where(examples_table.c.status == _check_choice(status, STATUSES, "status"))
    if _none_yet(settings):
        return iter(())
    if needle is None:
        return _stream(settings, query.limit(limit).offset(offset), Example.from_row)

    def fields(e: Example) -> list[str]:
        return [e.prompt, e.response, e.system or "", *(t["content"] for t in e.turns), *e.tags]

    return _searched(_stream(settings, query, Example.from_row), needle, fields, limit, offset)


def _search_needle(search: str | None) -> str | None:
    """The text a search looks for, folded as `_folded` folds what it reads; UsageError for a blank one, which
    would list everything (a search field left empty asks for no search: say None)."""
    if search is None:
        return None
    needle = _folded(search)
    if not needle:
        raise UsageError(
            "The search text is blank: give the words to look for, or no search to list everything.",
            params={"search": search},
        )
    return needle


def _folded(text: str) -> str:
    """Text as a search compares it: case and Unicode compatibility forms folded (Straße finds STRASSE, a
    decomposed é the composed one), runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _searched(rows: Iterator[T], needle: str, fields: Callable[[T], list[str]], limit: int, offset: int) -> Iterator[T]:
    """The rows one of whose `fields` holds `needle`, page `offset`..`offset + limit` of them. Matched here, not
    in SQL: SQLite's LIKE folds ASCII case only, and neither database folds Unicode forms; a search reads the
    whole table once, in chunks."""
    matches = (row for row in rows if any(needle in _folded(text) for text in fields(row)))
    return itertools.islice(matches, offset, offset + limit)


def _none_yet(settings: Settings) -> bool:
    """Whether the data root's own database does not exist yet: a listing says "nothing" rather than create
    the store wherever it is run. A database URL set explicitly is opened, so that a mistyped one is said."""
    return not settings.db_url and not has_database(settings)


def _stream(settings: Settings, query: sa.Select, make: Callable[[Any], T]) -> Iterator[T]:
    with open_store(settings).read() as conn:
        for row in conn.execution_options(yield_per=_FETCH).execute(query).mappings():
            yield make(row)


def _check_ids(conn: Connection, table: sa.Table, ids: Sequence[int], what: str) -> list[int]:
    wanted = sorted(set(ids))
    if not wanted:
        raise UsageError(f"Name at least one {what} id.")
    found: set[int] = set()
    held = [i for i in wanted if _holds(conn.dialect.name, i)]
    for i in range(0, len(held), _CHUNK):
        found.update(conn.scalars(sa.select(table.c.id).where(table.c.id.in_(held[i : i + _CHUNK]))))
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFound(f"No {what} with id {some([str(i) for i in missing], ', ')}; nothing was changed.")
    return wanted


def _set_status(settings: Settings, table: sa.Table, ids: Sequence[int], status: str, what: str) -> int:
    _check_choice(status, STATUSES, "status")
    lifted = 0
    with open_store(settings).write() as conn:
        wanted = _check_ids(conn, table, ids, what)
        changed = 0
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            changed += conn.execute(
                table.update()
                .where(table.c.id.in_(chunk), table.c.status != status)
                .values(status=status, updated_at=utc_now())
            ).rowcount
            if status == "approved":  # approved again: content a delete of its twin had tombstoned is back
                lifted += _forget_tombstones(
                    conn, list(conn.scalars(sa.select(table.c.hash).where(table.c.id.in_(chunk))))
                )
        if changed:
            _bump(conn)
    if lifted:
        _settle_stale(settings)
    return changed


def set_status(settings: Settings, ids: Sequence[int], status: Status) -> int:
    """Set the curation status of examples; returns how many changed. Unknown ids → NotFound, no change."""
    return _set_status(settings, examples_table, ids, status, "example")


class Deletion(NamedTuple):
    count: int
    hashes: list[str]  # content hashes now gone from the store (tombstoned): what adapters were trained on
    # the other kind's ids (`mem-3`, `ex-12`) that hold deleted content approved: still exported and trained on
    still_held: list[str] = []


def _delete(settings: Settings, table: sa.Table, ids: Sequence[int], kind: str) -> Deletion:
    other, prefix = (memory_table, "mem-") if table is examples_table else (examples_table, "ex-")
    tombstoned: list[str] = []
    held: list[int] = []
    with open_store(settings).write() as conn:
        wanted = _check_ids(conn, table, ids, kind)
        now = utc_now()
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            hashes = list(conn.scalars(sa.select(table.c.hash).where(table.c.id.in_(chunk))))
            conn.execute(table.delete().where(table.c.id.in_(chunk)))
            # A hash the other kind still holds approved is still trained on: no tombstone for it. Held there
            # pending or rejected, it is in no export, so adapters trained on it are stale.
            still = _existing(conn, other, hashes, approved_only=True)
            held += still.values()
            gone = [h for h in hashes if h not in still]
            _forget_tombstones(conn, gone)
            if gone:
                conn.execute(deleted_table.insert(), [{"hash": h, "kind": kind, "deleted_at": now} for h in gone])
            tombstoned += gone
        _bump(conn)
    return Deletion(len(wanted), tombstoned, [f"{prefix}{i}" for i in sorted(held)])


def delete_examples(settings: Settings, ids: Sequence[int]) -> Deletion:
    """Delete examples (all or nothing) and remember their content hashes as deleted."""
    return _delete(settings, examples_table, ids, "example")


def has_database(settings: Settings) -> bool:
    """Whether the store exists: reads that can do without it (status, stale marks) must not create it."""
    url = settings.database_url
    if url.startswith("sqlite"):  # sqlite:///FILE, sqlite+pysqlite:///FILE; in memory: refused, as for a write
        try:
            path = Path(_sqlite_file(url))
        except (sa.exc.ArgumentError, ValueError):  # not a URL at all: the store's own sentence says so
            return True
        # a write-ahead log without its database: there is one, moved away (opening says so); so does a folder
        # ASSISTANT_DB_URL names that is not there (a typo, a volume not mounted): no store is no answer then
        return path.exists() or _orphan_wal(path) is not None or _missing_folder(settings, url) is not None
    return True  # a server database: the store opens (and migrates) it


def deleted_hashes(settings: Settings) -> dict[str, datetime]:
    """Content hashes deleted from the store (examples and memory) → when; for marking adapters stale."""
    with open_store(settings).read() as conn:
        return {r.hash: _aware(r.deleted_at) for r in conn.execute(sa.select(deleted_table))}


def rejected_since(settings: Settings, records: Iterable[dict[str, Any]]) -> set[str]:
    """The ids of an export's `records` (`ex-N`, `mem-N`, each with its content hash) whose example or memory
    item is here with that content and no longer approved: rejected since the export was written. Matched by
    id and hash, so an export of another database names nothing."""
    wanted: dict[str, str] = {str(r.get("id")): r.get("hash") for r in records}
    out: set[str] = set()
    with open_store(settings).read() as conn:
        for table, prefix in ((examples_table, "ex-"), (memory_table, "mem-")):
            query = sa.select(table.c.id, table.c.hash).where(table.c.status != "approved")
            for row in conn.execute(query):
                if wanted.get(f"{prefix}{row.id}") == row.hash:
                    out.add(f"{prefix}{row.id}")
    return out


# --- memory -------------------------------------------------------------------------------------


def add_memory(
    settings: Settings,
    *,
    question: str,
    answer: str,
    topic: str | None = None,
    status: Status = "approved",
    tags: Sequence[str] = (),
) -> MemoryItem:
    """Remember a fact as a question and its answer (exported as a user/assistant sample).
    Raises UsageError for invalid fields and Conflict when the same question/answer is stored."""
    values = _memory_values(question=question, answer=answer, topic=topic, status=status, tags=tags)
    with open_store(settings).write() as conn:
        dup = _existing(conn, memory_table, [values["hash"]]) | _stored_earlier(
            conn, memory_table, [(values["earlier"], values["hash"])]
        )
        if dup:
            said = _unused(conn, memory_table, dup[values["hash"]], "memory")
            raise Conflict(
                f"A memory item with the same question and answer already exists (id {dup[values['hash']]}){said}."
            )
        lifted = _insert_memory(conn, [values])
        row = conn.execute(sa.select(memory_table).where(memory_table.c.hash == values["hash"])).mappings().one()
    if lifted:
        _settle_stale(settings)
    return MemoryItem.from_row(row)


def _add_memory_items(settings: Settings, items: Sequence[dict[str, Any]]) -> int:
    """Store the memory items (validated first, all of them) whose question/answer is new, in one
    transaction; returns how many were added."""
    rows: dict[str, dict[str, Any]] = {}
    earlier: list[tuple[str | None, str]] = []  # every twin's earlier hash: the database may hold it under any
    for item in items:
        values = _memory_values(**item)
        rows.setdefault(values["hash"], values)  # the first of two equal items in one batch
        earlier.append((values["earlier"], values["hash"]))
    with open_store(settings).write() as conn:
        stored = _existing(conn, memory_table, list(rows)) | _stored_earlier(conn, memory_table, earlier)
        new = [v for h, v in rows.items() if h not in stored]
        lifted = _insert_memory(conn, new) if new else 0
    if lifted:
        _settle_stale(settings)
    return len(new)


def _insert_memory(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert the rows; returns the tombstones lifted (`_forget_tombstones`)."""
    now = utc_now()
    stored = [{k: v for k, v in r.items() if k != "earlier"} | {"created_at": now, "updated_at": now} for r in rows]
    conn.execute(memory_table.insert(), stored)
    lifted = _forget_tombstones(conn, [r["hash"] for r in rows if r["status"] == "approved"])
    _bump(conn)
    return lifted


# What `memory list --json` writes beside an item's content: read, not kept (the new database gives its own).
_MEMORY_FIELDS = {"question", "answer", "topic", "status", "tags"}
_MEMORY_LISTED = {"id", "hash", "createdAt", "updatedAt"}


def import_memory_file(settings: Settings, path: Path | str) -> ImportResult:
    """Import memory items from a file in one transaction (`memory list --json` writes an array of them; JSON
    Lines or CSV of {question, answer, topic?, status?, tags?}): any bad record → UsageError naming each by its
    place, nothing imported; items stored already are skipped. Moves them to another database."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for where, rec in formats.read_memory_file(path):
        try:
            if isinstance(rec, RecordError):
                raise UsageError(rec.describe())
            if not isinstance(rec, dict):
                raise UsageError(f"expected a JSON object, got {type(rec).__name__}")
            unknown = sorted(set(rec) - _MEMORY_FIELDS - _MEMORY_LISTED)
            if unknown:
                raise UsageError(
                    f"unknown field {unknown[0]!r} (a memory item has {', '.join(sorted(_MEMORY_FIELDS))})"
                )
            try:
                tags = formats.tags_of(rec.get("tags"))  # a list, or a CSV cell "a;b"
            except RecordError as err:
                raise UsageError(err.describe()) from None
            rows.append(
                _memory_values(
                    question=rec.get("question") if isinstance(rec.get("question"), str) else "",
                    answer=rec.get("answer") if isinstance(rec.get("answer"), str) else "",
                    topic=rec.get("topic"),
                    status=rec.get("status") or "approved",
                    tags=tags,
                )
            )
        except UsageError as err:
            problems.append(f"{path.name} {where}: {err.message.removeprefix('Invalid memory item: ').rstrip('.')}")
    if problems:
        raise UsageError(
            f"Cannot import {path.name}: {counted(len(problems), 'bad record')} — {some(problems)}. Nothing was "
            "imported.",
            details=problems,
        )
    # No records (`[]`, what `memory list --json` writes for a store without any): nothing to add, no mistake.
    with open_store(settings).write() as conn:
        known = _existing(conn, memory_table, [r["hash"] for r in rows]) | _stored_earlier(
            conn, memory_table, [(r["earlier"], r["hash"]) for r in rows]
        )
        new = list({r["hash"]: r for r in rows if r["hash"] not in known}.values())  # a file's twice: once
        lifted = _insert_memory(conn, new) if new else 0
        revision = _revision_of(conn)
    if lifted:
        _settle_stale(settings)
    return ImportResult(
        path=str(path),
        records=len(rows),
        added=len(new),
        skipped_duplicates=len(rows) - len(new),
        formats={"memory": len(rows)},
        revision=revision,
    )


def _memory_values(
    *, question: str, answer: str, topic: str | None, status: Status, tags: Sequence[str]
) -> dict[str, Any]:
    """A memory item's row (without timestamps); UsageError names the first invalid field."""
    try:
        draft = formats.make_draft(prompt=question, response=answer, tags=list(tags))
    except RecordError as err:
        # The draft calls them prompt/response; the caller knows them as question/answer.
        names = {"prompt": "question", "response": "answer"}
        raise UsageError(
            f"Invalid memory item: field '{names.get(err.field or '', err.field)}': {err.message}."
        ) from None
    if topic is not None and not isinstance(topic, str):
        raise UsageError("Invalid memory item: field 'topic': expected a string.")
    try:
        # A blank topic is no topic (null), as a blank system prompt is no system prompt, not "".
        topic_ = (formats.checked_text(topic, "topic") or None) if topic else None
    except RecordError as err:
        raise UsageError(f"Invalid memory item: {err.describe()}.") from None
    if topic_ is not None and len(topic_) > 200:
        raise UsageError("Invalid memory item: field 'topic': longer than 200 characters.")
    _check_choice(status, STATUSES, "status")
    return {
        "hash": draft.hash,
        "earlier": draft.earlier_hash,  # not stored: what an earlier release stored it under (`_stored_earlier`)
        "topic": topic_,
        "question": draft.prompt,
        "answer": draft.response,
        "status": status,
        "tags": list(draft.tags) or None,
    }


def list_memory(
    settings: Settings, *, status: Status | None = None, limit: int = 100, offset: int = 0, search: str | None = None
) -> list[MemoryItem]:
    return list(iter_memory(settings, status=status, limit=limit, offset=offset, search=search))


def iter_memory(
    settings: Settings, *, status: Status | None = None, limit: int = 100, offset: int = 0, search: str | None = None
) -> Iterator[MemoryItem]:
    """`list_memory` one at a time, fetched in chunks (see `iter_examples`); `search` looks in the question, the
    answer, the topic and the tags."""
    check_page(limit, offset)
    needle = _search_needle(search)
    query = sa.select(memory_table).order_by(memory_table.c.id)
    if status is not None:
        query = query.where(memory_table.c.status == _check_choice(status, STATUSES, "status"))
    if _none_yet(settings):
        return iter(())
    if needle is None:
        return _stream(settings, query.limit(limit).offset(offset), MemoryItem.from_row)

    def fields(m: MemoryItem) -> list[str]:
        return [m.question, m.answer, m.topic or "", *m.tags]

    return _searched(_stream(settings, query, MemoryItem.from_row), needle, fields, limit, offset)


def get_memory(settings: Settings, item_id: int) -> MemoryItem:
    return MemoryItem.from_row(_get_row(settings, memory_table, item_id, "memory item"))


def set_memory_status(settings: Settings, ids: Sequence[int], status: Status) -> int:
    """Set the curation status of memory items (only approved ones are exported); returns how many changed.
    Unknown ids → NotFound, no change."""
    return _set_status(settings, memory_table, ids, status, "memory item")


def delete_memory(settings: Settings, ids: Sequence[int]) -> Deletion:
    """Delete memory items (all or nothing) and remember their hashes as deleted."""
    return _delete(settings, memory_table, ids, "memory item")


# --- overview -----------------------------------------------------------------------------------


def counts(settings: Settings) -> dict[str, Any]:
    """{"examples": {source: {status: n}}, "memory": {status: n}, "approved_twice": {source: n}, "totals": {...}}
    with every key present; `approved_twice`: approved memory items whose content an approved example of that
    source has too."""
    result: dict[str, Any] = {
        "examples": {s: {st: 0 for st in STATUSES} for s in SOURCES},
        "memory": {st: 0 for st in STATUSES},
    }
    with open_store(settings).read() as conn:
        q = sa.select(examples_table.c.source, examples_table.c.status, sa.func.count()).group_by(
            examples_table.c.source, examples_table.c.status
        )
        for source, status, n in conn.execute(q):
            result["examples"][source][status] = n
        q = sa.select(memory_table.c.status, sa.func.count()).group_by(memory_table.c.status)
        for status, n in conn.execute(q):
            result["memory"][status] = n
        # Approved memory items with the content of an approved example, per the example's source: the
        # export writes such a pair once (both hashes are unique, so this is an index join).
        q = (
            sa.select(examples_table.c.source, sa.func.count())
            .join(memory_table, memory_table.c.hash == examples_table.c.hash)
            .where(examples_table.c.status == "approved", memory_table.c.status == "approved")
            .group_by(examples_table.c.source)
        )
        result["approved_twice"] = {s: 0 for s in SOURCES} | dict(conn.execute(q).tuples().all())
    result["totals"] = {
        "examples": sum(sum(v.values()) for v in result["examples"].values()),
        "memory": sum(result["memory"].values()),
        "curated_approved": result["examples"]["curated"]["approved"],
    }
    return result


# --- bundled dataset ----------------------------------------------------------------------------


def load_seed(settings: Settings) -> SeedResult:
    """Load the bundled Luna dataset (resources/seed/manifest.json); running it again adds nothing."""
    seed_dir = importlib.resources.files("lunatrain") / "resources" / "seed"
    manifest = json.loads((seed_dir / "manifest.json").read_text(encoding="utf-8"))
    ex_added = ex_skipped = mem_added = mem_skipped = 0
    files: list[str] = []
    for entry in manifest["files"]:
        with importlib.resources.as_file(seed_dir / entry["file"]) as path:
            files.append(entry["file"])
            if entry["kind"] == "memory":
                # One transaction for the file: a write per item (and its commit) would make seeding slow.
                lines = path.read_text(encoding="utf-8").splitlines()
                items = [
                    {
                        "question": item["question"],
                        "answer": item["answer"],
                        "topic": item.get("topic"),
                        "status": item.get("status", entry.get("status", "approved")),
                        "tags": item.get("tags", ()),
                    }
                    for item in (json.loads(line) for line in lines if line.strip())
                ]
                added = _add_memory_items(settings, items)
                mem_added += added
                mem_skipped += len(items) - added
            else:
                res = import_file(settings, path, source=entry["source"], status=entry["status"])
                ex_added += res.added
                ex_skipped += res.skipped_duplicates
    return SeedResult(ex_added, ex_skipped, mem_added, mem_skipped, files)
