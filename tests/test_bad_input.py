"""Bad input a careless or hostile user gives ends in one sentence and changes nothing: the command line exits
1 or 2 with one `error:` line (never a traceback), an import file is refused with the line at fault, and the
API answers 4xx. Covered here: a data root that is a file, database URLs that fail inside the driver, a
database server that does not answer, ids and list bounds beyond 64 bits, digits `int()` refuses (`²`),
text that is not valid Unicode (a lone surrogate), import files that are too deep, too large a number, a CSV
cell over the csv module's limit, a path that is not a regular file, and settings out of range.
Run: `pytest tests/test_bad_input.py -q`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_store import db  # noqa: F401 - the SQLite/PostgreSQL backend fixture
from typer.testing import CliRunner, Result

from lunatrain import store
from lunatrain.api.main import create_app
from lunatrain.cli import app
from lunatrain.errors import UsageError
from lunatrain.service.jobs import JobStore, jobs_db_path
from lunatrain.service.lock import lock_path
from lunatrain.settings import Settings, load_settings
from lunatrain.web.security import GuardMiddleware

T = "/assistant/training"


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_sentence(r: Result, code: int | tuple[int, ...] = (1, 2)) -> str:
    """The call failed with exit `code` and printed exactly one `error:` line; returns that line."""
    codes = code if isinstance(code, tuple) else (code,)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in codes, (r.exit_code, r.output)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output and "\t" not in lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time: what a failed call must leave alone."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = (Path(dirpath) / name).stat()
            out[str(Path(dirpath) / name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def seeded(settings: Settings) -> Settings:
    store.load_seed(settings)
    store.dispose_stores()  # closed: the WAL is folded into the file, so a read changes no file
    return settings


# --- the data root and the database -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["is a file", "under a file"])
@pytest.mark.parametrize(
    "command", [("examples", "list"), ("export",), ("status",), ("adapters", "repair"), ("memory", "list")]
)
def test_a_data_root_that_is_a_file_is_named_in_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, command: tuple[str, ...]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    monkeypatch.setenv("ASSISTANT_HOME", str(blocker if where == "is a file" else blocker / "home"))
    line = one_sentence(run(*command), 2)
    assert "ASSISTANT_HOME" in line and "not a directory" in line, line
    assert blocker.read_text() == "a file" and not (tmp_path / "home").exists()


def test_a_data_root_with_an_unknown_user_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASSISTANT_HOME", "~no-such-user-lunatrain/x")
    assert "ASSISTANT_HOME" in one_sentence(run("status"), 2)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://x@127.0.0.1:notaport/y",  # SQLAlchemy parses the port only when it connects
        "sqlite:///{home}/x.db?timeout=abc",
        "sqlite:///{blocker}/x.db",  # its folder would have to be created under a file
        # libpq refuses these options before connecting: the URL is wrong, not the database (was "restore it
        # from a backup", exit 1)
        "postgresql+psycopg://x@127.0.0.1:1/y?connect_timeout=abc",
        "postgresql+psycopg://x@127.0.0.1:1/y?sslmode=bogus",
        "postgresql+psycopg://x@127.0.0.1:1/y?no_such_option=1",
    ],
)
def test_database_urls_that_fail_inside_the_driver(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.setenv("ASSISTANT_DB_URL", url.format(home=home, blocker=blocker))
    before = snapshot(tmp_path)
    line = one_sentence(run("examples", "list"), 2)
    assert "database" in line and "backup" not in line, line
    assert snapshot(tmp_path) == before


def test_a_database_server_that_does_not_answer_is_not_called_damaged(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    monkeypatch.setenv("ASSISTANT_DB_URL", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    line = one_sentence(run("examples", "list"), 1)
    assert "cannot connect" in line.lower() and "ASSISTANT_DB_URL" in line, line
    assert "backup" not in line and "move it aside" not in line, line
    with TestClient(create_app(load_settings()), base_url="http://127.0.0.1") as client:
        res = client.get(f"{T}/examples")
    assert res.status_code == 503 and "\n" not in res.json()["error"]["message"], res.text


# --- ids, bounds and text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("examples", "approve", "²"),  # a digit to str.isdigit(), not to int()
        ("examples", "delete", "ex-³"),
        ("memory", "delete", "²"),
        ("examples", "approve", "99999999999999999999999"),  # beyond SQLite's 64-bit integers
        ("examples", "reject", "ex-99999999999999999999999"),
        ("examples", "list", "--limit", "99999999999999999999999"),
        ("examples", "list", "--offset", "99999999999999999999"),
        ("memory", "list", "--limit", "99999999999999999999999"),
    ],
)
def test_ids_and_bounds_that_are_no_64_bit_numbers(seeded: Settings, args: tuple[str, ...]) -> None:
    before = snapshot(seeded.home)
    one_sentence(run(*args), 2)
    assert snapshot(seeded.home) == before


def test_a_too_long_conversation_id_is_named_as_the_flag_and_the_api_name_it(seeded: Settings) -> None:
    """Repro: `examples add --conversationId <500 chars>` said "field 'conversation_id'", a name neither the
    command line nor the API uses."""
    before = snapshot(seeded.home)
    line = one_sentence(run("examples", "add", "--prompt", "p", "--response", "r", "--conversationId", "c" * 500), 2)
    assert line == "error: Invalid example: field 'conversationId': longer than 200 characters.", line
    assert snapshot(seeded.home) == before


def test_text_that_is_not_valid_unicode_is_refused_everywhere(seeded: Settings) -> None:
    before = snapshot(seeded.home)
    # A byte that is not UTF-8 in an argument reaches Python as a lone surrogate (surrogateescape).
    line = one_sentence(run("examples", "add", "--prompt", "bad\udcffbyte", "--response", "ok"), 2)
    # Explore repro: it said "is not valid Unicode text (it holds a lone surrogate)", a thing nobody typed
    assert line == (
        "error: --prompt holds the byte 0xFF, which is not UTF-8: set the terminal to UTF-8 (LANG, LC_ALL) or type "
        "the text again."
    ), line
    line = one_sentence(run("memory", "add", "--question", "Wer?", "--answer", "ok", "--tag", "caf\udce9"), 2)
    assert line.startswith("error: --tag holds the byte 0xE9, which is not UTF-8"), line
    line = one_sentence(run("memory", "add", "--question", "Wer?", "--answer", "ok\udcff"), 2)
    assert line.startswith("error: --answer holds the byte 0xFF"), line
    assert snapshot(seeded.home) == before
    counts = store.counts(seeded)
    # Over HTTP the import route takes free-form records: a JSON escape makes the lone surrogate.
    records = [
        '{"prompt": "a\\ud800", "response": "r"}',
        '{"prompt": "a", "response": "r", "tags": ["x\\udc00"]}',
        '{"prompt": "a", "response": "r", "conversation_id": "c\\ud800"}',
        '{"messages": [{"role": "system", "content": "s\\udfff"}, {"role": "user", "content": "u"},'
        ' {"role": "assistant", "content": "a"}]}',
        '{"prompt": "a", "response": "r", "rating": "\\u00b2"}',
    ]
    with TestClient(create_app(seeded), base_url="http://127.0.0.1") as client:
        for record in records:
            body = '{"records": [' + record + "]}"
            res = client.post(
                f"{T}/examples/import", content=body.encode(), headers={"content-type": "application/json"}
            )
            assert res.status_code == 422 and res.json()["error"]["code"] == "invalid_request", (record, res.text)
            # review repro: a JSON escape is no byte of a terminal's; it stays a lone surrogate
            assert "lone surrogate" in res.json()["error"]["message"] or "rating" in record, res.text
        assert client.get(f"{T}/examples").status_code == 200
        # Explore repro: a tag of blanks was stored as no tag (201, `tags: []`) where "" is refused, and the
        # command line refuses "  "
        for path, body in (
            ("memory", {"question": "Q?", "answer": "A b"}),
            ("examples", {"prompt": "p", "response": "r"}),
        ):
            res = client.post(f"{T}/{path}", json=body | {"tags": ["ok", "  "]})
            assert res.status_code == 422 and "tags.1" in res.json()["error"]["message"], res.text
    assert store.counts(seeded) == counts


# --- import files ---------------------------------------------------------------------------------------------


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("rating.csv", "prompt,response,rating\nhallo,welt,²\n".encode(), r"line 2: field 'rating': expected"),
        (
            "huge.jsonl",
            b'{"prompt": "p", "response": "r", "rating": ' + b"9" * 5000 + b"}\n",
            r"line 1: malformed JSON",
        ),
        ("deep.json", _deep(100_000), r"line 1: malformed JSON"),
        ("deep.jsonl", _deep(100_000) + b"\n", r"line 1: malformed JSON"),
        # a JSON cell of a CSV file: was a traceback
        (
            "deepcell.csv",
            b'messages\n"' + _deep(30_000) + b'"\n',
            r"line 2: field 'messages': malformed JSON in cell \(nested too deeply\)",
        ),
        (
            "longcell.csv",
            b'tags,prompt,response\n"[' + b"9" * 5000 + b']",p,r\n',
            r"line 2: field 'tags': malformed JSON in cell \(a number of over 4300 digits\)",
        ),
        ("big.csv", b"prompt,response\n" + b"x" * 200_000 + b",ok\n", r"big\.csv.*line \d+: unreadable CSV"),
        ("surrogate.jsonl", b'{"prompt": "a\\ud800", "response": "r"}\n', r"line 1: field 'prompt'.*Unicode"),
        # a column named twice: one of its cells would be dropped without a word
        ("twice.csv", b"prompt,response,prompt\na,b,c\n", r"line 1: field 'prompt': the header names it twice"),
    ],
)
def test_import_files_that_break_the_parsers(
    seeded: Settings, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    before = snapshot(seeded.home)
    r = run("examples", "import", str(path))
    line = one_sentence(r, 2)
    assert re.search(expected, line), line
    assert snapshot(seeded.home) == before


def test_import_paths_that_are_no_regular_file(seeded: Settings, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    before = snapshot(seeded.home)
    for path, says in (
        (fifo, "not a regular file"),
        (Path("/dev/zero"), "not a regular file"),  # read to the end, it never ends
        (blocker / "x.jsonl", "Not a directory"),
        (tmp_path / ("n" * 300 + ".jsonl"), "too long"),
    ):
        line = one_sentence(run("examples", "import", str(path)), 2)
        assert says in line, line
    assert snapshot(seeded.home) == before


def test_skip_bad_imports_the_good_records_and_lists_the_bad_ones(seeded: Settings, tmp_path: Path) -> None:
    """A mixed file (a few tool-call conversations, a record without an answer) could only be imported after
    cleaning it by hand: one bad record imported nothing. `--skip-bad` imports the rest and lists what it left
    out; a file with no good record is still refused, changing nothing."""
    from lunatrain import store

    path = tmp_path / "mixed.jsonl"
    good = [{"prompt": f"Frage {i}?", "response": f"Antwort {i}."} for i in range(3)]
    tool = {"messages": [{"role": "user", "content": "Wetter?"}, {"role": "tool", "content": "{}"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good[0], tool, good[1], {"prompt": "x"}, good[2]]))
    before = snapshot(seeded.home)
    refused = run("examples", "import", str(path))
    assert refused.exit_code == 2 and snapshot(seeded.home) == before, refused.output
    total = len(store.list_examples(seeded, limit=10_000))
    r = run("examples", "import", str(path), "--skip-bad")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0] == "Imported mixed.jsonl: 3 added, 0 already present (3 prompt-response); 2 bad records left out:"
    assert lines[1].startswith("  mixed.jsonl line 2: field 'messages[1]': a tool result; lunatrain trains on"), lines
    assert lines[2] == "  mixed.jsonl line 4: field 'response': missing", lines
    assert len(store.list_examples(seeded, limit=10_000)) == total + 3
    nothing_good = tmp_path / "bad.jsonl"
    nothing_good.write_text(json.dumps({"prompt": "x"}) + "\n")
    before = snapshot(seeded.home)
    assert "1 bad record" in one_sentence(run("examples", "import", str(nothing_good)), 2)
    # Repro: with --skip-bad given, the refusal still read "1 bad record(s) — …, or import with --skip-bad".
    only_tools = tmp_path / "tools.jsonl"
    only_tools.write_text(json.dumps(tool) + "\n")
    for path in (nothing_good, only_tools):
        said = one_sentence(run("examples", "import", str(path), "--skipBad"), 2)
        assert f"Cannot import {path.name}: none of its 1 record can be imported — line" in said, said
        assert "--skip-bad" not in said, said
    assert snapshot(seeded.home) == before


def test_a_file_with_many_bad_records_prints_a_bounded_list(seeded: Settings, tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(2000)))
    r = run("examples", "import", str(path))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "2000 bad records" in lines[-1], lines[-1]
    # the first problems, each on a line, then how many more there are; not 2,000 lines
    assert 2 < len(lines) <= 25, len(lines)
    assert "many.jsonl line 1: field 'response': missing" in lines[0]
    assert any("1980 more" in line for line in lines), lines


@pytest.mark.parametrize("path", [f"{T}/examples", f"{T}/lora/start", f"{T}/examples/import", f"{T}/eval-gate"])
def test_a_body_of_many_unknown_keys_gets_a_short_refusal(settings: Settings, path: str) -> None:
    """Repro: 900,000 unknown keys (a body under the 10 MiB cap) were answered with an 81 MB error that listed
    each key twice, and the API answered nothing else for 10 s while it built it. Up to MAX_KEYS keys each
    unknown one is named (the sentence the first few, the details at most a hundred); beyond, the object is
    refused as a whole. Either answer is short."""
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for keys, said in (
            (150, r"\(and 1\d\d more\)\.$"),
            (20_000, r"an object of 200\d\d keys; at most 200 are read"),
        ):
            body = '{"prompt": "p", "response": "r", ' + ", ".join(f'"k{i}": 0' for i in range(keys)) + "}"
            res = client.post(path, content=body, headers={"content-type": "application/json"})
            assert res.status_code == 422, res.text
            error = res.json()["error"]
            assert error["code"] == "invalid_request"
            assert re.search(said, error["message"]), error["message"]
            assert 1 <= len(error["details"]) <= 100
            assert len(res.content) < 16_000, len(res.content)


# --- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "command"),
    [
        ("ASSISTANT_RETAIN_JOB_DAYS", "1e10", ("gc", "--dry-run")),
        ("ASSISTANT_RETAIN_JOB_DAYS", "inf", ("gc", "--dry-run")),
        ("ASSISTANT_RETAIN_CHECKPOINT_DAYS", "1e10", ("gc", "--dry-run")),
        # was accepted: a trainer that never answers was waited for forever
        ("ASSISTANT_LORA_ENSURE_TIMEOUT", "inf", ("health", "--ensure-trainer")),
        ("ASSISTANT_LORA_ENSURE_TIMEOUT", "1e400", ("health", "--ensure-trainer")),
        ("ASSISTANT_BASE_MODEL", "", ("prepare",)),
        ("ASSISTANT_LORA_TRAINER_URL", "notaurl", ("status",)),
        ("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:99999", ("status",)),
        # settings repros: a path, query or fragment went into every request's URL, and a trainer started for
        # it listened where its own clients never asked ("held by a service that is not a lunatrain trainer")
        ("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:5051/trainer", ("status",)),
        ("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:5051?x=1", ("status",)),
        ("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:5051#f", ("status",)),
        # perms repro: the password was shown by status, health and the API, and httpx sent it as Basic auth in
        # place of the trainer's bearer token ("Missing or wrong bearer token")
        ("ASSISTANT_LORA_TRAINER_URL", "http://admin:hunter2@127.0.0.1:5051", ("status",)),
        ("ASSISTANT_LORA_TRAINER_URL", "http://admin@127.0.0.1:5051", ("status",)),
        # a plain-http trainer was started for it, and waited for until the timeout ("did not become healthy")
        ("ASSISTANT_LORA_TRAINER_URL", "https://127.0.0.1:5051", ("health", "--ensure-trainer")),
        # was read as every interface (a token set) or named an empty host in its refusal (none set)
        ("ASSISTANT_API_HOST", "", ("serve", "--port", "0")),
    ],
)
def test_settings_out_of_range_are_refused_by_every_command(
    seeded: Settings, monkeypatch: pytest.MonkeyPatch, name: str, value: str, command: tuple[str, ...]
) -> None:
    JobStore(jobs_db_path(seeded.data_dir)).close()  # retention reads the jobs' ages from it
    store_before = snapshot(seeded.home)
    monkeypatch.setenv(name, value)
    said = one_sentence(run(*command), 2)
    assert name in said and "hunter2" not in said, said
    assert snapshot(seeded.home) == store_before


def test_settings_are_read_without_surrounding_whitespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings repro: ASSISTANT_HOME=" " made a data root folder named by a space, `" 127.0.0.1"` was refused as
    "bind to 127.0.0.1", a trainer URL with a leading space was "Offline", `"luna-tiny "` an unknown base model.
    A value is read without the spaces around it (a quoted .env line, `export X= Y`), as ports and ratios were."""
    monkeypatch.chdir(tmp_path)
    s = load_settings(
        home=f"  {tmp_path}/root ",
        api_host=" 127.0.0.1 ",
        lora_trainer_url=" http://127.0.0.1:5051/ ",
        base_model="luna-tiny ",
        allowed_hosts=" localhost , 127.0.0.1 ",
    )
    assert s.home == tmp_path / "root" and s.api_host == "127.0.0.1" and s.base_model == "luna-tiny"
    assert s.lora_trainer_url == "http://127.0.0.1:5051/"
    assert load_settings(home=" ").home == tmp_path  # blank is the default, the working directory
    # review repro: only text settings were stripped; a yes/no or a choice with a stray space was refused
    monkeypatch.setenv("ASSISTANT_HUB_DOWNLOAD", "true ")
    monkeypatch.setenv("ASSISTANT_CHAT_QUANTIZE", " 4bit")
    monkeypatch.setenv("ASSISTANT_API_PORT", " 0 ")
    s = load_settings()
    assert s.hub_download is True and s.chat_quantize == "4bit" and s.api_port == 0


def test_an_allowed_host_written_with_its_port_matches_that_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Settings repro: ASSISTANT_ALLOWED_HOSTS=localhost:5050, the usual form of a Host header, matched no request
    (names are compared without the port): the dashboard at http://localhost:5050 answered 400 to everything.
    The port of an entry is dropped (the allowlist is of names, any port); `[::1]:5050` too."""
    served = load_settings(home=tmp_path, allowed_hosts="localhost:5050,[::1]:5050")
    with TestClient(create_app(served), base_url="http://127.0.0.1") as client:
        for host, status in (("localhost:5050", 200), ("localhost", 200), ("[::1]:8080", 200), ("example.com", 400)):
            res = client.get("/assistant/training/adapters", headers={"Host": host})
            assert res.status_code == status, (host, res.status_code, res.text[:200])


@pytest.mark.parametrize(
    "name", ["ASSISTANT_TRAIN_VAL_RATIO", "ASSISTANT_LORA_ENSURE_TIMEOUT", "ASSISTANT_RETAIN_JOB_DAYS"]
)
def test_a_setting_that_is_not_a_number_says_so(settings: Settings, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Repro: ASSISTANT_TRAIN_VAL_RATIO=nan was refused as "Input should be less than 1" (NaN compares false)."""
    monkeypatch.setenv(name, "nan")
    said = one_sentence(run("status"), 2)
    assert name in said and "finite number" in said, said


# --- names and values the flags take --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("adapters", "show", "luna-adapter@"), "no version after '@'"),
        (("adapters", "activate", "luna-adapter@"), "no version after '@'"),
        # was: the latest version became active, even one the eval gate had refused
        (("adapters", "activate", "luna-adapter"), "activate takes NAME@VERSION"),
        (("adapters", "rollback", "luna-adapter@v1"), "rollback takes an adapter name"),  # @v1 was ignored
        (("eval-gate", "--min-golden-pass-rate", "2"), "minGoldenPassRate:"),  # the flag's name, not min_golden_…
        (("eval-gate", "--min-golden-pass-rate", "nan"), "minGoldenPassRate: Input should be a finite number"),
        (("prepare", "--dropout", "nan"), "dropout: Input should be a finite number"),  # not "less than 1"
        (("jobs", "list", "--status", "bogus"), "Unknown job status 'bogus'"),  # refused before asking the trainer
        (("luna", "--adapter", "../x"), "Invalid adapter name"),  # not "Step eval-gate failed" (exit 1)
        (("auto", "--adapter", "a@"), "no version after '@'"),
        # a chat request for that name would reach the base model: the adapter could never be asked for
        (("lora", "--adapter-name", "luna-tiny"), "adapterName 'luna-tiny' is the name of the base model"),
        (("lora", "--local", "--adapterName=luna-tiny"), "adapterName 'luna-tiny' is the name of the base model"),
        (("luna", "--adapterName=luna-tiny"), "adapterName 'luna-tiny' is the name of the base model"),
        # the caller's mistake inside a flow step was "Step prepare failed: …; fix the examples listed …" (exit 1)
        (("luna", "--local", "--chatTemplate=nonexist"), "Unknown chatTemplate 'nonexist'; bundled templates:"),
        (("luna", "--local", "--device=cuda"), "CUDA"),
        # settings repro: said as ASSISTANT_API_HOST's mistake (serve), or taken as no flag (trainer)
        (("serve", "--host", ""), "--host is empty"),
        (("trainer", "--host", " "), "--host is empty"),
    ],
)
@pytest.mark.usefixtures("no_gpu")  # `--device=cuda` is refused on a machine without a GPU
def test_flag_values_are_refused_with_their_own_names(
    seeded: Settings, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], says: str
) -> None:
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")  # nothing listens there
    before = snapshot(seeded.home)
    line = one_sentence(run(*args), 2)
    assert says in line, line
    assert snapshot(seeded.home) == before


# --- text a user wrote, on a terminal -----------------------------------------------------------------------


def test_a_narrow_terminal_gets_the_lines_a_pipe_gets_not_a_table_without_room(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locales repro: at COLUMNS=20 rich gave the prompt column no room and the prompt went missing from `examples
    list`; every cell of `status`'s table was "…". A terminal narrower than a table needs gets the plain
    tab-separated lines, which lose nothing."""
    from lunatrain.cli import examples as examples_cli
    from lunatrain.cli import status as status_cli

    monkeypatch.setattr(examples_cli, "is_tty", lambda: True)
    monkeypatch.setattr(status_cli, "is_tty", lambda: True)
    monkeypatch.setenv("COLUMNS", "20")
    assert run("examples", "add", "--prompt", "Wie heißt mein Hund?", "--response", "Bello.").exit_code == 0
    listed = run("examples", "list")
    assert listed.exit_code == 0 and "Wie heißt mein Hund?" in listed.output and "\t" in listed.output, listed.output
    status = run("status")
    assert "curated examples\t1\t0\t0\t1" in status.output, status.output
    monkeypatch.setenv("COLUMNS", "120")  # wide enough: the table
    assert "┃" in run("examples", "list").output


def test_a_topic_with_a_line_break_or_a_tab_stays_in_its_row_and_column(settings: Settings) -> None:
    """Curation repro: `memory list` printed a topic with a newline over two lines and one with a tab as an extra
    column (the question and answer were already squeezed to one line)."""
    assert run("memory", "add", "--question", "q1", "--answer", "a1", "--topic", "Zeile1\nZeile2").exit_code == 0
    assert run("memory", "add", "--question", "q2", "--answer", "a2", "--topic", "Spalte\tx").exit_code == 0
    long = "Annas Lieblingsessen und Ernährungsgewohnheiten"  # review: not cut short, as before
    assert run("memory", "add", "--question", "q3", "--answer", "a3", "--topic", long).exit_code == 0
    listed = run("memory", "list")
    assert listed.exit_code == 0, listed.output
    rows = [line.split("\t") for line in listed.output.splitlines() if line[:1].isdigit()]
    assert [row[2] for row in rows] == ["Zeile1 Zeile2", "Spalte x", long] and {len(r) for r in rows} == {5}, rows


def test_seed_counts_one_example_in_the_singular(settings: Settings) -> None:
    """Curation repro: after one seeded example and one memory item were deleted, `examples seed` said "1
    examples added", "1 memory items added"."""
    assert run("examples", "seed").exit_code == 0
    assert run("examples", "delete", "1").exit_code == 0 and run("memory", "delete", "1").exit_code == 0
    said = run("examples", "seed").output
    assert "1 example added (" in said and "1 memory item added (" in said, said


def test_brackets_in_stored_text_show_as_written_on_a_terminal(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal the lists are rich tables, and rich reads `[...]` as markup: a stray `[/]` raised
    MarkupError (a traceback) and `[b]fett[/b]` lost its brackets. Stored text shows as it was written."""
    from lunatrain.cli import examples as examples_cli

    monkeypatch.setattr(examples_cli, "is_tty", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")  # no folding inside a cell
    assert run("examples", "add", "--prompt", "Was bedeutet [/] in Regex?", "--response", "[b]fett[/b]").exit_code == 0
    assert run("memory", "add", "--question", "Tag [/foo]?", "--answer", "[red]x[/red]").exit_code == 0
    listed = run("examples", "list")
    assert listed.exit_code == 0 and listed.exception is None, listed.output
    assert "Was bedeutet [/] in Regex?" in listed.output and "[b]fett[/b]" in listed.output, listed.output
    memory = run("memory", "list")
    assert memory.exit_code == 0 and "Tag [/foo]?" in memory.output and "[red]x[/red]" in memory.output, memory.output
    # CLI-text repro: a text ending in a backslash (a Windows path) showed it doubled, `C:\Users\Jürgen\\`
    assert run("memory", "add", "--question", "Pfad?", "--answer", "C:\\Users\\Jürgen\\").exit_code == 0
    shown = run("memory", "list").output
    assert "C:\\Users\\Jürgen\\ " in shown and "Jürgen\\\\" not in shown, shown


@pytest.mark.parametrize("terminal", [True, False])
def test_control_characters_in_stored_text_are_shown_escaped_never_sent_to_the_terminal(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """Repro: an example from a chat log holding `ESC[2J` cleared the user's screen when `examples list`
    printed it; an OSC title sequence (`ESC]0;…BEL`) lost its BEL on the way and swallowed the rows after
    it; a right-to-left override reversed what followed. Without a terminal click removed some of them, so the
    text shown was not the text stored. Control characters and bidi overrides now show escaped (`\\x1b`),
    in the lists and in `prepare --show`; the stored text is unchanged."""
    from lunatrain.cli import examples as examples_cli
    from lunatrain.cli import prepare as prepare_cli

    for module in (examples_cli, prepare_cli):
        monkeypatch.setattr(module, "is_tty", lambda: terminal)
    monkeypatch.setenv("COLUMNS", "300")
    prompt, answer = "Lösch \x1b[2J\x1b[Hden Schirm", "Titel \x1b]0;PWNED\x07 und \u202eesrever"
    assert run("examples", "add", "--prompt", prompt, "--response", answer).exit_code == 0
    assert run("memory", "add", "--question", "Wer \x1b[31mrot?", "--answer", "Ich\x9b1m.").exit_code == 0
    listed, memory = run("examples", "list"), run("memory", "list")
    for r in (listed, memory):
        assert r.exit_code == 0 and r.exception is None, r.output
        assert not any(seq in r.output for seq in ("\x1b[2J", "\x1b]0;", "\x07", "\u202e", "\x1b[31m", "\x9b")), (
            r.output
        )
    flat = listed.output.replace("\n", "")
    assert "Lösch \\x1b[2J\\x1b[Hden Schirm" in flat and "\\x1b]0;PWNED\\x07 und \\u202eesrever" in flat, flat
    assert "Wer \\x1b[31mrot?" in memory.output.replace("\n", "") and "Ich\\x9b1m." in memory.output.replace("\n", "")
    stored = store.list_examples(settings)[-1]
    assert (stored.prompt, stored.response) == (prompt, answer)

    assert run("export").exit_code == 0
    shown = run("prepare", "--show", "100", "--minCurated", "0")
    assert not any(seq in shown.output for seq in ("\x1b[2J", "\x1b]0;", "\x07", "\u202e")), shown.output
    assert "\\x1b[2J" in shown.output and "\\u202eesrever" in shown.output, shown.output


def test_json_output_escapes_what_would_act_on_the_terminal_and_parses_back_to_the_stored_text(
    settings: Settings,
) -> None:
    """Repro: `examples list --json` printed a stored U+202E (right-to-left override) and U+009B (the C1
    control sequence introducer) raw: JSON escapes only C0 controls, so on a terminal they reordered or
    swallowed what followed. Every `--json` document now writes them as `\\uXXXX`, which any JSON reader turns
    back into the stored text."""
    prompt, answer = "Lies \u202eesrever und \u2066isoliert\u2069", "Ich\x9b1m und \x7f am Ende"
    assert run("examples", "add", "--prompt", prompt, "--response", answer).exit_code == 0
    assert run("memory", "add", "--question", "Wer \u200frot?", "--answer", "Ich\x9b2J.").exit_code == 0
    listed, memory = run("examples", "list", "--json"), run("memory", "list", "--json")
    for r in (listed, memory):
        assert r.exit_code == 0 and r.exception is None, r.output
        assert not re.search("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]", r.output), ascii(r.output)
    rows = json.loads(listed.output)
    assert (rows[-1]["prompt"], rows[-1]["response"]) == (prompt, answer)
    assert "\\u202eesrever" in listed.output and "Ich\\u009b1m" in listed.output, listed.output
    items = json.loads(memory.output)
    assert (items[-1]["question"], items[-1]["answer"]) == ("Wer \u200frot?", "Ich\x9b2J.")
    # The non-ASCII text a user wrote stays readable, not escaped.
    assert run("examples", "add", "--prompt", "Grüße", "--response", "Schön").exit_code == 0
    assert "Grüße" in run("examples", "list", "--json").output


def test_a_path_named_like_markup_shows_as_written_in_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lunatrain.cli import status as status_cli

    home = tmp_path / "[bold]luna"  # rich would print it bold, without the brackets
    home.mkdir()
    monkeypatch.setenv("ASSISTANT_HOME", str(home))
    monkeypatch.chdir(home)
    monkeypatch.setattr(status_cli, "is_tty", lambda: True)
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")  # nothing listens there
    registry_file = load_settings().registry_file  # damaged: its problem sentence names its path
    registry_file.parent.mkdir(parents=True)
    registry_file.write_text("{")
    r = run("status")
    assert r.exit_code == 0 and r.exception is None, r.output
    assert f"{home}/reports" in r.output.replace("\n", ""), r.output


# --- data that is not there, for every command that reads it ------------------------------------------------


def test_an_id_of_the_other_kind_names_the_command_that_takes_it(settings: Settings) -> None:
    """Memory repro: `examples delete mem-1` (prepare's report names memory items so) answered "use a number such
    as 12 or ex-12": following it, `examples delete 1` deletes example 1, another record. It names the
    command that takes the id, and nothing changes."""
    from lunatrain import store

    store.add_example(settings, prompt="P?", response="R.")
    store.add_memory(settings, question="Q?", answer="A.")
    for args, said in (
        (("examples", "delete", "mem-1"), "'mem-1' is a memory item's id: `lunatrain memory delete mem-1` deletes it"),
        (
            ("examples", "approve", "mem-1"),
            "'mem-1' is a memory item's id: `lunatrain memory approve mem-1` approves it",
        ),
        (("memory", "reject", "ex-1"), "'ex-1' is an example's id: `lunatrain examples reject ex-1` rejects it"),
    ):
        r = run(*args)
        assert r.exit_code == 2 and said in r.output, r.output
    assert len(store.list_examples(settings)) == 1 and store.list_memory(settings)[0].status == "approved"


@pytest.mark.parametrize("exported", [False, True], ids=["no export", "empty export"])
def test_missing_training_data_is_the_same_failure_for_prepare_and_lora(settings: Settings, exported: bool) -> None:
    """No export, or an export without training samples: the command line is right, the data is not there, so
    `prepare` and `lora --local` exit 1 with the same sentence (SPEC: 1 a data check failed, 2 usage), and
    neither writes an adapter or a job."""
    if exported:
        assert run("export").exit_code == 0
    says = "has no training samples" if exported else "No export found"
    kept = ("/reports/", "/data/models/", "/data/cache/")  # prepare's report, and the caches of the base model

    def files() -> set[str]:
        return {p for p in snapshot(settings.home) if not any(k in p for k in kept)}

    before = files()
    for args in (("prepare", "--min-curated", "0"), ("lora", "--local", "--min-curated", "0")):
        r = run(*args)
        if args[0] == "prepare" and exported:  # prepare reports its checks, then one sentence on stderr
            assert r.exit_code == 1 and "empty_train" in r.output, r.output
            continue
        assert says in one_sentence(r, 1), args
    assert files() == before


@pytest.mark.usefixtures("no_gpu")  # the usage error: `--device cuda` without a GPU
def test_a_usage_error_beside_missing_data_is_exit_2_naming_both(settings: Settings) -> None:
    """The caller's mistake decides the exit code when the data is missing as well, and one sentence names both
    problems, so that one run shows everything to fix."""
    line = one_sentence(run("lora", "--local", "--min-curated", "0", "--device", "cuda"), 2)
    assert "CUDA" in line and "No export found" in line, line


# --- patterns said in words ---------------------------------------------------------------------------------


def _patterns(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return found.union(*(_patterns(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(v) for v in node))
    return set()


def test_every_pattern_of_the_api_and_the_trainer_has_its_rule_in_words(settings: Settings) -> None:
    """A refusal names the rule, never the regular expression: each pattern in the API's and the trainer's
    OpenAPI documents (fields, path and query parameters) is registered with words (errors.pattern)."""
    from lunatrain.errors import PATTERN_RULES
    from lunatrain.service.app import create_app as trainer_app

    found = _patterns(create_app(settings).openapi()) | _patterns(trainer_app(settings).openapi())
    assert len(found) >= 6, found  # names, versions, job and request ids, template names, modules, refs
    assert found - PATTERN_RULES.keys() == set()


@pytest.mark.parametrize(
    ("method", "path", "body", "says"),
    [
        ("post", f"{T}/lora/start", {"adapterName": "../x"}, "adapterName: should be ASCII letters (A-Z, a-z), digits"),
        ("post", f"{T}/lora/start", {"requestId": "a b"}, "requestId: should be 1-128 letters, digits"),
        ("post", f"{T}/lora/start", {"targetModules": ["q proj"]}, "should be module names of 1-64 letters"),
        ("post", f"{T}/lora/start", {"chatTemplate": "../t"}, "chatTemplate: should be a template name"),
        ("post", f"{T}/adapters/a..b/activate", None, "name: should be ASCII letters (A-Z, a-z), digits"),
        ("get", f"{T}/lora/jobs/-x", None, "should be a job id"),
        ("get", f"{T}/lora/defaults?profile=a..b", None, "profile: should be ASCII letters (A-Z, a-z), digits"),
        ("post", f"{T}/eval-gate", {"adapter": "a@@b"}, "adapter: should be an adapter name, optionally with @"),
    ],
)
def test_a_value_off_its_pattern_is_refused_with_the_rule_in_words(
    settings: Settings, method: str, path: str, body: dict | None, says: str
) -> None:
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:5050")
    r = client.request(method.upper(), path, json=body)
    error = r.json()["error"]
    assert r.status_code == 422 and error["code"] == "invalid_request", r.text
    assert says in error["message"], error["message"]
    assert "pattern" not in error["message"] and "[A-Za-z" not in r.text, r.text  # details too: no regex


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            b"{bad",
            "Invalid request: the body is not valid JSON (Expecting property name enclosed in double quotes at "
            "offset 1).",
        ),
        # a body cut short: was "(Unterminated string starting at).", the parser's words without their place
        (
            b'{"adapterName": "ab',
            "Invalid request: the body is not valid JSON (Unterminated string starting at offset 16).",
        ),
        # was 400 "There was an error parsing the body", no cause and no period
        (b'{"adapterName": "\xff"}', "Invalid request: the body is not valid JSON (not UTF-8 text)."),
        (b"[" * 100_000 + b"]" * 100_000, "Invalid request: the body is not valid JSON (nested too deeply)."),
        # a number of more digits than Python converts: was 400 "There was an error parsing the body"
        (
            b'{"rank": ' + b"9" * 5000 + b"}",
            "Invalid request: the body is not valid JSON (a number of over 4300 digits).",
        ),
        # a list a model could never need: refused by its length (a million names took seconds to refuse)
        (
            b'{"targetModules": [' + b'"q", ' * 65 + b'"q"]}',
            "Invalid request: targetModules: List should have at most 64",
        ),
        (b'{"targetModules": ["q proj"]}', "Invalid request: targetModules.0: should be module names of 1-64"),
        # a value neither member takes: both wishes (was only "Input should be 'all-linear'")
        (
            b'{"targetModules": "q proj"}',
            "Invalid request: targetModules: Input should be a valid list or 'all-linear'.",
        ),
        # a list: what is wrong inside it, not that it is not 'all-linear' as well
        (b'{"targetModules": ["q_proj", 5]}', "Invalid request: targetModules.1: Input should be a valid string."),
        # was pydantic's "Extra inputs are not permitted", where the command line says "unknown parameter"
        (b'{"learningRat": 0.001}', "Invalid request: learningRat: unknown field."),
    ],
)
def test_api_validation_messages_name_fields_without_pydantic_internals(
    settings: Settings, body: bytes, says: str
) -> None:
    """Was "Invalid request: 1: JSON decode error." (the character offset as a field) and
    "targetModules.list[constrained-str].0: String should match pattern '^[A-Za-z0-9_.]{1,64}$'"; the
    `details` list still carried pydantic's steps in `loc`."""
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:5050")
    r = client.post(f"{T}/lora/start", content=body, headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and message.startswith(says), message
    assert "constrained" not in r.text and "list[" not in r.text and "literal[" not in r.text, r.text


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/lora/jobs/bad%20id", "jobId: should be a job id"),
        ("/lora/jobs/bad%20id/events", "jobId: should be a job id"),
        ("/examples/0/approve", "id: Input should be greater than or equal to 1"),
        ("/memory/0/reject", "id: Input should be greater than or equal to 1"),
    ],
)
def test_path_parameters_are_named_as_the_docs_name_them(settings: Settings, path: str, says: str) -> None:
    """Was "job_id: …" and "example_id: …" / "item_id: …": the handler's names, not `{jobId}` and `{id}`."""
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:5050")
    r = client.post(f"{T}{path}") if path.endswith(("approve", "reject")) else client.get(f"{T}{path}")
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(f"Invalid request: {says}"), r.text
    assert "_id" not in r.text, r.text


def test_the_command_line_says_a_pattern_in_words(seeded: Settings) -> None:
    before = snapshot(seeded.home)
    line = one_sentence(run("lora", "--local", "--adapter-name", "../x"), 2)
    assert "adapterName: should be ASCII letters (A-Z, a-z), digits, '.', '_' or '-'" in line, line
    assert "[A-Za-z" not in line, line
    # Repro: `Bär` was refused as not "letters", though ä is one: the rule says which letters
    line = one_sentence(run("lora", "--local", "--adapter-name", "Bär"), 2)
    assert "should be ASCII letters (A-Z, a-z)" in line, line
    assert snapshot(seeded.home) == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("lora", "--bogus"), "No such option: --bogus (`"),  # then the command path, as this process is named
        # click gives this one no context: the command was "lunatrain", and a full stop stood before the bracket
        (("luna", "--ensureTrainer=true"), "does not take a value (`lunatrain luna --help` lists the options)."),
        (("lora", "--batchSize=1e3"), "Invalid value for '--batch-size' / '--batchSize'"),
        (("status", "--minCurated=-1"), "greater than or equal to 0"),
        (("examples", "list", "--rating", "abc"), "No such option: --rating"),
        # an argument is named as the usage line and the docs name it (was 'ref', 'b', 'job_id', 'ids')
        (("adapters", "activate"), "Missing argument 'NAME@VERSION'"),
        (("adapters", "diff", "luna-adapter@v1"), "Missing argument 'B'"),
        (("jobs", "show"), "Missing argument 'JOB'"),
        (("examples", "approve"), "Missing argument 'IDS'"),
        (("nonsense",), "No such command 'nonsense'"),
        (("serve", "--log-level", "bogus"), "Unknown --log-level 'bogus'"),  # before anything listens
        (("trainer", "--port", "0", "--log-file", "."), "Cannot write the log file ."),  # a directory
    ],
)
def test_the_console_script_says_parser_errors_in_one_sentence(
    seeded: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args, says: str
) -> None:
    """What the parser refuses (an unknown option, a value of the wrong type, a missing argument) is one
    sentence and exit 2 from the `lunatrain` console script, like every other failure; a server whose
    options are wrong records no address."""
    from lunatrain.cli import main

    monkeypatch.chdir(seeded.home)
    monkeypatch.setattr(sys, "argv", ["lunatrain", *args])
    before = snapshot(seeded.home)
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (exited.value, lines)
    assert says in lines[0], lines[0]
    after = snapshot(seeded.home)
    after.pop(str(lock_path(seeded)), None)  # the empty file a trainer locks the root by
    assert after == before
    assert not seeded.trainer_url_file.exists() and not seeded.api_url_file.exists()


def test_the_console_script_without_a_command_shows_the_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lunatrain.cli import main

    for args, code in (([], 2), (["jobs"], 2), (["--help"], 0)):
        monkeypatch.setattr(sys, "argv", ["lunatrain", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        out = capsys.readouterr()
        assert exited.value.code == code and "Usage: " in out.out + out.err and "Commands:" in out.out + out.err


# --- the API --------------------------------------------------------------------------------------------------


def test_dashboard_paths_the_file_system_refuses_are_404(settings: Settings) -> None:
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for path in (
            "/static/%00",
            "/static/app.js%00",
            "/static/a%00b",
            "/static/" + "a" * 256,
            "/static/" + "é" * 300,
        ):
            res = client.get(path)
            assert res.status_code == 404 and res.json()["error"]["code"] == "not_found", (path, res.text)
        # HEAD wherever GET serves a file (the request guard lets both through without a token)
        for path in ("/", "/static/app.js"):
            get, head = client.get(path), client.head(path)
            assert get.status_code == head.status_code == 200, (path, head.status_code)
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


IMPORT_REFUSED = {
    "non-text content part": {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": None}]},
            {"role": "assistant", "content": "a"},
        ]
    },
    "numeric content part": {
        "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}, {"role": "assistant", "content": "a"}]
    },
    "list in a content part": {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": ["x"]}]},
            {"role": "assistant", "content": "a"},
        ]
    },
    "prompt over the limit": {"prompt": "x" * 100_001, "response": "r"},
    "5000 tags": {"prompt": "p", "response": "r", "tags": ",".join(f"t{i}" for i in range(5000))},
    "NUL in a prompt": {"prompt": "nul\x00", "response": "r"},
    "NUL in a tag": {"prompt": "p", "response": "r", "tags": ["t\x00"]},
    "NUL in a system turn": {
        "messages": [
            {"role": "system", "content": "\x00s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    },
}


@pytest.mark.parametrize("record", IMPORT_REFUSED.values(), ids=IMPORT_REFUSED.keys())
def test_import_records_meet_the_limits_of_a_single_example(seeded: Settings, record: dict) -> None:
    counts = store.counts(seeded)
    with TestClient(create_app(seeded), base_url="http://127.0.0.1") as client:
        res = client.post(f"{T}/examples/import", json={"records": [record]})
        assert res.status_code == 422 and "records[0]" in res.json()["error"]["message"], res.text
    assert store.counts(seeded) == counts


def test_nul_is_refused_in_every_text_field(seeded: Settings) -> None:
    counts = store.counts(seeded)
    with TestClient(create_app(seeded), base_url="http://127.0.0.1") as client:
        for route, body in (
            ("examples", {"prompt": "nul\x00", "response": "r"}),
            ("examples", {"prompt": "p", "response": "r", "system": "\x00"}),
            ("examples", {"prompt": "p", "response": "r", "conversationId": "c\x00"}),
            ("memory", {"question": "q", "answer": "a", "topic": "t\x00"}),
            ("memory", {"question": "q\x00", "answer": "a"}),
        ):
            res = client.post(f"{T}/{route}", json=body)
            assert res.status_code == 422 and "NUL" in res.json()["error"]["message"], (body, res.text)
    assert store.counts(seeded) == counts


def test_nul_never_reaches_either_database(db: Settings) -> None:
    # PostgreSQL cannot store NUL in text: it would fail as a storage error (503, "restore from a backup")
    with pytest.raises(UsageError, match="NUL"):
        store.add_example(db, prompt="a\x00b", response="r")
    with pytest.raises(UsageError, match="NUL"):
        store.add_memory(db, question="q", answer="a", tags=["t\x00"])
    assert store.counts(db)["examples"]["curated"]["approved"] == 0


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        (f"{T}/export", '{"valRatio": NaN}', 422, "valRatio: Input should be a finite number"),
        (f"{T}/lora/start", '{"learningRate": Infinity}', 422, "learningRate: Input should be a finite number"),
        (
            "/v1/chat/completions",
            '{"model": "luna-tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
            400,
            "finite number",
        ),
        (
            "/v1/chat/completions",
            '{"model": "luna-tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}',
            400,
            "finite number",
        ),
    ],
)
def test_non_finite_numbers_are_said_as_such_by_the_api(settings: Settings, path, body, status, says) -> None:
    """Repro: NaN fails every bound, so the answer said "less than 1" instead of naming the real problem."""
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", [f"{T}/examples", f"{T}/memory", f"{T}/examples/import"])
def test_a_missing_body_is_said_as_such(settings: Settings, path: str) -> None:
    """Repro: POST without a body where one is required said "Invalid request: Field required." (which field?)."""
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        r = client.post(path, headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 422 and error["code"] == "invalid_request", r.text
    assert error["message"] == "Invalid request: the body is missing; send a JSON object.", r.text


@pytest.mark.parametrize("declared", ["\u00b2", "9" * 5000, "-1", "1e3", ""])
def test_a_content_length_that_is_no_number_is_400(declared: str) -> None:
    # h11 refuses these before the app; another ASGI server (or an in-process caller) may not.
    import asyncio

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the guard let the request through")

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    guard = GuardMiddleware(app, hosts={"127.0.0.1"}, token=None, max_body_bytes=1024, realm="test")
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/assistant/training/examples",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", declared.encode())],
    }
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 400, sent


def test_deactivate_takes_the_active_alias_like_activate(trained_home: Path) -> None:
    settings = load_settings()
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.post(f"{T}/adapters/luna-adapter/activate", json={"version": "v1"})
        assert res.status_code == 200 and res.json()["aliases"]["active"] == "v1", res.text
        res = client.post(f"{T}/adapters/luna-adapter/deactivate", json={"version": "active"})
        assert res.status_code == 200 and res.json()["aliases"].get("active") is None, res.text
        res = client.post(f"{T}/adapters/luna-adapter/deactivate", json={"version": "active"})
        assert res.status_code == 422, res.text  # nothing active any more


def test_the_api_refuses_an_adapter_named_like_its_base(seeded: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")  # refused before any trainer is asked
    client = TestClient(create_app(load_settings()), base_url="http://127.0.0.1:5050")

    def files() -> dict[str, tuple[int, int]]:  # SQLite's -wal/-shm come with any read
        return {p: v for p, v in snapshot(seeded.home).items() if not p.endswith(("-wal", "-shm"))}

    before = files()
    for path in ("/lora/start", "/lora/quick-start"):
        body = {"adapterName": "luna-tiny", "minCurated": 0} if path == "/lora/start" else {"adapterName": "luna-tiny"}
        r = client.post(f"{T}{path}", json=body)
        assert r.status_code == 422, (path, r.text)
        assert "adapterName 'luna-tiny' is the name of the base model" in r.json()["error"]["message"]
    assert files() == before


def test_a_usage_error_met_inside_a_flow_step_is_exit_2_with_its_own_sentence(seeded: Settings) -> None:
    """Every error inside a `luna`/`auto` step was made a failed check (exit 1) with the step's fixed advice
    ("fix, roll back or deactivate the active adapter" for a base model that is not there)."""
    r = run("luna", "--local", "--baseModel=org/not-cached")
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: Step eval-gate failed: Base model 'org/not-cached' is not in the local"), last
    assert "deactivate the active adapter" not in r.output


def test_a_postgres_url_in_the_hosts_spelling_names_the_scheme_to_use(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """postgres:// (Heroku's and many hosts' spelling) failed with "Can't load plugin: sqlalchemy.dialects:postgres"
    and no hint."""
    monkeypatch.setenv("ASSISTANT_DB_URL", "postgres://luna:secret@127.0.0.1:9/luna")
    line = one_sentence(run("examples", "list"), 2)
    assert line.endswith("use the scheme postgresql+psycopg:// instead of postgres://."), line
    assert "secret" not in line
    # PostgreSQL repro: another database, or PostgreSQL through another driver, said only "No module named
    # 'MySQLdb'" / "'psycopg2'": which URLs work is the advice
    for url in ("mysql://luna:secret@127.0.0.1/luna", "postgresql+psycopg2://luna@127.0.0.1:9/luna"):
        monkeypatch.setenv("ASSISTANT_DB_URL", url)
        line = one_sentence(run("examples", "list"), 2)
        assert line.endswith(
            "lunatrain runs on SQLite (sqlite:///PATH) and on PostgreSQL through psycopg "
            "(postgresql+psycopg://USER@HOST/DB)."
        ), line
        assert "secret" not in line


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_another_media_type_is_415_saying_so(seeded: Settings, content_type: str | None) -> None:
    """`curl -d '{…}' URL` sends form encoding: the answer was 422 "Input should be a valid dictionary or
    object to extract fields from", which says nothing about the missing header."""
    client = TestClient(create_app(seeded), base_url="http://127.0.0.1:5050")
    headers = {"Content-Type": content_type} if content_type else {}
    before = snapshot(seeded.home)
    r = client.post(f"{T}/examples", content=b'{"prompt": "a", "response": "b"}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    said_type = repr(content_type) if content_type else "none"
    assert r.json()["error"]["message"] == (
        f"Send the body as JSON with Content-Type: application/json (the request's Content-Type: {said_type})."
    )
    chat = client.post("/v1/chat/completions", content=b'{"model": "luna-tiny", "messages": []}', headers=headers)
    assert chat.status_code == 415 and chat.json()["error"]["type"] == "invalid_request_error", chat.text
    assert snapshot(seeded.home) == before
    # JSON's own media types pass (a charset, application/*+json)
    for fine in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = client.post(f"{T}/examples", content=b'{"prompt": "a", "response": "b"}', headers={"Content-Type": fine})
        assert r.status_code in (201, 409), (fine, r.text)


@pytest.mark.parametrize("path", [f"{T}/status", f"{T}/examples", "/v1/models", f"{T}/lora/defaults"])
def test_head_answers_as_get_without_a_body(settings: Settings, path: str) -> None:
    """HEAD was 405 on every API route (HTTP says a server that answers GET answers HEAD)."""
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:5050")
    got = client.get(path)
    head = client.head(path)
    assert got.status_code == 200 and head.status_code == 200, head.text
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert client.head(f"{T}/examples/import").status_code == 405  # a POST-only route stays 405


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("examples", "list", "--limit", "0"), "limit must be 1 or more (got 0)."),
        (("memory", "list", "--offset", "-1"), "offset must be 0 or more (got -1)."),
        (
            ("examples", "list", "--limit", "99999999999999999999"),
            "limit must be at most 2^62 (got 99999999999999999999).",
        ),
        # CLI repro: `jobs list --help` printed its bound as [0<=x<=4611686018427387904]
        (
            ("jobs", "list", "--offset", "4611686018427387905"),
            "--offset must be at most 2^62 (got 4611686018427387905).",
        ),
        (("jobs", "list", "--offset", "-1"), "--offset must be 0 or more (got -1)."),
    ],
)
def test_a_page_bound_out_of_range_names_the_bound_and_its_rule(seeded: Settings, args, said) -> None:
    line = one_sentence(run(*args), 2)
    assert line == f"error: {said}", line
    assert "4611686018427387904" not in line
    assert "4611686018427387904" not in run(*args[:2], "--help").output


def test_a_ratio_that_is_not_finite_is_said_so() -> None:
    """CLI repro: `export --valRatio=nan` said "must be a number, got nan" (it is one: not a finite one)."""
    line = one_sentence(run("export", "--valRatio", "nan"), 2)
    assert line == "error: The val ratio (valRatio) must be a finite number, got nan.", line


@pytest.mark.parametrize(
    "args",
    [
        ("examples", "add", "--prompt", "p", "--response", "r", "--tag", ""),
        ("memory", "add", "--question", "q", "--answer", "a", "--tag", "ok", "--tag", "  "),
    ],
)
def test_an_empty_tag_is_refused_as_the_api_refuses_it(seeded: Settings, args: tuple[str, ...]) -> None:
    """Repro: `memory add --tag ""` added the item without the tag; POST /memory answers 422 for it."""
    before = snapshot(seeded.home)
    line = one_sentence(run(*args), 2)
    assert line.startswith("error: --tag must not be empty"), line
    assert snapshot(seeded.home) == before


@pytest.mark.slow
def test_output_into_a_pipe_closed_early_ends_quietly_with_the_sigpipe_status(seeded: Settings) -> None:
    """Repro: `lunatrain examples list | head -1` ended with exit 1 (a failed check, by the README's codes) and
    no sentence. A reader that stops early is no failure of the command: it ends quietly, with the status a
    Unix tool killed by SIGPIPE has (141), as `git log | head -1` does."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | {"ASSISTANT_HOME": str(seeded.home)}
    # The reader is gone before the command writes its first line (as `head` after its lines, without a race).
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lunatrain", "examples", "list"],
            env=env,
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr.decode()) == (141, ""), (done.returncode, done.stderr)


@pytest.mark.slow
def test_a_closed_standard_output_is_one_sentence_not_a_traceback_or_lost_output(seeded: Settings) -> None:
    """Repro: with stdout closed (`lunatrain status >&-`, as some daemon wrappers leave it) `status`, `export`
    and `examples list` ended in a traceback (`'NoneType' object has no attribute 'isatty'`), and `adapters
    list` or `status --json` exited 0 with their output lost. Each says so in one sentence, exit 2, before
    doing anything; the services, which log to stderr or their log file, still start."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | {"ASSISTANT_HOME": str(seeded.home)}
    before = snapshot(seeded.home)
    for args in (["status"], ["status", "--json"], ["adapters", "list"], ["export"]):
        done = subprocess.run(
            [sys.executable, "-m", "lunatrain", *args],
            preexec_fn=lambda: os.close(1),  # the shell's `>&-`: fd 1 closed at exec
            env=env,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        err = done.stderr.decode()
        assert done.returncode == 2 and err.count("\n") == 1, (args, done.returncode, err)
        assert err.startswith("error: Standard output is closed"), (args, err)
    assert snapshot(seeded.home) == before


@pytest.mark.slow
def test_an_output_encoding_without_every_character_still_prints_every_example(seeded: Settings) -> None:
    """Repro: with PYTHONIOENCODING=latin-1 (or a legacy locale's codec) `examples list` and `examples list
    --json` ended in a UnicodeEncodeError traceback at the first emoji. The JSON escapes what the encoding
    lacks (`\\ud83c\\udf19` reads back as the moon), the table writes it as a backslash escape."""
    import subprocess
    import sys

    from lunatrain import store

    store.add_example(seeded, prompt="Wer bist du? 🌙", response="Ich bin Luna ✓ – schön!")
    store.dispose_stores()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | {
        "ASSISTANT_HOME": str(seeded.home),
        "PYTHONIOENCODING": "latin-1",
    }
    for args in (
        ["examples", "list", "--limit", "500", "--json"],
        ["examples", "list", "--limit", "500"],
        ["status", "--json"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "lunatrain", *args],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert (done.returncode, done.stderr.decode()) == (0, ""), (args, done.stderr.decode())
        if args[-1] == "--json" and args[0] == "examples":
            rows = json.loads(done.stdout.decode("latin-1"))
            assert {"Wer bist du? 🌙", "Ich bin Luna ✓ – schön!"} <= {r["prompt"] for r in rows} | {
                r["response"] for r in rows
            }
        elif args[0] == "examples":
            line = next(x for x in done.stdout.decode("latin-1").splitlines() if "Luna" in x and "\\U" in x)
            assert "Wer bist du? \\U0001f319" in line and "Ich bin Luna \\u2713 \\u2013 schön!" in line, line
        else:
            json.loads(done.stdout.decode("latin-1"))


def test_a_mistyped_setting_is_named_with_the_one_meant(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repro: ASSISTANT_API_TOKENS=secret (for ASSISTANT_API_TOKEN) left the API without a token and
    ASSISTANT_BASE_MDOEL trained the default model, without a word: unknown ASSISTANT_ names were ignored."""
    monkeypatch.setenv("ASSISTANT_BASE_MDOEL", "org/foo")
    r = run("status", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["examples"], r.output  # stdout stays one JSON document
    assert (
        "warning: ASSISTANT_BASE_MDOEL is not a lunatrain setting and is ignored (did you mean ASSISTANT_BASE_MODEL?)."
        in r.stderr
    ), r.stderr


def test_a_number_setting_set_empty_says_it_is_empty_and_how_to_get_its_default(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config repro: `export ASSISTANT_LORA_GPUS=` (an .env file's empty line) stopped every command with
    "Input should be a valid integer, unable to parse string as an integer": nothing said the value is empty,
    nor that unsetting it gives the default ("every visible GPU")."""
    monkeypatch.setenv("ASSISTANT_LORA_GPUS", "")
    r = run("status")
    assert r.exit_code == 2, r.output
    assert "ASSISTANT_LORA_GPUS is set but empty" in r.output and "`unset ASSISTANT_LORA_GPUS`" in r.output, r.output


@pytest.mark.parametrize("name", ["ASSISTANT_DATA_DIR", "ASSISTANT_DATA_ROOT", "ASSISTANT_ROOT", "ASSISTANT_DATA"])
def test_a_data_root_variable_of_another_name_points_to_assistant_home(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Guide repro: ASSISTANT_DATA_DIR=/tmp/x was answered "(did you mean ASSISTANT_DB_URL?)": the nearest spelling,
    which sets a database URL, and the data still landed in the working directory. The data root is
    ASSISTANT_HOME."""
    monkeypatch.setenv(name, "/tmp/elsewhere")
    r = run("status", "--json")
    assert r.exit_code == 0, r.output
    assert f"warning: {name} is not a lunatrain setting and is ignored (did you mean ASSISTANT_HOME?)." in r.stderr


def test_a_setting_spelled_in_lower_case_is_warned_about_too(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings repro: the environment is read without regard to case, so `assistant_home` moved the data root,
    while a mistyped `assistant_api_tokn` was ignored without the warning its capital spelling gets."""
    monkeypatch.setenv("assistant_api_tokn", "secret")
    monkeypatch.setenv("Assistant_Train_Val_Ratio", "0.2")
    r = run("status", "--json")
    assert r.exit_code == 0, r.output
    assert (
        "warning: assistant_api_tokn is not a lunatrain setting and is ignored (did you mean ASSISTANT_API_TOKEN?)"
        in (r.stderr)
    ), r.stderr
    assert "warning: Assistant_Train_Val_Ratio is read as ASSISTANT_TRAIN_VAL_RATIO; spell it in capitals" in r.stderr


def test_import_json_gives_every_bad_record_to_a_script(seeded: Settings, tmp_path: Path) -> None:
    """Repro: `--skip-bad` on a file with 30 bad records named the first 20 and "… and 10 more", with no way
    to get the rest but cleaning the file by hand. `--json` prints the result with every record left out (and
    a refused import's every problem) to stdout; the human lines stay on stderr."""
    from lunatrain import store

    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": f"Frage {i}?", "response": f"Antwort {i}."} for i in range(3)]
    rows += [{"prompt": f"p{i}"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(seeded.home)
    refused = run("examples", "import", str(path), "--json")
    assert refused.exit_code == 2 and snapshot(seeded.home) == before
    body = json.loads(refused.stdout)
    assert body["error"]["code"] == "invalid_request" and "30 bad records" in body["error"]["message"], body
    # review repro: the list was `problems` here and `error.details` in the API's 422 for the same file
    details = body["error"]["details"]
    assert len(details) == 30 and details[29] == "mixed.jsonl line 33: field 'response': missing", body
    assert set(body) == {"error"}
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ")

    r = run("examples", "import", str(path), "--skip-bad", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {k: out[k] for k in ("file", "records", "added", "duplicates", "formats")} == {
        "file": "mixed.jsonl",
        "records": 3,
        "added": 3,
        "duplicates": 0,
        "formats": {"prompt-response": 3},
    }
    assert out["storeRevision"] == store.revision(seeded)
    assert len(out["leftOut"]) == 30 and out["leftOut"][0] == "mixed.jsonl line 4: field 'response': missing"
    assert r.stderr == ""


def test_ctrl_c_in_a_command_without_its_own_handler_is_said_in_one_sentence(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Repro: Ctrl-C during `examples import` (or `export`, `merge`…) ended the command with exit 130 and not a
    word (typer turns KeyboardInterrupt into a silent exit): one sentence now says it stopped. A command that
    says for itself what became of its work (`lora` detaching from its job) gets nothing added."""
    import sys

    from lunatrain import cli, store
    from lunatrain.cli import trainer as trainer_cli

    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "import_file", interrupted)
    monkeypatch.setattr(sys, "argv", ["lunatrain", "examples", "import", str(path)])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: Interrupted (Ctrl-C) before the command finished."]

    monkeypatch.setattr(trainer_cli, "follow", interrupted)
    monkeypatch.setattr(sys, "argv", ["lunatrain", "jobs", "follow", "ftjob-abc"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    err = capsys.readouterr().err
    assert ended.value.code == 130 and "Detached; job ftjob-abc keeps running" in err, err
    assert "Interrupted (Ctrl-C)" not in err, err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_while_following_a_job_says_it_keeps_running(monkeypatch, capsys, sig: str) -> None:
    """Unattended-run repro: `timeout`, a service manager's stop (SIGTERM) or a closed terminal (SIGHUP) ended
    `luna`/`lora` while they followed their trainer job with 143/129 and not a word: the morning's log stopped
    mid-progress and never said the job kept running. They are said as Ctrl-C is, with their own status."""
    import signal
    import time

    from lunatrain import cli
    from lunatrain.cli import trainer as trainer_cli

    signum = getattr(signal, sig)

    def unhandled(*_a: object) -> None:
        raise AssertionError(f"{sig} reached the test's own handler, not the command's")

    def signalled(*_a: object, **_k: object) -> None:
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler acts at the next bytecode
            time.sleep(0.01)
        raise AssertionError(f"{sig} was not taken")

    previous = signal.signal(signum, unhandled)  # what the process had: never its default end, here
    try:
        monkeypatch.setattr(trainer_cli, "follow", signalled)
        monkeypatch.setattr(sys, "argv", ["lunatrain", "jobs", "follow", "ftjob-abc"])
        with pytest.raises(SystemExit) as ended:
            cli.main()
        assert signal.getsignal(signum) is unhandled  # given back
    finally:
        signal.signal(signum, previous)
    err = capsys.readouterr().err
    assert ended.value.code == 128 + signum, (ended.value.code, err)
    assert f"{sig}: detached; job ftjob-abc keeps running in the trainer." in err, err


# What the installed `lunatrain` script runs, with Ctrl-C arriving while the command modules import.
_CTRL_C_AT_IMPORT = """
import sys
from importlib.metadata import entry_points

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "lunatrain.cli.export":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = ["lunatrain", "status"]
(script,) = entry_points(group="console_scripts", name="lunatrain")
sys.exit(script.load()())
"""


@pytest.mark.slow
def test_ctrl_c_while_the_command_starts_is_one_sentence_not_a_traceback(settings: Settings) -> None:
    """Repro: Ctrl-C in the first half second of any command, while its modules import, printed a
    KeyboardInterrupt traceback of a dozen frames. The console script now catches it around the imports."""
    r = subprocess.run([sys.executable, "-c", _CTRL_C_AT_IMPORT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["error: Interrupted (Ctrl-C) before the command started."], r.stderr


@pytest.mark.slow
def test_a_ctrl_c_after_the_command_ended_changes_neither_its_exit_nor_its_output(home: Path) -> None:
    """Explore repro: Ctrl-C in the moment after a command finished printed "Exception ignored in atexit
    callback … KeyboardInterrupt" (the interpreter's shutdown), or made a command that had done its work and
    said so exit 130. The SIGINT here comes while the process shuts down."""
    script = (
        "import atexit, os, signal, time\n"
        # The signal is sent first; the sleep keeps the callback running while Python's handler comes to it (the
        # signal cannot come after the sleep, so no machine is too slow for this)
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n"
        "from lunatrain.cli import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | {"ASSISTANT_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", script, "examples", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "KeyboardInterrupt" not in done.stderr, (done.returncode, done.stderr)


def test_a_trainer_whose_device_probe_failed_says_why_instead_of_answering_500(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limits repro: under `ulimit -n 16` the trainer's device probe failed ("Too many open files"); every
    /health then answered 500 (KeyError 'unknown' in the memory plan) for good, and `luna` waited 60 s to say
    "The trainer did not become healthy". /health answers, degraded, with the probe's failure; a job is refused
    with that sentence (503), not a 500."""
    from lunatrain.service import warm
    from lunatrain.service.app import create_app as trainer_app

    def no_probe(self) -> dict:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(warm.WarmWorker, "start", no_probe)
    with TestClient(trainer_app(settings), base_url="http://127.0.0.1") as client:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["status"] == "degraded" and "Too many open files" in body["device"]["name"], body
        assert any("could not probe its device" in line for line in body["canTrain"]), body["canTrain"]
        for path in ("/jobs/check", "/jobs"):
            refused = client.post(path, json={"baseModel": "luna-tiny"})
            assert refused.status_code == 503, refused.text
            said = refused.json()["error"]["message"]
            assert "could not probe its device" in said and "Too many open files" in said, said
        assert client.get("/jobs").json()["data"] == []


def _probe_failing_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """WarmWorker.start fails its first time (a descriptor limit met for a moment, a driver not loaded yet at
    boot) and measures this process's device after; the returned list records each try."""
    from lunatrain.models import device_info
    from lunatrain.service import device, warm

    tries: list[str] = []

    def start(self) -> dict:
        tries.append("try")
        if len(tries) == 1:
            raise OSError(24, "Too many open files")
        return device_info()

    monkeypatch.setattr(warm.WarmWorker, "start", start)
    monkeypatch.setattr(device, "RETRY_SECONDS", 0.0)
    return tries


def test_a_trainer_whose_device_probe_failed_probes_again_for_a_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: a trainer whose device probe failed once (started at boot before its GPU's driver, or at a
    moment without free descriptors) refused every job for good: "stop it and start it again". It probes
    again before it refuses a job, and the job is taken once the device answers."""
    from lunatrain.service.app import create_app as trainer_app

    tries = _probe_failing_once(monkeypatch)
    with TestClient(trainer_app(settings), base_url="http://127.0.0.1") as client:
        checked = client.post("/jobs/check", json={"baseModel": "luna-tiny"})
        assert checked.status_code == 200, checked.text
        assert len(tries) == 2
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["device"]["type"] == "cpu", health


def test_a_job_request_waits_for_a_slow_probe_only_so_long(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review repro: a job request waited for a later device probe without a limit; a probe that hung (up to its
    300 s answer timeout) held the request, and a trainer asked to stop waited for it. The request is refused
    after a while with what is under way; the probe goes on, and a later request finds its outcome."""
    import threading

    from lunatrain.models import device_info
    from lunatrain.service import device, warm
    from lunatrain.service.app import create_app as trainer_app

    from trainer_helpers import wait_for

    tries, release = [], threading.Event()

    def start(self) -> dict:
        tries.append("try")
        if len(tries) == 1:
            raise OSError(24, "Too many open files")
        release.wait(60)
        return device_info()

    monkeypatch.setattr(warm.WarmWorker, "start", start)
    monkeypatch.setattr(device, "RETRY_SECONDS", 0.0)
    monkeypatch.setattr(device, "PROBE_WAIT_SECONDS", 0.2)
    with TestClient(trainer_app(settings), base_url="http://127.0.0.1") as client:
        refused = client.post("/jobs/check", json={"baseModel": "luna-tiny"})
        assert refused.status_code == 503 and "probing its device again" in refused.json()["error"]["message"]
        release.set()
        assert wait_for(lambda: client.get("/health").json()["status"] == "ok", timeout=60)
        assert client.post("/jobs/check", json={"baseModel": "luna-tiny"}).status_code == 200


@pytest.mark.slow  # a real warm worker, started by the second probe
def test_the_warm_worker_a_later_probe_starts_lives_on_after_the_request(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review repro: a probe that worked on a later try started the warm worker on a thread of its own (or the
    request's), and the worker dies with the thread that started it (PR_SET_PDEATHSIG): killed at once after a
    /health retry, or when the server retired the request's thread, taking a job it had forked with it."""
    from lunatrain.service import device, warm
    from lunatrain.service.app import create_app as trainer_app

    from trainer_helpers import wait_for

    real, tries = warm.WarmWorker.start, []

    def start(self) -> dict:
        tries.append("try")
        if len(tries) == 1:
            raise OSError(24, "Too many open files")
        return real(self)

    monkeypatch.setattr(warm.WarmWorker, "start", start)
    monkeypatch.setattr(device, "RETRY_SECONDS", 0.0)
    with TestClient(trainer_app(settings), base_url="http://127.0.0.1") as client:
        client.get("/health")
        assert wait_for(lambda: client.get("/health").json()["status"] == "ok", timeout=120)
        worker = client.app.state.runner.warm
        assert wait_for(lambda: not worker.alive, timeout=3) is False  # alive seconds after its request ended
        assert len(tries) == 2


def test_a_trainer_whose_device_probe_failed_probes_again_when_asked_its_health(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard and `luna` ask /health, not for a job: a probe that failed is tried again from there too
    (beside the answer, which must not wait seconds for a device probe), so the badge turns to Online."""
    from lunatrain.service.app import create_app as trainer_app

    from trainer_helpers import wait_for

    tries = _probe_failing_once(monkeypatch)
    with TestClient(trainer_app(settings), base_url="http://127.0.0.1") as client:
        assert client.get("/health").json()["status"] in ("degraded", "ok")
        assert wait_for(lambda: client.get("/health").json()["status"] == "ok", timeout=60)
        assert len(tries) == 2


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("adapters", "activate", "x@v1", "--baseModel="), "error: --baseModel is empty"),
        (("adapters", "deactivate", "x", "--baseModel", " "), "error: --baseModel is empty"),
        (("adapters", "rollback", "x", "--baseModel="), "error: --baseModel is empty"),
        (("eval-gate", "--baseModel="), "error: --baseModel is empty"),
        (("eval-gate", "--adapter="), "error: --adapter is empty"),
        (("eval-gate", "--chatTemplate="), "error: --chatTemplate is empty"),
        (("luna", "--adapter=", "--local"), "error: --adapter is empty"),
        (("luna", "--dry-run", "--adapter=../x"), "error: Invalid adapter name '../x'"),
        (("auto", "--dry-run", "--adapter=x@"), "error: "),
        (("status", "--minCurated=99999999999999999999999"), "error: --minCurated"),
    ],
)
def test_empty_or_malformed_flags_are_refused_before_anything_runs(seeded: Settings, args, said) -> None:
    """CLI repro: an empty `--baseModel=` of `adapters activate|deactivate|rollback` was blamed on
    ASSISTANT_BASE_MODEL (not set); `eval-gate` took an empty `--baseModel=`, `--adapter=` or `--chatTemplate=` as
    not given and ran the whole gate (so did `luna --adapter=` its flow); `luna --dry-run --adapter=../x` printed
    its plan with exit 0 where the run refuses the flag; `status --minCurated` took a 23-digit number into its
    JSON (the API and the flows stop at 10,000,000)."""
    before = snapshot(seeded.home)
    line = one_sentence(run(*args), 2)
    assert line.startswith(said), line
    assert "ASSISTANT_BASE_MODEL" not in line and snapshot(seeded.home) == before


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ("trainer", "--port", "0", "--logFile", "{folder}"),
            "error: Cannot write the log file {folder}: it is a folder.",
        ),
        (("trainer", "--port", "0", "--logFile="), "error: --logFile is empty"),
        (("serve", "--port", "{taken}"), "error: "),
        (("trainer", "--port", "{taken}"), "error: "),
    ],
)
def test_a_service_refused_at_its_start_leaves_a_fresh_data_root_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args, said
) -> None:
    """CLI repro: `trainer --logFile=<a folder>` made data/trainer/trainer.lock and reports/training/ in a fresh
    data root before it refused the file (and `--logFile=` was said as "the log file ."); `serve --port <a port
    in use>` made data/ and reports/training/ before it refused the port."""
    import socket

    home = tmp_path / "fresh"
    monkeypatch.setenv("ASSISTANT_HOME", str(home))
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:0")
    folder = tmp_path / "logs"
    folder.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        filled = [a.format(folder=folder, taken=port) for a in args]
        line = one_sentence(run(*filled), 2)
    assert line.startswith(said.format(folder=folder)), line
    assert not home.exists() or not any(home.iterdir()), sorted(home.rglob("*"))
