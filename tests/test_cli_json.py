"""`--json` prints one JSON document on stdout, in the shape the assistant API answers for the same read
(camelCase, the API's list and page documents); what a command says while it works goes to stderr, so
`lunatrain … --json | jq` always reads JSON.

Run: `.venv/bin/python -m pytest tests/test_cli_json.py -q`
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import store
from lunatrain.api.main import create_app
from lunatrain.api.schemas import ExampleOut
from lunatrain.cli import app
from lunatrain.errors import NotFound
from lunatrain.params import parse_run
from lunatrain.service import client as trainer_client
from lunatrain.service.jobs import Health, JobStore, data_root_id, jobs_db_path
from lunatrain.settings import Settings

from helpers import make_records, write_export

T = "/assistant/training"


@pytest.fixture
def trainer(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobStore]:
    """This data root's job store behind the trainer's read routes, in this process: the trainer client's
    requests are answered from it with the trainer's own wire models (the real trainer app would start a
    device-probing worker process: a slow test)."""
    jobs = JobStore(jobs_db_path(settings.data_dir))

    def answer(request: httpx.Request) -> httpx.Response:
        path, query = request.url.path.strip("/").split("/"), request.url.params
        try:
            if path == ["health"]:
                body = Health(data_root={"id": data_root_id(settings.home), "path": str(settings.home)}).wire()
            elif path == ["jobs"]:
                body = jobs.page(
                    limit=int(query["limit"]), offset=int(query.get("offset", 0)), status=query.get("status")
                ).wire()
            elif len(path) == 2 and path[0] == "jobs":
                body = jobs.get(path[1]).wire()
            elif len(path) == 3 and path[0] == "jobs" and path[2] == "events":
                body = jobs.events(path[1], after=int(query["after"]), limit=int(query["limit"])).wire()
            else:
                return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such route"}})
        except NotFound as err:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": err.message}})
        return httpx.Response(200, json=body)

    monkeypatch.setattr(trainer_client, "_shared", httpx.Client(transport=httpx.MockTransport(answer)))
    yield jobs
    jobs.close()


def ended_job(jobs: JobStore, adapter: str) -> str:
    """A job recorded as cancelled before it ran, with its status events."""
    job, _ = jobs.create(parse_run({"adapterName": adapter, "baseModel": "luna-tiny"})[0])
    jobs.set_status(job.id, "queued")
    jobs.set_status(job.id, "cancelled", message="cancelled before it started")
    return job.id


def stdout_json(args: list[str]) -> object:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # the whole of stdout: one document


# --- lora ----------------------------------------------------------------------------------------
FAST = [
    "--epochs",
    "1",
    "--maxSteps",
    "2",
    "--batchSize",
    "8",
    "--rank",
    "4",
    "--maxSeqLength",
    "128",
    "--minCurated=0",
]


def test_lora_local_json_prints_only_the_outcome_on_stdout(settings: Settings) -> None:
    """`lora --local --json | jq` broke: the progress lines came first on stdout. They go to stderr now."""
    write_export(settings, make_records(40))
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--no-gate", "--json"])
    assert r.exit_code == 0, r.output
    outcome = json.loads(r.stdout)  # the whole of stdout
    assert outcome["status"] == "succeeded" and outcome["adapter"]["version"] == "v1"
    assert "step 2/2" in r.stderr  # the progress is still shown, beside the document
    # without --json the progress stays where it was, before the outcome's lines
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--no-gate"])
    assert r.exit_code == 0 and "step 2/2" in r.stdout and "@v2 written to" in r.stdout, r.output
    store.dispose_stores()


# --- jobs ----------------------------------------------------------------------------------------
def test_jobs_list_json_is_the_apis_job_list(settings: Settings, trainer: JobStore) -> None:
    """`jobs list --json` printed a bare array; the API answers `{object: "list", data: [Job]}`."""
    ended_job(trainer, "first")
    ended_job(trainer, "second")
    listed = stdout_json(["jobs", "list", "--json"])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        assert listed == api.get(f"{T}/lora/jobs", params={"limit": 20}).json()
    assert listed["object"] == "list" and [j["params"]["adapterName"] for j in listed["data"]] == ["second", "first"]
    store.dispose_stores()


def test_jobs_list_pages_past_the_newest_jobs_in_the_api_and_the_cli(settings: Settings, trainer: JobStore) -> None:
    """Scale repro: `GET /lora/jobs` ignored `offset` and `jobs list` had no `--offset`, so no job older than
    the newest 500 could be listed. Both page now, and a page says whether more follow."""
    for name in ("a", "b", "c", "d", "e"):
        ended_job(trainer, name)
    listed = stdout_json(["jobs", "list", "--limit", "2", "--offset", "2", "--json"])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        assert listed == api.get(f"{T}/lora/jobs", params={"limit": 2, "offset": 2}).json()
        last = api.get(f"{T}/lora/jobs", params={"limit": 2, "offset": 4}).json()
        for bad in ({"offset": -1}, {"offset": "x"}, {"offset": 2**63}):
            r = api.get(f"{T}/lora/jobs", params=bad)
            assert r.status_code == 422, (bad, r.status_code, r.text)
    assert [j["params"]["adapterName"] for j in listed["data"]] == ["c", "b"] and listed["hasMore"] is True
    assert [j["params"]["adapterName"] for j in last["data"]] == ["a"] and last["hasMore"] is False
    r = CliRunner().invoke(app, ["jobs", "list", "--limit", "2"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2, r.output
    assert r.stderr.strip() == "2 listed; more follow: --offset 2 lists the next ones."
    r = CliRunner().invoke(app, ["jobs", "list", "--limit", "2", "--offset", "4"])
    assert r.exit_code == 0 and " a " in r.stdout and r.stderr == "", r.output
    r = CliRunner().invoke(app, ["jobs", "list", "--offset", "5"])  # review repro: said "no jobs"
    assert r.exit_code == 0 and r.stdout == "no jobs past the first 5\n", r.output
    r = CliRunner().invoke(app, ["jobs", "list", "--offset", "-1"])
    assert r.exit_code == 2 and "--offset" in r.output, r.output
    store.dispose_stores()


def test_a_trainer_from_before_paging_is_not_taken_for_an_empty_page(settings: Settings, monkeypatch) -> None:
    """Review repro: a trainer still running the code from before paging (finishing its queue after an update)
    ignored `offset` and answered the newest jobs again, without `hasMore`; the list read them as the next
    page. A page asked past the first that comes without `hasMore` is said as such."""
    from lunatrain.errors import ServiceUnavailable

    old = {"object": "list", "data": []}
    monkeypatch.setattr(
        trainer_client, "_shared", httpx.Client(transport=httpx.MockTransport(lambda _r: httpx.Response(200, json=old)))
    )
    assert trainer_client.job_page(settings, limit=5).data == []  # the first page: nothing to tell apart
    with pytest.raises(ServiceUnavailable, match="from before an update and cannot page") as refused:
        trainer_client.job_page(settings, limit=5, offset=5)
    assert "lunatrain trainer" in refused.value.message


def test_jobs_events_json_is_the_apis_event_page_also_past_the_end(settings: Settings, trainer: JobStore) -> None:
    """`jobs events --json` printed JSON Lines without `hasMore`/`lastSeq`, and nothing at all past the end;
    it prints the API's EventPage, with an empty `data` past the end, so a script can page with `--after`."""
    job_id = ended_job(trainer, "paged")
    first = stdout_json(["jobs", "events", job_id, "--limit", "2", "--json"])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        assert first == api.get(f"{T}/lora/jobs/{job_id}/events", params={"after": 0, "limit": 2}).json()
    assert first["object"] == "list" and first["hasMore"] is True and len(first["data"]) == 2
    assert first["lastSeq"] == first["data"][-1]["seq"]
    rest = stdout_json(["jobs", "events", job_id, "--after", str(first["lastSeq"]), "--json"])
    assert rest["hasMore"] is False and [e["status"] for e in rest["data"]] == ["cancelled"]
    end = rest["lastSeq"]
    past = stdout_json(["jobs", "events", job_id, "--after", str(end), "--json"])
    assert past == {"object": "list", "data": [], "hasMore": False, "lastSeq": end}
    # without --json: the lines as before, and nothing past the end
    r = CliRunner().invoke(app, ["jobs", "events", job_id, "--after", str(end)])
    assert r.exit_code == 0 and r.stdout == ""
    store.dispose_stores()


def test_jobs_events_text_says_when_more_events_follow(settings: Settings, trainer: JobStore) -> None:
    """Repro: `lunatrain jobs events JOB` on a job of 926 events printed the first 100 and stopped, exit 0,
    with nothing saying the list was cut short or how to read on."""
    job_id = ended_job(trainer, "cut")
    r = CliRunner().invoke(app, ["jobs", "events", job_id, "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2, r.stdout  # stdout stays the events, one a line
    assert f"`lunatrain jobs events {job_id} --after 2`" in r.stderr, r.stderr
    r = CliRunner().invoke(app, ["jobs", "events", job_id])  # all of them: nothing more to say
    assert r.exit_code == 0 and r.stderr == "", r.output
    store.dispose_stores()


def test_jobs_events_of_a_job_whose_events_gc_removed_says_so(settings: Settings, trainer: JobStore) -> None:
    """Repro: after `lunatrain gc`, `lunatrain jobs events JOB` of an older job printed nothing at all, exit 0,
    as if the job had never done anything."""
    from lunatrain.retention import collect

    job_id = ended_job(trainer, "collected")
    collect(settings.model_copy(update={"retain_jobs": 0}))
    r = CliRunner().invoke(app, ["jobs", "events", job_id])
    assert r.exit_code == 0 and r.stdout == "", r.output
    assert f"Job {job_id} has no events" in r.stderr and "`lunatrain gc`" in r.stderr, r.stderr
    store.dispose_stores()


@pytest.mark.parametrize("job_id", ["", "_x", "a" * 65, "x/y"])
def test_jobs_commands_refuse_a_malformed_job_id_saying_what_one_looks_like(settings: Settings, job_id: str) -> None:
    """Repro: `lunatrain jobs show ''` said only "Invalid job id ''."; `jobs show _x` went to the trainer and
    came back as "Invalid request: job_id: should be …", naming a parameter the command line does not have.
    Every one is now refused before any request, in one sentence that says what a job id looks like."""
    for argv in (["jobs", "show", job_id], ["jobs", "cancel", job_id], ["jobs", "events", job_id]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 2, (argv, r.output)
        said = r.output.replace("\n", " ")
        assert f"Invalid job id {job_id!r}: 1-64 letters, digits" in said and "job_id" not in said, (argv, said)


def test_jobs_list_with_a_status_and_nothing_in_it_names_the_status(settings: Settings, trainer: JobStore) -> None:
    """Repro: `lunatrain jobs list --status running` printed "no jobs" although the trainer had finished jobs."""
    ended_job(trainer, "done")
    r = CliRunner().invoke(app, ["jobs", "list", "--status", "running"])
    assert r.exit_code == 0 and r.stdout == "no running jobs\n", r.output
    store.dispose_stores()


# --- examples and memory -------------------------------------------------------------------------
def test_examples_and_memory_list_json_use_the_apis_field_names(settings: Settings) -> None:
    """`examples list --json` and `memory list --json` printed snake_case keys (`conversation_id`,
    `created_at`); each item is now the API's Example / MemoryItem, field for field (the list stays an array)."""
    store.add_example(settings, prompt="Hallo", response="Hallo! Ich bin Luna.", conversation_id="c9", tags=["a"])
    store.add_example(settings, prompt="Wer bist du?", response="Luna.", source="conversation")
    store.add_memory(settings, question="Wie heißt mein Hund?", answer="Bruno.", topic="family")
    examples = stdout_json(["examples", "list", "--json"])
    memory = stdout_json(["memory", "list", "--json"])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        assert examples == api.get(f"{T}/examples").json()["examples"]
        assert memory == api.get(f"{T}/memory").json()["items"]
    assert examples[0]["conversationId"] == "c9" and "createdAt" in examples[0] and "created_at" not in examples[0]
    assert memory[0]["topic"] == "family" and "updatedAt" in memory[0] and "updated_at" not in memory[0]
    store.dispose_stores()


def test_a_json_list_cut_at_its_limit_says_more_may_follow_on_stderr(settings: Settings) -> None:
    """PostgreSQL repro: `examples list --json > all.json` printed 50 of 318 examples and nothing else (the text
    listing says "more may follow" on stderr); imported elsewhere, 268 were lost without a word. The JSON
    stays the page; stderr says how to get the next one, as the text listing does."""
    for i in range(3):
        store.add_example(settings, prompt=f"Frage {i}?", response=f"Antwort {i}.")
        store.add_memory(settings, question=f"Fakt {i}?", answer=f"Ja {i}.")
    for kind in ("examples", "memory"):
        r = CliRunner().invoke(app, [kind, "list", "--json", "--limit", "2"])
        assert r.exit_code == 0 and len(json.loads(r.stdout)) == 2, r.output
        assert r.stderr == "2 listed; more may follow: --offset 2 lists the next ones.\n", r.stderr
        r = CliRunner().invoke(app, [kind, "list", "--json", "--limit", "5"])
        assert r.exit_code == 0 and len(json.loads(r.stdout)) == 3 and r.stderr == "", r.stderr
    store.dispose_stores()


def test_examples_and_memory_list_search_like_the_api(settings: Settings) -> None:
    """`examples list --search` and `memory list --search` list what the API's `search` finds (store's test: every
    field, case and Unicode forms); a blank search exits 2 saying so."""
    store.add_example(settings, prompt="Wann hat Anna Geburtstag?", response="Am 3. März.")
    store.add_example(settings, prompt="Wer bist du?", response="Luna.")
    store.add_memory(settings, question="Wie heißt mein Hund?", answer="Bruno.", topic="family")
    found = stdout_json(["examples", "list", "--search", "märz", "--json"])
    assert [e["prompt"] for e in found] == ["Wann hat Anna Geburtstag?"]
    lines = CliRunner().invoke(app, ["examples", "list", "--search", "LUNA"]).stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("2\tcurated\tapproved\tWer bist du?"), lines
    assert [m["answer"] for m in stdout_json(["memory", "list", "--search", "FAMILY", "--json"])] == ["Bruno."]
    blank = CliRunner().invoke(app, ["examples", "list", "--search", " "])
    assert blank.exit_code == 2 and "search" in blank.output and "Traceback" not in blank.output, blank.output
    store.dispose_stores()


class _Counting:
    """A stdout that keeps nothing: counts what is written and checks it is the expected JSON text."""

    def __init__(self) -> None:
        self.written = 0
        self.digest = __import__("hashlib").sha256()

    def write(self, text: str) -> int:
        self.written += len(text)
        self.digest.update(text.encode("utf-8"))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_a_listing_of_the_whole_store_is_streamed_not_held_in_memory(settings: Settings, tmp_path) -> None:
    """Repro: `examples list --limit 1000000 --json` (the natural "give me everything" for jq) built every
    example, then every wire dict, then one JSON string: about 11 bytes of memory per byte printed (2.1 GB
    for 195k examples), nothing printed until the end. The listing now streams: the most memory it holds at
    once (Python's own allocations, tracemalloc) is a small part of what it prints, and the text is
    exactly what `json.dumps(..., indent=2)` of the whole list gives (so is an empty list)."""
    import contextlib
    import hashlib
    import tracemalloc

    from typer.main import get_command

    answer = "Eine lange Antwort über den Mond. " * 60  # ~2 KB: 3,000 examples print ~7 MB of JSON
    records = [{"prompt": f"Frage {i}?", "response": f"{answer}{i}"} for i in range(3000)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    store.import_file(settings, path)
    command = get_command(app)
    for args, items in (
        (["examples", "list", "--limit", "1000000", "--json"], None),
        (["memory", "list", "--limit", "1000000", "--json"], []),
    ):
        sink = _Counting()
        tracemalloc.start()
        try:
            with contextlib.redirect_stdout(sink):
                command.main(args, standalone_mode=False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        if items is None:
            items = [ExampleOut.of(e).wire() for e in store.list_examples(settings, limit=1_000_000)]
            assert len(items) == 3000 and sink.written > 7_000_000
            assert peak < sink.written / 4, (peak, sink.written)  # was several times what it printed
        expected = json.dumps(items, ensure_ascii=False, indent=2) + "\n"
        assert sink.digest.hexdigest() == hashlib.sha256(expected.encode("utf-8")).hexdigest(), args
    lines = CliRunner().invoke(app, ["examples", "list", "--limit", "2", "--offset", "2999"]).stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("3000\tcurated\tapproved\tFrage 2999?")
    store.dispose_stores()


# --- health --------------------------------------------------------------------------------------
def answering(monkeypatch: pytest.MonkeyPatch, response: httpx.Response) -> None:
    """Whatever listens at the trainer's address answers every request with `response`."""
    client = httpx.Client(transport=httpx.MockTransport(lambda _request: response))
    monkeypatch.setattr(trainer_client, "_shared", client)


def health_json(*args: str) -> tuple[int, dict]:
    r = CliRunner().invoke(app, ["health", *args, "--json"])
    return r.exit_code, json.loads(r.stdout)  # the whole of stdout, whatever the outcome


def test_health_json_is_one_document_for_every_outcome(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`health --json` printed no JSON when the trainer's address was held by another data root's trainer
    or by something that is no trainer at all. Every outcome is now one document on stdout, in the API's
    provider-health shape (`error` says what is wrong), with the exit code as before: 0 only when this data
    root's trainer answers, 1 otherwise, 2 for a usage error."""
    other = {"id": "0123456789abcdef", "path": "/srv/other-project"}
    answering(monkeypatch, httpx.Response(200, json=Health(data_root=other).wire()))
    code, body = health_json()
    assert code == 1 and body["label"] == "Offline" and body["reachable"] is False
    assert "/srv/other-project" in body["error"] and str(settings.home) in body["error"]
    assert body["trainerUrl"] == "http://127.0.0.1:5051"

    answering(monkeypatch, httpx.Response(200, html="<html>a web server</html>"))
    code, body = health_json()
    assert code == 1 and body["label"] == "Offline" and "not a lunatrain trainer" in body["error"], body
    answering(monkeypatch, httpx.Response(404, text="Not Found"))
    code, body = health_json()
    assert code == 1 and body["label"] == "Offline" and "not a lunatrain trainer" in body["error"], body
    # A 401 names who wants the token: another service (its own realm) is no trainer of ours; our trainer
    # (its realm) wants the token this command was not given.
    refusal = {"error": {"code": "unauthorized", "message": "Missing or wrong bearer token."}}
    answering(monkeypatch, httpx.Response(401, json=refusal, headers={"WWW-Authenticate": 'Bearer realm="grafana"'}))
    code, body = health_json()
    assert code == 1 and body["label"] == "Offline" and "not a lunatrain trainer" in body["error"], body
    trainer_realm = {"WWW-Authenticate": 'Bearer realm="lunatrain-trainer"'}
    answering(monkeypatch, httpx.Response(401, json=refusal, headers=trainer_realm))
    code, body = health_json()
    assert code == 2 and "ASSISTANT_API_TOKEN" in body["error"], body
    # A challenge naming no realm (a trainer from before the realm, or a service that names none): both causes.
    answering(monkeypatch, httpx.Response(401, json=refusal, headers={"WWW-Authenticate": "Bearer"}))
    code, body = health_json()
    assert code == 2 and "ASSISTANT_API_TOKEN" in body["error"] and "another service holds" in body["error"], body

    ours = Health(data_root={"id": data_root_id(settings.home), "path": str(settings.home)})
    answering(monkeypatch, httpx.Response(200, json=ours.wire()))
    code, body = health_json()
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        assert body == api.get(f"{T}/lora/provider-health").json()  # the API's document, field for field
    assert code == 0 and body["label"] == "Online (CPU)" and body["reachable"] is True and body["error"] is None
    store.dispose_stores()


def test_health_names_the_storage_problem_of_a_degraded_trainer(settings: Settings, monkeypatch) -> None:
    """Disk-full repro: with the trainer's disk full (its health `degraded`, `storage` saying why) `lunatrain
    health` printed "Online (CPU): …" and nothing of the problem that kept every job from starting or ending."""
    full = "The disk is full: the trainer's job database /x/jobs.db cannot be written (database or disk is full)."
    ours = Health(
        data_root={"id": data_root_id(settings.home), "path": str(settings.home)}, status="degraded", storage=full
    )
    answering(monkeypatch, httpx.Response(200, json=ours.wire()))
    said = CliRunner().invoke(app, ["health"])
    assert said.exit_code == 0, said.output
    assert (
        f"Degraded: {full} No job starts, nor is a job's end recorded, until that is fixed." in said.output.splitlines()
    ), said.output


def test_offline_with_a_port_0_address_names_no_address_at_port_0(home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repro: with ASSISTANT_LORA_TRAINER_URL=http://127.0.0.1:0 and the trainer stopped, `lunatrain health`
    said "Offline: no trainer at http://127.0.0.1:0" and `jobs list` "The trainer at http://127.0.0.1:0 is not
    reachable": port 0 is no address (any free port), and the sentence did not say where the real one is kept."""
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:0")
    for argv in (["health"], ["jobs", "list"], ["health", "--json"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 1, (argv, r.output)
        said = r.output.replace("\n", " ")
        assert "at http://127.0.0.1:0" not in said and "data/trainer/trainer.url" in said, (argv, said)
        assert str(home) in said, (argv, said)


def test_health_json_offline_and_usage_errors_are_json_too(home, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:0")  # nothing answers there
    code, body = health_json()
    assert code == 1 and body["label"] == "Offline" and body["status"] == "offline"
    assert "not reachable" in body["error"] and body["trainerUrl"] == "http://127.0.0.1:0"
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", "'unbalanced")
    code, body = health_json("--ensure-trainer")
    assert code == 2 and "ASSISTANT_LORA_TRAINER_START_CMD" in body["error"] and body["label"] == "Offline"
    monkeypatch.setenv("ASSISTANT_LORA_ENSURE_TIMEOUT", "-1")  # settings that do not load
    code, body = health_json()
    assert code == 2 and "ASSISTANT_LORA_ENSURE_TIMEOUT" in body["error"], body


def test_a_listing_keeps_line_separators_inside_values_as_stored(settings: Settings) -> None:
    """Review finding: the streamed listing indented with textwrap, which breaks lines at U+2028 and U+0085
    (json.dumps leaves them unescaped), so two spaces landed inside the string values."""
    store.add_example(settings, prompt="Zeile eins\u2028Zeile zwei", response="gut\u0085so")
    [item] = stdout_json(["examples", "list", "--json"])
    assert (item["prompt"], item["response"]) == ("Zeile eins\u2028Zeile zwei", "gut\u0085so")
    store.dispose_stores()


def _strict(text: str):
    """JSON as a strict reader takes it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_json_output_and_reports_never_hold_nan_or_infinity(settings: Settings) -> None:
    """Numbers repro: a registry holding a non-finite loss (a run that diverged, a file restored by hand) made
    `adapters list --json` and `adapters show` print `NaN` and `Infinity`, which no strict JSON reader takes;
    the reports lunatrain writes could hold them too. Both say null, as the API does."""
    from lunatrain import registry
    from lunatrain.fsio import atomic_write_json, dumps_json

    assert _strict(dumps_json({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}
    # review repro: keys JSON writes itself are written as before (spelled `true`, 9 sorted before 10)
    assert dumps_json({10: "x", 9: "y"}).index('"9"') < dumps_json({10: "x", 9: "y"}).index('"10"')
    assert _strict(dumps_json({True: 1})) == {"true": 1}
    entry = {"name": "a", "version": "v1", "baseModel": {"id": "luna-tiny", "fingerprint": "f"}}
    entry["created"] = "2026-12-01T10:00:00Z"
    entry |= {"metrics": {"valLoss": float("nan"), "baseValLoss": float("inf")}, "path": "data/adapters/a/v1"}
    adapters = {"a": {"versions": [entry], "aliases": {"latest": "v1"}, "activeByBase": {}, "activations": []}}
    path = registry.registry_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "lunatrain-registry/1", "adapters": adapters}))  # restored by hand
    shown = []
    # reports explore: `adapters show --json` was "No such option", where every reading command takes it
    for args in (["adapters", "list", "--json"], ["adapters", "show", "a@v1"], ["adapters", "show", "a@v1", "--json"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        assert "NaN" not in r.stdout and "Infinity" not in r.stdout, r.stdout
        shown.append(_strict(r.stdout))
    assert shown[1] == shown[2]
    atomic_write_json(settings.home / "r.json", {"loss": float("-inf")})
    assert _strict((settings.home / "r.json").read_text()) == {"loss": None}


def test_a_listing_cut_at_its_limit_says_how_to_see_the_rest(settings: Settings) -> None:
    """CLI-text repro: `examples list` stopped at its default 50 without a word, so a piped listing read as the
    whole store. A page as long as --limit says, on stderr, where the next one starts; stdout stays the rows."""
    store.load_seed(settings)
    r = CliRunner().invoke(app, ["examples", "list", "--limit", "3", "--offset", "5"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3, r.stdout
    assert r.stderr.strip() == "3 listed; more may follow: --offset 8 lists the next ones."
    last = CliRunner().invoke(app, ["memory", "list", "--limit", "1000"])
    assert last.exit_code == 0 and last.stderr == "", last.stderr  # all of them: nothing to add
    # with --json too (stdout stays the one document): `list --json > all.json` is a page, not the store
    said = CliRunner().invoke(app, ["examples", "list", "--limit", "3", "--json"]).stderr
    assert said == "3 listed; more may follow: --offset 3 lists the next ones.\n", said
    store.dispose_stores()


def test_a_job_cancelled_while_its_gate_ran_says_its_version_was_not_activated(trainer: JobStore):
    """Jobs repro: a job cancelled once its eval gate had begun ends succeeded (its version is registered), and
    `jobs show` said "…, gate passed", which reads as active; the gate's record says it was not promoted and
    why ("not activated: the job was cancelled while the gate ran"), and so does the line now."""
    job, _ = trainer.create(parse_run({"adapterName": "gated", "baseModel": "luna-tiny"})[0])
    trainer.set_status(job.id, "queued")
    trainer.claim(job.id)
    adapter = {"name": "gated", "version": "v1", "path": "data/adapters/gated/v1", "revision": None}
    gate = {
        "status": "passed",
        "passed": True,
        "promoted": False,
        "notes": ["not activated: the job was cancelled while the gate ran"],
    }
    trainer.set_status(job.id, "succeeded", adapter=adapter, gate=gate, metrics={"valLoss": 7.5})
    r = CliRunner().invoke(app, ["jobs", "show", job.id])
    assert r.exit_code == 0, r.output
    assert "gate passed, not activated: the job was cancelled while the gate ran" in r.stdout, r.stdout
    # a promoted version's line stays as it was
    other, _ = trainer.create(parse_run({"adapterName": "promoted", "baseModel": "luna-tiny"})[0])
    trainer.set_status(other.id, "queued")
    trainer.claim(other.id)
    promoted = gate | {"promoted": True, "notes": []}
    trainer.set_status(other.id, "succeeded", adapter=adapter | {"name": "promoted"}, gate=promoted, metrics={})
    r = CliRunner().invoke(app, ["jobs", "show", other.id])
    assert r.exit_code == 0 and "gate passed" in r.stdout and "not activated" not in r.stdout, r.stdout


def test_a_cancelled_job_with_an_epoch_checkpoint_says_how_to_continue_it(settings: Settings, trainer: JobStore):
    """Resume repro: a job cancelled after an epoch keeps its checkpoint, and `jobs resume` finishes it to the
    same weights, but nothing said so: "Job … cancelled: at step 11 of 16". One cancelled before its first
    epoch ended has nothing to continue from and says nothing of it."""
    fresh = ended_job(trainer, "fresh")
    job, _ = trainer.create(parse_run({"adapterName": "later", "baseModel": "luna-tiny"})[0])
    trainer.set_status(job.id, "queued")
    trainer.claim(job.id)
    trainer.add_event(job.id, "log", {"message": "epoch 1 done, checkpoint saved", "code": "log.epoch_done_no_val"})
    from lunatrain import checkpoints, registry

    state = registry.work_root(settings, "later") / "run-1" / checkpoints.CHECKPOINTS_DIR / "epoch-001" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"jobId": job.id}))
    trainer.request_cancel(job.id)
    trainer.set_status(job.id, "cancelled", message="cancelled")
    r = CliRunner().invoke(app, ["jobs", "show", job.id])
    assert r.exit_code == 1 and f"`lunatrain jobs resume {job.id}` continues it from its last checkpoint" in r.stdout
    # review repro: once a resume had finished the run (its checkpoints went with the publish), the hint
    # stayed, and following it failed
    state.unlink()
    r = CliRunner().invoke(app, ["jobs", "show", job.id])
    assert r.exit_code == 1 and "jobs resume" not in r.stdout, r.stdout
    r = CliRunner().invoke(app, ["jobs", "show", fresh])
    assert r.exit_code == 1 and "jobs resume" not in r.stdout, r.stdout
    # review repro: every failed job's closing line ended in "..", its message's period and one more
    broken, _ = trainer.create(parse_run({"adapterName": "broken", "baseModel": "luna-tiny"})[0])
    trainer.set_status(broken.id, "queued")
    trainer.claim(broken.id)
    trainer.set_status(broken.id, "failed", error={"code": "crash", "message": "The run crashed."})
    r = CliRunner().invoke(app, ["jobs", "follow", broken.id])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == f"Job {broken.id} failed: crash: The run crashed."
    store.dispose_stores()


def test_a_failed_jobs_resume_hint_goes_with_the_last_checkpoint(settings: Settings, trainer: JobStore):
    """Repro: a failed job's error says once, for good, that `jobs resume` continues it from its checkpoint.
    After a resume had finished the run (its publish took the checkpoints) or `gc` had removed them, `jobs
    show`, `jobs list --json` and the API's job still said so: following it was refused, or trained from step
    0. A job is read with the disk now: with no checkpoint of its adapter left, the error says so instead, and
    the dashboard's `resumeJob` goes."""
    from lunatrain import checkpoints, registry
    from lunatrain.service.recovery import resume_hint

    cut = []
    for adapter, message in (
        ("crashed", "The worker was killed by SIGKILL. {hint}."),
        ("cut", "The trainer stopped while this job was running and no adapter was registered; {hint}."),
        # review repro: the job process's own sentence, with the runner's resumeJob, kept offering the resume
        ("orphan", "Stopped at step 3 of 9: the trainer's warm worker is gone; " + checkpoints.RESUME_SAID),
    ):
        job, _ = trainer.create(parse_run({"adapterName": adapter, "baseModel": "luna-tiny"})[0])
        trainer.set_status(job.id, "queued")
        trainer.claim(job.id)
        error = {"code": "child_crashed", "message": message.format(hint=resume_hint(job.id))}
        trainer.set_status(job.id, "failed", error=error | {"params": {"resumeJob": job.id, "signal": "SIGKILL"}})
        work = registry.work_root(settings, adapter) / "run-1" / checkpoints.CHECKPOINTS_DIR / "epoch-001"
        work.mkdir(parents=True)
        (work / "state.json").write_text(json.dumps({"jobId": job.id}))
        cut.append((job, work))
    for job, _ in cut:  # a checkpoint there: the hint stands
        r = CliRunner().invoke(app, ["jobs", "show", job.id])
        offered = (
            checkpoints.RESUME_SAID if job.params["adapterName"] == "orphan" else f"`lunatrain jobs resume {job.id}`"
        )
        assert r.exit_code == 1 and offered in r.stdout, r.stdout
        assert trainer_client.get_job(settings, job.id).error.params["resumeJob"] == job.id
    for job, work in cut:
        shutil.rmtree(work.parents[1])
        r = CliRunner().invoke(app, ["jobs", "show", job.id])
        assert r.exit_code == 1 and "jobs resume" not in r.stdout, r.stdout
        assert "no checkpoint of it is left" in r.stdout.lower() and ".." not in r.stdout, r.stdout
        seen = trainer_client.get_job(settings, job.id).error
        assert seen.params == {"signal": "SIGKILL"} and "jobs resume" not in seen.message, seen
        listed = json.loads(CliRunner().invoke(app, ["jobs", "list", "--json"]).stdout)["data"]
        (row,) = [j for j in listed if j["id"] == job.id]
        assert "jobs resume" not in json.dumps(row), row
    assert trainer.get(cut[0][0].id).error.params["resumeJob"]  # the record itself is as it was written
    # review repro: `status` read the job database itself and still said it
    last = json.loads(CliRunner().invoke(app, ["status", "--json"]).stdout)["lastJob"]
    assert last["jobId"] == cut[-1][0].id and "jobs resume" not in json.dumps(last["error"]), last["error"]

    # review repro: another run's checkpoint of the same adapter kept the hint of a job that started fresh,
    # whose resume then found no checkpoint of its own run and trained from step 0
    job, _ = trainer.create(parse_run({"adapterName": "crashed", "baseModel": "luna-tiny", "epochs": 2})[0])
    trainer.set_status(job.id, "queued")
    trainer.claim(job.id)
    error = {"code": "child_crashed", "message": f"The worker was killed by SIGKILL. {resume_hint(job.id)}."}
    trainer.set_status(job.id, "failed", error=error | {"params": {"resumeJob": job.id}})
    other = registry.work_root(settings, "crashed") / "run-2" / checkpoints.CHECKPOINTS_DIR / "epoch-001"
    other.mkdir(parents=True)
    (other / "state.json").write_text(json.dumps({"jobId": "ftjob-another"}))
    assert "jobs resume" not in trainer_client.get_job(settings, job.id).error.message


def test_jobs_list_lines_up_its_columns(settings: Settings, trainer: JobStore) -> None:
    """CLI-text repro: `jobs list` padded no adapter name, so every summary started in another column."""
    for name in ("a", "strict-adapter", "cancel-me"):
        ended_job(trainer, name)
    lines = CliRunner().invoke(app, ["jobs", "list"]).stdout.splitlines()
    starts = {line.index("before its first step") for line in lines}  # each job's summary
    assert len(lines) == 3 and len(starts) == 1, lines
    store.dispose_stores()


def test_a_piped_export_says_its_split_ratios_as_a_terminal_does(settings: Settings) -> None:
    """CLI-text repro: `export` piped left out the split ratios the terminal's table title shows."""
    store.load_seed(settings)
    r = CliRunner().invoke(app, ["export"])
    assert r.exit_code == 0 and ", val 0.1, test 0.0)." in r.stdout.splitlines()[-1], r.stdout
    store.dispose_stores()


@pytest.mark.parametrize(
    ("job_id", "said"),
    [
        ("ftjob-typo", "error: No job 'ftjob-typo'; `lunatrain jobs list` lists the jobs."),
        ("", "error: Invalid job id ''"),
    ],
)
def test_jobs_resume_of_a_job_no_trainer_ever_held_starts_none(settings: Settings, monkeypatch, job_id, said) -> None:
    """CLI repro: `jobs resume ftjob-typo` on a data root without a jobs database started a trainer on demand (and
    left it running) to be told there is no such job; `jobs resume ''` said "No job ''" where `jobs show` and
    `jobs cancel` say the id is invalid."""
    from lunatrain.cli import trainer as cli_trainer

    started: list[str] = []
    monkeypatch.setattr(cli_trainer, "ensure_trainer", lambda *a, **k: started.append("trainer"))
    r = CliRunner().invoke(app, ["jobs", "resume", job_id])
    assert r.exit_code in (1, 2) and r.output.startswith(said), r.output
    assert started == [] and not jobs_db_path(settings.data_dir).exists()
