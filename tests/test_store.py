"""The example store on a real database: SQLite always, PostgreSQL when ASSISTANT_TEST_PG_URL is set.

Run: `.venv/bin/python -m pytest tests/test_store.py -q` (PostgreSQL cases are skipped without the URL).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from lunatrain import store
from lunatrain.cli import app
from lunatrain.errors import Conflict, NotFound, StorageError, UsageError
from lunatrain.formats import make_draft
from lunatrain.settings import Settings, load_settings

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _worker_database(url: str) -> str:
    """The test database for this pytest-xdist worker: its own database on the same server (created on
    first use), so workers never reset each other's schema. Without xdist, the URL as given."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return url
    base = sa.engine.make_url(url)
    name = f"{base.database}_{worker}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar() is None:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def _reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings pointing at an empty database of the parametrized backend."""
    if request.param == "postgres":
        url = os.environ.get("ASSISTANT_TEST_PG_URL")
        if not url:
            pytest.skip("ASSISTANT_TEST_PG_URL is not set: these cases need a real PostgreSQL")
        url = _worker_database(url)
        _reset_postgres(url)
        monkeypatch.setenv("ASSISTANT_DB_URL", url)
    store.dispose_stores()
    yield load_settings()
    store.dispose_stores()


def _snapshot(settings: Settings) -> tuple[str, dict, list, list]:
    """Everything a failed operation must leave untouched."""
    return (
        store.revision(settings),
        store.counts(settings),
        [e.to_dict() for e in store.list_examples(settings, limit=10_000)],
        [m.to_dict() for m in store.list_memory(settings, limit=10_000)],
    )


# --- migrations ---------------------------------------------------------------------------------


def test_open_migrates_empty_database_to_head_and_second_open_changes_nothing(db: Settings) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()

    st = store.open_store(db)
    with st.read() as conn:
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == head
        tables = set(sa.inspect(conn).get_table_names())
    assert {"examples", "memory_items", "deleted_hashes", "store_state", "alembic_version"} <= tables
    rev = store.revision(db)

    store.dispose_stores()  # a fresh process would open again from scratch
    st2 = store.open_store(db)
    assert st2 is not st
    with st2.read() as conn:
        assert conn.scalars(sa.text("SELECT version_num FROM alembic_version")).all() == [head]
    assert store.revision(db) == rev


@pytest.mark.slow  # starts three Python processes
def test_concurrent_first_opens_migrate_once(home: Path) -> None:
    # Several processes open a brand-new SQLite file at the same moment; the file lock serializes them.
    code = (
        "from lunatrain import store; from lunatrain.settings import load_settings;"
        "s = load_settings(); store.add_example(s, prompt='hi from ' + __import__('sys').argv[1], response='hallo')"
    )
    env = {**os.environ, "ASSISTANT_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    settings = load_settings()
    assert store.counts(settings)["totals"]["examples"] == 3
    with store.open_store(settings).read() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM alembic_version")) == 1


def test_connections_opening_a_new_file_together_wait_for_each_other(tmp_path: Path) -> None:
    """While one connection turns a brand-new file to WAL, SQLite fails another's switch at once ("database
    is locked") without waiting on the busy timeout; the store's connections must wait instead. Threads
    with an engine each stand in for processes (sqlite3 releases the GIL): 100 new files, 3 at a time."""
    import threading

    failures: list[str] = []

    def first_open(url: str, start: threading.Barrier) -> None:
        engine = store._sqlite_engine(url)
        start.wait()
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        except Exception as exc:  # every failure is the finding
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            engine.dispose()

    for i in range(100):
        start = threading.Barrier(3)
        url = f"sqlite:///{tmp_path / f'new-{i}.db'}"
        threads = [threading.Thread(target=first_open, args=(url, start)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, f"{len(failures)} of 300 first opens failed: {failures[0]}"


# --- examples -----------------------------------------------------------------------------------


def test_add_example_round_trip(db: Settings) -> None:
    ex = store.add_example(
        db,
        prompt="  Wie heißt du?  ",
        response="Ich bin Luna.",
        system="Du bist Luna.",
        turns=[{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hallo!"}],
        tags=["identity", "seed", "identity"],
        conversation_id="c-1",
        rating=5,
    )
    assert ex.prompt == "Wie heißt du?"  # trimmed
    assert ex.source == "curated" and ex.status == "approved"
    assert ex.tags == ("identity", "seed")
    assert ex.messages()[0] == {"role": "system", "content": "Du bist Luna."}
    assert ex.messages()[-1] == {"role": "assistant", "content": "Ich bin Luna."}
    assert len(ex.hash) == 64
    assert store.get_example(db, ex.id) == ex
    conv = store.add_example(db, prompt="x", response="y", source="conversation")
    assert conv.status == "pending"  # chat logs need review before training


def test_same_content_after_normalization_is_a_duplicate(db: Settings) -> None:
    store.add_example(db, prompt="Café?", response="Gern, ein Café.")
    decomposed = unicodedata.normalize("NFD", "Café?")
    assert decomposed != "Café?"
    before = _snapshot(db)
    with pytest.raises(Conflict, match="already exists"):
        store.add_example(db, prompt=f" {decomposed}\n", response="Gern, ein Café. ")
    assert _snapshot(db) == before


def test_a_response_opening_with_indented_code_keeps_its_first_lines_indent(db: Settings) -> None:
    """Trimming drops blank lines and whitespace around the text, not the indent of its first line: a
    Markdown code block indented by four spaces stays one block, every line aligned as written."""
    code = "    x = 1\n    if x:\n        y = 2"
    ex = store.add_example(db, prompt="Zeig mir den Block.", response=f"\n  \n{code}  \n\n")
    assert ex.response == code
    assert ex.messages()[-1]["content"] == code
    # one line is trimmed whole, as before: a stray space pasted before a short answer is no new example
    assert store.add_example(db, prompt="Eine Zeile?", response="   Ja.  ").response == "Ja."
    with pytest.raises(Conflict, match="already exists"):
        store.add_example(db, prompt="Zeig mir den Block.", response=code)


def test_content_stored_before_the_first_line_kept_its_indent_is_found_on_reimport(
    db: Settings, tmp_path: Path
) -> None:
    """Review repro: a database of the release before stored "    x = 1\n    y = 2" as "x = 1\n    y = 2",
    under that text's hash; re-importing the same file after the upgrade added the indented text as a new
    example, approved, although the stored one had been rejected. The earlier hash finds it."""
    code = "    x = 1\n    if x:\n        y = 2"
    before_upgrade = store.add_example(db, prompt="Der Block?", response=code.lstrip())  # as it was stored
    store.set_status(db, [before_upgrade.id], "rejected")
    path = tmp_path / "again.jsonl"
    path.write_text(json.dumps({"prompt": "Der Block?", "response": code}) + "\n", encoding="utf-8")
    snap = _snapshot(db)
    result = store.import_file(db, path, source="curated", status=None)
    assert (result.added, result.skipped_duplicates) == (0, 1)
    with pytest.raises(Conflict, match=f"already exists \\(id {before_upgrade.id}\\)"):
        store.add_example(db, prompt="Der Block?", response=code)
    assert _snapshot(db) == snap
    # One file holding both: the first is kept, as when they come in two files.
    both = tmp_path / "both.jsonl"
    rows = [{"prompt": "Noch ein Block?", "response": t} for t in ("y = 1\n    z = 2", "    y = 1\n    z = 2")]
    both.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = store.import_file(db, both, source="curated", status=None)
    assert (result.added, result.skipped_duplicates) == (1, 1)
    both.write_text("".join(json.dumps(r | {"prompt": "Umgekehrt?"}) + "\n" for r in rows[::-1]), encoding="utf-8")
    result = store.import_file(db, both, source="curated", status=None)
    assert (result.added, result.skipped_duplicates) == (1, 1)
    # A memory item likewise
    item = store.add_memory(db, question="Welcher Block?", answer=code.lstrip())
    with pytest.raises(Conflict, match=f"already exists \\(id {item.id}\\)"):
        store.add_memory(db, question="Welcher Block?", answer=code)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "", "response": "a"}, "field 'prompt': is empty"),
        ({"prompt": "q", "response": 3}, "field 'response': expected a string, got number"),
        ({"prompt": "q", "response": "a", "rating": 9}, "field 'rating': must be between 1 and 5"),
        # a tool turn is named as one, as in `messages` (it was "turns[0].role: must be 'user' or 'assistant'")
        ({"prompt": "q", "response": "a", "turns": [{"role": "tool", "content": "x"}]}, "turns\\[0\\]': a tool result"),
        ({"prompt": "q", "response": "a", "turns": [{"role": "bot", "content": "x"}]}, "turns\\[0\\].role"),
        ({"prompt": "q", "response": "a", "source": "web"}, "Invalid source 'web'"),
        ({"prompt": "q", "response": "a", "status": "done"}, "Invalid status 'done'"),
    ],
)
def test_invalid_example_is_refused_and_changes_nothing(db: Settings, kwargs: dict, message: str) -> None:
    store.add_example(db, prompt="schon da", response="ja")
    before = _snapshot(db)
    with pytest.raises(UsageError, match=message):
        store.add_example(db, **kwargs)
    assert _snapshot(db) == before


def test_import_is_deduplicated_and_reimport_adds_nothing(db: Settings, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [{"prompt": f"Frage {i}", "response": f"Antwort {i}"} for i in range(20)]
    lines.append({"prompt": "Frage 3", "response": "Antwort 3"})  # repeated inside the file
    path.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    first = store.import_file(db, path, source="curated", status="pending")
    assert (first.records, first.added, first.skipped_duplicates) == (21, 20, 1)
    assert first.formats == {"prompt-response": 21}
    rev = store.revision(db)
    again = store.import_file(db, path)
    assert (again.added, again.skipped_duplicates) == (0, 21)
    assert store.revision(db) == rev  # nothing changed, so no new revision
    assert store.counts(db)["examples"]["curated"]["pending"] == 20


def test_an_exported_record_edited_and_imported_again_says_the_old_example_stays(
    settings: Settings, tmp_path: Path
) -> None:
    """Forget repro: an export's record with its answer corrected and imported again (an export, edit, import round
    trip: there is no edit route) was added as a second example without a word; the wrong answer stayed approved
    and trained. The record's own id and hash (lunatrain's export writes them) tell an edit: the import says that
    the old example stays beside the new one, and how to drop it."""
    from typer.testing import CliRunner

    from lunatrain import export
    from lunatrain.cli import app

    first = store.add_example(settings, prompt="Wann ist Annas Geburtstag?", response="Am 3. Mai.")
    store.add_example(settings, prompt="Wie spät ist es?", response="Mittag.")
    export.export(settings, val_ratio=0.0)
    lines = (settings.training_dir / "current" / "assistant-sft-curated.jsonl").read_text("utf-8").splitlines()
    (record,) = [json.loads(line) for line in lines if json.loads(line)["id"] == f"ex-{first.id}"]
    record["messages"][-1]["content"] = "Am 3. März."
    untouched = [json.loads(line) for line in lines if json.loads(line)["id"] != f"ex-{first.id}"]
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [record, *untouched]), "utf-8")
    said = CliRunner().invoke(app, ["examples", "import", str(path)])
    assert said.exit_code == 0, said.output
    added = next(e for e in store.list_examples(settings) if e.response == "Am 3. März.")
    assert said.output.splitlines()[1:] == [
        f"Note: ex-{first.id} was edited in the file: the edit is ex-{added.id}, and ex-{first.id} keeps its old "
        f"content, still approved and exported; `lunatrain examples delete {first.id}` if the edit replaces it."
    ], said.output
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    record["messages"][-1]["content"] = "Am 4. März."
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        answer = api.post("/assistant/training/examples/import", json={"records": [record]}).json()
    assert answer["keptBeside"] == [{"edited": f"ex-{first.id}", "addedAs": f"ex-{added.id + 1}"}], answer
    # review: a rejected old example is exported by no tier: nothing stays beside the edit
    store.set_status(settings, [first.id], "rejected")
    record["messages"][-1]["content"] = "Am 5. März."
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", "utf-8")
    assert store.import_file(settings, path).kept_beside == ()
    store.set_status(settings, [first.id], "approved")
    # an export of another data root naming the same id says nothing of this one's example
    record["hash"] = "0" * 64
    record["messages"][-1]["content"] = "Im Mai."
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", "utf-8")
    assert store.import_file(settings, path).kept_beside == ()
    store.dispose_stores()


def test_adding_what_is_stored_rejected_or_pending_says_so_and_how_to_use_it(settings: Settings) -> None:
    """Memory repro: `memory add` of a fact stored rejected answered "already exists (id 1)": the user meant to
    store an approved fact, and it stays rejected, never exported. The refusal says its status and the way on."""
    from lunatrain.errors import Conflict

    item = store.add_memory(settings, question="Q?", answer="A.", status="rejected")
    ex = store.add_example(settings, prompt="P?", response="R.", status="pending")
    for add, said in (
        (
            lambda: store.add_memory(settings, question="Q?", answer="A."),
            f"A memory item with the same question and answer already exists (id {item.id}), rejected: "
            f"`lunatrain memory approve {item.id}` (POST /assistant/training/memory/{item.id}/approve) makes it "
            "trained.",
        ),
        (
            lambda: store.add_example(settings, prompt="P?", response="R."),
            f"An example with the same content already exists (id {ex.id}), pending: `lunatrain examples approve "
            f"{ex.id}` (POST /assistant/training/examples/{ex.id}/approve) makes it trained.",
        ),
    ):
        with pytest.raises(Conflict) as refused:
            add()
        assert refused.value.message == said, refused.value.message
    store.set_status(settings, [ex.id], "approved")
    with pytest.raises(Conflict, match=rf"^An example with the same content already exists \(id {ex.id}\)\.$"):
        store.add_example(settings, prompt="P?", response="R.")
    store.dispose_stores()


def test_importing_what_is_stored_rejected_or_pending_says_so_and_how_to_use_it(settings: Settings, tmp_path) -> None:
    """Import repro: `examples import f.jsonl --status rejected`, then `examples import f.jsonl --status approved`
    said "0 added, 4 already present", exit 0, and all four stayed rejected, out of every export; `examples add`
    of one of them says its status and how to approve it, the import said nothing. It keeps their status (the
    README's promise) and says which are not approved, and how to approve them."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    path = tmp_path / "f.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Frage {i}?", "response": f"Antwort {i}."}) + "\n" for i in range(4)),
        encoding="utf-8",
    )
    first = store.import_file(settings, path, status="rejected")
    assert first.added == 4
    store.set_status(settings, [2], "pending")
    store.set_status(settings, [3], "approved")
    r = CliRunner().invoke(app, ["examples", "import", str(path), "--status", "approved"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "Imported f.jsonl: 0 added, 4 already present (4 prompt-response).",
        "Note: 3 of the records already present are not approved, and keep their status (ex-1 rejected, ex-2 "
        "pending, ex-4 rejected): `lunatrain examples approve 1 2 4` makes them trained.",
    ], r.output
    shown = json.loads(
        CliRunner().invoke(app, ["examples", "import", str(path), "--status", "approved", "--json"]).output
    )
    assert shown["notApproved"] == [
        {"id": "ex-1", "status": "rejected"},
        {"id": "ex-2", "status": "pending"},
        {"id": "ex-4", "status": "rejected"},
    ], shown
    # an import that asks for no approval (rejected, pending) has nothing to say of them
    r = CliRunner().invoke(app, ["examples", "import", str(path), "--status", "pending"])
    assert r.exit_code == 0 and "Note" not in r.output, r.output
    assert [e.status for e in store.iter_examples(settings)] == ["rejected", "pending", "approved", "rejected"]
    store.dispose_stores()


def test_memory_items_move_to_another_database_with_memory_import(db: Settings, tmp_path: Path) -> None:
    """PostgreSQL repro: there was no way to carry memory items to another database: `memory list --json` wrote
    them, but `examples import` refused every one ("unknown format") and there is no bulk memory route.
    `memory import` reads what `memory list --json` writes (and JSON Lines of {question, answer, topic?,
    status?, tags?}): all or nothing, a bad record named by its place, duplicates skipped."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    runner = CliRunner()
    store.add_memory(db, question="Wie heißt mein Hund?", answer="Bruno.", topic="family", tags=["hund"])
    store.add_memory(db, question="Lieblingsfarbe?", answer="Blau.", status="rejected")
    listed = runner.invoke(app, ["memory", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    path = tmp_path / "memory.json"
    path.write_text(listed.stdout, "utf-8")
    store.delete_memory(db, [m.id for m in store.list_memory(db)])
    r = runner.invoke(app, ["memory", "import", str(path)])
    assert r.exit_code == 0 and r.output == "Imported memory.json: 2 added, 0 already present.\n", r.output
    moved = {(m.question, m.answer, m.topic, m.status, tuple(m.tags)) for m in store.list_memory(db)}
    assert moved == {
        ("Wie heißt mein Hund?", "Bruno.", "family", "approved", ("hund",)),
        ("Lieblingsfarbe?", "Blau.", None, "rejected", ()),
    }
    again = runner.invoke(app, ["memory", "import", str(path)])
    assert again.exit_code == 0 and again.output == "Imported memory.json: 0 added, 2 already present.\n"
    before = _snapshot(db)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Neu?", "answer": "Ja."}\n{"question": "", "answer": "x"}\n{"prompt": "p"}\n')
    r = runner.invoke(app, ["memory", "import", str(bad)])
    assert r.exit_code == 2, r.output
    assert "bad.jsonl line 2: field 'question'" in r.output and "bad.jsonl line 3: unknown field 'prompt'" in r.output
    assert _snapshot(db) == before  # nothing imported
    # review: a semicolon file (German Excel) with tags in one cell; and the empty list an empty store lists
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("question;answer;topic;tags\nWo wohne ich?;In Köln.;home;a,b\n", "utf-8")
    r = runner.invoke(app, ["memory", "import", str(sheet)])
    assert r.exit_code == 0 and r.output == "Imported sheet.csv: 1 added, 0 already present.\n", r.output
    assert [(m.topic, tuple(m.tags)) for m in store.list_memory(db) if m.question == "Wo wohne ich?"] == [
        ("home", ("a", "b"))
    ]
    (tmp_path / "none.json").write_text("[]\n")
    r = runner.invoke(app, ["memory", "import", str(tmp_path / "none.json")])
    assert r.exit_code == 0 and r.output == "Imported none.json: 0 added, 0 already present.\n", r.output
    store.dispose_stores()


def test_a_grant_names_the_role_as_sql_reads_it() -> None:
    """Review: the GRANT a refusal names took the user as typed: a mixed-case or hyphenated role must be quoted
    in SQL, or the statement grants another role (or none)."""
    import sqlalchemy as sa

    from lunatrain.store import _db_user

    assert _db_user(sa.create_engine("postgresql+psycopg://luna_app@h/db")) == ("luna_app", "luna_app")
    assert _db_user(sa.create_engine("postgresql+psycopg://Luna-Ops@h/db")) == ("Luna-Ops", '"Luna-Ops"')


def test_list_filters_and_pages(db: Settings) -> None:
    for i in range(5):
        store.add_example(db, prompt=f"p{i}", response="r", status="approved" if i % 2 else "pending")
    store.add_example(db, prompt="m", response="r", source="memory")
    assert [e.prompt for e in store.list_examples(db, status="pending")] == ["p0", "p2", "p4"]
    assert [e.prompt for e in store.list_examples(db, source="memory")] == ["m"]
    assert [e.prompt for e in store.list_examples(db, limit=2, offset=1)] == ["p1", "p2"]
    with pytest.raises(UsageError):
        store.list_examples(db, limit=0)


def test_a_search_finds_examples_and_memory_items_by_their_words_in_any_case_or_unicode_form(db: Settings) -> None:
    """A curator with thousands of examples could list them only in pages of ids: finding the one to delete or
    reject (a private fact, a wrong answer) meant reading them all. `search` matches the prompt, the answer, the
    system message, earlier turns and tags, case and Unicode forms folded; limit and offset page the matches."""
    store.add_example(db, prompt="Wann hat Anna Geburtstag?", response="Am 3. März.")
    store.add_example(db, prompt="Wie spät ist es?", response="Keine Ahnung.", system="Du bist Luna.")
    earlier = [{"role": "user", "content": "Wie wird das WETTER?"}, {"role": "assistant", "content": "Sonnig."}]
    store.add_example(db, prompt="Und morgen?", response="Regen.", turns=earlier)
    store.add_example(db, prompt="x", response="y", tags=["Privat"])
    store.add_example(db, prompt="Ein Café", response="Gern.")
    for i in range(4):
        store.add_example(db, prompt=f"Frage {i} zur Straße", response="Antwort", status="approved")

    def found(text: str, **filters) -> list[str]:
        return [e.prompt for e in store.list_examples(db, search=text, **filters)]

    assert found("MÄRZ") == ["Wann hat Anna Geburtstag?"]
    assert found("luna") == ["Wie spät ist es?"]
    assert found("wetter") == ["Und morgen?"]
    assert found("privat") == ["x"]
    assert found("cafe\u0301") == ["Ein Café"]  # typed decomposed, stored composed
    assert found("STRASSE", limit=2, offset=1) == ["Frage 1 zur Straße", "Frage 2 zur Straße"]
    assert found("strasse", status="pending") == []
    assert found("  anna  ") == ["Wann hat Anna Geburtstag?"]  # as typed into a search field
    assert found("nirgends") == []
    for blank in ("", "   "):
        with pytest.raises(UsageError, match="search"):
            store.list_examples(db, search=blank)
    store.add_memory(db, question="Wo wohnt Anna?", answer="In Köln.", topic="Familie", tags=["privat"])
    store.add_memory(db, question="Lieblingsfarbe?", answer="Blau.")
    assert [m.question for m in store.list_memory(db, search="KÖLN")] == ["Wo wohnt Anna?"]
    assert [m.question for m in store.list_memory(db, search="familie")] == ["Wo wohnt Anna?"]
    assert [m.question for m in store.list_memory(db, search="Privat")] == ["Wo wohnt Anna?"]


def test_set_status_is_all_or_nothing(db: Settings) -> None:
    a = store.add_example(db, prompt="a", response="1", status="pending")
    b = store.add_example(db, prompt="b", response="2", status="pending")
    before = _snapshot(db)
    with pytest.raises(NotFound, match="9999"):
        store.set_status(db, [a.id, 9999], "approved")
    assert _snapshot(db) == before
    assert store.set_status(db, [a.id, b.id], "approved") == 2
    assert store.set_status(db, [a.id], "approved") == 0  # already approved: no change, no new revision
    assert store.counts(db)["examples"]["curated"]["approved"] == 2


def test_delete_leaves_tombstones_and_ids_are_never_reused(db: Settings) -> None:
    a = store.add_example(db, prompt="vergiss das", response="ok")
    b = store.add_example(db, prompt="behalte das", response="ok")
    with pytest.raises(NotFound):
        store.delete_examples(db, [a.id, 12345])
    assert store.deleted_hashes(db) == {}
    assert store.delete_examples(db, [a.id]).count == 1
    tomb = store.deleted_hashes(db)
    assert list(tomb) == [a.hash] and tomb[a.hash].tzinfo is not None
    c = store.add_example(db, prompt="neu", response="ok")
    assert c.id > b.id
    # The same content added again is no longer "deleted".
    store.add_example(db, prompt="vergiss das", response="ok")
    assert store.deleted_hashes(db) == {}


def test_memory_items(db: Settings) -> None:
    m = store.add_memory(db, question="Was trinke ich gern?", answer="Tee.", topic="Vorlieben", tags=["seed"])
    assert (m.question, m.answer, m.topic, m.status) == ("Was trinke ich gern?", "Tee.", "Vorlieben", "approved")
    with pytest.raises(Conflict):
        store.add_memory(db, question="Was trinke ich gern?", answer="Tee.")
    with pytest.raises(UsageError, match="field 'answer'"):
        store.add_memory(db, question="q", answer="")
    store.add_memory(db, question="Hund?", answer="Bruno.", status="pending")
    assert [x.question for x in store.list_memory(db, status="pending")] == ["Hund?"]
    assert store.set_memory_status(db, [m.id], "rejected") == 1
    assert store.counts(db)["memory"] == {"approved": 0, "pending": 1, "rejected": 1}
    store.delete_memory(db, [m.id])
    assert m.hash in store.deleted_hashes(db)


def test_a_blank_topic_is_no_topic(db: Settings) -> None:
    """`memory add --topic "  "` stored the topic "" (listed as "" instead of null), while a blank system
    prompt of an example is no system prompt; a topic is trimmed like every other text."""
    blank = store.add_memory(db, question="Farbe?", answer="Blau.", topic="   ")
    assert blank.topic is None
    assert store.add_memory(db, question="Tier?", answer="Katze.", topic="  Vorlieben ").topic == "Vorlieben"
    assert [m.topic for m in store.list_memory(db)] == [None, "Vorlieben"]


def test_revision_changes_with_every_change(db: Settings) -> None:
    seen = [store.revision(db)]
    ex = store.add_example(db, prompt="a", response="b")
    seen.append(store.revision(db))
    store.set_status(db, [ex.id], "rejected")
    seen.append(store.revision(db))
    mem = store.add_memory(db, question="q", answer="a")
    seen.append(store.revision(db))
    store.delete_memory(db, [mem.id])
    seen.append(store.revision(db))
    store.delete_examples(db, [ex.id])
    seen.append(store.revision(db))
    assert len(set(seen)) == len(seen)


def test_a_database_restored_from_a_backup_never_repeats_a_revision(db: Settings) -> None:
    """Backup repro: an older database restored (its state row goes back with it) reached, after as many changes
    as it went back, the very revision the last export recorded: `status` said the export was up to date and
    prepare's export_stale passed, while the export held other examples than the database."""
    import sqlalchemy as sa

    from lunatrain.schema import state_table

    store.add_example(db, prompt="before the backup", response="b")
    with store.open_store(db).read() as conn:
        backup = conn.execute(sa.select(state_table.c.instance, state_table.c.counter)).one()
    store.add_example(db, prompt="only in the newer database A", response="a")
    store.add_example(db, prompt="only in the newer database B", response="b")
    exported = store.revision(db)  # what an export of the newer database recorded
    with store.open_store(db).write() as conn:  # the backup's state row is back, as with its whole file
        conn.execute(state_table.update().values(instance=backup.instance, counter=backup.counter))
    store.add_example(db, prompt="added after the restore C", response="c")
    store.add_example(db, prompt="added after the restore D", response="d")
    assert store.revision(db) != exported


def test_counts_has_every_key(db: Settings) -> None:
    c = store.counts(db)
    assert set(c["examples"]) == {"curated", "memory", "conversation"}
    assert all(set(v) == {"approved", "pending", "rejected"} for v in c["examples"].values())
    assert c["totals"] == {"examples": 0, "memory": 0, "curated_approved": 0}


def test_seed_loads_the_bundled_dataset_once(db: Settings) -> None:
    res = store.load_seed(db)
    assert res.examples_added >= 300 and res.memory_added >= 30
    c = store.counts(db)
    assert c["examples"]["curated"]["approved"] >= 250
    assert c["examples"]["conversation"]["pending"] > 0 and c["examples"]["conversation"]["rejected"] > 0
    multi = [e for e in store.list_examples(db, limit=1000) if e.turns]
    assert multi and all(e.conversation_id for e in multi)
    again = store.load_seed(db)
    assert (again.examples_added, again.memory_added) == (0, 0)
    assert again.examples_skipped == res.examples_added


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_examples_commands(home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app, ["examples", "add", "--prompt", "Hallo", "--response", "Hallo! Ich bin Luna.", "--tag", "greeting"]
    )
    assert r.exit_code == 0, r.output
    assert "Added example 1" in r.output
    r = runner.invoke(app, ["examples", "add", "--prompt", "Hallo", "--response", "Hallo! Ich bin Luna."])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["examples", "add", "--prompt", "x", "--response", "y", "--rating", "7"])
    assert r.exit_code == 2 and "rating" in r.output
    r = runner.invoke(
        app, ["examples", "add", "--prompt", "x", "--response", "y", "--conversationId", "c9", "--status", "pending"]
    )
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["examples", "list", "--json"])
    listed = json.loads(r.output)
    assert [(e["id"], e["status"], e["conversationId"]) for e in listed] == [
        (1, "approved", None),
        (2, "pending", "c9"),
    ]
    r = runner.invoke(app, ["examples", "list", "--status", "pending"])
    assert r.exit_code == 0 and r.output.startswith("2\tcurated\tpending")

    assert runner.invoke(app, ["examples", "approve", "ex-2"]).exit_code == 0
    r = runner.invoke(app, ["examples", "reject", "1", "77"])
    assert r.exit_code == 1 and "No example with id 77" in r.output
    r = runner.invoke(app, ["examples", "reject", "abc"])
    assert r.exit_code == 2
    assert runner.invoke(app, ["examples", "delete", "1"]).exit_code == 0
    settings = load_settings()
    assert store.counts(settings)["examples"]["curated"] == {"approved": 1, "pending": 0, "rejected": 0}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n', encoding="utf-8")
    r = runner.invoke(app, ["examples", "import", str(bad)])
    assert r.exit_code == 2 and "bad.jsonl" in r.output and "line 1" in r.output and "'response'" in r.output

    r = runner.invoke(app, ["memory", "add", "--question", "Wie heißt mein Hund?", "--answer", "Bruno."])
    assert r.exit_code == 0, r.output
    assert "Bruno" in runner.invoke(app, ["memory", "list"]).output
    assert runner.invoke(app, ["memory", "delete", "mem-1"]).exit_code == 0

    r = runner.invoke(app, ["examples", "seed"])
    assert r.exit_code == 0 and "examples added" in r.output


def test_schema_head_is_the_newest_migration() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(cfg).get_current_head() == store.SCHEMA_HEAD


@pytest.mark.slow
def test_a_database_at_head_opens_without_alembic(settings: Settings) -> None:
    """The first open migrates (alembic); every later process finds the schema at head and skips it."""
    store.open_store(settings)
    code = (
        "import sys; from lunatrain import store; from lunatrain.settings import load_settings; "
        "store.open_store(load_settings()); print('alembic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_cli_memory_approve_and_reject(db: Settings) -> None:
    """Repro: memory items had no approve/reject command, so a pending or rejected item could only be deleted."""
    runner = CliRunner()
    dog = store.add_memory(db, question="Wie heißt mein Hund?", answer="Bruno.", status="pending")
    home_ = store.add_memory(db, question="Wo wohne ich?", answer="In Berlin.", status="pending")
    tea = store.add_memory(db, question="Was trinke ich gern?", answer="Tee.", status="rejected")

    r = runner.invoke(app, ["memory", "approve", str(dog.id), f"mem-{tea.id}"])  # both id forms, several at once
    assert r.exit_code == 0 and r.output.strip() == "2 memory items set to approved.", r.output
    r = runner.invoke(app, ["memory", "reject", f"mem-{home_.id}"])
    assert r.exit_code == 0 and r.output.strip() == "1 memory item set to rejected.", r.output
    r = runner.invoke(app, ["memory", "reject", str(home_.id)])  # already rejected: nothing to change
    assert r.exit_code == 0 and r.output.strip() == "0 memory items set to rejected.", r.output
    assert {m.id: m.status for m in store.list_memory(db)} == {
        dog.id: "approved",
        home_.id: "rejected",
        tea.id: "approved",
    }

    before = _snapshot(db)
    r = runner.invoke(app, ["memory", "reject", str(dog.id), "mem-77"])  # one unknown id: none of them changes
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "error: No memory item with id 77; nothing was changed."
    ], r.output
    # Repro: 31 unknown ids were said as the first ten, without a word about the other 21.
    r = runner.invoke(app, ["memory", "approve", str(dog.id), *map(str, range(100, 131))])
    assert r.exit_code == 1 and r.output.strip() == (
        "error: No memory item with id 100, 101, 102, 103, 104 (and 26 more); nothing was changed."
    ), r.output
    for bad, said in (
        ("ex-1", "error: 'ex-1' is an example's id"),
        ("abc", "error: Invalid id"),
        ("0", "error: Invalid id"),
    ):
        r = runner.invoke(app, ["memory", "approve", bad])  # an example's id form is no memory id: said so
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(said), r.output
    assert _snapshot(db) == before


def test_memory_add_says_which_tier_trains_the_fact(db: Settings) -> None:
    """Repro: `memory add` said "Added memory item 1." and no more; the Luna profile trains the curated tier,
    so the fact was never learned unless the run named `--datasetTier=merged` (the guide's own example)."""
    r = CliRunner().invoke(app, ["memory", "add", "--question", "Wie heißt mein Hund?", "--answer", "Bruno."])
    assert r.exit_code == 0, r.output
    item = store.list_memory(db)[0]
    assert r.output.strip().splitlines() == [
        f"Added memory item {item.id}. Memory items are trained in the memory and merged tiers; the luna "
        "profile trains curated, so train with `--datasetTier=merged` for Luna to learn it."
    ], r.output
    r = CliRunner().invoke(app, ["memory", "add", "--question", "Katze?", "--answer", "Mia.", "--status", "pending"])
    assert r.exit_code == 0 and r.output.strip() == f"Added memory item {item.id + 1} (pending).", r.output


def test_approved_memory_items_reach_the_export_and_rejected_ones_do_not(db: Settings) -> None:
    """Repro: the seed's pending and rejected memory items stayed out of every export, with no way to approve them."""
    runner = CliRunner()
    store.add_example(db, prompt="Hallo", response="Hallo! Ich bin Luna.")
    kept = store.add_memory(db, question="Wie heißt mein Hund?", answer="Bruno.", status="pending")
    dropped = store.add_memory(db, question="Wo wohne ich?", answer="In Berlin.")
    revived = store.add_memory(db, question="Was trinke ich gern?", answer="Tee.", status="rejected")
    assert runner.invoke(app, ["memory", "approve", str(kept.id), f"mem-{revived.id}"]).exit_code == 0
    assert runner.invoke(app, ["memory", "reject", f"mem-{dropped.id}"]).exit_code == 0

    r = runner.invoke(app, ["export"])
    assert r.exit_code == 0, r.output
    lines = (db.training_dir / "assistant-sft-memory.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in lines if line) == sorted([f"mem-{kept.id}", f"mem-{revived.id}"])


def _write_lock_taken(conn: sa.Connection) -> bool:
    """Whether some transaction holds the store's write lock (SQLite: the file's, as BEGIN IMMEDIATE takes
    it; PostgreSQL: the writers' advisory lock), asked on a connection of its own that does not wait."""
    url = conn.engine.url
    if url.get_backend_name() == "sqlite":
        probe = sqlite3.connect(url.database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()  # rolls back the probe's own transaction, had it begun
        return False
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as probe:
            got = probe.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": store._PG_WRITE_LOCK})
            return not got.scalar()  # the probe's own lock, had it got one, ends with its transaction
    finally:
        engine.dispose()


def _both_checked_before_either_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers that each find the content absent before either inserts it: the race of two processes
    adding the same content. Each waits after its check until the other has checked too (2 s at most).
    It does not wait while the store's write lock is taken, as when the store lets one writer in at a time:
    either this writer holds it, and the other can only check after this one committed, or the other holds
    it and has checked already (the race happened). Waiting would only end by the timeout then."""
    barrier = threading.Barrier(2)
    original = store._existing

    def existing(conn, *args, **kwargs):
        found = original(conn, *args, **kwargs)
        if not _write_lock_taken(conn):
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)
        return found

    monkeypatch.setattr(store, "_existing", existing)


def _twice_at_once(call) -> list:
    results: list = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = call()
        except Exception as exc:  # the outcome is what the test looks at
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_writers_adding_the_same_memory_item_at_once(db: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL the second insert failed on the unique hash with a traceback (two `examples seed` at
    once); writers now queue as on SQLite, and the second finds the item there (Conflict, one sentence)."""
    store.add_memory(db, question="schon da", answer="ja")  # the store and its schema exist before the race
    _both_checked_before_either_writes(monkeypatch)
    results = _twice_at_once(lambda: store.add_memory(db, question="Wo wohne ich?", answer="In Berlin."))
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "MemoryItem"], results
    assert [i.question for i in store.list_memory(db)].count("Wo wohne ich?") == 1


def test_two_writers_importing_the_same_examples_at_once_both_succeed(
    db: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL one of two imports sharing examples failed ("run the command again") and used up ids, so
    the same examples got other ids than on SQLite. Both succeed now, the second skipping what the first added."""
    store.add_examples(db, [make_draft(prompt="schon da", response="ja")])
    _both_checked_before_either_writes(monkeypatch)
    drafts = [make_draft(prompt=f"Frage {i}", response=f"Antwort {i}") for i in range(20)]
    results = _twice_at_once(lambda: store.add_examples(db, drafts))
    assert all(isinstance(r, store.AddResult) for r in results), results
    assert sorted((r.added, r.skipped_duplicates) for r in results) == [(0, 20), (20, 0)]
    assert [e.id for e in store.list_examples(db, limit=100)] == list(range(1, 22))  # no ids used up


def test_an_id_beyond_the_column_is_not_found_not_a_damaged_database(db: Settings) -> None:
    """ids are 32-bit on PostgreSQL: 3000000000 made the server refuse the query, which was reported as a
    damaged database ("restore it from a backup"). No example or memory item can have such an id."""
    store.add_examples(db, [make_draft(prompt="a", response="b")])
    for call in (
        lambda: store.set_status(db, [3_000_000_000], "approved"),
        lambda: store.set_memory_status(db, [3_000_000_000], "approved"),
        lambda: store.delete_examples(db, [2**62]),
        lambda: store.get_example(db, 3_000_000_000),
        lambda: store.get_memory(db, 2**62),
    ):
        with pytest.raises(NotFound, match=r"^No (example|memory item) with id \d+"):
            call()


def test_a_reimported_export_keeps_its_memory_samples_apart_from_curated_ones(settings, tmp_path: Path) -> None:
    """Repro: importing lunatrain's own merged export (assistant-sft.jsonl, e.g. to move the data to another
    database) made every memory sample a curated example: the record's `source` was ignored, so the curated
    tier grew by the memory facts. Without --source a record's own source (one of ours) is kept; a source of
    another dataset's own meaning is not; --source still decides for every record."""
    from lunatrain import export
    from lunatrain.settings import load_settings

    store.load_seed(settings)
    summary = export.export(settings)
    merged = settings.training_dir / export.TIER_FILES["merged"]
    other = load_settings(home=tmp_path / "other")
    store.import_file(other, merged)
    by_source = {
        src: len(store.list_examples(other, source=src, limit=100_000)) for src in ("curated", "memory", "conversation")
    }
    counts = summary.counts if hasattr(summary, "counts") else summary["counts"]
    assert by_source == {"curated": counts["curated"]["total"], "memory": counts["memory"]["total"], "conversation": 0}
    assert all(e.status == "approved" for e in store.list_examples(other, limit=100_000))
    # an approved conversation example exported in the merged tier comes back approved, not up for review
    line = json.dumps({"prompt": "Wie war dein Tag?", "response": "Gut, danke!", "source": "conversation"})
    (tmp_path / "conv.jsonl").write_text(line + "\n")
    store.import_file(other, tmp_path / "conv.jsonl")
    [conv] = store.list_examples(other, source="conversation", limit=10)
    assert conv.status == "approved"
    # another dataset's `source` column (its own provenance) is not ours: curated, as without it
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"prompt": "p", "response": "r", "source": "wikipedia"}) + "\n")
    store.import_file(other, foreign)
    assert [e.source for e in store.list_examples(other, limit=100_000) if e.prompt == "p"] == ["curated"]
    # --source for every record
    third = load_settings(home=tmp_path / "third")
    store.import_file(third, merged, source="curated")
    assert len(store.list_examples(third, source="memory", limit=100_000)) == 0
    store.dispose_stores()


def test_an_imported_records_own_status_is_kept_and_a_foreign_one_refused(db: Settings, tmp_path: Path) -> None:
    """Repro: a record's `status` was ignored, so re-importing an `examples list --json` dump made its rejected
    and pending examples approved training data. A status of ours is kept (unless --status decides for every
    record); any other is a bad record, named by line and field, and nothing is imported."""
    path = tmp_path / "dump.jsonl"
    records = [
        {"prompt": "abgelehnt", "response": "a", "status": "rejected"},
        {"prompt": "offen", "response": "a", "status": "pending", "source": "conversation"},
        {"prompt": "gut", "response": "a", "status": "approved"},
        {"prompt": "ohne", "response": "a"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    store.import_file(db, path)
    got = {e.prompt: (e.source, e.status) for e in store.list_examples(db, limit=100)}
    assert got == {
        "abgelehnt": ("curated", "rejected"),
        "offen": ("conversation", "pending"),
        "gut": ("curated", "approved"),
        "ohne": ("curated", "approved"),
    }
    # --status decides for every record, as --source does
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "neu", "response": "a", "status": "rejected"}) + "\n", encoding="utf-8")
    store.import_file(db, other, status="pending")
    assert [e.status for e in store.list_examples(db, limit=100) if e.prompt == "neu"] == ["pending"]
    # a status that is not one of ours is refused, naming file, line and field; nothing is imported
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "x", "response": "a"})
        + "\n"
        + json.dumps({"prompt": "y", "response": "a", "status": "done"}),
        encoding="utf-8",
    )
    before = _snapshot(db)
    with pytest.raises(UsageError, match=r"line 2.*field 'status'.*approved, pending or rejected"):
        store.import_file(db, bad)
    assert _snapshot(db) == before
    # unless --status decides for every record: then the record's field (another dataset's) is not read
    store.import_file(db, bad, status="pending")
    assert {e.prompt: e.status for e in store.list_examples(db, limit=100) if e.prompt in "xy"} == {
        "x": "pending",
        "y": "pending",
    }


# --- PostgreSQL databases lunatrain cannot use ------------------------------------------------------


def test_a_database_server_that_never_answers_is_unreachable_after_a_connect_timeout(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL-flow repro: a server that accepts connections but never answers (a hung host, a partition)
    kept `examples list`, the API's requests and a finished job's last step waiting for good: PostgreSQL
    connections had no timeout. Now one is set unless ASSISTANT_DB_URL sets its own (here shortened)."""
    import socket

    monkeypatch.setattr(store, "PG_CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections land in its backlog; nothing ever answers them
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/lunatrain"
        monkeypatch.setenv("ASSISTANT_DB_URL", url)
        r = CliRunner().invoke(app, ["examples", "list"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: Cannot connect to the database") and "timeout" in r.output, r.output
    assert "connect_timeout" not in store.pg_connect_args(sa.engine.make_url(url + "?connect_timeout=7"))  # theirs
    assert store.pg_connect_args(sa.engine.make_url(url))["connect_timeout"] == 1
    store.dispose_stores()


@pytest.mark.parametrize(
    ("reason", "advice"),
    [
        ('FATAL: password authentication failed for user "luna"', "check the user and password in ASSISTANT_DB_URL"),
        ("fe_sendauth: no password supplied", "check the user and password in ASSISTANT_DB_URL"),
        ('FATAL: role "nobody" does not exist', "check the user and password in ASSISTANT_DB_URL"),
        (
            'FATAL: database "nosuch" does not exist',
            "create it (`createdb nosuch`) or fix its name in ASSISTANT_DB_URL",
        ),
    ],
)
def test_a_server_that_refuses_the_login_or_lacks_the_database_says_so(reason: str, advice: str) -> None:
    """PostgreSQL-flow repro: a wrong password and a missing database were said as "Cannot connect … check
    that its server runs", though the server had answered."""
    import psycopg

    engine = sa.create_engine("postgresql+psycopg://luna:secret@127.0.0.1:5432/nosuch")
    orig = psycopg.OperationalError(
        f'connection failed: connection to server at "127.0.0.1", port 5432 failed: {reason}'
    )
    said = store.storage_error(sa.exc.OperationalError("connect", {}, orig), engine)
    assert said.message.endswith(f"; {advice}."), said.message
    assert "check that its server runs" not in said.message and "secret" not in said.message
    assert said.code == ("storage_unreachable" if "database" in reason else "storage_denied")


def _pg_admin() -> sa.Engine:
    url = os.environ.get("ASSISTANT_TEST_PG_URL")
    if not url:
        pytest.skip("ASSISTANT_TEST_PG_URL is not set: these cases need a real PostgreSQL")
    return sa.create_engine(_worker_database(url), isolation_level="AUTOCOMMIT")


@pytest.mark.postgres
@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_a_postgres_database_not_in_utf8_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    """Repro: in a LATIN1 database `examples add --prompt "Kaffee ☕"` ended in a UnicodeEncodeError traceback
    (the API in a 500); in a SQL_ASCII one every command said "Invalid database URL …: cannot use a string
    pattern on a bytes-like object". Now the store refuses such a database in one sentence, exit 1."""
    admin = _pg_admin()
    name = f"{admin.url.database}_{encoding.lower()}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(
            sa.text(f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        )
    monkeypatch.setenv("ASSISTANT_DB_URL", admin.url.set(database=name).render_as_string(hide_password=False))
    try:
        r = CliRunner().invoke(app, ["examples", "add", "--prompt", "Kaffee ☕", "--response", "Gern."])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert f"uses encoding {encoding}; lunatrain needs UTF8" in r.output and name in r.output, r.output
        with pytest.raises(StorageError, match="ENCODING 'UTF8'") as err:
            store.list_examples(load_settings())
        assert err.value.code == "storage_incompatible"
    finally:
        store.dispose_stores()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _pg_store_with_one_example(monkeypatch: pytest.MonkeyPatch) -> tuple[str, Settings]:
    """This worker's PostgreSQL database, emptied, as ASSISTANT_DB_URL, holding one example: its URL and
    settings."""
    admin = _pg_admin()
    url = admin.url.render_as_string(hide_password=False)
    admin.dispose()
    _reset_postgres(url)
    monkeypatch.setenv("ASSISTANT_DB_URL", url)
    store.dispose_stores()
    settings = load_settings()
    store.add_example(settings, prompt="erste", response="Antwort")
    return url, settings


@pytest.mark.postgres
def test_a_postgres_writer_held_up_by_another_process_is_busy_not_hung(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repros: with another process holding the write lock (an import suspended with Ctrl-Z), every
    write on PostgreSQL waited without end (SQLite says "held by another process" after the busy timeout), and
    the API's waiting writers took every pooled connection: the next request, a read too, ended in a 500 from
    the pool's own timeout. Both are the busy database now, after the busy timeout, and nothing is changed."""
    url, settings = _pg_store_with_one_example(monkeypatch)
    monkeypatch.setattr(store, "SQLITE_BUSY_TIMEOUT_S", 0.5)  # not the 30 s a real writer waits
    store.dispose_stores()  # the pool's timeout is the engine's
    holder = sa.create_engine(url).connect()
    held = holder.begin()
    holder.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": store._PG_WRITE_LOCK})
    try:
        with pytest.raises(StorageError, match="held by another process") as err:
            store.add_example(settings, prompt="zweite", response="Antwort")
        assert err.value.code == "storage_busy" and "backup" not in err.value.message, err.value.message
        assert store.counts(settings)["totals"]["examples"] == 1  # reads go on
        engine = store.open_store(settings).engine
        taken = [engine.connect() for _ in range(engine.pool.size() + engine.pool._max_overflow)]
        try:
            with pytest.raises(StorageError, match="every connection") as err:
                store.counts(settings)
            assert err.value.code == "storage_busy", err.value.message
        finally:
            for conn in taken:
                conn.close()
    finally:
        held.rollback()
        holder.close()
        holder.engine.dispose()
    store.add_example(settings, prompt="dritte", response="Antwort")  # free again: nothing was wrong with it
    assert store.counts(settings)["totals"]["examples"] == 2
    store.dispose_stores()


@pytest.mark.postgres
def test_a_postgres_database_recreated_under_a_running_process_is_set_up_again(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repro: with the database dropped and created again while `serve` ran, every request answered
    503 "cannot be used (relation "examples" does not exist LINE 2: FROM examples … ^); restore it from a
    backup, or move it aside": advice that fits no empty database, and libpq's SQL excerpt in the sentence;
    only a restart helped. The request says what happened, and the next one sets the database up again."""
    url, settings = _pg_store_with_one_example(monkeypatch)
    _reset_postgres(url)  # as dropdb + createdb: the schema is gone under the running process
    with pytest.raises(StorageError) as err:
        store.list_examples(settings)
    message = err.value.message
    assert "has no lunatrain tables" in message and "try again" in message, message
    assert "LINE" not in message and "backup" not in message, message
    assert list(store.list_examples(settings)) == []  # set up again
    store.add_example(settings, prompt="zweite", response="Antwort")
    assert store.counts(settings)["totals"]["examples"] == 1
    # review repro: one table missing is damage, which setting up again would not mend: said as such, and as
    # the server says it, without libpq's excerpt of the query
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE memory_items"))
    engine.dispose()
    for _ in range(2):
        with pytest.raises(StorageError) as err:
            store.list_memory(settings)
        message = err.value.message
        assert "has no lunatrain tables" not in message and "LINE" not in message, message
        assert 'relation "memory_items" does not exist' in message and "backup" in message, message
    store.dispose_stores()


@contextlib.contextmanager
def _pg_role(
    monkeypatch: pytest.MonkeyPatch, name: str, grant: str, undo: str = ""
) -> Iterator[tuple[sa.Engine, str, str]]:
    """A login role of its own for the block (`grant`: SQL run as the admin after creating it, `{role}` in it
    replaced; `undo`: SQL that takes back what `grant` did beyond the role), ASSISTANT_DB_URL naming it.
    Yields the admin engine, the role and the database owner's URL (the schema is reset to empty)."""
    admin = _pg_admin()
    owner = admin.url.render_as_string(hide_password=False)
    _reset_postgres(owner)
    role = f"lunatrain_{name}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'luna'"))
        conn.execute(sa.text(grant.format(role=role)))
    monkeypatch.setenv("ASSISTANT_DB_URL", admin.url.set(username=role, password="luna").render_as_string(False))
    try:
        yield admin, role, owner
    finally:
        store.dispose_stores()
        with admin.connect() as conn:
            if undo:
                conn.execute(sa.text(undo.format(role=role)))
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_a_server_that_refuses_more_connections_is_busy_not_unreachable(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review repro: against a connection limit (a role's, a small managed database's), concurrent requests got
    503 storage_unreachable "check that its server runs", though the server answered: too many connections."""
    grant = "GRANT ALL ON SCHEMA public TO {role}; ALTER ROLE {role} CONNECTION LIMIT 1"
    with _pg_role(monkeypatch, "one_conn", grant) as (admin, role, _owner):
        settings = load_settings()
        store.add_example(settings, prompt="erste", response="Antwort")
        store.dispose_stores()  # its pooled connection goes: the limit's one is the holder's
        holder = sa.create_engine(admin.url.set(username=role, password="luna")).connect()
        try:
            with pytest.raises(StorageError) as err:
                store.counts(settings)
            assert err.value.code == "storage_busy", err.value.message
            assert (
                "refuses more connections" in err.value.message
                and "check that its server runs" not in err.value.message
            )
        finally:
            holder.close()
            holder.engine.dispose()


@pytest.mark.postgres
def test_a_database_user_without_a_usable_schema_is_told_so(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repro: a user without USAGE on the schema (PostgreSQL then skips it on the search_path) was told the
    database is damaged ("no schema has been selected to create in … restore it from a backup, or move it
    aside"). Now the sentence says the user may not use the schema and how to grant it."""
    revoke, restore = "REVOKE USAGE ON SCHEMA public FROM PUBLIC", "GRANT USAGE ON SCHEMA public TO PUBLIC"
    with _pg_role(monkeypatch, "no_schema", revoke, undo=restore) as (_admin, role, _owner):
        r = CliRunner().invoke(app, ["examples", "add", "--prompt", "Hallo", "--response", "Hi"])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert f"user {role} may not use any schema on its search path" in r.output, r.output
        assert f"GRANT USAGE, CREATE ON SCHEMA public TO {role}" in r.output, r.output
        assert "backup" not in r.output and "aside" not in r.output, r.output
        store.dispose_stores()
        with pytest.raises(StorageError) as err:
            store.open_store(load_settings())
        assert err.value.code == "storage_denied"


@pytest.mark.postgres
def test_a_database_user_without_permission_is_told_so(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repro: a user the server refuses ("permission denied for schema public", "… for table examples") was told
    the database is damaged: "restore it from a backup, or move it aside". Now the sentence says the user lacks
    the permission, and what the server said."""
    usage = "GRANT USAGE ON SCHEMA public TO {role}"  # as PostgreSQL 15 gives everyone
    with _pg_role(monkeypatch, "no_rights", usage) as (admin, role, owner):
        with pytest.raises(StorageError) as err:  # an empty database: the user may not create the schema
            store.open_store(load_settings())
        assert "permission denied for schema public" in err.value.message, err.value.message
        assert err.value.code == "storage_denied"
        # PostgreSQL repro: the README promises the GRANT; the common case (PostgreSQL 15 gives no CREATE on
        # public) said only "grant it the privileges lunatrain needs"
        assert f"`GRANT CREATE ON SCHEMA public TO {role}`" in err.value.message, err.value.message
        store.dispose_stores()
        store.open_store(
            load_settings(db_url=owner)
        )  # the schema, made by its owner; the user may see it but not read the examples
        with admin.connect() as conn:
            conn.execute(sa.text(f"GRANT SELECT ON alembic_version TO {role}"))
        r = CliRunner().invoke(app, ["examples", "list"])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        for said in (err.value.message, r.output):
            assert f"user {role} lacks a permission" in said and "backup" not in said and "aside" not in said, said
        assert "permission denied for table examples" in r.output, r.output
        grant = f"`GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}`"
        assert grant in " ".join(r.output.split()), r.output


def test_a_database_this_process_may_only_read_is_said_so_not_called_damaged(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: a database file this user may not write (a backup extracted as another user, one `sudo
    lunatrain`) failed every change with "cannot be used (attempt to write a readonly database); restore it
    from a backup, or move it aside to start with an empty one": advice that throws a healthy store away. Here
    SQLite opens it read-only by its URL, the same refusal; the sentence now says it cannot be written."""
    store.add_example(settings, prompt="Erste?", response="Ja.")
    store.dispose_stores()
    path = store.open_store(settings).engine.url.database
    store.dispose_stores()
    monkeypatch.setenv("ASSISTANT_DB_URL", f"sqlite:///file:{path}?mode=ro&uri=true")
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "Zweite?", "--response", "Nein."])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "cannot be written by this process (attempt to write a readonly database)" in r.output, r.output
    assert "backup" not in r.output and "aside" not in r.output, r.output
    assert "chmod" in r.output, r.output
    listed = CliRunner().invoke(app, ["examples", "list", "--json"])  # reading still works
    assert listed.exit_code == 0 and [e["prompt"] for e in json.loads(listed.output)] == ["Erste?"], listed.output
    store.dispose_stores()


def test_listing_by_status_reads_an_index_in_id_order(settings: Settings) -> None:
    """Repro: `examples list --status approved` sorted every approved row for each page (no index on status
    and id): a page took 7-10 s at 530,000 examples, against 0.09 s without the filter."""
    store.load_seed(settings)
    st = store.open_store(settings)
    query = (
        sa.select(store.examples_table.c.id)
        .where(store.examples_table.c.status == "approved")
        .order_by(store.examples_table.c.id)
        .limit(50)
    )
    with st.read() as conn:
        compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
        plan = " | ".join(str(row[-1]) for row in conn.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}")))
    assert "ix_examples_status_id" in plan and "TEMP B-TREE" not in plan, plan
    assert [e.id for e in store.list_examples(settings, status="approved", limit=5)] == sorted(
        e.id for e in store.list_examples(settings, status="approved", limit=5)
    )


def test_a_database_at_the_first_schema_gets_the_status_index_and_keeps_its_data(db: Settings) -> None:
    store.add_example(db, prompt="Wer bist du?", response="Luna.")
    with store.open_store(db).write() as conn:  # as lunatrain left it before migration 0002
        conn.execute(sa.text("DROP INDEX ix_examples_status_id"))
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
    store.dispose_stores()
    assert [e.prompt for e in store.list_examples(db, status="approved")] == ["Wer bist du?"]
    with store.open_store(db).read() as conn:
        assert "ix_examples_status_id" in {i["name"] for i in sa.inspect(conn).get_indexes("examples")}
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == store.SCHEMA_HEAD


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json", "lines.json"])
def test_a_large_import_holds_about_its_drafts_in_memory_not_several_copies(
    settings: Settings, tmp_path: Path, suffix: str
) -> None:
    """Repro: importing a JSON Lines file held the file's bytes, its text, its list of lines, every parsed
    record, every draft and every row at once (about 4x the file in Python's own allocations here, 8-9x on
    files of long records; a CSV table likewise), and binding each text to SQLite cached its UTF-8 bytes on
    the string until the end. Lines are now read one at a time and rows built and freed chunk by chunk, in the one transaction:
    the ids still follow the file's order, and a bad line still imports nothing. A JSON array (was 5.2x: its
    text and every parsed record at once) is read a record at a time, and so is JSON Lines under a .json name
    (as `datasets.Dataset.to_json` writes it), which was read whole (3.8x)."""
    import tracemalloc

    answer = "Eine lange Antwort über den Mond. " * 30
    path = tmp_path / f"many.{suffix}"
    if suffix in ("jsonl", "json", "lines.json"):
        lines = [
            json.dumps({"prompt": f"Frage {i}?", "response": f"{answer}{i}"}, ensure_ascii=False) for i in range(3000)
        ]
        if suffix == "json":  # one array, a record a line as json.dump(records, indent=…) puts it
            lines = ["[", *[f"  {line}," for line in lines[:-1]], f"  {lines[-1]}", "]"]
    else:
        lines = ["prompt,response"] + [f"Frage {i}?,{answer}{i}" for i in range(3000)]
    path.write_text("\n".join(lines) + "\n", "utf-8")
    store.add_example(settings, prompt="Erste?", response="Ja.")  # the store exists: its start is not measured
    tracemalloc.start()
    try:
        result = store.import_file(settings, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.records, result.added, result.skipped_duplicates) == (3000, 3000, 0)
    assert peak < 2.5 * path.stat().st_size, peak / path.stat().st_size  # was 4.3x (JSON Lines), 6.2x (CSV)
    listed = store.list_examples(settings, limit=10_000)
    assert [e.prompt for e in listed] == ["Erste?"] + [f"Frage {i}?" for i in range(3000)]

    bad = tmp_path / f"bad.{suffix}"
    broken, new = ("{", json.dumps({"prompt": "Neu?", "response": "Ja."})) if suffix != "csv" else ("x", "Neu?,Ja.")
    bad.write_text("\n".join([*lines[:10], broken, new]) + "\n", "utf-8")
    revision = store.revision(settings)
    # (in the array, the "{" opens a record whose first key is missing, on the next line)
    where = "line 12: malformed JSON" if suffix == "json" else "line 11: (malformed JSON|field 'response': missing)"
    with pytest.raises(UsageError, match=where):
        store.import_file(settings, bad)
    assert store.revision(settings) == revision


def test_memory_add_reads_the_profile_table_of_the_base_in_use(db: Settings) -> None:
    """Repro: a luna profile of the user's that trains the merged tier only on the base in use (its
    `[bases."…"]` table) still got "the luna profile trains curated": the hint read the `[lora]` table alone.
    It now reads the values a run on the configured base would get."""
    profile = db.home / "profiles" / "luna.toml"
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text('[lora]\ndatasetTier = "curated"\n\n[bases."luna-tiny"]\ndatasetTier = "merged"\n')
    r = CliRunner().invoke(app, ["memory", "add", "--question", "Wie heißt mein Hund?", "--answer", "Bruno."])
    assert r.exit_code == 0 and r.output.strip() == f"Added memory item {store.list_memory(db)[0].id}.", r.output
    profile.write_text('[lora]\ndatasetTier = "merged"\n\n[bases."luna-tiny"]\ndatasetTier = "curated"\n')
    r = CliRunner().invoke(app, ["memory", "add", "--question", "Katze?", "--answer", "Mia."])
    assert r.exit_code == 0 and "the luna profile trains curated" in r.output, r.output


def test_a_read_is_one_snapshot_while_others_write(db: Settings) -> None:
    """Repro: on PostgreSQL a read transaction ran at READ COMMITTED, so each statement of an export saw what
    other clients committed meanwhile: examples added during an export were in its files but not in the store
    revision it recorded, and `status` then said "changed since export" of an export that held them (4-7 of 8
    exports under concurrent adds). A read is one snapshot on both databases now."""
    store.add_example(db, prompt="Erste?", response="Ja.")
    with store.open_store(db).read() as conn:
        before = conn.scalar(sa.select(sa.func.count()).select_from(store.examples_table))
        store.add_example(db, prompt="Zweite?", response="Auch.")  # another connection commits meanwhile
        assert conn.scalar(sa.select(sa.func.count()).select_from(store.examples_table)) == before == 1
    assert len(store.list_examples(db)) == 2


def test_listing_a_data_root_without_a_database_creates_none(settings):
    """Packaging repro: `lunatrain examples list` in any directory made `data/assistant.db` there (a read
    that made a data root), while `status`, `adapters list` and `health` create nothing."""
    for args in (["examples", "list"], ["examples", "list", "--json"], ["memory", "list"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        assert not (settings.data_dir / "assistant.db").exists(), args
    assert store.list_examples(settings) == [] and store.list_memory(settings) == []
    assert not settings.data_dir.exists()
    with pytest.raises(UsageError):  # the arguments are still checked at once
        store.list_examples(settings, limit=-1)
    store.dispose_stores()


def test_a_data_root_this_process_may_only_read_can_be_read(settings: Settings) -> None:
    """Repro: on a read-only data root (a backup mounted read-only) `status` and `examples list` failed with
    "cannot be written": SQLite's WAL needs a -shm file beside the database even to read. Such a database is
    opened read-only: reading works, a change is refused in one sentence."""
    from faults import read_only

    store.add_example(settings, prompt="Erste?", response="Ja.")
    store.dispose_stores()
    with read_only(settings.data_dir):
        if not os.statvfs(settings.data_dir).f_flag & os.ST_RDONLY:
            pytest.skip("made read-only by its modes, not mounted so (not root): a writer may still be there")
        assert [e.prompt for e in store.list_examples(settings)] == ["Erste?"]
        assert store.counts(settings)["examples"]["curated"]["approved"] == 1
        listed = CliRunner().invoke(app, ["examples", "list", "--json"])
        assert listed.exit_code == 0 and [e["prompt"] for e in json.loads(listed.output)] == ["Erste?"], listed.output
        status = CliRunner().invoke(app, ["status"])
        assert status.exit_code == 0 and "cannot" not in status.output, status.output
        r = CliRunner().invoke(app, ["examples", "add", "--prompt", "Zweite?", "--response", "Nein."])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert "cannot be written by this process" in r.output, r.output
        store.dispose_stores()
    assert [e.prompt for e in store.list_examples(settings)] == ["Erste?"]  # and writable again afterwards
    store.add_example(settings, prompt="Zweite?", response="Nein.")
    store.dispose_stores()


def test_a_database_others_may_still_write_is_never_read_as_immutable(tmp_path: Path, monkeypatch) -> None:
    """Review repro: a reader with read access only to a root another user writes opened the database as
    immutable, and went on reading the file as it was while the owner added to it (SQLite takes no locks on
    an immutable file, so a write in the middle of a read could also tear it). Immutable is for a read-only
    file system only; elsewhere plain read-only, which sees the writer's changes."""
    db = tmp_path / "assistant.db"
    sqlite3.connect(db).close()
    assert not os.statvfs(db).f_flag & os.ST_RDONLY  # the test's own folder: a writable file system
    # this process may not write the folder (as a user with read access only), but the file system may be
    monkeypatch.setattr(store.os, "access", lambda p, mode: not mode & os.W_OK)
    url = store._read_only_uri(db)
    assert "mode=ro" in url and "immutable" not in url, url


def test_deleting_content_held_only_unapproved_as_the_other_kind_leaves_a_tombstone(db: Settings) -> None:
    """Tier repro: an example whose content was also a memory item, rejected, was deleted without a tombstone
    (the other kind "still held" it), so no adapter trained on it was marked stale, prepare only warned and
    lora trained on the old export that held it. Only content the other kind holds *approved* is still
    trained on; only that spares the tombstone."""
    ex = store.add_example(db, prompt="Wie heißt mein Hund?", response="Bruno.")
    mem = store.add_memory(db, question="Wie heißt mein Hund?", answer="Bruno.", status="rejected")
    assert mem.hash == ex.hash
    assert store.delete_examples(db, [ex.id]).hashes == [ex.hash]
    assert ex.hash in store.deleted_hashes(db)
    store.set_memory_status(db, [mem.id], "approved")  # approved again: the content is in the data once more
    again = store.add_example(db, prompt="Wie heißt mein Hund?", response="Bruno.")
    assert store.deleted_hashes(db) == {}
    assert store.delete_examples(db, [again.id]).hashes == []  # the approved memory item still trains on it
    assert store.deleted_hashes(db) == {}


def _as_the_previous_release_stored(db: Settings, table: str, prompt: str, response: str) -> int:
    """A row as the release before stored it: texts as read then, under that release's hash (its trim of
    these texts: strip)."""
    import hashlib

    import sqlalchemy as sa

    old = hashlib.sha256(
        json.dumps(["", [], prompt.strip(), response.strip()], ensure_ascii=False, separators=(",", ":")).encode()
    ).hexdigest()
    if table == "examples":
        row = store.add_example(db, prompt=prompt.replace("\r", ""), response=response)
        texts = "prompt = :p, response = :r"
    else:
        row = store.add_memory(db, question=prompt.replace("\r", ""), answer=response)
        texts = "question = :p, answer = :r"
    with store.open_store(db).write() as conn:
        conn.execute(
            sa.text(f"UPDATE {table} SET {texts}, hash = :h, status = 'rejected' WHERE id = :i"),
            {"p": prompt, "r": response, "h": old, "i": row.id},
        )
    return row.id


def test_content_the_previous_release_read_otherwise_is_found_on_reimport(db: Settings, tmp_path: Path) -> None:
    """Line endings are normalized now, and text parts joined as lines. A database of the release before
    holds such records as it read them, under that hash; re-importing the same file must find them (review
    repro: each came back as a new example, approved where the stored one had been rejected: mixed line
    endings, an Alpaca input, parts, a memory item). An OpenAI record's own `system` and an Alpaca `history`,
    which it left out, make other content: both are kept (the next test)."""
    parts = [{"type": "text", "text": "Lies:"}, {"type": "text", "text": "Der Mond."}]
    cases = [
        ({"prompt": "Eins\r\nZwei\nDrei", "response": "Gut."}, "Eins\r\nZwei\nDrei", "Gut."),
        (
            {"instruction": "Fasse zusammen:", "input": "A\r\nB", "output": "Kurz."},
            "Fasse zusammen:\n\nA\r\nB",
            "Kurz.",
        ),
        (
            {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Ok."}]},
            "Lies:Der Mond.",
            "Ok.",
        ),
    ]
    for _, prompt, response in cases:
        _as_the_previous_release_stored(db, "examples", prompt, response)
    path = tmp_path / "again.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record, _, _ in cases), encoding="utf-8")
    snap = _snapshot(db)
    result = store.import_file(db, path, source="curated", status=None)
    assert (result.added, result.skipped_duplicates) == (0, len(cases))
    assert _snapshot(db) == snap
    item = _as_the_previous_release_stored(db, "memory_items", "Wie alt?\r\nGenau.", "Drei.")
    with pytest.raises(Conflict, match=f"already exists \\(id {item}\\)"):
        store.add_memory(db, question="Wie alt?\r\nGenau.", answer="Drei.")
    with pytest.raises(Conflict, match="already exists"):  # an example added by hand likewise
        store.add_example(db, prompt="Eins\r\nZwei\nDrei", response="Gut.")


@pytest.mark.parametrize(
    "variant",
    [
        {
            "system": "Du bist ein Pirat.",
            "messages": [{"role": "user", "content": "Wer?"}, {"role": "assistant", "content": "Luna."}],
        },
        {"instruction": "Wer?", "output": "Luna.", "history": [["Hallo?", "Hallo."]]},
    ],
)
def test_a_record_with_its_own_system_or_history_is_not_its_plain_twin(
    db: Settings, tmp_path: Path, variant: dict
) -> None:
    """Review repro: reading a record as the previous release did (without its `system` or `history`) gave
    it the plain twin's hash as its earlier one, so the plain record and the variant never both got in, in
    either order, in one file or two: the two personas of one exchange were one example again."""

    def pair(n: int) -> list[dict]:
        said = json.loads(json.dumps(variant).replace("Wer?", f"Wer{n}?"))
        return [{"prompt": f"Wer{n}?", "response": "Luna."}, said]

    for n, order in enumerate([pair(0), pair(1)[::-1]]):  # one file, in either order
        both = tmp_path / f"both-{n}.jsonl"
        both.write_text("".join(json.dumps(r) + "\n" for r in order), encoding="utf-8")
        assert store.import_file(db, both, source="curated", status=None).added == 2, order
    for i, record in enumerate(pair(2)):  # two files
        one = tmp_path / f"one-{i}.jsonl"
        one.write_text(json.dumps(record) + "\n", encoding="utf-8")
        assert store.import_file(db, one, source="curated", status=None).added == 1, record


def test_twins_in_one_file_find_what_the_previous_release_stored_in_either_order(db: Settings, tmp_path: Path) -> None:
    """Explore repro: a file holding a record and its CRLF twin (one example now) found the example the
    previous release stored under the CRLF hash only when the CRLF one came first; with the LF one first, the
    rejected example came back as a new approved one."""
    stored = _as_the_previous_release_stored(db, "examples", "Zwei\r\nZeilen", "Ja.")
    for order in (["Zwei\nZeilen", "Zwei\r\nZeilen"], ["Zwei\r\nZeilen", "Zwei\nZeilen"]):
        path = tmp_path / "twins.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "response": "Ja."}) + "\n" for p in order), encoding="utf-8")
        result = store.import_file(db, path, source="curated", status=None)
        assert (result.added, result.skipped_duplicates) == (0, 2), order
    assert store.get_example(db, stored).status == "rejected"


def test_memory_twins_in_one_batch_find_what_the_previous_release_stored(db: Settings) -> None:
    """Review repro: a batch of memory items holding an item and its CRLF twin kept only the first twin's
    earlier hash, so with the LF one first the item the previous release stored came back as a new one."""
    _as_the_previous_release_stored(db, "memory_items", "Wie alt?\r\nGenau.", "Drei.")
    twins = [
        {"question": q, "answer": "Drei.", "topic": None, "status": "approved", "tags": ()}
        for q in ("Wie alt?\nGenau.", "Wie alt?\r\nGenau.")
    ]
    assert store._add_memory_items(db, twins) == 0


@pytest.mark.parametrize("name", ["luna%20a", "root?x=1", "50%#off", "caf\udce9 latin-1", "ä 日本"])
def test_a_data_root_whose_name_looks_like_url_syntax_keeps_its_database_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Odd-paths repro: the data root's path went into the SQLite URL unescaped, so `luna%20a` kept its database
    in another folder `luna a` (which two roots could share) and `root?x=1` in a file `root` beside it."""
    root = tmp_path / name
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("ASSISTANT_") and v != "ASSISTANT_TEST_PG_URL"]:
        monkeypatch.delenv(var)
    settings = load_settings(home=root)
    store.add_example(settings, prompt="Hallo", response="Hi")
    assert (root / "data" / "assistant.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], list(tmp_path.iterdir())
    assert [e.prompt for e in store.list_examples(settings)] == ["Hallo"]
    store.dispose_stores()


def test_the_files_a_reader_makes_beside_the_database_stay_writable_for_their_owner(tmp_path: Path) -> None:
    """Odd-paths repro: reading a database its owner had made read-only (`chmod a-w`) left its -shm at 0444:
    SQLite makes it with the database's mode. Once the database was writable again, every write was refused
    ("cannot be written") until that file was removed, a file no sentence named."""
    import stat

    from lunatrain.fsio import writable_beside

    db = tmp_path / "assistant.db"
    db.touch(mode=0o444)
    tmp_path.chmod(0o755)
    shm = tmp_path / "assistant.db-shm"
    shm.touch(mode=0o444)
    writable_beside(db)
    assert stat.S_IMODE(shm.stat().st_mode) == 0o644
    tmp_path.chmod(0o2775)  # a folder its group shares: its group may write them too
    shm.chmod(0o444)
    writable_beside(db)
    assert stat.S_IMODE(shm.stat().st_mode) == 0o664


def test_a_data_root_too_deep_for_sqlite_says_so_and_creates_nothing(tmp_path: Path, monkeypatch) -> None:
    """Odd-paths repro: with a data root of about 490 bytes every command said "Cannot open the database …:
    unable to open database file", with the folder fine and writable, and left an empty assistant.db behind:
    SQLite opens database paths of at most about 500 bytes, far below the system's own limit."""
    from lunatrain.fsio import SQLITE_PATH_MAX

    root = tmp_path
    while len(os.fsencode(root / "data" / "assistant.db")) <= SQLITE_PATH_MAX:
        root = root / ("d" * 60)
    root.mkdir(parents=True)
    for var in [v for v in os.environ if v.startswith("ASSISTANT_") and v != "ASSISTANT_TEST_PG_URL"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ASSISTANT_HOME", str(root))
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "a", "--response", "b"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "bytes long; SQLite opens paths of at most" in r.output and "shorter ASSISTANT_HOME" in r.output, r.output
    assert not (root / "data" / "assistant.db").exists()
    store.dispose_stores()


def test_a_relative_sqlite_path_in_the_database_url_is_under_the_data_root(tmp_path: Path, monkeypatch) -> None:
    """Settings repro: ASSISTANT_DB_URL=sqlite:///assistant.db was resolved against the working directory, so one
    data root run from two directories kept two databases (and the on-demand trainer, started in the data root,
    a third); `sqlite:///~/x.db` made a folder named `~`. A relative path is under the data root, `~` is the
    home directory, as ASSISTANT_HOME reads them."""
    root, a, b, user = tmp_path / "root", tmp_path / "a", tmp_path / "b", tmp_path / "user"
    for d in (root, a, b, user):
        d.mkdir()
    monkeypatch.setenv("HOME", str(user))
    monkeypatch.setenv("ASSISTANT_HOME", str(root))
    monkeypatch.setenv("ASSISTANT_DB_URL", "sqlite:///own.db")
    monkeypatch.chdir(a)
    assert CliRunner().invoke(app, ["examples", "add", "--prompt", "Hallo", "--response", "Hi"]).exit_code == 0
    monkeypatch.chdir(b)
    listed = CliRunner().invoke(app, ["examples", "list"])
    assert listed.exit_code == 0 and "Hallo" in listed.output, listed.output
    assert (root / "own.db").is_file() and list(a.iterdir()) == [] and list(b.iterdir()) == []
    assert load_settings(db_url="sqlite:///~/x.db?timeout=5").database_url == f"sqlite:///{user}/x.db?timeout=5"
    for same in (
        "sqlite:////abs/x.db",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file:/abs/x.db?mode=ro&uri=true",
        "postgresql+psycopg://u@h/db",
    ):
        assert load_settings(db_url=same).database_url == same
    store.dispose_stores()


def test_a_database_folder_that_cannot_be_made_names_the_setting_that_placed_it(tmp_path: Path, monkeypatch) -> None:
    """Settings repro: the default database under a data root whose folder cannot be made said "check
    ASSISTANT_DB_URL", a variable the user never set: it names ASSISTANT_HOME then."""
    for var in [v for v in os.environ if v.startswith("ASSISTANT_") and v != "ASSISTANT_TEST_PG_URL"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ASSISTANT_HOME", "/proc/lunatrain-none")  # no folder can be made in /proc
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "p", "--response", "r"])
    assert r.exit_code == 2 and "check ASSISTANT_HOME" in r.output and "ASSISTANT_DB_URL" not in r.output, r.output
    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path))
    monkeypatch.setenv("ASSISTANT_DB_URL", "sqlite:////proc/lunatrain-none/assistant.db")
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "p", "--response", "r"])
    assert r.exit_code == 2 and "check ASSISTANT_DB_URL" in r.output, r.output


def test_a_process_that_walks_many_data_roots_keeps_few_databases_open(tmp_path):
    """Explore repro (in-process use): each data root opened kept its SQLite database (three files) open for
    the life of the process, a deleted root's too (its disk space never came back); with `ulimit -n 100` the
    32nd root failed with "Too many open files". The least recently used are closed beyond a few."""
    import shutil

    def open_under(folder: Path) -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if (target := os.readlink(f"/proc/self/fd/{fd}")).startswith(str(folder)):
                    found.append(target)
        return found

    bound = store._MAX_STORES
    roots = [tmp_path / f"root{i}" for i in range(3 * bound)]
    for home in roots:
        store.load_seed(load_settings(home=home))
        shutil.rmtree(home)
    still = open_under(tmp_path)
    assert len({Path(p).parent for p in still}) <= bound, still
    assert not [p for p in still if any(p.startswith(f"{r}/") for r in roots[: 2 * bound])], still
    home = tmp_path / "again"
    s = store.open_store(load_settings(home=home))
    assert store.open_store(load_settings(home=home)) is s  # the one in use stays open
    store.dispose_stores()
