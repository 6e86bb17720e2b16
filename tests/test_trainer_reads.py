"""Reading jobs when this data root's trainer is not running and something else holds its address: another
project's trainer, or a service that is no lunatrain trainer at all. A read is not a conflict: the API answers
503 (declared in its OpenAPI) and the CLI one sentence, naming who holds the address and how to start this
root's trainer on another port.

The peer at the trainer's address is played by an httpx transport (tests/peer_helpers.py: no server, no
subprocess); the real other-project trainer is in tests/test_ensure.py. Run: `.venv/bin/python -m pytest tests/test_trainer_reads.py -q`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import settings as settings_mod
from lunatrain import store
from lunatrain.api.main import create_app
from lunatrain.cli import app
from lunatrain.errors import ServiceUnavailable
from lunatrain.service import client
from lunatrain.settings import load_settings

from peer_helpers import PEERS, playing

JOB = "ftjob-" + "0" * 24
READS = [
    "/assistant/training/lora/status",
    f"/assistant/training/lora/status?jobId={JOB}",
    "/assistant/training/lora/jobs",
    f"/assistant/training/lora/jobs/{JOB}",
    f"/assistant/training/lora/jobs/{JOB}/events",
]


@pytest.fixture(params=list(PEERS))
def held(request, home, monkeypatch, dead_port) -> Iterator[tuple[settings_mod.Settings, str]]:
    """This data root's trainer is not running; its default address (were the peer not played, refused)
    answers with the peer. Yields the settings and the words that name the peer."""
    handler, words = PEERS[request.param]
    monkeypatch.setattr(settings_mod, "DEFAULT_TRAINER_URL", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setattr(client, "_shared", playing(handler))
    yield load_settings(), words
    store.dispose_stores()


def assert_says_who_and_how(message: str, settings, words: str) -> None:
    assert words in message and str(settings.home) in message, message
    assert "`lunatrain trainer --port 0`" in message, message


def test_job_reads_are_503_naming_the_holder_and_the_way_out(held):
    settings, words = held
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        spec = api.app.openapi()
        for url in READS:
            r = api.get(url)
            assert r.status_code == 503, (url, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "service_unavailable", (url, error)
            assert_says_who_and_how(error["message"], settings, words)
            path = url.split("?")[0].replace(JOB, "{jobId}")
            assert "503" in spec["paths"][path]["get"]["responses"], path


def test_client_reads_raise_service_unavailable(held):
    settings, words = held
    for read in (
        lambda: client.list_jobs(settings),
        lambda: client.get_job(settings, JOB),
        lambda: client.events(settings, JOB),
    ):
        with pytest.raises(ServiceUnavailable) as refused:
            read()
        assert_says_who_and_how(refused.value.message, settings, words)


def test_cli_job_reads_say_who_holds_the_address(held):
    settings, words = held
    for argv in (["jobs", "list"], ["jobs", "show", JOB], ["jobs", "events", JOB]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 1, (argv, r.output)
        assert r.output.startswith("error: "), (argv, r.output)
        assert_says_who_and_how(r.output.replace("\n", " "), settings, words)


def test_following_a_job_whose_trainer_stays_away_names_the_job(home, monkeypatch):
    """Repro: `lunatrain lora` following a job whose trainer was killed gave up with only "error: The trainer
    at http://127.0.0.1:33999 is not reachable (nothing accepts connections there); start it with `lunatrain trainer`." - the job id
    was gone from the screen's last lines, so the user could not look up how the job ended."""
    from lunatrain.cli import trainer as trainer_cli

    def unreachable(*_args, **_kwargs):
        raise ServiceUnavailable(
            "The trainer at http://127.0.0.1:9 is not reachable (nothing accepts connections there); start it."
        )

    monkeypatch.setattr(client, "events", unreachable)
    monkeypatch.setattr(trainer_cli.time, "sleep", lambda _s: None)  # no waiting between the tries
    with pytest.raises(ServiceUnavailable) as lost:
        trainer_cli.follow(load_settings(), JOB, unreachable_s=0.0)
    message = lost.value.message
    assert "not reachable (nothing accepts connections there)" in message, message  # the cause, as before
    assert f"`lunatrain jobs show {JOB}`" in message and f"`lunatrain jobs follow {JOB}`" in message, message


def test_following_a_job_the_trainer_settled_as_it_stopped_reports_its_outcome(home, monkeypatch, capsys):
    """Repro: `lunatrain lora` following a job when its trainer was stopped (Ctrl-C: an orderly stop, which
    settles the running job as interrupted before the trainer exits) waited, then gave up with "Stopped
    following job ...: not reachable", although the job's outcome was recorded in the trainer's database
    under this data root. The follower now reads it there: the events it had not shown, then the outcome."""
    from lunatrain.cli import trainer as trainer_cli
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobStore, jobs_db_path

    settings = load_settings()
    jobs = JobStore(jobs_db_path(settings.data_dir))
    try:
        settled, _ = jobs.create(LoraParams(epochs=1))
        jobs.add_event(settled.id, "progress", {"step": 1, "totalSteps": 4, "loss": 2.5})
        jobs.set_status(
            settled.id,
            "failed",
            message="the trainer stopped",
            error={"code": "interrupted", "message": "The trainer stopped while the job ran."},
        )
        waiting, _ = jobs.create(LoraParams(epochs=1))
        jobs.set_status(waiting.id, "queued", message="requeued after the trainer stopped")
    finally:
        jobs.close()
    # The follower only reads: a database it finds in rollback-journal mode stays so (opening it as the
    # trainer does would switch it to WAL, a write on a file the trainer may still be using).
    db = jobs_db_path(settings.data_dir)
    with contextlib.closing(sqlite3.connect(db)) as raw:
        raw.execute("PRAGMA journal_mode=DELETE")

    def unreachable(*_args, **_kwargs):
        raise ServiceUnavailable(
            "The trainer at http://127.0.0.1:9 is not reachable (nothing accepts connections there); start it."
        )

    monkeypatch.setattr(client, "events", unreachable)
    monkeypatch.setattr(client, "get_job", unreachable)
    monkeypatch.setattr(trainer_cli.time, "sleep", lambda _s: None)
    job = trainer_cli.follow(settings, settled.id, unreachable_s=60.0)  # no waiting: a settled job is over
    assert job.status == "failed" and job.error.code == "interrupted", job
    shown = capsys.readouterr()
    assert "the trainer stopped" in shown.out + shown.err, shown
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    # A job the trainer will run again (resume) is not over: the follower gives up as before, saying so.
    with pytest.raises(ServiceUnavailable) as lost:
        trainer_cli.follow(settings, waiting.id, unreachable_s=0.0)
    assert "queued" in lost.value.message and f"`lunatrain jobs follow {waiting.id}`" in lost.value.message

    # Repro: a job the database does not hold was followed for 15 s, then "once it is back, `lunatrain jobs
    # follow …` continues": a promise about a job that does not exist. It is not found, at once.
    from lunatrain.errors import NotFound

    unknown = "ftjob-000000000000000000000000"
    with pytest.raises(NotFound) as missing:
        trainer_cli.follow(settings, unknown, unreachable_s=60.0)
    assert missing.value.message == (
        f"No job {unknown} is recorded under this data root (the trainer at http://127.0.0.1:9 is not reachable "
        "(nothing accepts connections there); start it)."
    ), missing.value.message


def test_jobs_show_names_the_job_log_and_where_a_cancelled_job_stopped(home, monkeypatch):
    """Repro: `jobs show` printed a cancelled job as `ftjob-…  cancelled` and nothing more, and no command,
    record or message named data/trainer/logs/<job>.log, where a job's details are. It now says at which
    step a cancelled job stopped, and names the log when it is there."""
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobStore, job_log_path, jobs_db_path

    settings = load_settings()
    jobs = JobStore(jobs_db_path(settings.data_dir))
    try:
        job, _ = jobs.create(LoraParams())
        jobs.set_status(job.id, "running")
        jobs.set_fields(job.id, progress={"step": 3, "totalSteps": 9, "percent": 33.3})
        jobs.set_status(job.id, "cancelled")
        early, _ = jobs.create(LoraParams())
        jobs.set_status(early.id, "cancelled")
        monkeypatch.setattr(client, "get_job", lambda _s, job_id: jobs.get(job_id))
        log = job_log_path(settings.data_dir / "trainer" / "logs", job.id)
        log.parent.mkdir(parents=True)
        log.write_text("2026-12-05T10:00:00.000Z training cancelled: cancelled at step 3 of 9\n")
        r = CliRunner().invoke(app, ["jobs", "show", job.id])
        assert r.exit_code == 1, r.output
        assert r.output.splitlines() == [f"{job.id}  cancelled  at step 3 of 9", f"log: data/trainer/logs/{job.id}.log"]
        r = CliRunner().invoke(app, ["jobs", "show", early.id])
        assert r.output.splitlines() == [f"{early.id}  cancelled  before its first step"], r.output
    finally:
        jobs.close()


def test_an_unreachable_trainer_is_said_in_words_not_httpx_class_names(home, dead_port, monkeypatch):
    """Repro: "The trainer at http://127.0.0.1:5051 is not reachable (nothing accepts connections there)": httpx's class name in a
    sentence for the user (`lunatrain lora`, `jobs …`, the API's 503). How the request failed is said in words."""
    import httpx

    settings = load_settings(lora_trainer_url=f"http://127.0.0.1:{dead_port}")
    with pytest.raises(ServiceUnavailable) as refused:
        client.list_jobs(settings)
    assert refused.value.message == (
        f"The trainer at http://127.0.0.1:{dead_port} is not reachable (nothing accepts connections there); "
        "start it with `lunatrain trainer`."
    ), refused.value.message

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    monkeypatch.setattr(client, "_shared", httpx.Client(transport=httpx.MockTransport(slow)))
    with pytest.raises(ServiceUnavailable) as late:
        client.get_job(settings, JOB)
    assert "is not reachable (no answer within 10 s); start it" in late.value.message, late.value.message
    assert "Error" not in refused.value.message + late.value.message
    # A submit waits longer: a trainer just started on a busy machine (its warm worker importing torch beside
    # it) took more than 10 s to answer one in a loaded test run, and was called unreachable.
    from lunatrain.params import LoraParams

    with pytest.raises(ServiceUnavailable) as submitted:
        client.submit(settings, LoraParams(base_model="luna-tiny"))
    assert "(no answer within 30 s)" in submitted.value.message, submitted.value.message


def test_jobs_resume_starts_the_trainer_as_lora_does_and_refuses_parameters_it_cannot_use(home, monkeypatch):
    """Repro (two): `jobs resume` asked the trainer for the job before anything started it, so after an orderly
    stop (the case its own hint is given for) it failed with "not reachable; start it", where `lora --resume`
    starts the trainer on demand; and a job recorded with parameters this release refuses ended in a pydantic
    traceback. It ensures the trainer first, and such a job is one sentence, exit 2."""
    from lunatrain.cli import trainer as trainer_cli
    from lunatrain.service.jobs import Health, Job

    from helpers import recorded_job

    # after an orderly stop: the data root's job database holds the job, the trainer is away
    job_id = recorded_job(load_settings().data_dir, "failed").id
    calls: list[str] = []
    monkeypatch.setattr(trainer_cli, "ensure_trainer", lambda settings: calls.append("ensure") or Health())
    old = Job(
        id=job_id,
        status="failed",
        created_at="2026-01-01T00:00:00.000Z",
        params={"adapterName": "old", "baseModel": "luna-tiny", "minCurated": 30, "gate": True},
    )
    monkeypatch.setattr(client, "get_job", lambda settings, job_id: calls.append("get") or old)
    r = CliRunner().invoke(app, ["jobs", "resume", job_id])
    assert calls == ["ensure", "get"], calls
    assert r.exit_code == 2, (r.output, r.exception)
    said = r.output.strip()
    assert said == (
        f"error: Job {job_id} cannot be resumed by this release (Invalid parameters: minCurated: unknown parameter; "
        "gate: unknown parameter); submit it anew with `lunatrain lora`."
    ), said


def test_jobs_resume_of_a_job_the_data_root_does_not_hold_starts_no_trainer(home, monkeypatch):
    """Repro: `jobs resume job-typo` started a trainer on demand (left running in the background), then said
    "No job". The data root's job database answers first: a job it does not hold, or one that succeeded, is
    refused without a trainer."""
    from lunatrain.cli import trainer as trainer_cli

    from helpers import recorded_job

    done = recorded_job(load_settings().data_dir, "succeeded", "done")
    started: list[str] = []
    monkeypatch.setattr(trainer_cli, "ensure_trainer", lambda settings: started.append("trainer"))
    typo = CliRunner().invoke(app, ["jobs", "resume", "ftjob-typo"])
    assert typo.exit_code == 1 and "No job 'ftjob-typo'" in typo.output, typo.output
    succeeded = CliRunner().invoke(app, ["jobs", "resume", done.id])
    assert succeeded.exit_code == 2 and "nothing to resume" in succeeded.output, succeeded.output
    assert started == []
