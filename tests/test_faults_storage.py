"""Fault injection on the storage half: kill -9 of a real `lunatrain export` at every rename point, ENOSPC
and EIO on write and fsync of the export and the registry, a damaged database and registry. After each
fault the invariants are checked, and the counts go into bench/results/faults.md.

Run: `pytest -m slow tests/test_faults_storage.py -q -s` (about ten CPU-seconds: the `lunatrain` commands are
forked from one process that imported the CLI once, `faults.ForkedCli`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunatrain import export as ex
from lunatrain import prepare, registry, store
from lunatrain.formats import make_draft
from lunatrain.settings import Settings, load_settings

from faults import KILLED, ForkedCli, Row, fault_env, record

pytestmark = pytest.mark.slow
ROWS: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    if ROWS:
        record(
            "Storage: export, registry, database",
            ROWS,
            "Each fault in a real child process (`python -m lunatrain …`, forked from one that imported the "
            "CLI once); the hook is a test-only sitecustomize.py (tests/faults.py).",
        )


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedCli]:
    """`faults.run_cli` for this module's tests: each command a real process, forked from one that imported
    the CLI once (about 60 commands here; start-up was most of their CPU)."""
    run = ForkedCli(tmp_path_factory.mktemp("cli"))
    yield run
    run.close()


def _whole(settings: Settings, *, first: bool = False) -> str:
    """The invariant readers rely on: the current export is complete and verifies, through the one pointer
    and through the guide's names alike; prepare's export_summary check passes. Returns its fingerprint."""
    directory = ex.export_dir(settings)
    summary = ex.read_summary(settings, directory)
    assert summary is not None
    _, mismatched = prepare._verify_files(directory, summary)
    assert mismatched == [], mismatched
    for tier in ex.TIERS:
        ex.read_tier(settings, tier)  # type: ignore[arg-type]
    # what a user reading the guide's names sees is one export too (each name a link or an adopted file)
    # (the very first export creates the names one by one after the switch: a name may not exist yet)
    names = settings.training_dir
    if not (first and not (names / ex.SUMMARY_FILE).exists()):
        by_name = json.loads((names / ex.SUMMARY_FILE).read_text())
        assert by_name["fingerprint"] == summary["fingerprint"]
        for name in ex.DATA_FILES:
            if first and not (names / name).exists():
                continue
            data = (names / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == by_name["files"][name]["sha256"], name
    return summary["fingerprint"]


def _add(settings: Settings, tag: str, n: int = 20) -> None:
    store.add_examples(settings, [make_draft(prompt=f"{tag} Frage {i}", response=f"Antwort {i}") for i in range(n)])
    store.dispose_stores()


def _flatten(settings: Settings) -> None:
    """The layout of an export made before .exports/ existed: plain files, no current link."""
    out = settings.training_dir
    files = {name: (out / name).read_bytes() for name in (*ex.DATA_FILES, ex.SUMMARY_FILE)}
    for name, data in files.items():
        (out / name).unlink()
        (out / name).write_bytes(data)
    (out / ex.CURRENT_LINK).unlink()
    shutil.rmtree(out / ex.EXPORTS_DIR)


@pytest.mark.parametrize("layout", ["fresh", "second", "flat"])
def test_kill_export_at_every_rename_point(cli: ForkedCli, tmp_path: Path, layout: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    settings = load_settings(home=home)
    _add(settings, "alt")
    old = None
    if layout != "fresh":
        old = ex.export(settings).fingerprint
        store.dispose_stores()
        if layout == "flat":
            _flatten(settings)
    _add(settings, "neu")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(home, snapshot, symlinks=True)

    seen: set[str | None] = set()
    at, kills, held = 1, 0, 0
    points = None
    while True:
        # before each rename point in turn; once they are all known, once more right after the last one
        when = "before" if points is None else "after"
        env = fault_env(
            tmp_path,
            home,
            op="replace",
            at=at if points is None else points,
            action="kill",
            when=when,
            under=str(home / "data" / "training"),
        )
        proc = cli(["export"], env, home)
        if proc.returncode != KILLED:
            assert proc.returncode == 0 and points is None, proc.stderr
            new = _whole(settings)
            points = at - 1
            shutil.rmtree(home)
            shutil.copytree(snapshot, home, symlinks=True)
            continue
        kills += 1
        if layout == "fresh" and not (settings.training_dir / ex.CURRENT_LINK).is_symlink():
            assert ex.read_summary(settings) is None  # nothing visible yet: no export at all, never a torn one
            fingerprint = None
        else:
            fingerprint = _whole(settings, first=layout == "fresh")
        seen.add(fingerprint)
        # the next export after a crash works and cleans up what the killed one left
        ex.export(settings)
        store.dispose_stores()
        _whole(settings)
        assert not list((settings.training_dir / ex.EXPORTS_DIR).glob("*.partial"))
        assert not [p.name for p in settings.training_dir.glob(".*") if p.name not in (ex.EXPORTS_DIR, ".export.lock")]
        held += 1
        if when == "after":
            break
        shutil.rmtree(home)
        shutil.copytree(snapshot, home, symlinks=True)
        at += 1
    assert seen <= {old, new} and kills >= 3
    assert old in seen and new in seen  # early kills leave the previous export, late ones the new: never a mix
    ROWS.append(
        Row(
            "kill -9 before each rename/replace, and after the last",
            f"`lunatrain export` ({layout} data root)",
            kills,
            held,
            "previous export intact or new one whole (sha256 of every file through `current` and through "
            "the guide's names), prepare's export_summary check passes, the next export succeeds",
        )
    )


@pytest.fixture(scope="module")
def exported_then_grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A data root with one export (its fingerprint returned) and 3000 examples added since, built once:
    each test gets a copy of it (adding the 3000 examples took about 0.15 CPU-seconds a test)."""
    home = tmp_path_factory.mktemp("grown") / "home"
    home.mkdir()
    settings = load_settings(home=home)
    _add(settings, "alt")
    old = ex.export(settings).fingerprint
    store.dispose_stores()
    _add(settings, "neu", 3000)  # several buffer flushes, so a write fails mid-file
    return home, old


@pytest.mark.parametrize("op", ["write", "fsync"])
@pytest.mark.parametrize("action", ["ENOSPC", "EIO"])
def test_export_write_faults_keep_the_previous_export(
    cli: ForkedCli, exported_then_grown: tuple[Path, str], tmp_path: Path, op: str, action: str
) -> None:
    home = tmp_path / "home"
    shutil.copytree(exported_then_grown[0], home, symlinks=True)
    settings = load_settings(home=home)
    old = exported_then_grown[1]
    before = sorted(p.name for p in (settings.training_dir / ex.EXPORTS_DIR).iterdir())
    injected = held = 0
    for at in (1, 3):
        env = fault_env(tmp_path, home, op=op, at=at, action=action, under=str(home / "data" / "training"))
        proc = cli(["export"], env, home)
        injected += 1
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert ("disk is full" in lines[0]) == (action == "ENOSPC") and "previous data is intact" in lines[0]
        assert _whole(settings) == old
        assert sorted(p.name for p in (settings.training_dir / ex.EXPORTS_DIR).iterdir()) == before
        held += 1
    ROWS.append(
        Row(
            f"{action} on {op}",
            "`lunatrain export`",
            injected,
            held,
            "exit 1 with one sentence (`disk_full` / `storage_error`), previous export intact, no partial "
            "directory left",
        )
    )


def _registry_with_history(settings: Settings) -> None:
    entry = {
        "baseModel": {"id": "luna-tiny", "fingerprint": "f"},
        "datasetTier": "curated",
        "params": {},
        "metrics": {},
    }
    data = {
        "format": registry.FORMAT,
        "copies": registry.COPIES,  # made by this version: a read writes nothing
        "adapters": {
            "a": {
                "versions": [entry | {"name": "a", "version": v, "path": f"data/adapters/a/{v}"} for v in ("v1", "v2")],
                "aliases": {"latest": "v2", "active": "v2"},
                "activations": [{"version": "v1", "previous": None}, {"version": "v2", "previous": "v1"}],
            }
        },
    }
    registry.registry_path(settings).parent.mkdir(parents=True, exist_ok=True)
    registry.registry_path(settings).write_text(json.dumps(data))


@pytest.mark.parametrize("op", ["write", "fsync", "replace"])
@pytest.mark.parametrize("action", ["ENOSPC", "EIO"])
def test_registry_write_faults_keep_the_registry(cli: ForkedCli, tmp_path: Path, op: str, action: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    settings = load_settings(home=home)
    _registry_with_history(settings)
    before = registry.registry_path(settings).read_bytes()
    env = fault_env(tmp_path, home, op=op, at=1, action=action, under=str(home / "reports" / "training"))
    # a registry write that does not depend on the configured base model: deactivating a named version
    proc = cli(["adapters", "deactivate", "a@v2"], env, home)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "lora-adapters.json" in lines[0], proc.stderr
    assert registry.registry_path(settings).read_bytes() == before
    assert not list(registry.registry_path(settings).parent.glob(".lora-adapters.json.*.tmp"))
    ROWS.append(
        Row(
            f"{action} on {op}",
            "registry update (`adapters deactivate`)",
            1,
            1,
            "exit 1 with one sentence naming the file, registry byte-identical, no temp file left",
        )
    )


def test_damaged_registry_and_database_in_real_processes(cli: ForkedCli, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    settings = load_settings(home=home)
    env = fault_env(tmp_path, home)
    injected = held = 0
    for damage in ('{"format": "lunatrain-registry/1"}', '{"adapters": {"a": {"vers', ""):
        _registry_with_history(settings)
        path = registry.registry_path(settings)
        path.write_text(damage)
        injected += 1
        for args in (["adapters", "list"], ["adapters", "rollback", "a"]):
            proc = cli(args, env, home)
            assert proc.returncode == 1 and "adapters repair" in proc.stderr and proc.stderr.count("\n") == 1, (
                proc.stderr
            )
        assert path.read_text() == damage
        held += 1
    ROWS.append(
        Row(
            "registry damaged (wrong shape, cut short, empty)",
            "`adapters list`, `adapters rollback`",
            injected,
            held,
            "exit 1, one sentence naming `lunatrain adapters repair`, file never replaced",
        )
    )

    _add(settings, "db")
    db = settings.data_dir / "assistant.db"
    good = db.read_bytes()
    injected = held = 0
    for damaged in (good[: len(good) // 2], os.urandom(len(good)), good[:100]):
        db.write_bytes(damaged)
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        injected += 1
        for args in (["status"], ["examples", "list"], ["export"]):
            proc = cli(args, env, home)
            assert proc.returncode == 1 and str(db) in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
        held += 1
    ROWS.append(
        Row(
            "database damaged (cut in half, garbage, header only)",
            "`status`, `examples list`, `export`",
            injected,
            held,
            "exit 1, one sentence naming the database file (`storage_error` over HTTP)",
        )
    )


def test_full_database_is_disk_full_and_changes_nothing(settings: Settings) -> None:
    """SQLite's own "database or disk is full" (its page limit reached, as on a full disk), through the API."""
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    _add(settings, "voll", 5)
    engine = store.open_store(settings).engine
    db = settings.data_dir / "assistant.db"
    pages = db.stat().st_size // 4096

    @sa.event.listens_for(engine, "connect")
    def _cap(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()
    before = store.counts(settings)
    injected = held = 0
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for i in range(3):
            res = client.post("/assistant/training/examples", json={"prompt": f"p{i}", "response": "x" * 90_000})
            injected += 1
            assert res.status_code == 503 and res.json()["error"]["code"] == "disk_full", res.text
            assert str(db) in res.json()["error"]["message"]
            assert store.counts(settings) == before
            held += 1
        assert client.get("/assistant/training/examples").status_code == 200  # reads still work
    store.dispose_stores()
    ROWS.append(
        Row(
            "SQLite full (page limit)",
            "`POST /examples`",
            injected,
            held,
            "503 `disk_full` naming the database, nothing written, reads still answer",
        )
    )
