"""A trainer shutdown that lands while the runner is starting a job (service/runner.py `_run`): the job's
process is never left running, and the job is settled like any job a stopped trainer interrupted.

The window is opened on purpose: the warm worker here is a stand-in whose `spawn()` is where the shutdown
arrives, so the test does not depend on timing. What it answers is real: no process at all (it could not
fork), or a real child process in a session of its own (a forked job).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import IO

import psutil
import pytest

from lunatrain.params import LoraParams
from lunatrain.service import runner as runner_module
from lunatrain.service.jobs import JobStore, jobs_db_path
from lunatrain.service.recovery import recover
from lunatrain.service.runner import Runner


class ShutdownDuringSpawn:
    """A warm worker asked to fork a job just as the trainer stops: it raises the runner's stop flag (what
    `Runner.stop()` does first) and answers with `proc`."""

    alive = True

    def __init__(self, proc: subprocess.Popen[bytes] | None) -> None:
        self.proc = proc
        self.runner: Runner | None = None

    def spawn(self, argv: list[str], log_file: IO[bytes]) -> subprocess.Popen[bytes] | None:
        assert self.runner is not None and "--job" in argv
        self.runner._stopping.set()
        return self.proc

    def close(self) -> None:
        pass


@pytest.fixture
def store(settings):
    s = JobStore(jobs_db_path(settings.data_dir))
    yield s
    s.close()


def start_one(settings, store: JobStore, warm: ShutdownDuringSpawn, **params: object) -> str:
    """Queue a job and let the runner start it; returns once the runner is done with it (bounded: a runner
    that left the job's process running would wait for it, and the test then fails instead of hanging)."""
    job, _ = store.create(LoraParams(epochs=1, **params))
    job = store.set_status(job.id, "queued")
    runner = Runner(settings, store, warm=warm, cancel_grace=5.0)  # type: ignore[arg-type]
    warm.runner = runner
    thread = threading.Thread(target=runner._run, args=(store.next_queued(),), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the runner is still waiting for the job's process"
    return job.id


def test_no_fork_during_a_shutdown_starts_no_process_and_leaves_the_job_to_recovery(settings, store, monkeypatch):
    def no_process(*_a: object, **_k: object) -> None:
        raise AssertionError("a job process was started while the trainer stopped")

    monkeypatch.setattr(runner_module.subprocess, "Popen", no_process)
    job_id = start_one(settings, store, ShutdownDuringSpawn(None))
    assert store.get(job_id).status == "running" and store.child(job_id) == (None, None)
    recover(settings, store)  # what the next trainer does first
    job = store.get(job_id)
    assert job.status == "failed" and job.error.code == "interrupted", job


@pytest.mark.parametrize("resume", [False, True])
def test_a_job_forked_during_a_shutdown_is_stopped_and_settled_as_interrupted(settings, store, resume):
    # A real child in its own session, like a forked job; it would run for ten minutes if nobody stopped it.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        job_id = start_one(settings, store, ShutdownDuringSpawn(child), resume=resume)
        assert child.wait(timeout=30) == -signal.SIGUSR1  # stopped by the runner, as a shutdown stops a job
        job = store.get(job_id)
        if resume:  # requeued for the next trainer, which resumes it
            assert job.status == "queued", job
        else:
            assert job.status == "failed" and job.error.code == "interrupted", job
    finally:
        if psutil.pid_exists(child.pid):
            child.kill()
        child.wait()
