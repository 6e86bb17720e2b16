"""Ensure-on-demand: concurrent callers start exactly one real trainer; a trainer that cannot start fails
clearly within the timeout, naming the log; with on-demand ensure off nothing is started.

Run: `.venv/bin/python -m pytest tests/test_ensure.py -q` (starts real trainer processes, each on a port it
binds itself and records under its data root).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lunatrain
from lunatrain.cli import app
from lunatrain.errors import ServiceUnavailable
from lunatrain.service import client, ensure
from lunatrain.service.ensure import ensure_trainer, log_path
from lunatrain.service.jobs import JobStore, jobs_db_path
from lunatrain.service.lock import lock_path, pid_path
from lunatrain.settings import load_settings

from trainer_helpers import (
    ON_DEMAND_ENV,
    bound_port,
    gone,
    kill_trainers,
    start_trainer,
    trainer_processes,
    wait_for,
)

LABELS = ("Online (CPU)", "Aktiv (CUDA)")


@pytest.fixture
def any_port(home, monkeypatch):
    """The trainer's address is "any free port on 127.0.0.1": a trainer ensure starts binds one itself and
    records it; until then nothing listens at the configured address (port 0 refuses connections)."""
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:0")
    monkeypatch.setenv("ASSISTANT_LORA_WARM_WORKER", "false")  # these trainers run no job: spare their imports
    yield
    kill_trainers(home)  # ensure starts detached trainers; never leave one behind


def test_lunatrain_trainer_refuses_an_https_address_as_the_on_demand_start_does(home, monkeypatch):
    """Config repro: with ASSISTANT_LORA_TRAINER_URL=https://…, `lunatrain trainer` served plain http on that
    port, and status and health then said "Offline …; run `lunatrain trainer`": the command already running.
    The on-demand start refuses such an address; the command does too, in the same sentence, and starts
    nothing."""
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "https://127.0.0.1:20517")
    r = CliRunner().invoke(app, ["trainer"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        "error: ASSISTANT_LORA_TRAINER_URL is https://127.0.0.1:20517, but `lunatrain trainer` serves plain http: "
        "use http://HOST:PORT, or set ASSISTANT_LORA_TRAINER_START_CMD to start a trainer behind TLS there."
    ], r.output
    assert not (home / "data" / "trainer" / "trainer.url").exists()


@pytest.mark.slow
def test_two_concurrent_callers_start_one_trainer(home, any_port):
    settings = load_settings()
    # One caller is this process (a thread), the other a separate CLI process: the lock works across both.
    cli = subprocess.Popen(
        [sys.executable, "-c", "from lunatrain.cli import main; main()", "health", "--ensure-trainer"],
        cwd=home,
        env=dict(os.environ) | ON_DEMAND_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_trainer(settings, timeout=300))) for _ in range(2)]
    for t in threads:
        t.start()
    out, _ = cli.communicate(timeout=330)  # a cold start on a loaded machine: see ON_DEMAND_ENV
    for t in threads:
        t.join(timeout=330)

    assert cli.returncode == 0, out
    assert any(label in out for label in LABELS), out
    assert len(results) == 2 and all(h.status == "ok" for h in results)
    procs = trainer_processes(home)
    assert len(procs) == 1, [p.info["cmdline"] for p in procs]
    assert procs[0].info["cmdline"][-4:-2] == ["--port", "0"]  # binds a port itself, none picked for it
    # it bound a port of its own and recorded it; every caller got the health of that trainer
    recorded = settings.trainer_url_file.read_text().strip()
    assert recorded.startswith("http://127.0.0.1:") and not recorded.endswith(":0")
    assert client.base_url(settings) == recorded and client.health(settings).data_root.path == str(home.resolve())
    assert int(pid_path(settings).read_text()) == procs[0].pid
    assert log_path(settings).read_text().count("starting trainer") == 1  # one start, not one per caller
    # A later call finds it healthy and starts nothing.
    ensure_trainer(settings, timeout=10)
    assert [p.pid for p in trainer_processes(home)] == [procs[0].pid]


def test_a_start_command_of_the_users_imports_what_lies_beside_it(home, any_port, monkeypatch, tmp_path):
    """Review repro: our processes start with PYTHONSAFEPATH=1 (a module in the data root must not shadow the
    standard library), and a user's ASSISTANT_LORA_TRAINER_START_CMD got it too: `python /opt/x/start.py`
    could no longer import the module beside it and died with ModuleNotFoundError. Its Python is its own."""
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "helper.py").write_text("WORD = 'the module beside it'\n")
    (tool / "start.py").write_text("import sys\nimport helper\nprint(helper.WORD)\nsys.exit(3)\n")
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", shlex.join([sys.executable, str(tool / "start.py")]))
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    settings = load_settings()
    with pytest.raises(ServiceUnavailable, match=r"exited while starting \(status 3\)"):
        ensure_trainer(settings, timeout=60)
    assert "the module beside it" in log_path(settings).read_text()


@pytest.mark.parametrize("token", ["s3cret-token-4711", "Qz9'Wv7 Kp3"])
def test_the_token_in_a_start_command_is_not_written_to_the_log(home, any_port, monkeypatch, token):
    """Repro: ASSISTANT_LORA_TRAINER_START_CMD was written to trainer.log as it stands, the API token in it
    too (`ssh gpu-box env ASSISTANT_API_TOKEN=… lunatrain trainer`): the log is what users paste into issues.
    Perms repro: a token with a quote or a space was quoted apart in the command shown, and written whole."""
    monkeypatch.setenv("ASSISTANT_API_TOKEN", token)
    cmd = shlex.join([sys.executable, "-c", "import sys; sys.exit(3)", f"ASSISTANT_API_TOKEN={token}"])
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", cmd)
    settings = load_settings()
    with pytest.raises(ServiceUnavailable, match=r"exited while starting \(status 3\)") as info:
        ensure_trainer(settings, timeout=60)
    said = log_path(settings).read_text()
    assert "starting trainer: " in said and "ASSISTANT_API_TOKEN=***" in said, said
    for part in (token, *token.split("'"), *token.split(" ")):  # nor a piece of it, quoted apart
        assert part not in said and part not in info.value.message, part


def test_a_trainer_that_refuses_to_start_is_said_in_its_own_sentence(home, any_port, monkeypatch):
    """Odd-paths repro: a trainer that could not open its job database said why in one sentence (in its log),
    but `lora` said only "The trainer exited while starting (status 1); see … for why."."""
    said = "The trainer's job database data/trainer/jobs.db is not a file; move it aside and start again."
    cmd = shlex.join([sys.executable, "-c", f"import sys; print('starting'); sys.exit({'error: ' + said!r})"])
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", cmd)
    with pytest.raises(ServiceUnavailable) as info:
        ensure_trainer(load_settings(), timeout=60)
    assert info.value.message == (
        f"The trainer exited while starting (status 1): {said[:-1]}; see reports/training/trainer.log."
    ), info.value.message


def test_start_command_that_exits_fails_fast_naming_the_log(home, any_port, monkeypatch):
    cmd = shlex.join([sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)"])
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", cmd)
    settings = load_settings()
    old = "an earlier trainer's long log\n" * 10
    log_path(settings).parent.mkdir(parents=True)
    log_path(settings).write_text(old)
    monkeypatch.setattr(ensure, "LOG_KEEP_BYTES", len(old) - 1)  # over the limit: moved aside at this start
    with pytest.raises(ServiceUnavailable) as info:
        ensure_trainer(settings, timeout=60)
    assert "exited while starting (status 3)" in info.value.message
    assert "reports/training/trainer.log" in info.value.message
    assert "no GPU here" in log_path(settings).read_text()
    assert old not in log_path(settings).read_text()
    assert log_path(settings).with_name("trainer.log.1").read_text() == old
    # Repro: reports/training/trainer.pid kept naming the process that had exited, so `kill $(cat …)` could
    # hit whatever reused that pid; a start that failed leaves no pid file behind.
    assert not pid_path(settings).exists()
    # Repro: a pid file copied with the data root (`cp -a`) names the other root's trainer, alive; a failed
    # start here wrote that pid back, so `kill $(cat …)` in the copy stopped the other root's trainer. A
    # process that holds no trainer lock of this data root gets nothing back.
    pid_path(settings).write_text(f"{os.getpid()}\n")
    with pytest.raises(ServiceUnavailable):
        ensure_trainer(settings, timeout=60)
    assert not pid_path(settings).exists()
    # A start that failed while this data root's trainer runs (it did not answer in time, and the new one
    # found the data root taken: it holds the root's lock) gives that trainer its pid file back.
    lock = lock_path(settings)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid_path(settings).write_text(f"{os.getpid()}\n")
        with pytest.raises(ServiceUnavailable):
            ensure_trainer(settings, timeout=60)
        assert pid_path(settings).read_text() == f"{os.getpid()}\n"


@pytest.mark.slow
def test_trainer_that_never_gets_healthy_times_out_and_is_stopped(home, any_port, monkeypatch):
    cmd = shlex.join([sys.executable, "-c", "import time; time.sleep(300)", "never-healthy-marker"])
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", cmd)
    settings = load_settings()
    procs = []
    real_start = ensure.start_trainer
    monkeypatch.setattr(ensure, "start_trainer", lambda *a, **k: procs.append(real_start(*a, **k)) or procs[-1])
    with pytest.raises(ServiceUnavailable) as info:
        # 3 s: time enough to reach the start even on a loaded machine (the deadline counts from the call);
        # the command never answers, so the test waits all of it
        ensure_trainer(settings, timeout=3)
    assert "did not become healthy" in info.value.message and "within 3s" in info.value.message
    assert "reports/training/trainer.log" in info.value.message
    [started] = [p.pid for p in procs]
    assert wait_for(lambda: gone(started), 10)  # the half-started process is not left behind
    assert not pid_path(settings).exists()  # nor its pid file


def test_on_demand_off_starts_nothing(home, any_port, monkeypatch):
    monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", "false")
    settings = load_settings()
    with pytest.raises(ServiceUnavailable, match="ASSISTANT_LORA_ENSURE_ON_DEMAND=false"):
        ensure_trainer(settings, timeout=5)
    assert not log_path(settings).exists() and trainer_processes(home) == []


def test_on_demand_off_starts_nothing_when_another_data_root_holds_the_address(home, monkeypatch):
    """Repro: with ASSISTANT_LORA_ENSURE_ON_DEMAND=false and the default address held by another project's
    trainer, POST /lora/start answered 202 after starting a trainer of this data root on a free port."""
    from fastapi.testclient import TestClient

    from lunatrain import store
    from lunatrain.api.main import create_app
    from lunatrain.service.jobs import DataRootView, Health

    other = home.parent / "other-project"
    monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", "false")
    monkeypatch.delenv("ASSISTANT_LORA_TRAINER_URL", raising=False)  # the default address, not one chosen
    foreign = Health(data_root=DataRootView(id="0" * 16, path=str(other)))
    monkeypatch.setattr(client, "probe", lambda settings, timeout=3.0: foreign)

    def started(*_args, **_kwargs):
        raise AssertionError("a trainer was started with on-demand ensure off")

    monkeypatch.setattr(ensure, "start_trainer", started)
    settings = load_settings()
    with pytest.raises(ServiceUnavailable) as refused:
        ensure_trainer(settings, timeout=5)
    message = refused.value.message
    assert "ASSISTANT_LORA_ENSURE_ON_DEMAND=false" in message and str(other) in message, message
    with TestClient(create_app(settings), base_url="http://127.0.0.1:5050") as api:
        r = api.post("/assistant/training/lora/start", json={})
    store.dispose_stores()
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
    assert not log_path(settings).exists() and trainer_processes(home) == []
    # Reading or cancelling jobs there said "the next job starts it", which it then did not.
    for refusal in (client.other_data_root, client.held_by_another):
        message = refusal(settings, client.holder(foreign)).message
        assert "next job" not in message and "lunatrain trainer --port 0" in message, message


@pytest.mark.parametrize("chosen", [True, False])
def test_an_address_held_by_another_service_is_said_with_its_case_for_the_dashboard(home, monkeypatch, chosen):
    """Review repro: with the trainer's address held by another service, "Trainer starten" (provider-health
    with ensureTrainer) and the job panel's status poll answered 503 with the English sentence alone, so the
    German page said "Trainer nicht erreichbar: The trainer address … is held by …". Both carry the case now."""
    from fastapi.testclient import TestClient

    from lunatrain import store
    from lunatrain.api.main import create_app

    from peer_helpers import html_service, playing

    if chosen:
        monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:5999")
    else:
        monkeypatch.delenv("ASSISTANT_LORA_TRAINER_URL", raising=False)
        monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", "false")
    monkeypatch.setattr(client, "_shared", playing(html_service))
    settings = load_settings()
    detail = "trainer.address_held_chosen" if chosen else "trainer.address_held_off"
    with TestClient(create_app(settings), base_url="http://127.0.0.1:5050") as api:
        answers = [api.get("/assistant/training/lora/status")]
        if chosen:  # else an asked-for start starts this root's trainer on a free port, as it should
            answers.append(api.get("/assistant/training/lora/provider-health", params={"ensureTrainer": "true"}))
        for r in answers:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["params"] == {"detail": detail, "url": client.base_url(settings)}, r.text
    store.dispose_stores()
    assert trainer_processes(home) == []


def test_health_cli_offline_exits_1(home, any_port):
    result = CliRunner().invoke(app, ["health"])
    assert result.exit_code == 1
    assert "Offline" in result.output and "127.0.0.1:0" in result.output


def test_bad_start_command_is_a_usage_error(home, any_port, monkeypatch):
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_START_CMD", "'unbalanced")
    result = CliRunner().invoke(app, ["health", "--ensure-trainer"])
    assert result.exit_code == 2 and "ASSISTANT_LORA_TRAINER_START_CMD" in result.output


def test_a_free_port_setting_is_no_chosen_address_when_its_record_names_another_root(home, monkeypatch):
    """Repro: with ASSISTANT_LORA_TRAINER_URL=http://127.0.0.1:0 and data/trainer/trainer.url naming another
    data root's trainer (a copied project, or a port the OS gave that trainer after ours was killed), every
    `lora` was refused as if the user had chosen that address ("…or unset it"); port 0 chooses none, so this
    root's own trainer starts on a free port."""
    from lunatrain.service.jobs import DataRootView, Health

    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:0")
    settings = load_settings()
    settings.trainer_url_file.parent.mkdir(parents=True)
    settings.trainer_url_file.write_text("http://127.0.0.1:43173\n")
    foreign = Health(data_root=DataRootView(id="0" * 16, path=str(home.parent / "other-project")))
    monkeypatch.setattr(client, "probe", lambda settings, timeout=3.0: foreign)
    ports: list[int | None] = []

    class Started(Exception):
        pass

    def start(_settings, port=None):
        ports.append(port)
        raise Started

    monkeypatch.setattr(ensure, "start_trainer", start)
    with pytest.raises(Started):
        ensure_trainer(settings, timeout=5)
    assert ports == [0]


@pytest.mark.slow
def test_a_trainer_of_another_data_root_is_never_used(tmp_path, monkeypatch):
    """Two projects on one machine: the first one's trainer holds the default address. The second refuses it
    when its URL was chosen explicitly (one sentence naming both roots), and otherwise starts a trainer of
    its own on a port the OS picks, which that trainer records under its data root; jobs of either land in
    their own data root."""
    from lunatrain import settings as settings_mod
    from lunatrain.errors import Conflict

    from trainer_helpers import start_trainer, stop_group

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for var in [v for v in os.environ if v.startswith("ASSISTANT_")]:
        monkeypatch.delenv(var)
    # Neither trainer runs a job (the second one, started by ensure, takes this environment): spare their imports.
    monkeypatch.setenv("ASSISTANT_LORA_WARM_WORKER", "false")
    proc = start_trainer(first, ASSISTANT_LORA_WARM_WORKER="false")
    shared = proc.url
    try:
        explicit = load_settings(home=second, lora_trainer_url=shared)
        with pytest.raises(Conflict) as refused:
            ensure_trainer(explicit, timeout=30)
        assert str(first) in refused.value.message and str(second) in refused.value.message
        assert not explicit.trainer_url_file.exists() and trainer_processes(second) == []
        assert_refused_everywhere(explicit, first, second, "ASSISTANT_LORA_TRAINER_URL")
        assert_health_json_says_why(second, first, ASSISTANT_LORA_TRAINER_URL=shared)

        # Not chosen: the default address happens to be the first project's trainer.
        monkeypatch.setattr(settings_mod, "DEFAULT_TRAINER_URL", shared)
        implicit = load_settings(home=second)
        # Until it has a trainer of its own, the other project's is not one to read from either.
        assert_refused_everywhere(implicit, first, second, "the next job starts it")
        assert_health_json_says_why(second, first)  # the user's case: the default port held by another root
        health = ensure_trainer(implicit, timeout=120)
        assert health.data_root.path == str(second.resolve())
        own = implicit.trainer_url_file.read_text().strip()
        assert own.startswith("http://127.0.0.1:") and own not in (shared, "http://127.0.0.1:0")
        assert client.base_url(implicit) == own and client.health(implicit).data_root.path == str(second.resolve())
        # started on a port it bound itself, not on one picked here and bound later
        [started] = trainer_processes(second)
        assert started.info["cmdline"][-4:-2] == ["--port", "0"], started.info["cmdline"]
        assert f"trainer for {second.resolve()} on {own}" in log_path(implicit).read_text()
        # the first project's trainer still serves the first project, and its record still names it
        assert client.health(load_settings(home=first, lora_trainer_url=shared)).data_root.path == str(first.resolve())
        assert load_settings(home=first).trainer_url_file.read_text().strip() == shared
    finally:
        stop_group(proc.pid)
        kill_trainers(second)


def assert_health_json_says_why(home, other, **env: str) -> None:
    """`health --json` printed no JSON here (only the error sentence): it prints one document, Offline, whose
    `error` names both roots, and exits 1 as before."""
    r = CliRunner().invoke(app, ["health", "--json"], env={"ASSISTANT_HOME": str(home), **env})
    assert r.exit_code == 1, r.output
    body = json.loads(r.stdout)
    assert body["label"] == "Offline" and body["reachable"] is False, body
    assert str(other) in body["error"] and str(home) in body["error"], body


def assert_refused_everywhere(settings, first, second, fix: str) -> None:
    """Every call of this data root's clients to the other project's trainer is refused with one sentence
    naming both roots, before that trainer acts on it: reading, following or cancelling its jobs, its
    health in the CLI, the API's provider health (Offline) and status. A job id it does not know is the
    refusal too, not its 404. Reads are not a conflict: this root's trainer is not running (503); cancelling
    through the other project's trainer is (409)."""
    from fastapi.testclient import TestClient

    from lunatrain import store
    from lunatrain.api.main import create_app
    from lunatrain.errors import Conflict, ServiceUnavailable
    from lunatrain.status import training_status

    unknown = "ftjob-" + "0" * 24
    calls = {
        "list": (ServiceUnavailable, lambda: client.list_jobs(settings)),
        "show": (ServiceUnavailable, lambda: client.get_job(settings, unknown)),
        "events": (ServiceUnavailable, lambda: client.events(settings, unknown)),
        "cancel": (Conflict, lambda: client.cancel(settings, unknown)),
        "health": (Conflict, lambda: client.own_health(settings)),
    }
    for name, (refusal, call) in calls.items():
        with pytest.raises(refusal) as refused:
            call()
        message = refused.value.message
        assert str(first) in message and str(second) in message and fix in message, (name, message)

    assert training_status(settings)["trainer"]["label"] == "Offline"
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        health = api.get("/assistant/training/lora/provider-health").json()
        assert health["label"] == "Offline" and not health["reachable"] and str(first) in health["error"]
        for method, path, code in [
            ("GET", "jobs", 503),
            ("GET", "status", 503),
            ("GET", f"jobs/{unknown}", 503),
            ("POST", f"jobs/{unknown}/cancel", 409),
        ]:
            r = api.request(method, f"/assistant/training/lora/{path}")
            message = r.json()["error"]["message"]
            assert r.status_code == code and str(first) in message and str(second) in message, (path, r.text)
    store.dispose_stores()


@pytest.mark.slow
def test_a_stale_record_gets_a_trainer_on_a_free_port(home, monkeypatch, dead_port):
    """Nothing answers at the address our last trainer recorded, a port of its own: the new one binds a free
    port rather than the configured one, which may still be taken (here: it is)."""
    from lunatrain import settings as settings_mod

    stale = dead_port
    with bound_port() as taken:  # bound, never listening: refused, and held
        monkeypatch.setattr(settings_mod, "DEFAULT_TRAINER_URL", f"http://127.0.0.1:{taken}")
        monkeypatch.setenv("ASSISTANT_LORA_WARM_WORKER", "false")  # it runs no job: spare its imports
        settings = load_settings()
        settings.trainer_url_file.parent.mkdir(parents=True)
        settings.trainer_url_file.write_text(f"http://127.0.0.1:{stale}\n")
        try:
            health = ensure_trainer(settings, timeout=120)
            assert health.data_root.path == str(home.resolve())
            own = settings.trainer_url_file.read_text().strip()
            used = {stale, taken, 0}
            assert own.startswith("http://127.0.0.1:") and int(own.rsplit(":", 1)[1]) not in used
            [started] = trainer_processes(home)
            assert started.info["cmdline"][-4:-2] == ["--port", "0"], started.info["cmdline"]
        finally:
            kill_trainers(home)


def test_a_full_disk_at_the_trainer_log_is_one_sentence_and_starts_nothing(home, any_port):
    """Repro: with the disk full, starting the trainer on demand died writing the first line of trainer.log:
    the raw OSError made POST /lora/start a 500 and `lunatrain lora` two tracebacks, and an empty log was
    left. It is the disk-full sentence (503 disk_full in the API), no trainer starts, no log is left."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app
    from lunatrain.errors import DiskFull

    import faults

    settings = load_settings()
    (settings.data_dir / "trainer").mkdir(parents=True)
    (settings.data_dir / "trainer" / "ensure.lock").touch()  # there from an earlier start
    with faults.small_disk(settings.reports_training_dir, "64k"):
        fd = os.open(settings.reports_training_dir / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
        with pytest.raises(DiskFull, match=r"^The disk is full: writing the trainer log .*trainer\.log failed"):
            ensure_trainer(settings, timeout=5)
        assert not log_path(settings).exists() and trainer_processes(home) == []
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
            r = api.post("/assistant/training/lora/start", json={"epochs": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "disk_full", r.text
        r = CliRunner().invoke(app, ["health", "--ensure-trainer"])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "The disk is full" in r.output, r.output
        assert trainer_processes(home) == []


def test_trainer_log_rolls_over_while_running(tmp_path):
    """The trainer's log handler bounds its file while the process runs (not only at the next start)."""
    import logging

    from lunatrain.service.app import log_handler

    path = tmp_path / "trainer.log"
    handler = log_handler(path, max_bytes=4096)
    logger = logging.getLogger("lunatrain.test-rollover")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(2000):
            logger.warning("storage problem, retrying: %d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["trainer.log", "trainer.log.1"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    assert "1999" in path.read_text()


def installed_copy(where: Path) -> Path:
    """lunatrain as it was installed when a trainer started: a copy of this package under `where`, which a
    trainer imports with PYTHONPATH=where; an update then replaces its files."""
    shutil.copytree(Path(lunatrain.__file__).parent, where / "lunatrain", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def update(installed: Path) -> None:
    module = installed / "lunatrain" / "flow.py"
    module.write_text(module.read_text() + "\n# the update\n")


@pytest.mark.slow
def test_a_trainer_started_before_an_update_makes_way_for_the_updated_one(home, any_port, tmp_path):
    """Repro: a trainer started before lunatrain was updated (`pip install -U`, `git pull` in a checkout) kept
    serving, and every job after the update trained with the code it had imported, without a word. It now
    says so in its health, finishes the job it runs, and stops once idle (UPDATE_GRACE_S after its last job);
    the next command waits for it to go and starts the updated one."""
    from test_trainer_service import LONG, poll_job, prepare_root, running_with_steps, submit

    settings = load_settings()
    prepare_root(home)
    installed = installed_copy(tmp_path / "before")
    old = start_trainer(home, PYTHONPATH=str(installed), ASSISTANT_LORA_WARM_WORKER="false")
    assert client.health(settings).code_changed is False
    job = submit(settings, LONG | {"adapterName": "before-update"})
    assert wait_for(lambda: running_with_steps(poll_job(settings, job.id)), 300, 0.3)
    update(installed)

    busy = ensure_trainer(settings, timeout=60)  # busy: its job goes on where it started
    assert busy.code_changed is True and busy.queue.running == 1, busy
    assert [p.pid for p in trainer_processes(home)] == [old.pid]
    said = CliRunner().invoke(app, ["health"])
    assert said.exit_code == 0 and "lunatrain was updated since this trainer started" in said.output, said.output

    client.cancel(settings, job.id)
    assert wait_for(lambda: (j := poll_job(settings, job.id)) is not None and j.status == "cancelled", 60, 0.2)
    fresh = ensure_trainer(settings, timeout=300)  # idle now: it waits for the old one to stop, then starts
    assert old.wait(timeout=60) is not None
    said = (home / "trainer-0.log").read_text()
    assert "lunatrain's code changed on disk since this trainer started (an update); stopping" in said, said[-2000:]
    assert fresh.code_changed is False and fresh.status == "ok", fresh
    (now,) = trainer_processes(home)
    assert now.pid != old.pid and str(installed) not in now.environ().get("PYTHONPATH", "")
    assert client.get_job(settings, job.id).status == "cancelled"  # its record stays where it was


def test_a_runner_stops_for_an_update_only_when_no_job_waits(home):
    """The decision itself: lunatrain's files differ from those the runner started with, and nothing is
    queued: it stops, and admits no job from then on (the trainer answers 503, `trainer.updating`). A job
    admitted before the decision runs first."""
    from lunatrain.params import parse_run
    from lunatrain.service.runner import UPDATE_GRACE_S, Runner

    settings = load_settings()
    with contextlib.closing(JobStore(jobs_db_path(settings.data_dir))) as store:
        runner = Runner(settings, store)  # not started: no thread runs, nothing is signalled
        runner.idle_since -= UPDATE_GRACE_S + 1  # its last job ended long ago
        assert runner.code_changed is False and runner._updated() is False
        runner.code = "what was installed when it started"
        job, _ = store.create(parse_run({"baseModel": "luna-tiny"})[0], None, None)
        store.set_status(job.id, "queued")
        assert runner.code_changed is True and runner._updated() is False  # the queued job runs first
        assert runner.stopping_for_update is False
        store.set_status(job.id, "cancelled")
        assert runner._updated() is True and runner.stopping_for_update is True


@pytest.mark.slow  # the trainer app probes its device in a process of its own
def test_a_job_admitted_as_the_runner_decides_to_stop_for_an_update_is_queued_first_or_refused(home, monkeypatch):
    """Review repro: POST /jobs created its job under the admission lock but queued it after letting go:
    the runner, deciding in between, saw no queued job and stopped, and the client got 202 for a job no
    trainer would run. The job is queued under the lock, so the decision sees it and waits."""
    from fastapi.testclient import TestClient

    from lunatrain.service.app import create_app

    monkeypatch.setenv("ASSISTANT_LORA_WARM_WORKER", "false")
    settings = load_settings()
    api = create_app(settings)
    with TestClient(api, base_url="http://127.0.0.1") as http:
        runner = api.state.runner
        runner.stop()  # its thread stops: the decision below is taken by hand, at the moment it could be
        runner.code = "what was installed when it started"
        runner.idle_since -= 3600  # idle for long, as far as the grace after a job is concerned
        held = []
        queue = JobStore.set_status

        def set_status(self, job_id, status, **kw):
            if status == "queued":  # the runner decides under the same lock: it sees the job, or refuses it
                held.append(runner.admission.locked())
            return queue(self, job_id, status, **kw)

        monkeypatch.setattr(JobStore, "set_status", set_status)
        answer = http.post("/jobs", json={"baseModel": "luna-tiny"})
        assert answer.status_code == 202 and held == [True], (answer.text, held)
        assert runner._updated() is False and runner.stopping_for_update is False  # a job waits: it runs first


def test_a_trainer_stops_for_an_update_only_some_seconds_after_its_last_job(home):
    """Review repro: the trainer stopped within a tenth of a second of its job's end, before a dashboard
    polling every two seconds saw the job end: its reads went from `running` to 503. It waits UPDATE_GRACE_S
    after the last job before it stops (ensure waits for it)."""
    import time

    from lunatrain.service.runner import UPDATE_GRACE_S, Runner

    settings = load_settings()
    with contextlib.closing(JobStore(jobs_db_path(settings.data_dir))) as store:
        runner = Runner(settings, store)
        runner.code = "what was installed when it started"
        runner.idle_since = time.monotonic()  # a job just ended
        assert runner._updated() is False and runner.stopping_for_update is False
        runner.idle_since -= UPDATE_GRACE_S + 1
        assert runner._updated() is True


def test_an_outdated_trainer_is_waited_for_until_it_has_let_go_of_the_data_root(home, monkeypatch):
    """CI repro (a race): the outdated trainer closed its listening socket, and the next command, taking that for
    stopped, started the updated trainer while the old one still held the data root's trainer lock in its
    shutdown: "Another trainer is already running for the data root". Stopped is gone: quiet and the lock free."""
    import time

    from lunatrain.settings import load_settings

    settings = load_settings()
    lock = lock_path(settings)
    lock.parent.mkdir(parents=True, exist_ok=True)
    letting_go = home / "letting-go"  # written by the holder just before it releases the lock
    # An old trainer in its shutdown: no longer listening, its lock still held for a while (how long does not
    # matter: the wait must outlast it, whatever the machine's speed).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, pathlib, time; fh = open({str(lock)!r}, 'a'); fcntl.flock(fh, fcntl.LOCK_EX); "
            f"print('held', flush=True); time.sleep(0.5); pathlib.Path({str(letting_go)!r}).touch(); "
            "fcntl.flock(fh, fcntl.LOCK_UN); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(client, "probe", lambda *a, **k: None)
        assert ensure._wait_stopped(settings, time.monotonic() + 300, 300) is None
        assert letting_go.exists(), "it returned while the old trainer still held the data root"
    finally:
        holder.kill()
        holder.wait()
