"""Damaged or full storage ends in one sentence: API 503 (`storage_error` / `disk_full`), CLI exit 1; an
unusable data root stops `serve` with exit 2. Run: `pytest tests/test_storage_errors.py -q`."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import export, fsio, models, registry, store
from lunatrain.api.main import create_app
from lunatrain.cli import app
from lunatrain.errors import DiskFull, StorageError, UsageError
from lunatrain.fsio import atomic_write_text
from lunatrain.params import LoraParams
from lunatrain.service.jobs import JobStore, existing_store, jobs_db_path
from lunatrain.settings import Settings, check_data_root, load_settings
from lunatrain.status import training_status

from faults import as_user, read_only, read_only_view
from helpers import make_records, write_export

T = "/assistant/training"


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    store.dispose_stores()


def _db(settings: Settings) -> Path:
    return settings.data_dir / "assistant.db"


def _seeded(settings: Settings) -> Path:
    store.load_seed(settings)
    store.dispose_stores()  # closed: SQLite checkpoints the WAL into the main file
    return _db(settings)


DAMAGE = {
    "garbage": lambda data: os.urandom(4096),
    "cut short": lambda data: data[: len(data) // 3],
    "header only": lambda data: data[:100],
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_database_is_one_sentence_everywhere(settings: Settings, kind: str) -> None:
    path = _seeded(settings)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(DAMAGE[kind](path.read_bytes()))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for url in (f"{T}/examples", f"{T}/status"):
            res = client.get(url)
            assert res.status_code == 503, (url, res.text)
            err = res.json()["error"]
            assert err["code"] == "storage_error" and str(path) in err["message"], err
            assert "locked" not in err["message"]
    store.dispose_stores()
    runner = CliRunner()
    for args in (["status"], ["examples", "list"], ["export"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.count("\n") == 1 and str(path) in r.output and "Traceback" not in r.output, r.output


def test_a_database_emptied_while_serving(settings: Settings) -> None:
    path = _seeded(settings)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.get(f"{T}/examples").status_code == 200
        store.dispose_stores()
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{path}{suffix}")
            if p.exists():
                p.write_bytes(b"" if not suffix else b"\x00" * 64)
        res = client.get(f"{T}/examples")
        # an empty file is a new empty database (SQLite's rule); garbage beside it is a damaged one
        assert res.status_code in (200, 503), res.text
        if res.status_code == 503:
            assert res.json()["error"]["code"] == "storage_error" and "locked" not in res.text


def test_a_full_database_is_disk_full_and_changes_nothing(settings: Settings) -> None:
    """SQLite's own "database or disk is full" (max_page_count reached, as on a full disk)."""
    store.add_example(settings, prompt="erste", response="Antwort")
    engine = store.open_store(settings).engine
    pages = sqlite3.connect(_db(settings)).execute("PRAGMA page_count").fetchone()[0]

    @sa.event.listens_for(engine, "connect")
    def _cap(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()
    before = store.counts(settings)
    big = "x" * 90_000  # below the API field limit, far above one free page
    with pytest.raises(DiskFull, match="is full") as err:
        store.add_example(settings, prompt="zweite", response=big)
    assert err.value.code == "disk_full" and str(_db(settings)) in err.value.message
    assert store.counts(settings) == before
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.post(f"{T}/examples", json={"prompt": "dritte", "response": big})
        assert res.status_code == 503 and res.json()["error"]["code"] == "disk_full", res.text


def test_a_look_at_the_data_on_a_full_disk_says_why_it_needs_room(settings: Settings, monkeypatch) -> None:
    """Disk-full repro: `status`, `examples list` and `memory list` on a full disk said "…is full (disk I/O error),
    so nothing was changed": the user asked to change nothing. SQLite cannot grow the -shm file a read of a WAL
    database needs; a read says that, a write says what it says."""
    store.add_example(settings, prompt="erste", response="Antwort")
    engine = store.open_store(settings).engine

    def full(*_args, **_kwargs):
        raise sa.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(engine, "connect", full)
    monkeypatch.setattr(store, "_disk_full", lambda _engine: True)
    with pytest.raises(DiskFull) as looked:
        store.list_examples(settings)
    assert looked.value.message == (
        f"The disk holding the database {_db(settings)} is full (disk I/O error): SQLite needs a little room beside "
        "the database even to read it (its -shm file); free some space (`lunatrain gc` removes what the retention "
        "policy allows) and try again."
    ), looked.value.message
    with pytest.raises(DiskFull, match=r"is full \(disk I/O error\), so nothing was changed; free some space"):
        store.add_example(settings, prompt="zweite", response="Antwort")


def test_data_root_that_is_not_usable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "data").write_text("a file where the data directory belongs")
    with pytest.raises(UsageError, match="not usable") as err:
        check_data_root(load_settings())
    assert str(home) in err.value.message
    r = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "ASSISTANT_HOME" in r.output, r.output
    r = CliRunner().invoke(app, ["trainer", "--port", "1"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "ASSISTANT_HOME" in r.output, r.output


def test_read_only_data_root(home: Path) -> None:
    with read_only(home):
        r = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert r.exit_code == 2 and "not usable" in r.output, r.output


def test_storage_errors_are_503_and_one_sentence() -> None:
    assert StorageError("x").http_status == 503 and StorageError("x").exit_code == 1
    assert DiskFull("x").code == "disk_full"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_and_folders_written_by_rename_get_the_modes_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """A temp name (mkstemp 0600, mkdtemp 0700) renamed into place kept its private mode: an export, a report
    or a merged model was unreadable to anyone else whatever the umask said."""
    old = os.umask(umask)
    try:
        assert fsio.current_umask() == umask
        atomic_write_text(tmp_path / "report.json", "{}\n")
        folder = fsio.staging_dir(tmp_path, "merged-v1")
        os.umask(0o002)  # read when used, not once per process
        atomic_write_text(tmp_path / "later.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert folder.parent == tmp_path and folder.name.startswith(".merged-v1.") and not list(folder.iterdir())
    assert stat.S_IMODE((tmp_path / "later.json").stat().st_mode) == 0o664


def test_a_root_a_group_shares_stays_the_groups(tmp_path: Path) -> None:
    """Repro (a data root two users share through a setgid folder, umask 002): SQLite created the databases
    0644 whatever the umask, and their -wal/-shm files take that mode, so a second member's first read left
    files that locked the owner out of writing; and the chmod of a staging folder cleared its setgid bit, so
    reports in a version folder belonged to the writer's own group, unreadable to the other member. The
    databases get 0666 less the umask, and folders keep setgid."""
    from lunatrain.service.jobs import JobStore, jobs_db_path

    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o2775)
    old = os.umask(0o002)
    try:
        settings = load_settings(home=root, db_url=None)
        store.add_example(settings, prompt="Wer?", response="Luna.")
        export.export(settings)  # its files were opened 0644 whatever the umask
        JobStore(jobs_db_path(settings.data_dir)).close()
        folder = fsio.staging_dir(settings.adapters_dir, "v1")
        (folder / "inner").mkdir()
        fsio.give_umask_modes(folder)
        # README repro: luna-tiny, copied from the machine's cache of builds (`ensure_tiny` of another root made
        # it), took the cache's folder mode and lost the setgid bit every other folder of the root had
        models.ensure_tiny(load_settings(home=tmp_path / "other", db_url=None))
        tiny = models.ensure_tiny(settings)
    finally:
        os.umask(old)
        store.dispose_stores()
    exported = (settings.training_dir / export.CURATED_FILE).resolve()
    for db in (settings.data_dir / "assistant.db", jobs_db_path(settings.data_dir), exported):
        assert stat.S_IMODE(db.stat().st_mode) == 0o664, db
    for made in (folder, folder / "inner", tiny):
        assert made.stat().st_mode & stat.S_ISGID and stat.S_IMODE(made.stat().st_mode) & 0o777 == 0o775, made


def test_weights_written_by_libraries_get_the_modes_the_umask_gives(trained_root: Path) -> None:
    """safetensors creates its files 0600 whatever the umask: a trained adapter's and luna-tiny's weights were
    unreadable to a server running as another user, while the JSON files beside them were readable."""
    umask = fsio.current_umask()
    settings = load_settings(home=trained_root, db_url=None)
    folders = [settings.adapters_dir / "luna-adapter" / "v1", settings.models_dir / "luna-tiny"]
    for folder in folders:
        assert (folder / "config.json").exists() or (folder / "adapter_config.json").exists(), folder
        for path in folder.rglob("*"):
            want = 0o777 & ~umask if path.is_dir() else 0o666 & ~umask
            assert stat.S_IMODE(path.stat().st_mode) == want, path


ADAPTER_COMMANDS = [
    ["adapters", "activate", "luna-adapter@v1"],
    ["adapters", "deactivate", "luna-adapter"],
    ["adapters", "rollback", "luna-adapter"],
    ["adapters", "repair"],
]


@pytest.mark.parametrize("lock", ["there", "never made"])
def test_adapter_commands_on_a_read_only_registry(trained_home: Path, settings: Settings, lock: str) -> None:
    """Repro: with reports/training read-only, `adapters activate|deactivate|rollback|repair` (and the API's
    activate) ended in an OSError traceback (a 500) from opening the registry lock for writing. Now one
    sentence naming the lock file, exit 1 (503), and the registry as it was."""
    folder = settings.reports_training_dir
    lock_file = folder / ".lora-adapters.lock"
    if lock == "never made":
        lock_file.unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client, read_only(folder):
        for args in ADAPTER_COMMANDS:
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 1 and r.output.count("\n") == 1, (args, r.output)
            assert r.output.startswith(f"error: Writing the lock file {lock_file} failed"), (args, r.output)
        res = client.post(f"{T}/adapters/luna-adapter/activate", json={"version": "v1"})
        assert res.status_code == 503 and res.json()["error"]["code"] == "storage_error", res.text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


FAST = ["--epochs", "1", "--maxSteps", "2", "--batchSize", "8", "--rank", "4", "--maxSeqLength", "128"]


@pytest.mark.parametrize("folder", ["reports/training", "data/adapters", "."])
def test_lora_refuses_before_training_where_it_could_not_publish(settings: Settings, tiny: Path, folder: str) -> None:
    """Repro: `lora --local` with the registry (reports/training) or the adapter folder read-only trained a
    whole epoch, then failed at publish (a traceback from the registry lock, or "training failed: OSError").
    Now it refuses in one sentence before it trains, and changes nothing."""
    write_export(settings, make_records(40))
    (settings.home / folder).mkdir(parents=True, exist_ok=True)
    before = sorted(settings.home.rglob("*"))
    with read_only(settings.home / folder):
        r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--minCurated", "0", "--no-gate"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: Cannot train luna-adapter: nothing can be written in "), r.output
    assert "ASSISTANT_HOME" in r.output
    assert sorted(settings.home.rglob("*")) == before  # not even a work dir or a latest report


def test_eval_gate_refuses_before_evaluating_where_it_could_not_write_its_report(settings: Settings, tiny: Path):
    """Odd-paths repro: `eval-gate` (and POST /eval-gate) with reports/eval read-only loaded the models, asked
    every golden case, computed the losses, and only then failed to write its report: the decision was lost
    (`--json` printed nothing), minutes of GPU on a real model. Now one sentence before, as the flows say it."""
    from lunatrain import evalgate

    settings.reports_eval_dir.mkdir(parents=True, exist_ok=True)
    before = sorted(settings.home.rglob("*"))
    asked: list[object] = []
    with read_only(settings.reports_eval_dir), pytest.MonkeyPatch.context() as mp:
        mp.setattr(evalgate, "_run", lambda *a, **k: asked.append(a))  # evaluating would be too late
        r = CliRunner().invoke(app, ["eval-gate", "--json"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: Cannot run the eval gate: nothing can be written in "), r.output
    assert asked == [] and sorted(settings.home.rglob("*")) == before


@pytest.mark.parametrize("folder", ["data/models/merged", "data/models", "reports/training"])
def test_merge_refuses_where_it_could_not_write(trained_home: Path, settings: Settings, folder: str) -> None:
    """Repro: `merge` with data/models/merged read-only ended in an OSError traceback; with the registry
    read-only it wrote the merged model, then failed to record it. Now one sentence before the merge, exit 1,
    and nothing written."""
    (settings.home / folder).mkdir(parents=True, exist_ok=True)
    before = sorted(settings.home.rglob("*"))
    with read_only(settings.home / folder):
        r = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: Cannot merge luna-adapter@v1: nothing can be written in "), r.output
    assert sorted(settings.home.rglob("*")) == before


def test_an_os_error_a_rust_writer_names_in_its_message_is_a_storage_error() -> None:
    """safetensors (SafetensorError) and tokenizers (Exception) report a failed write only in their message,
    "… No space left on device (os error 28)": storage_guard makes it the same sentence as an OSError, and
    lets every other exception through unchanged."""
    from safetensors import SafetensorError

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert fsio.os_error_of(full).errno == 28
    assert fsio.os_error_of(Exception("I/O error: Input/output error (os error 5)")).errno == 5
    assert fsio.os_error_of(ValueError("tensor is not contiguous")) is None
    with (
        pytest.raises(DiskFull, match="The disk is full: writing the weights failed"),
        fsio.storage_guard("the weights"),
    ):
        raise full
    with pytest.raises(StorageError, match="Writing the weights failed: Input/output error"):
        with fsio.storage_guard("the weights"):
            raise Exception("I/O error: Input/output error (os error 5)")
    with pytest.raises(ValueError, match="contiguous"), fsio.storage_guard("the weights"):
        raise ValueError("tensor is not contiguous")


def test_storage_messages_are_one_sentence() -> None:
    """Repro: `lunatrain status` with ASSISTANT_DB_URL naming a server that is not running printed "error: Cannot
    connect to the database … names it. Nothing was changed." (two sentences), as did the disk-full and failed
    write messages ("… the previous data is intact. Free some space …")."""
    import errno
    import re

    pg = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/x")  # never connects
    refused = sa.exc.OperationalError("SELECT 1", {}, Exception("connection failed: Connection refused"))
    full = sa.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))
    messages = [
        store.storage_error(refused, pg).message,
        store.storage_error(full, sa.create_engine("sqlite://")).message,
        fsio.storage_error(OSError(errno.ENOSPC, "No space left on device"), "the registry").message,
        fsio.storage_error(OSError(errno.EIO, "Input/output error"), "the registry").message,
    ]
    for message in messages:
        assert message.endswith(".") and not re.search(r"\.\s", message), message
    # each kind has a code of its own, so the dashboard does not call an unreachable server "storage failed"
    assert store.storage_error(refused, pg).code == "storage_unreachable"
    assert store.storage_error(full, sa.create_engine("sqlite://")).code == "disk_full"
    assert "nothing was changed" in messages[0] and "ASSISTANT_DB_URL" in messages[0]
    assert "nothing was changed" in messages[1] and "lunatrain gc" in messages[1]
    assert "previous data is intact" in messages[2] and "lunatrain gc" in messages[2]
    assert "previous data is intact" in messages[3] and "check the disk" in messages[3]


@pytest.mark.parametrize("revision", ["0099", "zzz"])
def test_a_database_of_a_newer_lunatrain_is_one_sentence_everywhere(settings: Settings, revision: str) -> None:
    """Repro: a database whose alembic_version names a revision this lunatrain does not know (made by a newer
    one, or garbage) ended `examples list`, `status` and `export` in a 107-line alembic traceback ("Can't locate
    revision identified by '0002'"), and `serve` died at startup. Now one sentence, exit 1 (API 503), and the
    database as it was."""
    store.add_example(settings, prompt="erste", response="Antwort")
    store.dispose_stores()
    path = _db(settings)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    said = f"schema revision {revision!r}; this one knows up to {store.SCHEMA_HEAD!r}"
    runner = CliRunner()
    for args in (["status"], ["examples", "list"], ["export"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.count("\n") == 1 and said in r.output and "newer lunatrain" in r.output, (args, r.output)
        assert str(path) in r.output and "Traceback" not in r.output, r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.get(f"{T}/examples")
        assert res.status_code == 503 and res.json()["error"]["code"] == "storage_incompatible", res.text
        assert said in res.json()["error"]["message"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(revision,)]


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://"])
def test_an_in_memory_database_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Repro: with ASSISTANT_DB_URL=sqlite:/// `examples add` said "Added example 1" and the next command listed
    nothing: the example went to an in-memory database that ended with the process."""
    monkeypatch.setenv("ASSISTANT_DB_URL", url)
    with pytest.raises(UsageError, match="ASSISTANT_DB_URL"):
        store.open_store(load_settings())
    # the reads too (repro: `status` and `examples list` showed an empty store, exit 0)
    for args in (["examples", "add", "--prompt", "Hallo", "--response", "Hi"], ["status"], ["examples", "list"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and r.output.count("\n") == 1, (args, r.output)
        assert "in-memory database keeps nothing" in r.output and "ASSISTANT_DB_URL" in r.output, r.output
        assert "%3A" not in r.output, r.output  # CLI repro: `sqlite:///:memory:` was quoted as sqlite:///%3Amemory%3A
    # `serve` too refuses it before it serves (it stopped with uvicorn's "Application startup failed")
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: Invalid database URL"), r.output
    assert not (load_settings().home / "data" / "api" / "api.url").exists()


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_database_url_in_a_folder_that_does_not_exist_is_refused(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Repro: ASSISTANT_DB_URL=sqlite:////srv/lunna/assistant.db (a typo of /srv/luna, or a volume that was not
    mounted) created /srv/lunna and a fresh, empty database there: `status` showed no examples and the next
    `examples add` went into a store nobody meant. A PostgreSQL database that does not exist is refused; so is a
    SQLite file whose folder does not exist. The data root's own folders are still made on first use."""
    folder = tmp_path / "lunna" if where == "absolute" else home / "dta"
    url = f"sqlite:///{folder / 'assistant.db'}" if where == "absolute" else "sqlite:///dta/assistant.db"
    monkeypatch.setenv("ASSISTANT_DB_URL", url)
    for args in (["status"], ["examples", "add", "--prompt", "Hallo", "--response", "Hi"], ["examples", "list"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and r.output.count("\n") == 1, (args, r.output)
        assert str(folder) in r.output and "does not exist" in r.output and "ASSISTANT_DB_URL" in r.output, r.output
        assert not folder.exists(), args
    # `serve` refuses it before it serves, as it refuses a database it cannot open
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2 and "does not exist" in r.output.strip().splitlines()[-1], r.output
    assert not folder.exists()
    folder.mkdir()  # made by hand: the database is created in it
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "Hallo", "--response", "Hi"])
    assert r.exit_code == 0 and (folder / "assistant.db").is_file(), r.output
    # a data root that is not there yet still gets its data/ folder and database (the default URL)
    monkeypatch.delenv("ASSISTANT_DB_URL")
    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path / "fresh" / "root"))
    assert CliRunner().invoke(app, ["examples", "add", "--prompt", "Hallo", "--response", "Hi"]).exit_code == 0
    assert (tmp_path / "fresh" / "root" / "data" / "assistant.db").is_file()


def test_a_busy_database_is_busy_not_damaged(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repro: a database another process holds past the busy timeout (a long import) was reported as damaged,
    "restore it from a backup, or move it aside": advice that throws away a healthy database. Now it says
    another process holds it; exit 1, API 503."""
    store.add_example(settings, prompt="erste", response="Antwort")
    store.dispose_stores()
    monkeypatch.setattr(store, "SQLITE_BUSY_TIMEOUT_S", 0.2)  # not the 30 s a real writer waits
    holder = sqlite3.connect(_db(settings), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError, match="another process") as err:
            store.add_example(settings, prompt="zweite", response="Antwort")
        assert "backup" not in err.value.message and "aside" not in err.value.message, err.value.message
        r = CliRunner().invoke(app, ["examples", "add", "--prompt", "dritte", "--response", "Antwort"])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "another process" in r.output, r.output
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            res = client.post(f"{T}/examples", json={"prompt": "vierte", "response": "Antwort"})
            assert res.status_code == 503 and "another process" in res.json()["error"]["message"], res.text
            assert res.json()["error"]["code"] == "storage_busy", res.text  # not "storage failed" on the page
    finally:
        holder.close()
    store.add_example(settings, prompt="fünfte", response="Antwort")  # free again: nothing was wrong with it
    assert store.counts(settings)["totals"]["examples"] == 2


def test_a_database_moved_aside_while_a_server_runs_is_replaced_by_a_fresh_one(settings: Settings) -> None:
    """Explore repro: with `lunatrain serve` running, the database moved aside (as the advice for a damaged one
    says): POST /examples answered 201 with an id, but the row went into the moved file through the server's
    open connection, while GET /examples and the command line showed an empty store. The server now opens the
    database found at its path (a fresh one), and what it stored before stays in the moved file."""
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.post(f"{T}/examples", json={"prompt": "vorher", "response": "Antwort"}).status_code == 201
        db = Path(_db(settings))
        aside = db.with_name(db.name + ".aside")
        for suffix in ("", "-wal", "-shm"):  # as the README says: with the files that hold its latest changes
            if db.with_name(db.name + suffix).exists():
                db.with_name(db.name + suffix).rename(aside.with_name(aside.name + suffix))
        r = client.post(f"{T}/examples", json={"prompt": "nachher", "response": "Antwort"})
        assert r.status_code == 201, r.text
        listed = client.get(f"{T}/examples").json()
        assert [e["prompt"] for e in listed["examples"]] == ["nachher"], listed
    r = CliRunner().invoke(app, ["examples", "list"])
    assert "nachher" in r.output and "vorher" not in r.output, r.output
    with sqlite3.connect(aside) as moved:
        assert [p for (p,) in moved.execute("SELECT prompt FROM examples")] == ["vorher"]


@pytest.mark.parametrize("url", ["sqlite", "sqlite:", "nonsense"])
def test_a_database_url_that_is_no_url_is_one_sentence(home: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Review repro: with ASSISTANT_DB_URL=sqlite the command line printed an ArgumentError traceback (exit 1)
    and `serve` crashed at start: the check for a log left without its database read the URL first."""
    monkeypatch.setenv("ASSISTANT_DB_URL", url)
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "Hallo", "--response", "Hi"])
    assert r.exit_code == 2 and r.output.startswith("error: Invalid database URL"), r.output
    assert r.output.count("\n") == 1, r.output


def test_a_database_moved_aside_without_its_wal_is_refused_and_its_changes_kept(settings: Settings) -> None:
    """Review repro: with the server running, the database file moved aside without its -wal file (which holds
    its latest changes): the next request opened a fresh database at the path, which reset the -wal left there,
    and every change not yet in the main file was gone for good. Nothing opens the path then; it says what to
    do, and with the file back every change is there."""
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for i in range(3):
            assert client.post(f"{T}/examples", json={"prompt": f"p{i}", "response": "r"}).status_code == 201
        db = Path(_db(settings))
        wal = db.with_name(db.name + "-wal")
        assert wal.stat().st_size > 0  # the changes not yet in the main file
        aside = db.with_name(db.name + ".aside")
        db.rename(aside)
        for _ in range(2):
            r = client.post(f"{T}/examples", json={"prompt": "nachher", "response": "r"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_error", r.text
            assert (
                "-wal" in r.json()["error"]["message"] and "put the database file back" in r.json()["error"]["message"]
            )
        assert not db.exists() and wal.stat().st_size > 0
        r = CliRunner().invoke(app, ["examples", "list"])
        assert r.exit_code == 1 and "-wal" in r.output, r.output
        aside.rename(db)
        listed = client.get(f"{T}/examples").json()
        assert sorted(e["prompt"] for e in listed["examples"]) == ["p0", "p1", "p2"], listed


def test_a_read_only_data_root_is_read_and_says_why_it_cannot_be_changed(settings: Settings) -> None:
    """Repro: on a read-only data root (a mounted backup) `examples list` said only "unable to open database
    file", though the file is there and readable: SQLite writes its journal beside it, even to read. Then it
    said why; now the database opens read-only, so the listing works and a change says why it cannot."""
    store.add_example(settings, prompt="erste", response="Antwort")
    store.dispose_stores()
    with read_only(settings.home):
        listed = CliRunner().invoke(app, ["examples", "list"])
        added = CliRunner().invoke(app, ["examples", "add", "--prompt", "zweite", "--response", "Antwort"])
    store.dispose_stores()
    assert listed.exit_code == 0 and "erste" in listed.output, listed.output
    assert added.exit_code == 1 and added.output.count("\n") == 1, added.output
    assert "cannot be written by this process" in added.output, added.output


OWNER = (1001, 1002, 0o022)  # a user with umask 022, the shared group its primary one


@pytest.fixture
def shared_home(tmp_path: Path) -> Iterator[Path]:
    """A data root a group shares: owned by OWNER, setgid and group-writable, as an admin sets one up."""
    # The other users cannot read this interpreter's files: what the children need is imported here first.
    warm = Settings(home=tmp_path / "warm")
    store.add_example(warm, prompt="erste", response="Antwort")
    store.list_examples(warm)
    JobStore(jobs_db_path(warm.data_dir), read_only=False).create(LoraParams())
    with existing_store(warm.data_dir) as jobs:
        assert jobs is not None and len(jobs.list()) == 1
    training_status(warm)
    store.dispose_stores()
    shared = Path(tempfile.mkdtemp(dir="/tmp", prefix="lunatrain-shared-"))  # pytest's own tmp is root's only
    try:
        shared.chmod(0o755)
        home = shared / "home"
        home.mkdir()
        os.chown(home, OWNER[0], OWNER[1])
        home.chmod(0o2775)
        yield home
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _command(action: Callable[[], object]) -> Callable[[], object]:
    """`action` as a command runs it: its connections close as it ends."""

    def run() -> object:
        try:
            return action()
        finally:
            store.dispose_stores()

    return run


# A group member with umask 002: the shared group its primary one, or (as Debian and Ubuntu make users, each with
# a group of its own) a supplementary one, where a folder without the setgid bit gives new files the member's own.
MEMBERS = {"setgid": (1003, 1002, 0o002, ()), "no-setgid": (1003, 1004, 0o002, (1002,))}


def member(kind: str, action: Callable[[], object]) -> str:
    uid, gid, umask, groups = MEMBERS[kind]
    return as_user(uid, gid, umask, action, groups)


def _shared(folder: Path, kind: str = "setgid") -> None:
    """`folder` shared with the group, as the group's admin does it after the owner's first command."""
    folder.chmod(0o2775 if kind == "setgid" else 0o775)


@pytest.mark.parametrize("kind", MEMBERS)
def test_a_reader_of_a_group_shared_root_leaves_the_owner_able_to_write(shared_home: Path, kind: str) -> None:
    """Repro: in a group-shared data root (folder group-writable, the database 0644 as its owner's umask made
    it), a group member's `examples list` opened the file read-only, and SQLite made its `-shm` and `-wal` files
    beside it owned by the reader and as the database's mode, 0644 (and in the member's own group, where the
    folder has no setgid bit). They stayed after the reader closed, and from then on the owner's every change
    failed: "attempt to write a readonly database"."""
    shared_home.chmod(0o2775 if kind == "setgid" else 0o775)
    settings = Settings(home=shared_home)

    def add(prompt: str) -> Callable[[], object]:
        return _command(lambda: store.add_example(settings, prompt=prompt, response="Antwort").id > 0)

    assert as_user(*OWNER, add("erste")) == "True"
    _shared(settings.data_dir, kind)
    listed = member(kind, _command(lambda: [e.prompt for e in store.list_examples(settings)]))
    assert listed == repr(["erste"])
    assert as_user(*OWNER, add("zweite")) == "True"
    assert member(kind, _command(lambda: len(store.list_examples(settings)))) == "2"
    assert as_user(*OWNER, add("dritte")) == "True"


def test_a_reader_of_a_group_shared_trainer_database_leaves_the_trainer_able_to_write(shared_home: Path) -> None:
    """The same for the trainer's jobs database: a member's `status` read it and left the trainer unable to
    queue a job."""
    path = jobs_db_path(shared_home / "data")

    def queue() -> object:
        jobs = JobStore(path)
        try:
            return jobs.create(LoraParams())[1]
        finally:
            jobs.close()

    def count() -> object:
        with existing_store(path.parent.parent) as jobs:
            return len(jobs.list()) if jobs else None

    assert as_user(*OWNER, queue) == "True"
    _shared(path.parent)
    assert member("setgid", count) == "1"
    assert as_user(*OWNER, queue) == "True"
    assert member("setgid", count) == "2"


def test_a_read_only_view_of_a_root_someone_writes_shows_the_writes(settings: Settings, tmp_path: Path) -> None:
    """Repro: a data root mounted read-only (a `:ro` container volume for the dashboard) while its owner writes
    it through another mount: the reader opened it immutable while nobody had it open, and a long-lived reader
    (the API) then never saw a later change, and could read a page torn by a write."""
    store.add_example(settings, prompt="erste", response="Antwort")
    store.dispose_stores()
    view = tmp_path / "view"
    with read_only_view(settings.home, view):
        reader = Settings(home=view)
        assert [e.prompt for e in store.list_examples(reader)] == ["erste"]
        store.add_example(settings, prompt="zweite", response="Antwort")
        assert [e.prompt for e in store.list_examples(reader)] == ["erste", "zweite"]  # the owner still writing
        store.open_store(settings).engine.dispose()  # the owner's command ends; the reader's process stays
        store.add_example(settings, prompt="dritte", response="Antwort")
        store.open_store(settings).engine.dispose()
        assert [e.prompt for e in store.list_examples(reader)] == ["erste", "zweite", "dritte"]
        store.dispose_stores()


def test_a_database_moved_aside_under_a_read_only_view_is_said_not_a_500(settings: Settings, tmp_path: Path) -> None:
    """Review repro: a long-lived reader of a read-only view decides for each connection how to open the
    database; once its owner had moved the file aside (the advice for a damaged one), that decision raised a
    bare FileNotFoundError, and the API answered 500 where it said before what was wrong."""
    store.add_example(settings, prompt="erste", response="Antwort")
    store.dispose_stores()
    view = tmp_path / "view"
    with read_only_view(settings.home, view):
        # named, as ASSISTANT_DB_URL names it: a listing of a root without a database shows it empty instead
        reader = Settings(home=view, db_url=f"sqlite:///{view / 'data' / 'assistant.db'}")
        with TestClient(create_app(reader), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
            assert client.get("/assistant/training/examples").status_code == 200
            db = settings.data_dir / "assistant.db"
            db.rename(db.with_name("assistant.db.aside"))
            answer = client.get("/assistant/training/examples")
        store.dispose_stores()
    assert 400 <= answer.status_code < 500 or answer.status_code == 503, answer.text
    assert "assistant.db" in answer.json()["error"]["message"], answer.text


def test_a_trainer_database_the_reader_may_not_open_is_not_called_damaged(shared_home: Path) -> None:
    """Review repro: `status` run by a user who may not read data/trainer/jobs.db (the trainer ran with umask
    077) said it "cannot be read ... move it aside (the trainer starts an empty one) or restore a backup":
    advice that throws the trainer's history away for a permission."""
    settings = Settings(home=shared_home)

    def queue() -> object:
        store.add_example(settings, prompt="erste", response="Antwort")
        store.dispose_stores()
        os.umask(0o077)  # the trainer's
        jobs = JobStore(jobs_db_path(settings.data_dir))
        jobs.close()
        jobs_db_path(settings.data_dir).parent.chmod(0o755)
        return True

    assert as_user(*OWNER, queue) == "True"
    _shared(settings.data_dir)
    problems = member("setgid", _command(lambda: training_status(settings)["problems"]))
    assert "cannot be read by this process" in problems and "move it aside" not in problems, problems


def test_a_registry_the_reader_may_not_open_is_a_problem_status_names(shared_home: Path) -> None:
    """Review repro: a registry this user may not read left `activeAdaptersKnown` false, "active adapter:
    unknown", and no problem saying why."""
    settings = Settings(home=shared_home)

    def registry_of_owner() -> object:
        store.add_example(settings, prompt="erste", response="Antwort")
        store.dispose_stores()
        os.umask(0o077)
        path = registry.registry_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"adapters": {}}))
        return True

    assert as_user(*OWNER, registry_of_owner) == "True"
    _shared(settings.data_dir)
    said = member(
        "setgid", _command(lambda: (lambda s: (s["activeAdaptersKnown"], s["problems"]))(training_status(settings)))
    )
    assert said.startswith("(False, [") and "lora-adapters.json" in said, said


def test_a_trainer_database_whose_log_the_reader_may_not_open_is_not_called_damaged(shared_home: Path) -> None:
    """Review repro: jobs.db made readable as the permission sentence advises, while the trainer (umask 077)
    holds it open with its -wal/-shm 0600: `status` by another user failed to open it and was again told to
    move the database aside, the running trainer's."""
    settings = Settings(home=shared_home)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trainer: OWNER, umask 077, keeps jobs.db open in WAL mode until the reader is done
        try:
            os.setgroups([])
            os.setgid(OWNER[1])
            os.setuid(OWNER[0])
            store.add_example(settings, prompt="erste", response="Antwort")
            store.dispose_stores()
            os.umask(0o077)
            jobs = JobStore(jobs_db_path(settings.data_dir))
            jobs.create(LoraParams())
            jobs_db_path(settings.data_dir).parent.chmod(0o755)
            jobs_db_path(settings.data_dir).chmod(0o644)
            os.write(ready_w, b"ready")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 5) == b"ready"
        _shared(settings.data_dir)
        problems = member("setgid", _command(lambda: training_status(settings)["problems"]))
        assert "cannot be read by this process" in problems and "move it aside" not in problems, problems
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)


@pytest.mark.parametrize("free", [0, 512 * 1024, 10 * 2**30])
def test_a_disk_io_error_is_a_full_disk_when_the_disk_is_full_and_never_damage(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, free: int
) -> None:
    """Explore repro: with the disk full, even `status` and `examples list` said "cannot be used (disk I/O
    error); restore it from a backup, or move it aside": SQLite cannot grow the -shm file a WAL database is
    read through, and says "disk I/O error", not "full". Advice that throws a healthy database away. A full
    disk is said as one (disk_full); another I/O error says the file may be intact and what to check."""
    store.add_example(settings, prompt="erste", response="Antwort")
    engine = store.open_store(settings).engine
    usage = shutil.disk_usage(_db(settings).parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage._replace(free=free))
    failed = sa.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O error"))
    said = store.storage_error(failed, engine)
    assert "aside" not in said.message and str(_db(settings)) in said.message, said.message
    if free < 2**20:
        assert isinstance(said, DiskFull) and said.code == "disk_full", said
        assert said.message.startswith(f"The disk holding the database {_db(settings)} is full (disk I/O error)")
    else:
        assert not isinstance(said, DiskFull) and said.code == "storage_error", said
        assert said.message == (
            f"The database {_db(settings)} cannot be read or written (disk I/O error): the disk or file system "
            "under it failed, and the file may well be intact; check the disk (`dmesg`, free space) and try again, "
            "and restore a backup only if the error stays."
        )


def test_postgresqls_no_space_left_is_a_full_disk(settings: Settings) -> None:
    """PostgreSQL says a full disk as "could not extend file …: No space left on device" (53100), without the
    word "full" the check looked for."""
    engine = store.open_store(settings).engine

    class NoSpace(Exception):
        sqlstate = "53100"

    failed = sa.exc.OperationalError(
        "INSERT", {}, NoSpace('could not extend file "base/16384/16402": No space left on device')
    )
    assert isinstance(store.storage_error(failed, engine), DiskFull)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://luna@127.0.0.1:1/luna?password=hunter2",
        "postgresql+psycopg://luna@127.0.0.1:1/luna?sslmode=disable&PASSWORD=hunter2",
        "postgresql+psycopg://luna:hunter2@127.0.0.1:1/luna",
    ],
)
def test_a_database_password_is_never_shown_in_any_form(home: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Explore repro: a password given in the URL's query (`?password=…`, which libpq takes as well) was printed
    in full by every CLI error, every API 503 and the server's log; only `user:password@` was hidden."""
    monkeypatch.setenv("ASSISTANT_DB_URL", url)
    result = CliRunner().invoke(app, ["examples", "list"])
    # libpq refuses "PASSWORD" as an option (exit 2); the others cannot connect (exit 1): hidden either way
    assert result.exit_code in (1, 2) and "127.0.0.1:1/luna" in result.output, result.output
    assert "hunter2" not in result.output and "***" in result.output, result.output


def test_an_at_sign_in_the_password_is_said_not_shown(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explore repro: `luna:pa@ss@host` split at the first `@`: the host became "ss@host", and every message
    showed "ss@127.0.0.1", the password's tail."""
    monkeypatch.setenv("ASSISTANT_DB_URL", "postgresql+psycopg://luna:pa@ss@127.0.0.1:1/luna")
    result = CliRunner().invoke(app, ["examples", "list"])
    assert result.exit_code == 2, result.output
    assert "ss@127" not in result.output and "%40" in result.output, result.output


def _main(*argv: str) -> Callable[[], object]:
    """`lunatrain ARGV` as the console script runs it (its own error handling included): 'EXIT|stderr'."""

    def run() -> object:
        import io
        import sys

        from lunatrain.cli import main

        err, sys.argv = io.StringIO(), ["lunatrain", *argv]
        code: object = 0
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                main()
        except SystemExit as stop:
            code = stop.code
        return f"{code}|{err.getvalue()}"

    return run


OTHER = (1003, 1004, 0o022)  # a user in none of OWNER's groups


def test_a_data_root_this_user_cannot_enter_is_said_in_one_sentence(
    shared_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repro: another user's root made under umask 077 ended `status`, `examples list` and `adapters
    list` in a PermissionError traceback, and a root inside a folder this user cannot search (another user's
    0700 home) ended every command that way, in the settings' own check. One sentence now, exit 1, naming
    what cannot be read; the API answers 503 with its code."""
    home = shared_home / "private" / "root"
    monkeypatch.setenv("ASSISTANT_HOME", str(home))
    settings = Settings(home=home)

    def make() -> object:
        (shared_home / "private").mkdir(mode=0o700)
        store.add_example(settings, prompt="erste", response="Antwort")
        settings.adapters_dir.mkdir(parents=True)
        return True

    assert as_user(*OWNER[:2], 0o077, _command(make)) == "True"
    for argv in (["status"], ["examples", "list"], ["adapters", "list"]):  # imported here, as this user
        assert _main(*argv)().startswith("0|"), argv
    for folder in (shared_home / "private", home):  # the folder above the root, then the root's own files
        for argv in (["status"], ["examples", "list"], ["adapters", "list"], ["export"]):
            out = as_user(*OTHER, _main(*argv))
            assert "|" in out, (argv, out)  # else it raised
            code, said = ast.literal_eval(out).split("|", 1)
            said = said.strip()
            assert code in ("1", "2") and said.count("\n") == 0 and "Traceback" not in said, (argv, said)
            assert said.startswith("error: ") and "Permission denied" in said, said
            if argv != ["export"]:  # which says the database's folder cannot be made
                assert said.startswith("error: Permission denied: ") and "cannot use this data root" in said, said
        if folder == shared_home / "private":
            folder.chmod(0o711)  # searchable now: the root's own files (0700 folders, a 0600 database) are not

    # A server that started (its database readable) and then meets a file it may not read: 503, said as such.
    def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(settings.adapters_dir))

    monkeypatch.setattr("lunatrain.status.training_status", denied)
    reader = Settings(home=shared_home / "reader")
    with TestClient(create_app(reader), base_url="http://127.0.0.1") as client:
        r = client.get("/assistant/training/status")
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_no_access", r.text
    assert r.json()["error"]["params"] == {"path": str(settings.adapters_dir)}


def test_a_folder_where_a_file_belongs_is_said_so(settings: Settings, tiny: Path) -> None:
    """Explore repro: a token cache, trainer.url or api.url replaced by a folder got "… failed: Is a directory, and
    the previous data is intact; check the disk and try again": the disk is fine, and trying again never helps.
    The sentence names the folder and says to remove or rename it."""
    import errno

    from lunatrain.params import parse_params
    from lunatrain.prepare import prepare

    write_export(settings, make_records(30))
    params = parse_params({"maxSeqLength": 128})
    prepare(settings, params)
    caches = list((settings.cache_dir / "tokens").glob("*.safetensors"))
    assert len(caches) == 1
    cache = caches[0]
    cache.unlink()
    cache.mkdir()
    with pytest.raises(StorageError) as refused:
        prepare(settings, params)
    assert refused.value.message == (
        f"Writing {cache} failed: {cache} is a folder where a file belongs, and the previous data is intact; "
        "remove or rename that folder and try again."
    ), refused.value.message
    # coded, with the folder, so that the dashboard says it in its language
    assert (refused.value.code, refused.value.params) == ("storage_folder_in_place", {"path": str(cache)})
    said = fsio.storage_error(OSError(errno.EISDIR, "Is a directory"), "the registry").message
    assert said == (
        "Writing the registry failed: a folder stands where a file belongs, and the previous data is intact; "
        "remove or rename that folder and try again."
    ), said


def test_a_coded_storage_failure_keeps_its_values_in_a_runs_and_a_jobs_error(tmp_path: Path) -> None:
    """Review repro: a run whose save met a folder where a file belongs, and a job that failed on the job store,
    kept only the error's code and sentence: the dashboard filled the code's text without its values and showed a
    literal "{path}". The values go with the code."""
    import errno

    from lunatrain.service.runner import storage_error as job_storage_error
    from lunatrain.train import failure

    folder = tmp_path / "adapter_model.safetensors"
    folder.mkdir()
    exc = IsADirectoryError(errno.EISDIR, "Is a directory", str(folder))
    said = failure(exc, "training_error", writing="the adapter")
    assert said["code"] == "storage_folder_in_place" and said["params"] == {"path": str(folder)}, said
    coded = fsio.storage_error(exc, "the adapter")
    assert job_storage_error(coded)["params"] == {"path": str(folder)}


def test_luna_tiny_copied_onto_a_full_disk_is_said_in_one_sentence(settings: Settings, tiny_dir: Path) -> None:
    """Limits repro: with too little room left to copy the machine's cached luna-tiny into the data root,
    `prepare`, `eval-gate` and `lora --local` ended in a `shutil.Error` traceback, and POST /prepare in a 500:
    copytree gathers each file's OSError into one error without an errno. It is the disk-full sentence now."""
    from lunatrain import models

    from faults import small_disk

    assert models._tiny_cache() is not None and tiny_dir.is_dir()  # the session's build is in the cache
    write_export(settings, make_records(8, val_every=4))
    with small_disk(settings.models_dir, "256k"):  # luna-tiny is about 1.4 MB
        with pytest.raises(DiskFull, match="The disk is full: writing .*luna-tiny failed"):
            models.ensure_tiny(settings)
        r = CliRunner().invoke(app, ["prepare"])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert r.output.startswith("error: The disk is full"), r.output
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            answer = client.post("/assistant/training/prepare", json={})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "disk_full", answer.text
        left = sorted(p.name for p in settings.models_dir.iterdir())
        assert left == [".luna-tiny.lock"], left  # no half-copied model, no staging folder
    assert fsio.os_error_of(shutil.Error([("a", "b", "[Errno 28] No space left on device: 'b'")])).errno == 28


def test_a_process_out_of_open_files_is_told_to_try_again_not_to_restore_its_database(settings: Settings) -> None:
    """Limits repro: `serve` under `ulimit -n 64` with 100 requests at once answered 500s (a profile file or a
    lazy import failing with EMFILE) and 503s saying the healthy database "cannot be used (unable to open
    database file); restore it from a backup, or move it aside", advice that throws the examples away. Out of
    open files is said as what it is: try again, or raise the limit."""
    import subprocess
    import sys

    store.add_example(settings, prompt="Wie heißt du?", response="Luna.")
    store.dispose_stores()
    script = (
        "import os, resource\n"
        "from lunatrain import store\n"
        "from lunatrain.errors import LunaError\n"
        "from lunatrain.settings import load_settings\n"
        "settings = load_settings()\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "held = []\n"
        "try:\n"
        "    while True: held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError: pass\n"
        "try:\n"
        "    store.counts(settings)\n"
        "except LunaError as err:\n"
        "    print(err.code, err.http_status, err.message)\n"
    )
    env = dict(os.environ, ASSISTANT_HOME=str(settings.home))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    said = done.stdout.strip()
    assert said.startswith("storage_out_of_files 503 "), (said, done.stderr[-2000:])
    assert "too many files open" in said and "ulimit -n" in said and "backup" not in said, said
    assert fsio.storage_error(OSError(24, "Too many open files"), "the registry").code == "storage_out_of_files"


def test_the_api_says_out_of_open_files_as_a_503(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits repro: an EMFILE where a route reads a file (a profile, a bundled resource) was a 500."""
    from lunatrain import profiles

    def no_files(*args, **kwargs):
        raise OSError(24, "Too many open files", "resources/profiles/luna.toml")

    monkeypatch.setattr(profiles, "load_profile", no_files)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        answer = client.get("/assistant/training/lora/defaults")
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "storage_out_of_files" and "ulimit -n" in error["message"], error


def test_a_trainer_request_this_process_has_no_file_for_is_not_an_unreachable_trainer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limits repro: under a low `ulimit -n`, GET /lora/jobs answered "the trainer … is not reachable (nothing
    accepts connections there); start it", while the trainer ran: this process could not open a socket."""
    import httpx

    from lunatrain.service import client

    def no_socket(*args, **kwargs):
        try:
            raise OSError(24, "Too many open files")
        except OSError as exc:
            raise httpx.ConnectError("[Errno 24] Too many open files") from exc

    monkeypatch.setattr(client._client(), "request", no_socket)
    with pytest.raises(StorageError) as err:
        client.list_jobs(settings)
    assert err.value.code == "storage_out_of_files" and "connection to the trainer" in err.value.message, err.value
    assert "not reachable" not in err.value.message


@pytest.mark.slow
def test_a_server_out_of_file_descriptors_logs_its_failed_accepts_once_without_a_traceback(tmp_path: Path) -> None:
    """Limits repro: `serve` under `ulimit -n 64` with many connections at once logged asyncio's "socket.accept()
    out of system resource" a dozen times a second, each with its traceback: 50-100 MB of log in 5 s, a full
    disk next. It is said once per 10 s, without the traceback, with how many were left out."""
    import socket
    import subprocess
    import sys

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    listener.close()
    script = f"""
import asyncio, logging, os, resource, sys
from lunatrain.cli.serve import log_handler
from lunatrain.settings import load_settings
logging.basicConfig(level=logging.WARNING, handlers=[log_handler(load_settings(home={str(tmp_path)!r}))], force=True)

async def main():
    held = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", {port}, backlog=64)
    print("listening", flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    await asyncio.sleep(3.5)

asyncio.run(main())
"""
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening", server.stderr
        clients = []
        for _ in range(150):  # far more than the 64 descriptors the server may hold
            with contextlib.suppress(OSError):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
        for client in locals().get("clients", []):
            client.close()
    said = [line for line in err.splitlines() if "out of system resource" in line]
    assert len(said) == 1 and "Too many open files" in said[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_dashboard_file_this_process_cannot_open_is_a_503_not_a_200_without_a_body(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dashboard repro: `serve` near its open-file limit answered the page's scripts with 200 and then failed to
    open them ("Caught handled exception, but response already started"): the page hung on "Prüfe …" without a
    word. The file is opened before the status line goes out: a 503 storage_out_of_files."""
    import anyio

    real = anyio.open_file

    async def no_files(path, *args, **kwargs):
        if str(path).endswith("app.js"):
            raise OSError(24, "Too many open files", str(path))
        return await real(path, *args, **kwargs)

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.get("/static/app.js").status_code == 200
        monkeypatch.setattr(anyio, "open_file", no_files)
        answer = client.get("/static/app.js")
    assert answer.status_code == 503, (answer.status_code, answer.text[:200])
    assert answer.json()["error"]["code"] == "storage_out_of_files", answer.text
