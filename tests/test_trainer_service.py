"""The trainer service end to end: a real `lunatrain trainer` on a free loopback port,
real worker child processes, real training of luna-tiny on the seeded, exported example data.

Shown here: submit -> succeeded with a registered adapter; one job per requestId; FIFO queue with one job
running at a time; cancel of a running job (child gone, nothing registered); injected crash and NaN end
their job `failed` with the right code while the service keeps serving; kill -9 of the trainer mid-job and
a restart (job `interrupted`, or resumed from its checkpoint to success); 422/404 on bad requests.

Run: `.venv/bin/python -m pytest tests/test_trainer_service.py -q` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from subprocess import Popen

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from lunatrain import export, registry, store
from lunatrain.cli import app
from lunatrain.errors import Conflict, NotFound, ServiceUnavailable, UsageError
from lunatrain.models import ensure_tiny
from lunatrain.params import parse_run
from lunatrain.service import client as trainer_client
from lunatrain.service.jobs import TERMINAL, Job
from lunatrain.settings import Settings, load_settings
from lunatrain.wire import utc_now

import faults
from trainer_helpers import gone, start_trainer, stop_group, wait_for

# Two steps on the small memory tier: a job is mostly process start-up and model loading.
QUICK = {"datasetTier": "memory", "epochs": 1, "maxSteps": 2, "batchSize": 4, "gate": False, "baseModel": "luna-tiny"}
# Long enough to be caught running (stopped early by the tests).
LONG = QUICK | {"epochs": 50, "maxSteps": None}
FAULTS = "crash=crashy,nan=nanny,crash_after_epoch=late"
JOB_TIMEOUT = 480.0  # generous: these machines are shared and slow; a passing run takes a fraction
HTTP_TIMEOUT_S = 60.0  # one raw request to a trainer that a loaded machine keeps busy (httpx's own default is 5 s)


@dataclass
class Trainer:
    proc: Popen
    settings: Settings
    started: datetime  # before its process started

    @property
    def url(self) -> str:
        return self.settings.lora_trainer_url


def prepare_root(home: Path) -> None:
    """The user's first steps: seed the bundled examples, export them, build the tiny base model; and a
    one-case eval suite, so the gate after a training job stays quick."""
    settings = load_settings(home=home)
    store.load_seed(settings)
    export.export(settings)
    ensure_tiny(settings)
    case = {
        "id": "short",
        "prompt": "Wer bist du?",
        "checks": [{"type": "max_chars", "value": 4000}],
        "maxNewTokens": 4,
    }
    settings.eval_dir.mkdir(parents=True, exist_ok=True)
    (settings.eval_dir / "mini.jsonl").write_text(json.dumps(case) + "\n")


def copy_root(src: Path, dst: Path) -> None:
    """A second data root with the same export and model (a trainer holds its data root exclusively)."""
    shutil.copytree(src / "data", dst / "data", ignore=shutil.ignore_patterns("trainer", "adapters"))


def launch(home: Path, port: int | None = None, **env: str) -> Trainer:
    """A trainer on `home`, on `port` or (by default) on a port it binds itself; its settings point at the
    address it recorded."""
    started = utc_now()
    proc = start_trainer(home, port or 0, **env)
    return Trainer(proc, load_settings(home=home, lora_trainer_url=proc.url), started)


def shutdown(trainer: Trainer) -> None:
    """SIGTERM (the trainer stops its running child), then make sure nothing of it is left."""
    workers = workers_of(trainer.settings.home)
    stop_group(trainer.proc.pid, signal.SIGTERM)
    try:
        trainer.proc.wait(timeout=60)
    except Exception:
        stop_group(trainer.proc.pid)
        trainer.proc.wait()
    for w in workers:
        stop_group(w.pid)


def workers_of(home: Path, warm: bool = False) -> list[psutil.Process]:
    """Job processes whose data root is `home` (found by their environment); with `warm`, the trainer's warm
    worker (service/warm.py) instead, which lives as long as its trainer."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if (
                "lunatrain.service.worker" in cmd
                and ("--warm" in cmd) == warm
                and proc.environ().get("ASSISTANT_HOME") == str(home)
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def worker_for(job_id: str) -> psutil.Process:
    def find() -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "lunatrain.service.worker" in cmd and job_id in cmd:
                return proc
        return None

    proc = wait_for(find, 60)
    assert proc is not None, f"no worker process for {job_id}"
    return proc


def poll_job(settings: Settings, job_id: str) -> Job | None:
    """The job as its trainer reports it now, or None when the trainer did not answer in time (a busy machine):
    the poll asks again instead of failing the test."""
    try:
        return trainer_client.get_job(settings, job_id)
    except ServiceUnavailable:
        return None


def wait_job(settings: Settings, job_id: str, until: frozenset[str] = TERMINAL, timeout: float = JOB_TIMEOUT) -> Job:
    def state() -> Job | None:
        job = poll_job(settings, job_id)
        return job if job is not None and job.status in until else None

    job = wait_for(state, timeout, 0.5)
    assert job is not None, f"{job_id} not {sorted(until)} in {timeout}s: {trainer_client.get_job(settings, job_id)}"
    return job


def all_events(settings: Settings, job_id: str, page: int = 50) -> list:
    out, after = [], 0
    while True:
        got = trainer_client.events(settings, job_id, after=after, limit=page)
        out += got.data
        after = got.last_seq
        if not got.has_more:
            return out


def running_with_steps(job: Job | None) -> bool:
    return job is not None and job.status == "running" and job.progress.step >= 1


def versions(settings: Settings, name: str) -> list[dict]:
    return registry.load(settings)["adapters"].get(name, {}).get("versions", [])


def submit(settings: Settings, flags: dict, request_id: str | None = None, thresholds: dict | None = None) -> Job:
    params, options = parse_run(flags)
    return trainer_client.submit(settings, params, options, request_id, thresholds)


def wire(flags: dict, **extra: object) -> dict:
    """The body a client posts to /jobs for these flags (parameters, options, extra keys)."""
    params, options = parse_run(flags)
    return params.wire() | {"options": options.wire()} | extra


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("trainer-service") / "home"
    home.mkdir()
    prepare_root(home)
    return home


@pytest.fixture(scope="module")
def svc(root):
    # a zone 14 hours from UTC: a local time in the trainer's log shows at once (another date)
    trainer = launch(root, LUNATRAIN_FAULT=FAULTS, PYTHONPATH=faults.with_hooks(), TZ="Pacific/Kiritimati")
    yield trainer
    shutdown(trainer)


@pytest.mark.slow
def test_the_trainer_log_stamps_lines_in_utc_as_every_record_does(svc, root):
    """Repro: trainer.log stamped its lines in the service's local time without a zone (`2026-12-06 02:09:29,057`
    under TZ=Asia/Tokyo), beside its own `--- …Z` start lines and the jobs' UTC events: a trainer started from
    a shell in another zone jumped hours. Every line is UTC ISO 8601 with milliseconds and `Z` now."""
    from lunatrain.wire import parse_iso

    lines = [line for line in (root / "trainer-0.log").read_text().splitlines() if " INFO " in line]
    assert lines, "the trainer logged nothing"
    for line in lines:
        stamp = line.split(" ", 1)[0]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), line
        # logged while this module's trainer ran (a local time labelled Z would lie hours off, +14 h here)
        assert svc.started - timedelta(seconds=1) <= parse_iso(stamp) <= utc_now(), (svc.started, line)


# --- requests the service refuses -----------------------------------------------------------------
@pytest.mark.slow
def test_bad_requests_get_4xx_and_change_nothing(svc, tmp_path):
    url, settings = svc.url, svc.settings
    odd = tmp_path / "odd-model"  # a model directory whose config.json is a list
    odd.mkdir()
    (odd / "config.json").write_text("[]")
    (odd / "model.safetensors").write_bytes(b"")
    before = len(trainer_client.list_jobs(settings, limit=500))
    cases = [
        ({"learningRate": -1}, "learningRate"),
        ({"epochs": 0, "rank": 5000}, "rank"),
        ({"bogusField": 1}, "bogusField"),
        ({"adapterName": "../etc"}, "adapterName"),
        ({"requestId": "has space"}, "requestId"),
        ({"targetModules": []}, "targetModules"),
        # a name the model lacks: refused before the job is queued (it failed in the worker, exit 1 not 2)
        ({"targetModules": ["q_proj", "zz_proj"]}, "its linear layers are"),
        ({"gateThresholds": {"bogus": 1}}, "gateThresholds"),
        ({"gateThresholds": {"maxValLossRatioVsBase": 0}}, "gateThresholds"),
        ({"baseModel": None}, "baseModel"),  # the client resolves it; the trainer never fills in its own
        # strict JSON, nested bodies included: a string is no number, and "yes" no boolean
        ({"epochs": True}, "epochs"),
        ({"batchSize": "4"}, "batchSize"),
        ({"packing": "yes"}, "packing"),
        ({"options": {"gate": "false"}}, "gate"),
        ({"gateThresholds": {"maxValLossRatioVsBase": "1.5"}}, "maxValLossRatioVsBase"),
        # base models the file system cannot look up, or whose config is no object
        ({"baseModel": "~no-such-user-lunatrain/x"}, "Base model"),
        ({"baseModel": "m" * 300}, "Base model"),
        ({"baseModel": str(odd)}, "not a JSON object"),
    ]
    for body, field in cases:
        r = httpx.post(url + "/jobs", json={"baseModel": "luna-tiny"} | body, trust_env=False, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 422, (body, r.text)
        err = r.json()["error"]
        # a base model that cannot be used has a code of its own (base_model.*), as on the API
        codes = {"invalid_request"} | (
            {err["code"]} if "baseModel" in body and err["code"].startswith("base_model.") else set()
        )
        assert err["code"] in codes and field in err["message"], err
    # the memory plan refuses a job no data could fit on this device, saying so: a failed check (409), as
    # prepare reports it; a job whose worst case would not fit is the run's to plan with its data (repro: the
    # preflight said such a job fits, the trainer refused it with a fix sized for data that did not exist)
    too_big = {"batchSize": 1024, "maxSeqLength": 131072, "gradientCheckpointing": "false"}
    r = httpx.post(
        url + "/jobs/check", json={"baseModel": "luna-tiny"} | too_big, trust_env=False, timeout=HTTP_TIMEOUT_S
    )
    assert r.status_code == 200, r.text
    huge = tmp_path / "huge-model"  # a 70B-shaped config: not even its 4-bit weights fit this machine
    huge.mkdir()
    (huge / "model.safetensors").write_bytes(b"")
    llama70 = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64}
    shape = llama70 | {"model_type": "llama", "num_key_value_heads": 8, "vocab_size": 128256}
    (huge / "config.json").write_text(json.dumps(shape | {"architectures": ["LlamaForCausalLM"]}))
    r = httpx.post(url + "/jobs", json={"baseModel": str(huge)}, trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 409 and r.json()["error"]["code"] == "check_failed", r.text
    error = r.json()["error"]
    assert error["params"]["check"] == "check.memory_plan.too_big_any", error
    assert "use a smaller base model or a device with more memory" in error["message"], error
    for raw in (b"{not json", b"[1, 2]"):
        r = httpx.post(
            url + "/jobs",
            content=raw,
            headers={"content-type": "application/json"},
            trust_env=False,
            timeout=HTTP_TIMEOUT_S,
        )
        assert r.status_code == 422, r.text
    big = httpx.post(url + "/jobs", content=b"{" + b" " * 400_000 + b"}", trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert big.status_code == 413
    for method, path in (("GET", "/jobs/ftjob-000000"), ("GET", "/jobs/nope/events"), ("POST", "/jobs/nope/cancel")):
        r = httpx.request(method, url + path, trust_env=False, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 404 and "No job" in r.json()["error"]["message"], r.text
    # a body where none is taken is refused, not ignored (as on the API's routes)
    r = httpx.post(url + "/jobs/nope/cancel", json={"force": True}, trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 422 and "takes no body" in r.json()["error"]["message"], r.text
    for query in ("/jobs?limit=0", "/jobs?status=bogus", "/jobs/x/events?after=-1", "/jobs?stauts=running"):
        r = httpx.get(url + query, trust_env=False, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 422, (query, r.text)
    evil = httpx.get(url + "/health", headers={"host": "evil.example"}, trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert evil.status_code == 400
    assert trainer_client.health(settings).can_train[0].startswith("What this cpu can train")
    with pytest.raises(NotFound):
        trainer_client.get_job(settings, "ftjob-unknown")
    assert len(trainer_client.list_jobs(settings, limit=500)) == before


@pytest.mark.slow
def test_token_required_when_set_and_public_bind_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"ASSISTANT_HOME": str(home), "ASSISTANT_API_TOKEN": ""}
    refused = CliRunner().invoke(app, ["trainer", "--host", "0.0.0.0", "--port", "0"], env=env)
    assert refused.exit_code == 2 and "ASSISTANT_API_TOKEN" in refused.output
    trainer = launch(home, ASSISTANT_API_TOKEN="s3cret", ASSISTANT_LORA_WARM_WORKER="false")  # no job runs here
    try:
        refused = httpx.get(trainer.url + "/health", trust_env=False, timeout=HTTP_TIMEOUT_S)
        # The realm tells a client it is a lunatrain trainer that wants another token, not another service.
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="lunatrain-trainer"'
        wrong = httpx.get(
            trainer.url + "/jobs", headers={"authorization": "Bearer nope"}, trust_env=False, timeout=HTTP_TIMEOUT_S
        )
        assert wrong.status_code == 401
        with pytest.raises(UsageError, match="ASSISTANT_API_TOKEN"):
            trainer_client.health(trainer.settings)
        authed = trainer.settings.model_copy(update={"api_token": "s3cret"})
        assert trainer_client.health(authed).status == "ok" and trainer_client.list_jobs(authed) == []
        # A second trainer on the same data root refuses to start: one queue per device and database.
        second = CliRunner().invoke(app, ["trainer", "--port", "0"], env=env)
        assert second.exit_code == 1 and "already running" in second.output
    finally:
        shutdown(trainer)


# --- the happy path, idempotency and the queue -------------------------------------------------
@pytest.mark.slow
def test_submit_is_idempotent_queued_fifo_and_registers(svc):
    url, settings = svc.url, svc.settings
    body = wire(QUICK | {"adapterName": "fifo-a"}, requestId="req-a")
    first = httpx.post(url + "/jobs", json=body, trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert first.status_code == 202, first.text
    a = first.json()
    retry = httpx.post(url + "/jobs", json=body, trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert retry.status_code == 200 and retry.json()["id"] == a["id"]
    with pytest.raises(Conflict, match="req-a"):  # same key, other parameters
        submit(settings, QUICK | {"adapterName": "fifo-a", "maxSteps": 3}, "req-a")
    with pytest.raises(Conflict, match="req-a"):  # same key and parameters, other gate thresholds
        submit(settings, QUICK | {"adapterName": "fifo-a"}, "req-a", {"maxLossRegression": 0.5})
    # The eval gate runs after training, with this job's thresholds (here: a bar two steps cannot clear).
    b = submit(settings, QUICK | {"adapterName": "fifo-b", "gate": True}, None, {"maxValLossRatioVsBase": 0.01})
    assert b.status == "queued" and b.gate_thresholds["maxValLossRatioVsBase"] == 0.01

    seen: set[tuple[str, str]] = set()

    def both_done() -> bool:
        # One list request reads both jobs in one query: a consistent snapshot of the two states.
        jobs = {j.id: j for j in trainer_client.list_jobs(settings, limit=500)}
        ja, jb = jobs[a["id"]], jobs[b.id]
        seen.add((ja.status, jb.status))
        return ja.finished and jb.finished

    assert wait_for(both_done, 2 * JOB_TIMEOUT, 0.3)
    assert ("running", "running") not in seen  # one job at a time
    ja, jb = trainer_client.get_job(settings, a["id"]), trainer_client.get_job(settings, b.id)
    assert (ja.status, jb.status) == ("succeeded", "succeeded"), (ja.error, jb.error)
    assert jb.started_at >= ja.finished_at  # FIFO: b started after a ended
    assert [j.id for j in trainer_client.list_jobs(settings, limit=2)] == [b.id, ja.id]
    older = trainer_client.job_page(settings, limit=1, offset=1)  # the trainer's own route pages too
    assert [j.id for j in older.data] == [ja.id]
    assert older.has_more is (len(trainer_client.list_jobs(settings, limit=500)) > 2)  # jobs of earlier tests

    for job, name in ((ja, "fifo-a"), (jb, "fifo-b")):
        entries = versions(settings, name)
        assert [e["jobId"] for e in entries] == [job.id]
        assert job.adapter.version == entries[0]["version"] and job.adapter.path == entries[0]["path"]
        assert (settings.home / job.adapter.path / "adapter_model.safetensors").is_file()
        assert job.progress.step == 2 and job.progress.percent == 100.0 and job.error is None
        assert job.metrics["steps"] == 2 and job.metrics["trainLoss"] > 0

    assert ja.gate is None and ja.gate_thresholds is None  # gate: false; no thresholds given
    gate = versions(settings, "fifo-b")[0]["gate"]
    assert jb.gate["status"] == gate["status"] == "failed" and jb.gate["reasons"] == gate["reasons"]
    assert any("x the base model's" in r and "(allowed 0.01)" in r for r in gate["reasons"]), gate["reasons"]
    assert registry.list_adapters(settings)["fifo-b"]["aliases"].get("active") is None

    # Every log line comes with its code (the dashboard says it in the page's language), the gate's reasons too.
    for job in (ja, jb):
        logs = [e.model_extra for e in all_events(settings, job.id) if e.type == "log"]
        assert logs and all(e.get("code") for e in logs), [e for e in logs if not e.get("code")]
    refused = [e.model_extra for e in all_events(settings, jb.id) if e.model_extra.get("code") == "log.gate_failed"]
    assert [r["code"] for r in refused[0]["params"]["reasonCodes"]] == ["gate.loss_vs_base"], refused

    events = all_events(settings, ja.id, page=3)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # contiguous cursor over pages
    statuses = [e.model_extra["status"] for e in events if e.type == "status"]
    assert statuses == ["validating", "queued", "running", "succeeded"]
    assert [e.model_extra["step"] for e in events if e.type == "progress"] == [1, 2]
    # A retry after the fact still returns the finished job and trains nothing new.
    again = httpx.post(url + "/jobs", json=body, trust_env=False, timeout=HTTP_TIMEOUT_S)
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    assert len(versions(settings, "fifo-a")) == 1

    # The CLI view of the same jobs (plain lines: the runner is not a terminal).
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_LORA_TRAINER_URL": url}
    followed = CliRunner().invoke(app, ["jobs", "follow", ja.id], env=env)
    assert followed.exit_code == 0, followed.output
    assert (
        "progress step 2/2" in followed.output and f"succeeded: adapter fifo-a@{ja.adapter.version}" in followed.output
    )
    listed = CliRunner().invoke(app, ["jobs", "list", "--limit", "2"], env=env)
    assert listed.exit_code == 0 and listed.output.index(jb.id) < listed.output.index(ja.id)


# --- cancel ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cancel_running_job_stops_child_and_registers_nothing(svc):
    settings = svc.settings
    job = submit(settings, LONG | {"adapterName": "cancel-me"})
    wait_for(lambda: running_with_steps(poll_job(settings, job.id)), JOB_TIMEOUT, 0.3)
    child = worker_for(job.id)
    assert trainer_client.cancel(settings, job.id).status in ("cancelling", "cancelled")
    final = wait_job(settings, job.id)
    assert final.status == "cancelled" and final.adapter is None and final.error is None
    assert wait_for(lambda: gone(child.pid), 30)
    assert versions(settings, "cancel-me") == []
    assert not list((settings.adapters_dir / "cancel-me").glob("v*"))
    assert trainer_client.cancel(settings, job.id).status == "cancelled"  # idempotent
    statuses = [e.model_extra["status"] for e in all_events(settings, job.id) if e.type == "status"]
    assert statuses[-2:] == ["cancelling", "cancelled"]


# --- the base model is the submitter's ------------------------------------------------------------
@pytest.mark.slow
def test_the_job_trains_on_the_base_model_the_client_resolved(svc):
    """The guide's model change with a trainer already running: the trainer was started without
    ASSISTANT_BASE_MODEL (so luna-tiny would be its own default); `lunatrain lora` run with
    ASSISTANT_BASE_MODEL=<another model> sends that base, and the adapter is trained on it."""
    from lunatrain.models import build_tiny_model

    settings = svc.settings
    other = settings.home / "models" / "other-base"
    if not other.exists():
        build_tiny_model(other, hidden=32, layers=1, heads=2, kv_heads=1, seed=7)
    env = {
        "ASSISTANT_HOME": str(settings.home),
        "ASSISTANT_LORA_TRAINER_URL": svc.url,
        "ASSISTANT_BASE_MODEL": str(other),
    }
    flags = [
        "--adapter-name",
        "moved",
        "--datasetTier",
        "memory",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--no-gate",
        "--json",
    ]
    cli = CliRunner().invoke(app, ["lora", *flags], env=env)
    assert cli.exit_code == 0, cli.output
    job = next(j for j in trainer_client.list_jobs(settings, limit=500) if j.params["adapterName"] == "moved")
    assert job.params["baseModel"] == str(other)
    entry = versions(settings, "moved")[0]
    report = json.loads((settings.home / entry["path"] / "training-report.json").read_text())
    assert entry["baseModel"]["id"] == report["baseModel"]["id"] == str(other)
    from lunatrain.models import resolve_base

    assert report["baseModel"]["fingerprint"] == resolve_base(str(other), settings).fingerprint
    assert report["baseModel"]["fingerprint"] != resolve_base("luna-tiny", settings).fingerprint


@pytest.mark.slow
def test_lora_start_with_the_luna_profile_queues_what_lunatrain_lora_would(svc):
    """`POST …/lora/start {"profile": "luna", …}`: the profile's values and its luna-tiny table under the
    body's fields, as `lunatrain lora` resolves them; without `profile`, the library defaults."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    body = {"adapterName": "profiled", "epochs": 1, "maxSteps": 1, "gate": False, "minCurated": 0}
    with TestClient(create_app(svc.settings), base_url="http://127.0.0.1") as client:
        with_profile = client.post("/assistant/training/lora/start", json=body | {"profile": "luna"})
        plain = client.post("/assistant/training/lora/start", json=body | {"adapterName": "plain"})
    assert with_profile.status_code == plain.status_code == 202, (with_profile.text, plain.text)
    for accepted in (with_profile, plain):  # only the queued parameters matter here
        with contextlib.suppress(Conflict):  # one that already finished is left as it ended
            trainer_client.cancel(svc.settings, accepted.json()["jobId"])
    picked = ("learningRate", "rank", "batchSize", "maxSeqLength", "epochs", "maxSteps")
    luna = with_profile.json()["job"]["params"]
    assert {k: luna[k] for k in picked} == {
        "learningRate": 0.01,
        "rank": 8,
        "batchSize": 8,
        "maxSeqLength": 512,
        "epochs": 1,
        "maxSteps": 1,
    }
    library = plain.json()["job"]["params"]
    assert (library["learningRate"], library["rank"], library["maxSeqLength"]) == (2e-4, 16, 1024)


@pytest.mark.slow
def test_a_second_start_of_the_same_training_follows_the_job_that_runs_it(svc):
    """Repro: the same training started from two tabs (or Start pressed again after a reload) queued a second
    job, which trained the same export to a second version of the same weights. The second start returns the
    job that runs it (`joined`), also after an export of the same data. A start with a requestId of its own is
    its client's (review: joined, the id was kept nowhere, and its retry after the job ended trained again)."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    settings = svc.settings
    body = {k: v for k, v in LONG.items() if v is not None} | {"adapterName": "twice", "minCurated": 0}
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        first = client.post("/assistant/training/lora/start", json=body)
        assert first.status_code == 202 and first.json()["joined"] is False, first.text
        job_id = first.json()["jobId"]
        try:
            wait_for(lambda: running_with_steps(poll_job(settings, job_id)), JOB_TIMEOUT, 0.3)
            again = client.post("/assistant/training/lora/start", json=body)
            export.export(settings)  # the same data exported again: what the job reads is unchanged
            tab = client.post("/assistant/training/lora/start", json=body | {"requestId": "other-tab"})
            other = client.post("/assistant/training/lora/start", json=body | {"rank": 2})
        finally:
            trainer_client.cancel(settings, job_id)
    assert again.status_code == 202 and again.json()["joined"] is True, again.text
    assert again.json()["jobId"] == job_id and again.json()["job"]["status"] == "running"
    queued = []
    for separate in (tab, other):
        assert separate.status_code == 202 and separate.json()["joined"] is False, separate.text
        queued.append(separate.json()["jobId"])
        trainer_client.cancel(settings, queued[-1])
    assert job_id not in queued and trainer_client.get_job(settings, queued[0]).request_id == "other-tab"
    named = [j.id for j in trainer_client.list_jobs(settings, limit=500) if j.params["adapterName"] == "twice"]
    assert sorted(named) == sorted([job_id, *queued])


@pytest.mark.slow
def test_a_followed_job_in_the_queue_says_what_it_waits_behind(svc, monkeypatch):
    """Queue repro: `lunatrain lora` said "status queued" and then nothing while the job ahead ran for minutes,
    and on Ctrl-C that the queued job "keeps running in the trainer". The follower says which job it waits
    behind (and how many more), once per job ahead; detached, a queued job "stays queued"."""
    from lunatrain.cli import trainer as cli_trainer

    settings = svc.settings
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_LORA_TRAINER_URL": svc.url}
    long = submit(settings, LONG | {"adapterName": "ahead"})
    wait_for(lambda: running_with_steps(poll_job(settings, long.id)), JOB_TIMEOUT, 0.3)
    second = submit(settings, QUICK | {"adapterName": "second"})
    third = submit(settings, QUICK | {"adapterName": "third"})
    try:
        # Ctrl-C while it waits (its first pause between polls): detached, and said as still queued, from what
        # the poll saw (review: asking the trainer again in the handler kept a detach waiting 10 s on one that
        # did not answer).
        def interrupted(_seconds):
            raise KeyboardInterrupt

        with monkeypatch.context() as patched:
            patched.setattr(cli_trainer.time, "sleep", interrupted)
            left = CliRunner().invoke(app, ["jobs", "follow", third.id], env=env)
        assert left.exit_code == 130 and f"Detached; job {third.id} stays queued in the trainer." in left.output
        real, said = cli_trainer.waiting_behind, []

        def seen_then_cancel_the_long_one(settings_, job):
            said.append(real(settings_, job))
            if len(said) == 6:  # six polls while the long job's steps move on, then the queue moves
                trainer_client.cancel(settings, long.id)
            return said[-1]

        monkeypatch.setattr(cli_trainer, "waiting_behind", seen_then_cancel_the_long_one)
        followed = CliRunner().invoke(app, ["jobs", "follow", third.id], env=env)
    finally:
        trainer_client.cancel(settings, long.id)
    assert followed.exit_code == 0, followed.output
    key, line = said[0]
    assert key == (long.id, 2), key
    assert re.fullmatch(
        rf"queued behind job {long.id} \(ahead, (running|cancelling) at step \d+/\d+\) and 1 more job", line
    )
    # Once per change of the jobs ahead (review: the step moved on, and the line came at every poll).
    assert followed.output.count(f"queued behind job {long.id} ") == 1, followed.output
    assert f"Job {third.id} succeeded" in followed.output
    assert wait_job(settings, second.id).status == "succeeded"


@pytest.mark.slow
def test_lora_json_through_the_trainer_prints_only_the_outcome_on_stdout(svc):
    """`lunatrain lora --json | jq` broke: "Submitted job …", the followed events and "Job … succeeded" came
    first on stdout. With --json they go to stderr and stdout is the outcome document alone."""
    settings = svc.settings
    flags = ["--adapterName", "json-out", "--datasetTier", "memory", "--epochs", "1", "--maxSteps", "2"]
    flags += ["--batchSize", "4", "--baseModel", "luna-tiny", "--no-gate", "--json"]
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_LORA_TRAINER_URL": svc.url}
    cli = CliRunner().invoke(app, ["lora", *flags], env=env)
    assert cli.exit_code == 0, cli.output
    outcome = json.loads(cli.stdout)  # the whole of stdout
    assert outcome["status"] == "succeeded" and outcome["adapter"]["name"] == "json-out"
    assert "Submitted job" in cli.stderr and f"Job {outcome['jobId']} succeeded" in cli.stderr, cli.stderr


@pytest.mark.slow
def test_a_quantized_job_starts_fresh_and_trains_in_4_bits(svc):
    """The warm worker holds PEFT loaded without bitsandbytes (compat.without_bitsandbytes), so the trainer
    starts a quantized job as a fresh process, which loads it; a plain job is forked as before."""
    settings = svc.settings
    plain = wait_job(settings, submit(settings, QUICK | {"adapterName": "plain"}).id)
    quantized = wait_job(settings, submit(settings, QUICK | {"adapterName": "q4", "quantize": "4bit"}).id)
    assert plain.status == quantized.status == "succeeded", (plain.error, quantized.error)
    assert versions(settings, "q4")[0]["quantization"]["bits"] == 4
    log = (settings.home / "trainer-0.log").read_text()
    assert f"job {plain.id} running on 1 process(es): forked from the warm worker" in log
    assert re.search(rf"job {quantized.id} running on 1 process\(es\): \S+ -m lunatrain\.service\.worker", log)


# --- child failures ----------------------------------------------------------------------------
@pytest.mark.slow
def test_crash_and_nan_fail_with_codes_while_the_service_keeps_serving(svc):
    settings = svc.settings
    nanny = submit(settings, QUICK | {"adapterName": "nanny"})
    # The crashing job goes through `lunatrain lora` (its default path: ensure, submit, follow to the end).
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_LORA_TRAINER_URL": svc.url}
    flags = [
        "--adapter-name",
        "crashy",
        "--datasetTier",
        "memory",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--no-gate",
    ]
    cli = CliRunner().invoke(app, ["lora", *flags], env=env)
    assert cli.exit_code == 1, cli.output
    assert "Submitted job" in cli.output and "child_crashed" in cli.output
    crashy = next(j for j in trainer_client.list_jobs(settings, limit=500) if j.params["adapterName"] == "crashy")
    crashed = wait_job(settings, crashy.id)
    assert crashed.status == "failed" and crashed.error.code == "child_crashed", crashed.error
    assert "SIGABRT" in crashed.error.message and f"data/trainer/logs/{crashy.id}.log" in crashed.error.message
    assert "resume" not in crashed.error.message  # it crashed before its first checkpoint: nothing to resume
    # explore repro: the log the error points at ended on an ordinary line, never saying the process died
    last = (settings.data_dir / "trainer" / "logs" / f"{crashy.id}.log").read_text().splitlines()[-1]
    assert last.endswith(crashed.error.message) and last[:4].isdigit(), last
    assert trainer_client.health(settings).status == "ok"
    nan = wait_job(settings, nanny.id)
    assert nan.status == "failed" and nan.error.code == "nan_loss", nan.error
    health = trainer_client.health(settings)
    assert health.status == "ok" and health.queue.running == 0 and svc.proc.poll() is None
    assert versions(settings, "crashy") == [] and versions(settings, "nanny") == []
    shown = CliRunner().invoke(app, ["jobs", "show", nanny.id], env=env)
    assert shown.exit_code == 1 and "nan_loss" in shown.output
    health_cli = CliRunner().invoke(app, ["health"], env=env)
    assert health_cli.exit_code == 0 and ("Online (CPU)" in health_cli.output or "Aktiv (CUDA)" in health_cli.output)


@pytest.mark.slow
def test_a_job_that_crashed_after_a_checkpoint_resumes_with_its_own_parameters(svc):
    """Repro: a job interrupted after a checkpoint said "submit it again (with `lunatrain lora --resume` … it
    continues from its last checkpoint)"; that command takes the luna profile's values, so a job of any other
    values logged "is of another run … starting fresh" and lost its epochs. A crash after a checkpoint now
    names `lunatrain jobs resume JOB`, which submits the job's own parameters with resume on: the run goes on
    from its checkpoint and registers."""
    settings = svc.settings
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_LORA_TRAINER_URL": svc.url}
    # values no profile has: only the job's own parameters continue its run
    job = submit(settings, QUICK | {"adapterName": "late", "epochs": 2, "maxSteps": None, "learningRate": 0.0003})
    crashed = wait_job(settings, job.id)
    assert crashed.status == "failed" and crashed.error.code == "child_crashed", crashed.error
    assert crashed.error.message.endswith(
        f"`lunatrain jobs resume {job.id}` continues it from its last checkpoint (in the API: submit its "
        'parameters again with `"resume": true`).'
    ), crashed.error.message

    r = CliRunner().invoke(app, ["jobs", "resume", job.id], env=env)
    assert r.exit_code == 0, r.output
    resumed = next(j for j in trainer_client.list_jobs(settings, limit=500) if j.params["adapterName"] == "late")
    assert resumed.id != job.id and f"Submitted job {resumed.id}" in r.output
    assert resumed.status == "succeeded" and resumed.params == crashed.params | {"resume": True}, resumed
    assert resumed.options == crashed.options
    codes = [e.model_extra.get("code") for e in all_events(settings, resumed.id) if e.type == "log"]
    assert "log.resumed" in codes and "log.resume_other_run" not in codes, codes
    assert [v["jobId"] for v in versions(settings, "late")] == [resumed.id]
    assert f"Adapter late@{resumed.adapter.version} written to" in r.output

    # what there is nothing to resume of: a job that succeeded, one that does not exist
    again = CliRunner().invoke(app, ["jobs", "resume", resumed.id], env=env)
    assert again.exit_code == 2 and f"Job {resumed.id} succeeded" in again.output, again.output
    assert "nothing to resume" in again.output
    unknown = CliRunner().invoke(app, ["jobs", "resume", "ftjob-000000"], env=env)
    assert unknown.exit_code == 1 and "ftjob-000000" in unknown.output, unknown.output
    assert [v["jobId"] for v in versions(settings, "late")] == [resumed.id]


@pytest.mark.slow
def test_an_overwrite_run_the_gate_refused_is_described_as_not_kept(svc):
    """Repro: through the trainer, a refused overwrite run was described with the kept revision's validation
    loss and "Eval gate: passed." (its job's adapter carried no revision, so the slot's kept one was read)."""
    settings = svc.settings
    profiles = settings.home / "profiles"
    profiles.mkdir(exist_ok=True)
    (profiles / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.01\n")
    (profiles / "lenient.toml").write_text("[gate]\nmaxValLossRatioVsBase = 100.0\nmaxLossRegression = 10.0\n")
    env = {"ASSISTANT_HOME": str(settings.home), "ASSISTANT_LORA_TRAINER_URL": svc.url}
    run = ["lora", "--adapterName", "slot", "--adapterStrategy", "overwrite", "--datasetTier", "memory"]
    run += ["--epochs", "1", "--maxSteps", "2", "--batchSize", "4"]
    kept = CliRunner().invoke(app, [*run, "--profile", "lenient"], env=env)
    assert kept.exit_code == 0 and "Eval gate: passed." in kept.output, kept.output
    refused = CliRunner().invoke(app, [*run, "--profile", "strict", "--json"], env=env)
    assert refused.exit_code == 1, refused.output
    assert json.loads(refused.stdout)["adapter"]["revision"] == 2, refused.stdout
    said = CliRunner().invoke(app, [*run, "--profile", "strict"], env=env)
    assert said.exit_code == 1, said.output
    assert "Adapter slot@current revision 3 was not kept: data/adapters/slot/current still holds" in said.output
    assert "Eval gate: failed." in said.output and "Eval gate: passed." not in said.output, said.output


@pytest.mark.slow
def test_what_the_trainer_and_its_children_write_to_stderr_rolls_over_with_its_log(tmp_path: Path) -> None:
    """Explore repro: a trainer started with --log-file had its stdout and stderr on trainer.log as it was
    at start; once the log rolled over, that output (a library's warnings, the warm worker's tracebacks) grew
    trainer.log.1 without bound and untimestamped. It goes through the log's handler now."""
    import subprocess
    import sys

    log = tmp_path / "trainer.log"
    script = f"""
import logging, os, subprocess, sys
from pathlib import Path
from lunatrain.service.app import log_handler, stream_into_log
from lunatrain.wire import UtcLogFormatter
handler = log_handler(Path({str(log)!r}), max_bytes=4000)
handler.setFormatter(UtcLogFormatter())
logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
pumping = stream_into_log()
for i in range(100):
    print("stdout line", i, flush=True)
    os.write(2, b"stderr line %d\\n" % i)
subprocess.run([sys.executable, "-c", "import sys; [sys.stderr.write('child line\\\\n') for _ in range(100)]"])
os.close(1)  # the last writers: the pump reads to the end of what they wrote, then ends
os.close(2)
pumping.join(60)
"""
    with open(log, "ab") as start:  # as ensure starts it: its descriptors on the log file
        subprocess.run([sys.executable, "-c", script], stdout=start, stderr=subprocess.STDOUT, check=True, timeout=120)
    rolled = log.with_name("trainer.log.1")
    assert log.stat().st_size < 5000 and rolled.stat().st_size < 5000, (log.stat().st_size, rolled.stat().st_size)
    last = log.read_text().splitlines()[-1]
    assert last.endswith("child line") and last[:4].isdigit() and "Z " in last[:30], last  # timestamped


def test_following_a_job_reports_it_when_the_trainer_stops_right_after_it_ended(home, monkeypatch):
    """Review repro: the follower's last look for events after the job ended was outside the fallback to the
    job database: a trainer that stopped in that moment (as one does after an update, once idle) turned a
    succeeded job into "The trainer … is not reachable" and exit 1."""
    from lunatrain.cli import trainer as cli_trainer
    from lunatrain.service.jobs import EventPage

    settings = load_settings()
    job = Job.model_validate(
        {"id": "ftjob-" + "a" * 24, "status": "succeeded", "createdAt": "2026-01-01T00:00:00Z", "params": {}}
    )
    calls = {"events": 0}

    def events(_settings, _job_id, *, after=0, limit=100):
        calls["events"] += 1
        if calls["events"] > 1:
            raise ServiceUnavailable("The trainer is not reachable (nothing accepts connections there).")
        return EventPage(data=[], has_more=False, last_seq=after)

    monkeypatch.setattr(trainer_client, "events", events)
    monkeypatch.setattr(trainer_client, "get_job", lambda _s, _j: job)
    monkeypatch.setattr(cli_trainer, "_recorded", lambda _s, _j, _a: (job, []))
    assert cli_trainer.follow(settings, job.id).status == "succeeded"
