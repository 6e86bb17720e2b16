"""Settling jobs after the trainer stopped: process-group signals, orphaned children, and every unfinished
job's outcome decided from what was durably recorded.

A job found `running`/`cancelling` when the trainer starts lost its trainer. Its child, if still alive and
really the same process, is stopped. Then the facts decide, never a guess:
- an adapter registered for the job (a registry entry carrying its job id, or its own `trained` event) means
  the job `succeeded` with that adapter, whatever happened afterwards; its gate is marked interrupted unless
  a gate outcome was recorded on the version. Such a job is never queued again, so one job never makes two
  versions. An overwrite run still staged (its gate was to decide whether it takes the slot) is not kept;
- otherwise a requested cancel ends it `cancelled`; `resume: true` puts it back in the queue (the engine
  continues from its last complete checkpoint); else it ends `failed` with code `interrupted`.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from .. import procs, registry
from ..checkpoints import RESUME_SAID, saved_states
from ..errors import LunaError
from ..fsio import identity, read_json
from ..settings import Settings
from ..wire import parse_iso
from .jobs import AdapterRef, Job, JobError, JobStore

log = logging.getLogger("lunatrain.trainer")

GATE_INTERRUPTED = {
    "status": "interrupted",
    "passed": False,
    "reasons": ["the eval gate did not finish; run `lunatrain eval-gate --adapter NAME@VERSION`"],
}

GATE_NOT_KEPT = {
    "status": "interrupted",
    "passed": False,
    "reasons": ["the eval gate did not finish, so the overwrite run was not kept: the slot serves what it held"],
}


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid`; False when the group is already gone."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_orphan(pid: int, started: float | None, home: Path | None = None, grace: float = 5.0) -> bool:
    """Stop a child left behind by a previous trainer of the data root `home`, if `pid` is still that very process.

    Its recorded start guards against a pid that was reused by an unrelated process since; its ASSISTANT_HOME
    against a child of another data root: a copy of a root (`cp -a`, a backup restored) made while a job trained
    carries the job as running, and the live process is the original root's training, not this root's orphan.
    """
    try:
        proc = psutil.Process(pid)
        if started is not None and not procs.is_same(pid, started):
            return False
        if home is not None and _of_another_root(proc, home):
            return False
    except psutil.NoSuchProcess:
        signal_group(pid, signal.SIGKILL)  # the leader is gone; stragglers of its group may not be
        return False
    signal_group(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([proc], timeout=grace)
    if alive:
        signal_group(pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace)
    return True


def _of_another_root(proc: psutil.Process, home: Path) -> bool:
    """Whether `proc` works for another data root than `home`: its ASSISTANT_HOME (set for every child, see
    spawn.py) names a folder that exists and is not `home`. Unsure (no such variable, a folder gone since the
    root was moved, an environment this user may not read) is False: then it is this root's."""
    try:
        theirs = procs.data_root_of(proc, unset_is_cwd=False)
    except (psutil.Error, OSError):
        return False
    if theirs is None:
        return False
    where = identity(theirs)
    return where is not None and where != identity(home)


def recover(settings: Settings, store: JobStore) -> None:
    """Settle every job a previous trainer left active (see the module docstring)."""
    for job in store.with_status("running", "cancelling"):
        pid, started = store.child(job.id)
        if pid and stop_orphan(pid, started, settings.home):
            log.warning("stopped orphaned child %s of job %s", pid, job.id)
        settled = settle_interrupted(settings, store, job.id, cancel_requested=job.status == "cancelling")
        log.info(
            "job %s was running when the trainer stopped: %s",
            job.id,
            settled.status + (f" ({settled.error.code})" if settled.error else ""),
        )
    for job in store.with_status("validating"):  # validated params were stored; only the queueing was lost
        store.set_status(job.id, "queued")


def settle_interrupted(
    settings: Settings, store: JobStore, job_id: str, *, cancel_requested: bool, stopped: str = "the trainer stopped"
) -> Job:
    """End (or requeue) a job whose child stopped without a result, from the recorded facts. `stopped`: what
    ended it, for the sentence of a job whose adapter was registered before."""
    job = store.get(job_id)
    adapter = published_adapter(settings, store, job)
    if adapter is not None:
        unjudged = settle_staged(settings, job.id)
        return store.set_status(
            job_id,
            "succeeded",
            adapter=adapter,
            gate=GATE_NOT_KEPT if unjudged else recorded_gate(settings, job.id),
            message=f"the adapter was registered before {stopped}",
        )
    if cancel_requested:
        return store.set_status(job_id, "cancelled", message="cancelled (the trainer stopped meanwhile)")
    if requeued_when_stopped(job):
        return store.set_status(
            job_id,
            "queued",
            message="requeued after the trainer stopped; resuming from the last checkpoint",
            pid=None,
            pid_started=None,
        )
    if resumable(settings, store, job):
        message = (
            f"The trainer stopped while this job was running and no adapter was registered; {resume_hint(job.id)}."
        )
    else:
        message = (
            "The trainer stopped while this job was running, before its first epoch ended: no adapter was "
            "registered and no checkpoint saved; submit it again."
        )
    return store.set_status(job_id, "failed", error={"code": "interrupted", "message": message})


def requeued_when_stopped(job: Job) -> bool:
    """Whether a trainer's stop (orderly, or its recovery after a kill) puts `job` back in the queue instead of
    ending it, unless its version was registered: a resume job (`jobs resume`) not being cancelled."""
    return job.lora_params().resume and job.status in ("queued", "running")


def ended_by_its_report(
    settings: Settings, job_id: str, started_at: str | None, report: Any, *, resumes: bool = False
) -> bool:
    """Whether `report` (lora-latest.json, or status's view of it) says how the try of job `job_id` that began
    at `started_at` ended, where the job's record still says it runs: the job's own process writes it as it
    ends, and a record left running by a trainer that was killed is settled only by the next trainer's
    recovery. Only while no trainer holds the data root (one that runs keeps its record right). `resumes`: a
    job submitted to resume (`jobs resume`) and not being cancelled, which a trainer's stop requeues unless its
    version was registered (`settle_interrupted`): its report's failure is where it stopped, not how it ended."""
    from .lock import trainer_lock_held

    return (
        isinstance(report, dict)
        and report.get("jobId") == job_id
        and report.get("status") in (("succeeded",) if resumes else ("succeeded", "failed", "cancelled"))
        # when it ended (the report's `created`; status's view says it `finished`): a resumed job keeps its id
        and str(report.get("finished") or report.get("created") or "") >= str(started_at or "")
        and not trainer_lock_held(settings)
    )


def as_its_report_says(settings: Settings, job: Job) -> Job | None:
    """`job` as lora-latest.json says it ended (`ended_by_its_report`), or None when it does not say."""
    try:
        report = read_json(settings.lora_latest_report, None)
    except (LunaError, OSError):  # damaged or unreadable: it says nothing (status names it as a problem)
        return None
    if not ended_by_its_report(settings, job.id, job.started_at, report, resumes=requeued_when_stopped(job)):
        return None
    error = report.get("error") if isinstance(report.get("error"), dict) else None
    version = report.get("version") if report["status"] == "succeeded" else None
    adapter = (
        {
            "name": report.get("adapterName"),
            "version": version,
            "path": report.get("path") or "",
            "revision": report.get("revision"),
        }
        if version
        else None
    )
    try:
        return job.model_copy(
            update={
                "status": report["status"],
                "finished_at": report.get("created"),
                "adapter": AdapterRef.model_validate(adapter) if adapter else None,
                "error": JobError.model_validate(error) if error else None,
                "gate": report.get("gate") if isinstance(report.get("gate"), dict) else job.gate,
                "metrics": report.get("metrics") if isinstance(report.get("metrics"), dict) else job.metrics,
            }
        )
    except ValueError:  # a report edited into another shape says nothing of the job (pydantic's error is one)
        return None


def resumable(settings: Settings, store: JobStore, job: Job) -> bool:
    """Whether a checkpoint of the job's run is there to continue from: one it saved (said after each epoch,
    train.py; a child that outlived its trainer by a moment may have saved one it could not report, so the disk
    is asked too), or the one it resumed from itself."""
    return (
        store.logged(job.id, "log.epoch_done") or store.logged(job.id, "log.resumed") or checkpoint_since(settings, job)
    )


def resume_hint(job_id: str) -> str:
    """How to continue the job from its last checkpoint, in the CLI's and the API's terms: its own parameters
    with resume on (a bare `lunatrain lora --resume` takes the profile's values, and a run of other values
    starts fresh)."""
    return (
        f"`lunatrain jobs resume {job_id}` continues it from its last checkpoint (in the API: submit its "
        'parameters again with `"resume": true`)'
    )


def as_read_now(settings: Settings, job: Job) -> Job:
    """A failed job as it reads now. Its error was written once, with `resume_hint` when a checkpoint was there
    to continue from; once none of its adapter's checkpoints is left (a resume finished the run, and its
    publish took them, or `gc` removed them), the hint would lead to a refusal or a run from step 0: it gives
    way to a sentence that says so, and the dashboard's `resumeJob` goes with it. The record stays as written."""
    hint = resume_hint(job.id)
    offered = job.error is not None and (hint in job.error.message or "resumeJob" in (job.error.params or {}))
    if job.status != "failed" or not offered:
        return job
    try:
        if checkpoint_since(settings, job):
            return job
        # A job that resumed itself went on from an earlier try's checkpoint, which names that try's job: any
        # of the adapter's may be it (`jobs resume` tells the runs apart). Another run's checkpoint is no
        # resume point of a job that started fresh.
        if job.lora_params().resume and saved_states(registry.work_root(settings, job.lora_params().adapter_name)):
            return job
    except (OSError, ValueError, LunaError):
        return job
    gone = (
        "no checkpoint of it is left (a later run went on from it, or `lunatrain gc` removed it; `lunatrain "
        "adapters list` shows what was registered)"
    )
    said = job.error.message
    said = (
        said.replace(f". {hint}", f". {gone[0].upper()}{gone[1:]}") if f". {hint}" in said else said.replace(hint, gone)
    )
    said = said.replace(RESUME_SAID, f"{gone}.")  # the job process's own sentence
    params = {k: v for k, v in (job.error.params or {}).items() if k != "resumeJob"}
    return job.model_copy(update={"error": job.error.model_copy(update={"message": said, "params": params or None})})


def checkpoint_since(settings: Settings, job: Job) -> bool:
    """Whether an epoch checkpoint of the job's adapter was saved by this job (any try of its run: the work
    directory's name needs the tokenizer to compute, and a resume takes the furthest of them). A checkpoint
    names its job; one saved outside a job, or by an earlier version, counts when saved since the job started
    (its mtime: a wall-clock step back mid-run hides it)."""
    if not job.started_at:
        return False
    try:
        since = parse_iso(job.started_at).timestamp()
        work = registry.work_root(settings, job.lora_params().adapter_name)
        return any(_saved_by(state, job.id, since) for state in saved_states(work))
    except (ValueError, OSError, LunaError):
        return False


def _saved_by(state: Path, job_id: str, since: float) -> bool:
    try:
        saved = read_json(state)
    except (OSError, LunaError):
        return False
    if isinstance(saved, dict) and saved.get("jobId"):
        return saved["jobId"] == job_id
    return state.stat().st_mtime >= since


def published_adapter(settings: Settings, store: JobStore, job: Job) -> dict[str, Any] | None:
    """The adapter this job registered, from the registry (entry with its job id) or its `trained` event."""
    entry = _registered(settings, job.id)
    if entry is not None:
        return {"name": entry["name"], "version": entry["version"], "path": entry["path"]}
    trained = store.last_event(job.id, "trained")
    adapter = (trained or {}).get("adapter")
    if isinstance(adapter, dict) and adapter.get("name") and adapter.get("version"):
        return {"name": str(adapter["name"]), "version": str(adapter["version"]), "path": str(adapter.get("path", ""))}
    return None


def settle_staged(settings: Settings, job_id: str) -> bool:
    """A staged overwrite run of this job (its gate was to decide whether it takes the slot) that the gate never
    settled: the slot keeps what it held and the run's files go, as when a gate is skipped
    (flow.train_and_gate); its entry stays in the history, replaced. True when it settled one now. (The gate
    settles the run before it records its outcome, so a staged run has no recorded outcome to go by.)"""
    entry = _registered(settings, job_id)
    if not entry or not entry.get("staged"):
        return False
    try:
        registry.settle_slot(settings, entry["name"], int(entry["revision"]), keep=False)
    except LunaError as err:  # the registry cannot be written now: the run stays staged, never served
        log.warning("could not settle the staged run of %s: %s", job_id, err.message)
        return False
    log.warning("job %s: its gate did not finish; the overwrite run was not kept", job_id)
    return True


def recorded_gate(settings: Settings, job_id: str) -> dict[str, Any]:
    """The gate outcome recorded on the job's version (the gate finished, its report never reached the
    trainer), else interrupted."""
    return (_registered(settings, job_id) or {}).get("gate") or GATE_INTERRUPTED


def _registered(settings: Settings, job_id: str) -> dict[str, Any] | None:
    try:
        return registry.find_by_job(settings, job_id)
    except LunaError as err:  # an unreadable registry: the trained event is the remaining fact
        log.warning("registry not readable while settling %s: %s", job_id, err.message)
        return None
