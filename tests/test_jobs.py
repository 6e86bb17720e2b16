"""Job store and restart recovery: states, idempotent submits, FIFO order, the event cursor, persistence
across a reopen, and what a restarted trainer does with jobs its predecessor left running.

Run: `.venv/bin/python -m pytest tests/test_jobs.py -q` (fast, no training).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from lunatrain import procs
from lunatrain.errors import Conflict, NotFound
from lunatrain.params import LoraParams, parse_params
from lunatrain.service.jobs import JobStore, Progress, job_log_path, jobs_db_path
from lunatrain.service.recovery import recover, resumable
from lunatrain.service.runner import _crash_error
from lunatrain.service.worker import error_code

from hooks.faulthooks import fault_for
from trainer_helpers import wait_for

# What every registry entry records (registry._entry_problem); the tests here publish minimal ones.
BASE = {"baseModel": {"id": "luna-tiny", "fingerprint": "f" * 64}}


@pytest.fixture
def store(settings):
    s = JobStore(jobs_db_path(settings.data_dir))
    yield s
    s.close()


def queued(store: JobStore, params: LoraParams | None = None, request_id: str | None = None):
    job, created = store.create(params or LoraParams(epochs=1), request_id)
    assert created
    return store.set_status(job.id, "queued")


def test_create_queue_and_fifo_order(store):
    first = queued(store, LoraParams(adapter_name="a"))
    second = queued(store, LoraParams(adapter_name="b"))
    assert first.status == "queued" and first.params["adapterName"] == "a" and first.error is None
    assert [j.id for j in store.list()] == [second.id, first.id]  # newest first
    assert store.next_queued().id == first.id  # runs oldest first
    assert store.claim(first.id) and not store.claim(first.id)  # claimed once only
    assert store.next_queued().id == second.id
    assert store.counts() == {"running": 1, "queued": 1}
    assert store.list(status="running")[0].attempts == 1


def test_the_job_list_pages_past_its_first_page(store):
    """Scale repro: the job list showed the newest 500 jobs at most; `offset` was ignored, so a year of daily
    jobs could not be read past them. A page says whether more follow; a filter pages among its own jobs."""
    made = [queued(store, LoraParams(adapter_name=f"j{i}")).id for i in range(7)]
    newest_first = made[::-1]
    pages, offset = [], 0
    while True:
        page = store.page(limit=3, offset=offset)
        pages.append([j.id for j in page.data])
        if not page.has_more:
            break
        offset += 3
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:7]]
    exact = store.page(limit=7)
    assert len(exact.data) == 7 and exact.has_more is False  # a page that ends at the last job says so
    assert store.page(limit=3, offset=7).data == [] and store.page(limit=3, offset=7).has_more is False
    store.claim(made[0])
    store.claim(made[1])
    running = store.page(limit=1, offset=1, status="running")
    assert [j.id for j in running.data] == [made[0]] and running.has_more is False
    assert [j.id for j in store.list(limit=2)] == newest_first[:2]  # the list reads the first page


@pytest.mark.parametrize("fault", ["folder", "garbage"])
def test_a_job_database_that_cannot_be_opened_is_one_sentence_and_the_trainer_says_it(settings, fault):
    """Odd-paths repro: a folder at data/trainer/jobs.db or a damaged file there made `lunatrain trainer` die
    in a traceback (exit 3), and `lora` said only "exited while starting (status 3); see trainer.log"."""
    from typer.testing import CliRunner

    from lunatrain.cli import app
    from lunatrain.errors import StorageError

    path = jobs_db_path(settings.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fault == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"not a database at all" * 100)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(StorageError) as refused:
        JobStore(path)
    assert "data/trainer/jobs.db" in refused.value.message and "\n" not in refused.value.message
    assert ("move it aside" in refused.value.message) is (fault == "garbage"), refused.value.message
    r = CliRunner().invoke(app, ["trainer", "--port", "0"])
    assert r.exit_code == 1 and r.output == f"error: {refused.value.message}\n", r.output
    assert (path.read_bytes() if path.is_file() else None) == before  # nothing written


def test_request_id_is_idempotent_and_refuses_other_params(store):
    job, created = store.create(LoraParams(epochs=2), "retry-1")
    again, created_again = store.create(parse_params({"epochs": 2}), "retry-1")
    assert created and not created_again and again.id == job.id
    with pytest.raises(Conflict, match="retry-1"):
        store.create(LoraParams(epochs=3), "retry-1")
    assert len(store.list()) == 1


def test_cancel_rules(store):
    waiting = queued(store)
    assert store.request_cancel(waiting.id).status == "cancelled"
    assert not store.claim(waiting.id)  # a cancelled job is never started
    running = queued(store)
    store.claim(running.id)
    assert store.request_cancel(running.id).status == "cancelling"
    assert store.request_cancel(running.id).status == "cancelling"  # idempotent
    done = queued(store)
    store.claim(done.id)
    store.set_status(done.id, "succeeded", adapter={"name": "a", "version": "v1", "path": "data/adapters/a/v1"})
    with pytest.raises(Conflict, match="already succeeded") as ended:
        store.request_cancel(done.id)
    # Dashboard repro: the refusal came as a bare "conflict", so the German page showed it in English.
    assert (ended.value.code, ended.value.params) == ("job.already_succeeded", {"jobId": done.id})
    broken = queued(store)
    store.claim(broken.id)
    store.set_status(broken.id, "failed", error={"code": "crash", "message": "boom"})
    with pytest.raises(Conflict, match="already failed") as ended:
        store.request_cancel(broken.id)
    assert (ended.value.code, ended.value.params) == ("job.already_failed", {"jobId": broken.id})
    with pytest.raises(NotFound):
        store.request_cancel("ftjob-nope")


def test_event_cursor_progress_snapshot_and_non_finite_numbers(store):
    job = queued(store)
    store.claim(job.id)
    for step in range(1, 6):
        progress = Progress(step=step, total_steps=5, percent=step * 20.0, loss=float("nan") if step == 5 else 1.0)
        store.add_event(job.id, "progress", {"step": step, "loss": progress.loss}, progress=progress)
    store.add_event(job.id, "eval", {"valLoss": 0.5}, metrics={"valLoss": 0.5})
    page = store.events(job.id, after=0, limit=3)
    # status validating, queued, running, then the progress events
    assert [e.type for e in page.data] == ["status", "status", "status"] and page.has_more and page.last_seq == 3
    rest = store.events(job.id, after=page.last_seq, limit=100)
    assert [e.seq for e in rest.data] == list(range(4, 10)) and not rest.has_more
    assert rest.data[-2].model_extra["loss"] is None  # NaN is stored as null: JSON has no NaN
    json.dumps([e.wire() for e in rest.data], allow_nan=False)
    empty = store.events(job.id, after=rest.last_seq)
    assert empty.data == [] and empty.last_seq == rest.last_seq
    # Jobs repro: a cursor past the job's last event came back as the page's lastSeq (after=1000 gave lastSeq
    # 1000 where the last was 9), so a client going on from it never saw the events 10 to 1000 when they came
    beyond = store.events(job.id, after=1000)
    assert beyond.data == [] and beyond.last_seq == rest.last_seq
    store.add_event(job.id, "log", {"message": "later"})
    assert [e.seq for e in store.events(job.id, after=beyond.last_seq).data] == [rest.last_seq + 1]
    current = store.get(job.id)
    assert current.progress.step == 5 and current.progress.loss is None and current.metrics == {"valLoss": 0.5}
    with pytest.raises(NotFound):
        store.events("ftjob-unknown")


@pytest.mark.parametrize("ended", ["failed", "cancelled", "succeeded"])
def test_an_ended_job_has_no_time_left(store, ended):
    """Cross-surface repro: a cancelled or failed job kept the estimate of its last progress event
    (`etaSeconds: 37.7` for good); only the dashboard hid it. An ended job's estimate is null, its steps stay."""
    job = queued(store)
    store.claim(job.id)
    store.add_event(job.id, "progress", {"step": 2}, progress=Progress(step=2, total_steps=5, eta_seconds=37.7))
    assert store.get(job.id).progress.eta_seconds == 37.7
    done = store.set_status(job.id, ended)
    assert done.progress.eta_seconds is None and done.progress.step == 2 and done.progress.total_steps == 5


def test_a_requeued_job_starts_its_next_try_without_the_last_tries_progress(store, settings):
    """Jobs repro: a resume job requeued by a trainer's stop at step 224 of 610 was shown by the next trainer as
    "running step 224/610" until its resumed run (from the epoch checkpoint at step 184) said its first step:
    the progress went backwards. A new try starts without the last one's steps; its run says where it is."""
    from lunatrain.service.recovery import settle_interrupted

    job = queued(store, LoraParams(adapter_name="again", resume=True))
    store.claim(job.id)
    store.add_event(job.id, "progress", {"step": 224}, progress=Progress(step=224, total_steps=610, percent=36.7))
    requeued = settle_interrupted(settings, store, job.id, cancel_requested=False)
    assert requeued.status == "queued"
    assert store.claim(job.id)
    again = store.get(job.id)
    assert again.status == "running" and again.progress == queued(store).progress == Progress(), again.progress


def test_a_jobs_epoch_is_a_whole_number_as_in_its_events(store):
    """Numbers repro: a job's progress said `"epoch": 3.0` where its progress events said `"epoch": 3`."""
    job = queued(store)
    store.claim(job.id)
    event = {"step": 3, "totalSteps": 9, "epoch": 3, "percent": 33.33}
    store.add_event(job.id, "progress", event, progress=Progress.model_validate(event))
    assert json.dumps(store.get(job.id).progress.wire()["epoch"]) == "3"


def test_a_job_of_the_overwrite_slot_is_listed_with_its_revision(store):
    """Queue repro: two overwrite jobs of one adapter were both listed as "adapter ow@current
    (data/adapters/ow/current)", the older one naming the files the newer replaced. Each says its revision."""
    from lunatrain.cli.trainer import summary
    from lunatrain.service.jobs import AdapterRef

    job = store.get(queued(store).id)
    slot = AdapterRef(name="ow", version="current", path="data/adapters/ow/current", revision=1)
    done = job.model_copy(update={"status": "succeeded", "adapter": slot, "metrics": {"valLoss": 8.4649}})
    assert summary(done) == "adapter ow@current rev 1 (data/adapters/ow/current), val loss 8.4649"
    versioned = done.model_copy(update={"adapter": AdapterRef(name="ow", version="v2", path="data/adapters/ow/v2")})
    assert summary(versioned) == "adapter ow@v2 (data/adapters/ow/v2), val loss 8.4649"


def test_a_job_deep_in_a_long_queue_counts_every_job_ahead_in_the_queues_order(store, monkeypatch):
    """Review repro: with 110 jobs queued, only the newest 100 were read, so an early job was said to wait behind
    none more, later ones behind 40 where 51 were ahead; and the jobs ahead were ordered by their clock times,
    where the queue runs in the order it took them."""
    from lunatrain.cli import trainer as cli_trainer
    from lunatrain.service import client
    from lunatrain.service.jobs import JobList

    waiting = [queued(store) for _ in range(110)]
    running = waiting[0].model_copy(update={"id": "ftjob-" + "0" * 24, "status": "running"})
    newest_first = list(reversed(waiting))

    def page(_settings, *, limit=20, offset=0, status=None):
        jobs = {"running": [running], "queued": newest_first}.get(status, [])
        return JobList(data=jobs[offset : offset + min(limit, 100)], has_more=offset + min(limit, 100) < len(jobs))

    monkeypatch.setattr(client, "job_page", page)
    first = cli_trainer.waiting_behind(None, waiting[0])
    assert first is not None and first[0] == (running.id, 1) and first[1].endswith(", running)"), first
    key, line = cli_trainer.waiting_behind(None, waiting[60])
    assert key == (running.id, 61) and line.endswith(" and 60 more jobs"), line
    assert cli_trainer.waiting_behind(None, waiting[109])[0] == (running.id, 110)


def test_progress_lines_never_say_100_percent_before_the_last_step(store):
    """Numbers repro: `step 480/482 (100%)` while the JSON said 99.59: whole percents are cut, not rounded."""
    from lunatrain.progress import event_line

    assert event_line({"type": "progress", "step": 480, "totalSteps": 482, "percent": 99.59}) == "step 480/482 (99%)"
    assert event_line({"type": "progress", "step": 482, "totalSteps": 482, "percent": 100.0}) == "step 482/482 (100%)"
    # review repro: `jobs list` and `jobs show` still rounded
    from lunatrain.cli.trainer import summary

    job = queued(store)
    store.claim(job.id)
    event = {"step": 480, "totalSteps": 482, "percent": 99.59}
    store.add_event(job.id, "progress", event, progress=Progress.model_validate(event))
    assert summary(store.get(job.id)) == "step 480/482 (99%)"


def test_jobs_survive_a_reopen(settings, store):
    job = queued(store, LoraParams(adapter_name="kept"), "rid-1")
    store.add_event(job.id, "log", {"message": "hello"})
    store.close()
    reopened = JobStore(jobs_db_path(settings.data_dir))
    try:
        again = reopened.get(job.id)
        assert again.status == "queued" and again.request_id == "rid-1" and again.params["adapterName"] == "kept"
        assert reopened.events(job.id).data[-1].model_extra["message"] == "hello"
    finally:
        reopened.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sleeper(**env: str) -> subprocess.Popen:
    # A stand-in for an orphaned worker: its own session, as the runner starts workers (with `env` over this
    # process's environment). 120 s bounds its life should a test fail to kill it; no test waits for it.
    script = "import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env={**os.environ, **env})
    # Returned once it runs the script: until its exec, a forked child shows this process's command line and
    # environment (its ASSISTANT_HOME this test's root), which a loaded machine made recovery read.
    assert wait_for(lambda: script in psutil.Process(proc.pid).cmdline(), 60, 0.02), "the stand-in never started"
    return proc


def test_recover_settles_running_jobs_and_stops_their_orphans(store, settings):
    plain = queued(store, LoraParams(adapter_name="plain"))
    resumable = queued(store, LoraParams(adapter_name="resumable", resume=True))
    cancelling = queued(store, LoraParams(adapter_name="cancelling"))
    waiting = queued(store, LoraParams(adapter_name="waiting"))
    orphan = _sleeper()
    try:
        for job in (plain, resumable, cancelling):
            store.claim(job.id)
        store.set_fields(plain.id, pid=orphan.pid, pid_started=procs.started(orphan.pid))
        store.request_cancel(cancelling.id)

        recover(settings, store)

        assert gone(orphan.pid)
        failed = store.get(plain.id)
        assert failed.status == "failed" and failed.error.code == "interrupted" and failed.finished_at
        assert store.get(resumable.id).status == "queued"
        assert store.get(cancelling.id).status == "cancelled"
        assert store.get(waiting.id).status == "queued"
        assert store.next_queued().id == resumable.id  # the resumed job keeps its place in the queue
    finally:
        orphan.kill()
        orphan.wait()


def test_a_running_job_copied_with_its_data_root_is_not_stopped_by_the_copys_trainer(store, settings, tmp_path):
    """Move-root repro: a data root copied (`cp -a`, a backup restored) while a job trained carried the job as
    running; the copy's first trainer found its process alive, took it for its own orphan and stopped it, the
    original root's live training. A child of another data root (its ASSISTANT_HOME names another folder) is
    left alone; the copy settles its record only."""
    original = tmp_path / "original"
    original.mkdir()
    job = queued(store, LoraParams(adapter_name="copied"))
    theirs = _sleeper(ASSISTANT_HOME=str(original))
    try:
        store.claim(job.id)
        store.set_fields(job.id, pid=theirs.pid, pid_started=procs.started(theirs.pid))
        recover(settings, store)
        assert theirs.poll() is None, "the other root's training was stopped"
        assert store.get(job.id).status == "failed"  # this root's record of it is settled
    finally:
        theirs.kill()
        theirs.wait()


def test_an_interrupted_job_says_how_to_resume_in_the_callers_terms(store, settings):
    """Repro: `lunatrain lora` and `jobs show` said "submit it again (with resume=true it continues from its
    last checkpoint)": `resume=true` is neither the CLI's flag nor the API's JSON."""
    job = queued(store, LoraParams(adapter_name="cut"))
    store.claim(job.id)
    store.add_event(job.id, "log", {"message": "epoch 1 done, checkpoint saved", "code": "log.epoch_done_no_val"})
    recover(settings, store)
    message = store.get(job.id).error.message
    assert "resume=true" not in message, message
    assert f"`lunatrain jobs resume {job.id}`" in message and '`"resume": true`' in message, message


def test_a_resumed_job_cut_off_before_its_next_epoch_ended_is_resumable_again(store, settings):
    """Repro: a job that resumed from an earlier try's checkpoint and was cut off before its next epoch ended
    got no resume hint in its crash error: the checkpoint it started from is still there,
    and `jobs resume` continues from it again."""
    job = queued(store, LoraParams(adapter_name="again", resume=True))
    store.claim(job.id)
    store.add_event(job.id, "log", {"message": "resumed from epoch 2", "code": "log.resumed"})
    job = store.get(job.id)  # as the runner judges it when its process crashed
    assert resumable(settings, store, job)
    fresh = queued(store, LoraParams(adapter_name="again"))
    assert not resumable(settings, store, fresh)


def test_a_job_interrupted_before_its_first_epoch_ended_promises_no_checkpoint(store, settings):
    """Repro: a job whose trainer stopped during its first epoch said "with `lunatrain lora --resume` … it
    continues from its last checkpoint", though a checkpoint is saved only when an epoch ends: the resume
    started over. Without an epoch's end in its events the message now says so."""
    job = queued(store, LoraParams(adapter_name="early"))
    store.claim(job.id)
    store.add_event(job.id, "log", {"message": "epoch 0: base val loss 8.3", "code": "log.base_val_loss"})
    recover(settings, store)
    error = store.get(job.id).error
    assert error.code == "interrupted" and "--resume" not in error.message, error
    assert error.message == (
        "The trainer stopped while this job was running, before its first epoch ended: no adapter was registered "
        "and no checkpoint saved; submit it again."
    )


def test_a_checkpoint_the_orphaned_child_saved_after_the_trainer_died_is_promised_to_resume(store, settings):
    """Repro: kill -9 of the trainer right at an epoch's end: its child lived on for a moment and saved the
    epoch's checkpoint, but could not report it, and the restarted trainer said "before its first epoch ended
    … no checkpoint saved; submit it again" beside the checkpoint on disk. Recovery looks on disk as well: a
    checkpoint of this adapter saved since the job started means --resume continues from it."""
    import time

    job = queued(store, LoraParams(adapter_name="late"))
    store.claim(job.id)
    old = settings.adapters_dir / "late" / ".work" / "other-try" / "checkpoints" / "epoch-001"
    old.mkdir(parents=True)
    (old / "state.json").write_text("{}")
    os.utime(old / "state.json", (time.time() - 3600, time.time() - 3600))  # an older try's: not this job's
    saved = settings.adapters_dir / "late" / ".work" / "this-try" / "checkpoints" / "epoch-001"
    recover(settings, store)
    assert "before its first epoch ended" in store.get(job.id).error.message  # only an old try's checkpoint
    job = queued(store, LoraParams(adapter_name="late"))
    store.claim(job.id)
    saved.mkdir(parents=True)
    (saved / "state.json").write_text("{}")
    recover(settings, store)
    message = store.get(job.id).error.message
    assert "before its first epoch ended" not in message and f"`lunatrain jobs resume {job.id}`" in message, message


def test_a_checkpoint_saved_after_a_wall_clock_step_back_is_still_the_jobs(store, settings):
    """Repro: recovery asked the disk for a checkpoint saved since the job started by comparing mtimes with the
    job's start stamp. After the clock was set an hour back mid-run, the child's checkpoint looked older than
    its job and the error said "no checkpoint saved; submit it again". A checkpoint names the job that saved it;
    one another job saved is not this job's, however new its mtime."""
    import time

    job = queued(store, LoraParams(adapter_name="stepped"))
    store.claim(job.id)
    other = settings.adapters_dir / "stepped" / ".work" / "a-try" / "checkpoints" / "epoch-001"
    other.mkdir(parents=True)
    (other / "state.json").write_text(json.dumps({"jobId": "ftjob-another"}))
    recover(settings, store)
    assert "before its first epoch ended" in store.get(job.id).error.message

    job = queued(store, LoraParams(adapter_name="stepped"))
    store.claim(job.id)
    saved = settings.adapters_dir / "stepped" / ".work" / "this-try" / "checkpoints" / "epoch-001"
    saved.mkdir(parents=True)
    (saved / "state.json").write_text(json.dumps({"jobId": job.id}))
    os.utime(saved / "state.json", (time.time() - 3600, time.time() - 3600))  # written after the step back
    recover(settings, store)
    assert f"`lunatrain jobs resume {job.id}`" in store.get(job.id).error.message


def test_recover_never_kills_a_reused_pid(store, settings):
    job = queued(store)
    store.claim(job.id)
    bystander = _sleeper()
    try:
        # The recorded create time does not match: this pid belongs to some other process now.
        store.set_fields(job.id, pid=bystander.pid, pid_started=procs.started(bystander.pid) - 1000)
        recover(settings, store)
        assert bystander.poll() is None
        assert store.get(job.id).error.code == "interrupted"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("recorded", ["since boot", "epoch seconds, by an earlier version"])
def test_recover_stops_an_orphan_after_a_wall_clock_step(store, settings, monkeypatch, recorded):
    """Repro: the child's start was recorded as wall-clock time, which psutil derives from a boot time that
    moves with every clock step. After an NTP step of an hour the orphan no longer matched its record and went
    on training beside the restarted trainer. A start an earlier version recorded is still honoured."""
    from psutil import _pslinux

    job = queued(store)
    store.claim(job.id)
    orphan = _sleeper()
    try:
        start = procs.started(orphan.pid) if recorded == "since boot" else psutil.Process(orphan.pid).create_time()
        store.set_fields(job.id, pid=orphan.pid, pid_started=start)
        if recorded == "since boot":
            real = _pslinux.boot_time()
            monkeypatch.setattr(_pslinux, "boot_time", lambda: real - 3600)
        recover(settings, store)
        assert gone(orphan.pid)
    finally:
        orphan.kill()
        orphan.wait()


def test_recover_settles_a_job_whose_adapter_was_saved_from_its_trained_event(store, settings):
    """kill -9 of the trainer after the adapter was registered: the job is the adapter's, never "submit it
    again", and with resume it is not queued again (one job, one version)."""
    plain = queued(store, LoraParams(adapter_name="plain"))
    resumable = queued(store, LoraParams(adapter_name="resumable", resume=True))
    for job in (plain, resumable):
        store.claim(job.id)
        store.add_event(
            job.id,
            "trained",
            {
                "adapter": {
                    "name": job.params["adapterName"],
                    "version": "v1",
                    "path": f"data/adapters/{job.params['adapterName']}/v1",
                }
            },
        )
    recover(settings, store)
    for job in (plain, resumable):
        done = store.get(job.id)
        assert done.status == "succeeded" and done.error is None, done
        assert (done.adapter.name, done.adapter.version) == (job.params["adapterName"], "v1")
        assert done.gate["status"] == "interrupted" and "eval-gate" in done.gate["reasons"][0]
    assert store.next_queued() is None


def test_recover_takes_the_registry_entry_with_the_job_id(store, settings):
    """The registry is the durable fact too: an entry carrying the job id settles the job (with its gate
    when one was recorded), even when the trained event never reached the job store."""
    from lunatrain import registry

    job = queued(store, LoraParams(adapter_name="reg", resume=True))
    store.claim(job.id)
    work = settings.adapters_dir / "reg" / ".work" / "w1"
    work.mkdir(parents=True)
    (work / "adapter_model.safetensors").write_bytes(b"x")
    entry = registry.publish(settings, "reg", "versioned", work, {"jobId": job.id, "status": "succeeded"} | BASE)
    registry.record_gate(settings, "reg", entry["version"], {"status": "passed", "passed": True, "reasons": []})
    # Publishing again for the same job (a retried or resumed run) registers nothing new.
    work2 = settings.adapters_dir / "reg" / ".work" / "w2"
    work2.mkdir(parents=True)
    again = registry.publish(settings, "reg", "versioned", work2, {"jobId": job.id, "status": "succeeded"} | BASE)
    assert again["version"] == entry["version"] and not work2.exists()
    assert [v["version"] for v in registry.load(settings)["adapters"]["reg"]["versions"]] == ["v1"]
    recover(settings, store)
    done = store.get(job.id)
    assert done.status == "succeeded" and done.adapter.version == "v1" and done.gate["status"] == "passed"


def test_recover_does_not_keep_an_overwrite_run_whose_gate_never_finished(store, settings):
    """kill -9 of the trainer during the gate of an overwrite run: the run waited beside the slot for the
    gate's verdict. The restarted trainer settles the job with its adapter, and the slot keeps serving the
    revision it held: the unjudged run's files go, its entry stays in the history (replaced)."""
    from lunatrain import registry

    def run(tag: str) -> Path:
        work = settings.adapters_dir / "ow" / ".work" / tag
        work.mkdir(parents=True)
        (work / "adapter_model.safetensors").write_bytes(tag.encode())
        return work

    first = registry.publish(settings, "ow", "overwrite", run("r1"), {"status": "succeeded"} | BASE)
    job = queued(store, LoraParams(adapter_name="ow", adapter_strategy="overwrite"))
    store.claim(job.id)
    staged = registry.publish(settings, "ow", "overwrite", run("r2"), {"jobId": job.id} | BASE, stage=True)
    assert staged["revision"] == 2 and (settings.home / staged["staged"]).is_dir()

    recover(settings, store)

    done = store.get(job.id)
    assert done.status == "succeeded" and (done.adapter.name, done.adapter.version) == ("ow", "current")
    assert done.gate["status"] == "interrupted" and done.gate["passed"] is False
    assert "not kept" in done.gate["reasons"][0]
    second = registry.get_revision(settings, "ow", 2)
    assert second["replaced"] and "staged" not in second
    assert not (settings.home / staged["staged"]).exists()
    assert registry.get_version(settings, "ow", "current")["revision"] == first["revision"] == 1
    assert (settings.adapters_dir / "ow" / "current" / "adapter_model.safetensors").read_bytes() == b"r1"
    assert [p.name for p in (settings.adapters_dir / "ow" / ".slots").iterdir()] == [
        (settings.adapters_dir / "ow" / "current").resolve().name
    ]
    recover(settings, store)  # a second restart changes nothing
    assert store.get(job.id).gate == done.gate and registry.get_revision(settings, "ow", 2) == second


def test_crash_error_names_signal_and_log(settings, tmp_path):
    log = job_log_path(settings.trainer_logs_dir, "ftjob-x")
    log.parent.mkdir(parents=True)
    log.write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    err = _crash_error(-signal.SIGABRT, log, settings.shown(log))
    assert err["code"] == "child_crashed"
    assert "SIGABRT" in err["message"] and "RuntimeError: boom" in err["message"]
    assert "data/trainer/logs/ftjob-x.log" in err["message"]
    assert "out-of-memory" in _crash_error(-signal.SIGKILL, log, settings.shown(log))["message"]
    assert "status 3" in _crash_error(3, log, settings.shown(log))["message"]
    # Cross-surface repro: the error carried no params, so the German dashboard said "Der Trainingsprozess ist
    # abgestürzt: The training process was killed by …". The params say it all, for the page's language.
    shown = "data/trainer/logs/ftjob-x.log"
    assert err["params"] == {
        "detail": "crash.signal",
        "signal": "SIGABRT",
        "log": shown,
        "lastLine": "RuntimeError: boom",
    }
    log.write_text("")
    assert _crash_error(-signal.SIGKILL, log, settings.shown(log))["params"] == {"detail": "crash.oom", "log": shown}
    assert _crash_error(3, log, settings.shown(log))["params"] == {"detail": "crash.status", "status": 3, "log": shown}


def test_a_workers_log_events_reach_its_job_log(capfd):
    """Repro: a job killed by SIGKILL in its second epoch failed with "last log line: 'worker 29724 started
    for ftjob-…'", and data/trainer/logs/<job>.log held that one line: the worker's log events (samples,
    epochs done, adapter written) went only to the event stream, so the log and the crash message read as
    if the job had died while starting."""
    import io

    from lunatrain.service.worker import Channel

    events = io.StringIO()
    Channel(events).send({"type": "log", "message": "epoch 1 done: val loss 7.8748, checkpoint saved"})
    Channel(events).send({"type": "progress", "step": 3})
    assert [json.loads(line)["type"] for line in events.getvalue().splitlines()] == ["log", "progress"]
    [line] = capfd.readouterr().err.splitlines()
    # stamped as every record is: a job log read after the fact says when each step happened
    stamp, message = line.split(" ", 1)
    assert message == "epoch 1 done: val loss 7.8748, checkpoint saved"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), line


def test_an_expected_failure_is_one_line_in_the_job_log_and_a_crash_keeps_its_traceback(settings, capfd):
    """Repro: a job failing for a reason it states (no export, bad data, a damaged base) wrote a whole Python
    traceback (22 to 43 lines through transformers) into its log before the one sentence. Such a failure is
    one line with its code now; an unexpected exception keeps its traceback (it is what a bug report needs)."""
    import threading

    from lunatrain.service import worker

    result = worker.run("ftjob-x", {"adapterName": "x", "maxSteps": 1}, {}, worker.Channel(None), threading.Event())
    assert result["status"] == "failed" and result["error"]["code"] == "export.missing", result
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert f"error export.missing: {result['error']['message']}" in err, err
    # the log starts with what the job runs
    parameters = next(line for line in err.splitlines() if " parameters: " in line)
    assert json.loads(parameters.split(" parameters: ", 1)[1])["adapterName"] == "x", parameters


def test_fault_spec_and_error_codes():
    assert fault_for("any", "crash") == "crash"
    assert fault_for("b", "crash=a,nan=b") == "nan"
    assert fault_for("c", "crash=a,nan=b") is None
    assert fault_for("a", "bogus=a") is None and fault_for("a", "") is None
    assert error_code(MemoryError()) == "out_of_memory"
    assert error_code(RuntimeError("CUDA out of memory. Tried to allocate")) == "out_of_memory"
    assert error_code(ValueError("x")) == "training_error"


def test_runner_backs_off_on_storage_errors_and_fails_the_job(settings, store, monkeypatch):
    """A full disk: claiming a job fails. The runner marks the job failed (disk_full) when it can, reports
    the problem for /health and waits 1, 2, 4 … s between tries — never a hot loop on the same job."""
    import errno
    import sqlite3

    from lunatrain.service.runner import Runner

    job = queued(store)
    runner = Runner(settings, store)
    waits: list[float] = []

    def claim(_job_id):
        raise sqlite3.OperationalError("database or disk is full")

    def wait(timeout=None):
        waits.append(timeout)
        if len(waits) == 4:
            runner._stopping.set()
        return False

    monkeypatch.setattr(store, "claim", claim)
    monkeypatch.setattr(
        store, "set_status", lambda *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("disk is full"))
    )
    monkeypatch.setattr(runner._wake, "wait", wait)
    runner._loop()
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert "full" in runner.storage_problem
    assert store.get(job.id).status == "queued"  # nothing could be recorded; it is retried after the back-off

    # With the database writable again but the job's own files failing (ENOSPC), the job ends disk_full.
    monkeypatch.undo()
    runner = Runner(settings, store)
    monkeypatch.setattr(
        runner, "_run", lambda _job: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    )
    monkeypatch.setattr(runner._wake, "wait", lambda timeout=None: runner._stopping.set())
    runner._loop()
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error.code == "disk_full", failed.error


def test_job_stores_opening_a_new_file_together_wait_for_each_other(tmp_path):
    """The jobs database has the same SQLite behaviour as the example store (test_store.py): while one
    connection turns a new file to WAL, another's switch fails at once with "database is locked" instead of
    waiting. A trainer starting while `lunatrain status` reads its jobs opens it like that. Threads stand in
    for processes (sqlite3 releases the GIL): 100 new files, 3 stores at a time."""
    import threading

    failures: list[str] = []

    def first_open(path, start: threading.Barrier) -> None:
        start.wait()
        try:
            jobs = JobStore(path)
            try:
                assert jobs._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            finally:
                jobs.close()
        except Exception as exc:  # every failure is the finding
            failures.append(f"{type(exc).__name__}: {exc}")

    for i in range(100):
        start = threading.Barrier(3)
        threads = [threading.Thread(target=first_open, args=(tmp_path / f"jobs-{i}.db", start)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, f"{len(failures)} of 300 first opens failed: {failures[0]}"


@pytest.mark.slow
def test_a_job_refused_for_its_data_carries_the_values_its_message_names(settings, store):
    """Repro: a trainer job failed with a coded error (`train.special_tokens`, `train.no_samples`) kept only
    its code and English sentence, so the dashboard filled its own sentence's placeholders with nothing
    ("{count} samples of the {tier} tier…"). The worker's result and the job now carry the error's params."""
    from lunatrain.service.spawn import child_env, worker_argv

    from helpers import make_records, write_export

    records = make_records(24)
    typed = next(r for r in records if r["source"] == "curated")  # the tier the job trains
    typed["messages"][-1]["content"] = "Ja. <|im_end|>"
    write_export(settings, records)
    params = {"adapterName": "typed", "maxSteps": 2, "batchSize": 4, "maxSeqLength": 128}
    argv = worker_argv("--job", "ftjob-typed", "--params", json.dumps(params))
    done = subprocess.run(argv, env=child_env(settings), cwd=settings.home, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]  # a failed job, said in its one result line
    result = json.loads(done.stdout.splitlines()[-1])
    error = result["error"]
    assert result["status"] == "failed" and error["code"] == "train.special_tokens", done.stderr[-3000:]
    assert error["params"] == {"count": 1, "tier": "curated", "examples": [str(typed["id"])]}

    job = queued(store, LoraParams(adapter_name="typed"))
    failed = store.set_status(job.id, "failed", error=error)
    assert store.get(job.id).error.params == error["params"] == failed.error.params
    assert failed.wire()["error"]["params"]["examples"] == [str(typed["id"])]


def test_the_trainer_log_names_what_retention_removed(settings, store, caplog):
    """Repro: after a job the trainer's log said only "retention removed 2 item(s)": which files went (an
    export a user still wanted, a run's checkpoints) could not be told afterwards. Each item is named."""
    import logging

    from lunatrain import export as ex
    from lunatrain import store as example_store
    from lunatrain.formats import make_draft
    from lunatrain.service.runner import Runner

    for i in range(settings.retain_exports + 1):
        example_store.add_examples(settings, [make_draft(prompt=f"Frage {i}?", response="Antwort.")])
        ex.export(settings)
    stale = settings.cache_dir / "tokens" / "curated-old.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 16)
    with caplog.at_level(logging.INFO, logger="lunatrain.trainer"):
        Runner(settings, store)._collect()
    said = [r.getMessage() for r in caplog.records if r.name == "lunatrain.trainer"]
    assert any("retention removed token-cache data/cache/tokens/curated-old.safetensors" in m for m in said), said


def test_a_job_database_that_cannot_be_written_is_a_storage_error_naming_it(settings):
    """Repro: a trainer whose data/trainer/jobs.db could not be written (another user's, a read-only copy)
    started "healthy", then answered every submit 500 "Internal error" with sqlite3's traceback in its log. A
    write the database refuses is a StorageError naming the file (the trainer answers 503, one sentence), and
    changes nothing."""
    from lunatrain.errors import StorageDenied

    path = jobs_db_path(settings.data_dir)
    JobStore(path).close()
    reader = JobStore(path, read_only=True)  # what sqlite does with a file this user may not write
    try:
        with pytest.raises(StorageDenied) as refused:
            reader.create(LoraParams(adapter_name="x"))
        assert refused.value.message.startswith(f"The trainer's job database {path} cannot be written"), refused.value
        assert refused.value.http_status == 503
        assert reader.list() == []
    finally:
        reader.close()


def test_a_job_database_that_refuses_writes_makes_the_runner_back_off_and_say_so(settings):
    """Repro: once job-store writes raised StorageError, the runner's loop (which caught sqlite3 and OS errors)
    no longer backed off: it claimed the same queued job again thousands of times a second, a traceback each,
    and /health never said `degraded`. It backs off on the first refusal, with the problem for /health."""
    from lunatrain.errors import StorageDenied
    from lunatrain.service.runner import Runner

    path = jobs_db_path(settings.data_dir)
    writer = JobStore(path)
    job = queued(writer, LoraParams(adapter_name="x"))
    writer.close()
    store = JobStore(path, read_only=True)  # as the test above: a jobs.db this user may not write
    runner = Runner(settings, store)
    seen: list[BaseException] = []
    real = runner._back_off

    def back_off(exc: BaseException) -> None:
        seen.append(exc)
        runner._stopping.set()  # one round is the test: no waiting
        real(exc)

    runner._back_off = back_off  # type: ignore[method-assign]
    runner._wake.set()
    runner.start()
    runner._thread.join(60)
    store.close()
    assert not runner._thread.is_alive()
    assert len(seen) == 1 and isinstance(seen[0], StorageDenied), seen
    assert runner.storage_problem and "job database" in runner.storage_problem and str(path) in runner.storage_problem
    after = JobStore(path, read_only=True)
    try:
        assert after.get(job.id).status == "queued"  # never claimed: it waits for a writable database
    finally:
        after.close()


def _full_disk_for(store: JobStore, monkeypatch) -> dict[str, bool]:
    """`store`'s status writes refused as on a full disk while the returned flag's "full" is true."""
    from lunatrain.errors import DiskFull

    disk = {"full": False}
    real_set = store.set_status

    def set_status(*args, **kwargs):
        if disk["full"]:
            raise DiskFull("The disk is full: writing the trainer's job database failed.")
        return real_set(*args, **kwargs)

    monkeypatch.setattr(store, "set_status", set_status)
    return disk


def _settled_by(runner, store: JobStore, job_id: str, *, run, back_off):
    """`runner` started with `run` as its job step and `back_off` as its wait after a storage error; the job
    once it has ended (falsy when it has not within 30 s)."""
    from lunatrain.service.jobs import TERMINAL

    runner._run = run
    runner._back_off = back_off
    runner._wake.set()
    runner.start()
    try:
        return wait_for(lambda: store.get(job_id).status in TERMINAL and store.get(job_id), 30)
    finally:
        runner._stopping.set()
        runner._wake.set()
        runner._thread.join(60)


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_job_whose_end_could_not_be_recorded_on_a_full_disk_is_settled_once_it_can_be(
    settings, monkeypatch, cancelled
):
    """Limits repro: the disk filled while a trainer job ran; the runner stopped the job's process, but its
    `failed` could not be written either, and nothing went back to it: after space was freed the job stayed
    `running` (a cancel: `cancelling`) until the trainer restarted, `lora` followed it for ever, and `luna` with
    the same parameters attached to it and hung. The runner settles it at its next round that can write."""
    from lunatrain.errors import DiskFull
    from lunatrain.service.runner import Runner

    store = JobStore(jobs_db_path(settings.data_dir))
    job = queued(store, LoraParams(adapter_name="x"))
    runner = Runner(settings, store)
    disk = _full_disk_for(store, monkeypatch)

    def run(claimed) -> None:
        assert store.claim(claimed.id)
        disk["full"] = True
        raise DiskFull("The disk is full: writing the job's events failed.")

    rounds: list[BaseException] = []

    def back_off(exc: BaseException) -> None:
        assert store.get(job.id).status == "running"  # its end could not be written
        rounds.append(exc)
        if len(rounds) < 3:  # still full for two rounds: the runner keeps trying, and keeps running
            return
        disk["full"] = False  # space freed
        if cancelled:
            store.request_cancel(job.id)  # `lunatrain jobs cancel` meanwhile: `cancelling`, and no process to stop

    settled = _settled_by(runner, store, job.id, run=run, back_off=back_off)
    assert settled, store.get(job.id)
    assert len(rounds) == 3 and all(isinstance(r, DiskFull) for r in rounds), rounds
    if cancelled:
        assert settled.status == "cancelled", settled
    else:
        assert settled.status == "failed" and settled.error.code == "disk_full", settled
    store.close()


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_job_registered_before_its_end_could_be_recorded_is_settled_succeeded(settings, monkeypatch, cancelled):
    """Review repro: the child registered its adapter, then the disk filled before the trainer wrote
    `succeeded`; once space came back the runner settled the job `failed` (disk_full), or `cancelled`, and told
    the user to train again, which makes a second version of the same run. A restarted trainer's recovery
    says succeeded from the same facts; so does the runner."""
    from lunatrain import registry
    from lunatrain.service.runner import Runner

    store = JobStore(jobs_db_path(settings.data_dir))
    job = queued(store, LoraParams(adapter_name="reg", epochs=1))
    runner = Runner(settings, store)
    disk = _full_disk_for(store, monkeypatch)

    def run(claimed) -> None:
        assert store.claim(claimed.id)
        if cancelled:
            store.request_cancel(claimed.id)  # a cancel that came during the gate, after the registration
        work = settings.adapters_dir / "reg" / ".work" / "w1"
        work.mkdir(parents=True)
        (work / "adapter_model.safetensors").write_bytes(b"x")
        base = {"baseModel": {"id": "luna-tiny", "fingerprint": "f" * 64}}
        registry.publish(settings, "reg", "versioned", work, {"jobId": claimed.id} | base)
        disk["full"] = True
        result = {"status": "succeeded", "adapter": {"name": "reg", "version": "v1", "path": "data/adapters/reg/v1"}}
        runner._finish(claimed.id, result, None, 0, settings.trainer_logs_dir / "x.log")

    def back_off(exc: BaseException) -> None:
        disk["full"] = False

    settled = _settled_by(runner, store, job.id, run=run, back_off=back_off)
    assert settled and settled.status == "succeeded", settled
    assert settled.adapter is not None and settled.adapter.version == "v1", settled
    store.close()


def test_a_full_job_database_is_disk_full_not_a_failed_rollback(settings):
    """Repro: SQLite rolls a transaction back itself when the disk is full, so the store's own ROLLBACK then
    failed ("cannot rollback - no transaction is active") and was what the caller saw, hiding the cause."""
    from lunatrain.errors import DiskFull

    store = JobStore(jobs_db_path(settings.data_dir))
    try:
        job, _ = store.create(LoraParams(adapter_name="x"))
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL, as a full disk gives it
        with pytest.raises(DiskFull):
            for _ in range(2000):
                store.add_event(job.id, "log", {"message": "x" * 3000})
        assert store.get(job.id).id == job.id  # the store still reads
    finally:
        store.close()


def test_a_local_runs_bar_shows_the_engines_eta_as_a_pipe_does():
    """CLI-text repro: `lora --local` on a terminal drew rich's own estimate (`ETA 0:00:00`) where a pipe and
    `jobs follow` show the training engine's (`ETA 1:15`)."""
    import io

    from lunatrain.progress import ProgressDisplay, event_line

    event = {"type": "progress", "step": 3, "totalSteps": 9, "epoch": 1, "epochs": 2, "loss": 2.5, "etaSeconds": 75.0}
    out = io.StringIO()
    with ProgressDisplay(tty=True, stream=out) as display:
        display.on_event(event)
    assert "ETA 1:15" in out.getvalue() and "ETA 1:15" in event_line(event), out.getvalue()


def test_a_wall_clock_step_during_a_job_leaves_its_duration_as_long_as_it_took(store, settings, monkeypatch):
    """Repro: the clock stepped back an hour while a trainer job ran; its finish stamp came before its start,
    and `status` said lastJob.durationSeconds -3577. The trainer measures a job's run on a clock that never
    steps; stamps stay wall time (they say when, not how long)."""
    from datetime import timedelta

    from lunatrain import status
    from lunatrain.service import jobs as jobs_mod
    from lunatrain.wire import iso, utc_now

    job = queued(store)
    assert store.claim(job.id)
    monkeypatch.setattr(jobs_mod, "now_iso", lambda: iso(utc_now() - timedelta(hours=1)))
    done = store.set_status(job.id, "succeeded")
    assert done.finished_at < done.started_at  # the stamps say what the clock said
    assert done.duration_seconds is not None and 0 <= done.duration_seconds < 600, done.duration_seconds
    last = status.training_status(settings)["lastJob"]
    assert last["jobId"] == job.id and last["durationSeconds"] == done.duration_seconds, last
