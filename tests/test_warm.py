"""The warm worker (service/warm.py): it reports the device, forks single-process jobs that train exactly what
a fresh worker process trains, reports their exit statuses, and when it cannot fork (switched off, or dead)
the trainer starts the job fresh. A forked job shows `--job ID` in its command line like a fresh one.

A warm worker that stops answering is given up after a bounded wait.
The trainer-level behaviour (jobs forked in a running trainer, the warm worker dying with a killed trainer)
is covered by test_trainer_service.py and the kill -9 suites, whose jobs run forked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_trainer_service import QUICK, root  # noqa: F401 - `root`: a prepared data root, per module

from lunatrain.service.spawn import child_env
from lunatrain.service.warm import WarmWorker
from lunatrain.settings import load_settings

from trainer_helpers import gone, wait_for

pytestmark = pytest.mark.slow


PARAMS = {k: v for k, v in QUICK.items() if k != "gate"}  # the gate is a flow option, not a parameter


def job_argv(job_id: str, **params: object) -> list[str]:
    return ["--job", job_id, "--params", json.dumps(PARAMS | params), "--options", json.dumps({"gate": False})]


def lines(stream) -> list[dict]:
    return [json.loads(raw) for raw in stream.read().splitlines() if raw.strip()]


def adapter_bytes(home: Path, result: dict) -> bytes:
    return (home / result["adapter"]["path"] / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def warm_holder(root: Path) -> Iterator[dict[str, WarmWorker]]:
    holder: dict[str, WarmWorker] = {}
    yield holder
    if "warm" in holder:
        holder["warm"].close()


@pytest.fixture
def warm(root: Path, warm_holder: dict[str, WarmWorker]) -> WarmWorker:
    """A running warm worker on `root`, shared by the module's tests: each start imports torch, transformers
    and PEFT. A test that killed it leaves a dead one, and the next test gets a new one."""
    current = warm_holder.get("warm")
    if current is None or not current.alive:
        if current is not None:
            current.close()
        current = warm_holder["warm"] = WarmWorker(load_settings(home=root))
        device = current.start()
        assert device["type"] == "cpu" and current.alive
    return current


def test_forked_job_trains_what_a_fresh_process_trains_and_reports_its_exit(root: Path, warm: WarmWorker) -> None:
    home = root
    settings = load_settings(home=home)
    with open(home / "forked.log", "ab") as log:
        forked = warm.spawn(job_argv("job-forked", adapterName="forked"), log)
    assert forked is not None
    events = lines(forked.stdout)
    assert forked.wait() == 0 and forked.poll() == 0
    result = events[-1]
    assert result["type"] == "result" and result["status"] == "succeeded", events
    assert any(e["type"] == "progress" for e in events)

    # A failing job: exit status 1 and its result line, like a fresh worker.
    with open(home / "bad.log", "ab") as log:
        bad = warm.spawn(job_argv("job-bad", adapterName="bad", baseModel="no-such-model"), log)
    assert bad is not None
    assert lines(bad.stdout)[-1]["status"] == "failed"
    assert bad.wait() == 1

    # The same job in a fresh interpreter: the same bytes.
    fresh = subprocess.run(
        [sys.executable, "-m", "lunatrain.service.worker", *job_argv("job-fresh", adapterName="fresh")],
        env=child_env(settings),
        cwd=home,
        capture_output=True,
        timeout=600,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    fresh_result = json.loads(fresh.stdout.splitlines()[-1])
    assert adapter_bytes(home, fresh_result) == adapter_bytes(home, result)


def test_a_warm_worker_that_stops_answering_is_given_up(root: Path) -> None:
    """A warm worker that stops answering (here: stopped): after a bounded wait the job starts fresh (spawn
    gives None) and the unusable warm worker is killed; from then on, no fork at all. Stopped right after its
    start (it may still be importing what jobs need: a stopped process answers nothing either way)."""
    warm = WarmWorker(load_settings(home=root))
    try:
        assert warm.start()["type"] == "cpu" and warm.alive
        pid = warm._proc.pid
        os.kill(pid, signal.SIGSTOP)
        warm.answer_timeout = 0.5  # a stopped process never answers: any wait ends the same way
        with open(root / "stuck.log", "ab") as log:
            assert warm.spawn(job_argv("job-stuck"), log) is None
        assert wait_for(lambda: gone(pid), 30) and not warm.alive
        with open(root / "after.log", "ab") as log:
            assert warm.spawn(job_argv("job-after"), log) is None
    finally:
        warm.close()


def test_switched_off_it_only_reports_the_device(root: Path) -> None:
    home = root
    warm = WarmWorker(load_settings(home=home, lora_warm_worker=False))
    device = warm.start()
    assert device["type"] == "cpu" and not warm.alive
    with open(home / "off.log", "ab") as log:
        assert warm.spawn(job_argv("job-off"), log) is None


def test_a_job_stopped_by_its_trainers_shutdown_reports_interrupted_not_cancelled(root: Path, warm: WarmWorker) -> None:
    """Repro: a trainer stopped in order (SIGTERM to it, as a service manager does) stopped its running job
    as a cancel does: the job's log and lora-latest.json said "cancelled" while the job record said failed
    (interrupted). The runner's shutdown signal (runner.SHUTDOWN_SIGNAL) is no cancel: the run reports
    interrupted, naming why."""
    from lunatrain.service.runner import SHUTDOWN_SIGNAL

    with open(root / "shutdown.log", "ab") as log:
        job = warm.spawn(job_argv("job-shutdown", adapterName="shutdown", epochs=50, maxSteps=None), log)
    assert job is not None
    next(line for line in job.stdout if b'"progress"' in line)
    os.killpg(job.pid, SHUTDOWN_SIGNAL)
    result = lines(job.stdout)[-1]
    assert result["type"] == "result" and result["status"] == "failed", result
    assert result["error"]["code"] == "interrupted" and "the trainer is stopping" in result["error"]["message"]
    job.wait()
    report = json.loads(load_settings(home=root).lora_latest_report.read_text())
    assert (report["status"], report["error"]["code"]) == ("failed", "interrupted"), report
    assert "training cancelled" not in (root / "shutdown.log").read_text()


def test_a_job_whose_warm_worker_dies_stops_and_is_reported_killed(root: Path, warm: WarmWorker) -> None:
    """The warm worker killed mid-job (say, by the OOM killer): the job sees its parent gone and stops
    without registering anything, and the trainer's wait ends with SIGKILL instead of hanging."""
    with open(root / "orphan.log", "ab") as log:
        job = warm.spawn(job_argv("job-orphan", adapterName="orphan", epochs=50, maxSteps=None), log)
    assert job is not None
    # Its own process group as soon as its pid is known: a cancel signals the group at once. (Checked on
    # this long job: a short one may have ended and been reaped before the check.)
    assert os.getpgid(job.pid) == job.pid
    first = json.loads(next(line for line in job.stdout if b'"progress"' in line))
    assert first["type"] == "progress"
    # Titled like a fresh worker right after the fork, before the job's first event.
    assert psutil.Process(job.pid).cmdline()[-3:] == ["lunatrain.service.worker", "--job", "job-orphan"]
    os.kill(warm._proc.pid, signal.SIGKILL)
    rest = lines(job.stdout)
    # not "cancelled": nobody cancelled it; it stopped because its trainer side is gone (train.py's reason)
    assert rest[-1]["type"] == "result" and rest[-1]["status"] == "failed", rest[-1]
    # Limits repro: it said "the trainer process is gone" while the trainer ran on, and nothing of memory. Its
    # parent is the warm worker, which only a kill ends while a job runs (often the out-of-memory killer).
    said = rest[-1]["error"]["message"]
    assert rest[-1]["error"]["code"] == "interrupted" and "the trainer's warm worker" in said, said
    assert "out-of-memory killer" in said and "the trainer process is gone" not in said, said
    assert job.wait() == -signal.SIGKILL
    assert not list(root.glob("data/adapters/orphan/v*"))  # nothing registered
