"""`lunatrain trainer`, `lunatrain health` and `lunatrain jobs …`: run, probe and drive the trainer service.

`follow()` and `follow_and_report()` are the live view that `lunatrain lora` uses: a rich progress bar on a
terminal, plain lines otherwise; Ctrl-C detaches (the job keeps running in the trainer) and says how to
come back. Exit codes: 0 succeeded, 1 failed or cancelled (or trainer offline), 2 usage, 130 detached.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from ..errors import LunaError, NotFound, ServiceUnavailable, UsageError
from ..messages import counted
from ..params import format_validation_error
from ..progress import event_line, progress_details
from ..service import client as trainer_client
from ..service.ensure import ensure_trainer, refuse_tls
from ..service.jobs import Event, Health, Job, existing_store, job_log_path, jobs_db_path
from ..service.recovery import as_its_report_says
from ..settings import DEFAULT_TRAINER_URL, Settings, load_settings
from ..startup import collector_paused
from ..wire import check_page
from .app import Signalled, app, fail, given, is_tty, json_text, said_interrupted, stops_as_interrupts
from .serve import check_host_flag

EnsureOpt = Annotated[
    bool, typer.Option("--ensure-trainer", "--ensureTrainer", help="start the trainer first if it is not running")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="a job id (ftjob-…)")]
DETACHED = 130  # the shell's code for "ended by Ctrl-C": the job itself goes on

jobs_app = typer.Typer(help="Trainer jobs: list, show, follow, cancel, resume, events.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@app.command("trainer")
def trainer_cmd(
    host: Annotated[str | None, typer.Option("--host", help="default: host of ASSISTANT_LORA_TRAINER_URL")] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="default: port of ASSISTANT_LORA_TRAINER_URL; 0: a free port"),
    ] = None,
    log_file: Annotated[
        str | None,
        typer.Option("--log-file", "--logFile", help="log here, rolling over at 10 MB (default: stderr)"),
    ] = None,
) -> None:
    """Run the trainer service in the foreground (job queue, one child process per job); the address it
    serves is recorded in data/trainer/trainer.url, where clients of this data root look."""
    with collector_paused():  # the service's imports (startup.py)
        from ..service.app import serve

    try:
        check_host_flag(host)
        given(log_file, "--logFile", "a file to log to")
        settings = load_settings()
        refuse_tls(settings)  # its clients would never reach a plain-http trainer at an https address
        default_host, default_port = trainer_client.trainer_address(settings)
        if port is not None and port != default_port and trainer_client.chosen_address(settings):
            # Clients go to the chosen address, whatever this trainer records: it would never be reached.
            raise UsageError(
                f"ASSISTANT_LORA_TRAINER_URL ({settings.lora_trainer_url}) is where the clients of this data root "
                f"look for its trainer, so they would never reach one on port {port}; start it without --port, "
                "or change or unset ASSISTANT_LORA_TRAINER_URL."
            )
        log = Path(log_file) if log_file is not None else None
        serve(settings, host or default_host, default_port if port is None else port, log)
    except LunaError as err:
        raise fail(err) from None


@app.command("health")
def health_cmd(ensure: EnsureOpt = False, as_json: JsonOpt = False) -> None:
    """Show the trainer's state: `Aktiv (CUDA)`, `Online (CPU)` or `Offline` (exit 1, for scripts); --json:
    the API's provider-health document whatever the outcome, `error` saying what is wrong."""
    settings, health, problem = None, None, None
    try:
        settings = load_settings()
        if ensure:
            health = ensure_trainer(settings, explicit=True)
        else:
            try:
                health = trainer_client.own_health(settings)
            except ServiceUnavailable as err:
                problem = err
    except LunaError as err:
        if not as_json:
            raise fail(err) from None
        problem = err
    if as_json:
        typer.echo(json_text(_health_document(settings, health, problem)))
        if health is None:
            raise typer.Exit(problem.exit_code if problem else 1)
        return
    assert settings is not None
    typer.echo(describe_health(settings, health))
    if health is None:
        raise typer.Exit(1)


def _health_document(settings: Settings | None, health: Health | None, problem: LunaError | None) -> dict[str, Any]:
    """What GET …/lora/provider-health answers for the same outcome (api/routes/lora.py)."""
    # Settings that did not load have no address: the one configured, as given.
    url = trainer_client.base_url(settings) if settings else os.environ.get("ASSISTANT_LORA_TRAINER_URL")
    url = url or DEFAULT_TRAINER_URL
    return trainer_client.provider_health(url, health, problem.message if problem else None).wire()


def describe_health(settings: Settings, health: Health | None) -> str:
    label = trainer_client.label(health)
    if health is None:
        return (
            f"{label}: no trainer {trainer_client.where(settings)}; start it with `lunatrain trainer` "
            "or `lunatrain health --ensure-trainer`."
        )
    d = health.device
    memory = f", {_gib(d.memory_free)} free of {_gib(d.memory_total)}" if d.memory_total else ""
    return "\n".join(
        [
            f"{label}: {d.type} {d.name}{memory}, bf16 {'yes' if d.bf16 else 'no'}; "
            f"queue {health.queue.running} running, {health.queue.queued} queued; "
            f"trainer {health.version} at {trainer_client.base_url(settings)}",
            *health.can_train,
            # a full or read-only disk: jobs neither start nor have their end recorded, whatever the device
            *(
                [f"Degraded: {health.storage} No job starts, nor is a job's end recorded, until that is fixed."]
                if health.storage
                else []
            ),
            *(
                [
                    "lunatrain was updated since this trainer started: it finishes its queue, then stops, and the "
                    "next command starts the updated one"
                ]
                if health.code_changed
                else []
            ),
        ]
    )


def _gib(n: int | None) -> str:
    return f"{(n or 0) / 2**30:.1f} GiB"


# --- jobs ----------------------------------------------------------------------------------------
@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="at most this many, newest first")] = 20,
    offset: Annotated[int, typer.Option("--offset", help="skip this many newest first (0 to 2^62)")] = 0,
    status: Annotated[str | None, typer.Option("--status", help="only jobs in this state")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first (--json: the API's `{object: "list", data: [Job], hasMore}`)."""
    try:
        check_page(
            limit, offset, flags=True
        )  # before a trainer is asked (typer's own bound would print 2^62's 19 digits)
        page = trainer_client.job_page(load_settings(), limit=limit, offset=offset, status=status)
    except LunaError as err:
        raise fail(err) from None
    if as_json:
        typer.echo(json_text(page.wire()))
        return
    jobs = page.data
    if not jobs:  # "no jobs" under a filter, or past the first page, reads as none at all
        past = f" past the first {offset}" if offset else ""
        typer.echo(f"no {status} jobs{past}" if status else f"no jobs{past}")
    # The adapter column as wide as its longest name here, so every summary starts in one column.
    width = max((len(str(job.params.get("adapterName"))) for job in jobs), default=0)
    for job in jobs:
        name = str(job.params.get("adapterName"))
        typer.echo(f"{job.id}  {job.status:<10} {job.created_at}  {name:<{width}}  {summary(job)}".rstrip())
    if page.has_more:  # on stderr: stdout stays the rows, for a pipe
        typer.echo(f"{len(jobs)} listed; more follow: --offset {offset + len(jobs)} lists the next ones.", err=True)


@jobs_app.command("show")
def jobs_show(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Show one job (state, progress, adapter or error); exit 1 if it failed or was cancelled."""
    try:
        settings = load_settings()
        job = trainer_client.get_job(settings, job_id)
    except LunaError as err:
        raise fail(err) from None
    typer.echo(
        json_text(job.wire()) if as_json else f"{job.id}  {job.status}  {summary(job)}{_resume_note(settings, job)}"
    )
    log = job_log_path(settings.trainer_logs_dir, job.id)
    if not as_json and log.is_file():  # the job's details: parameters, each step's line, a crash's traceback
        typer.echo(f"log: {log.relative_to(settings.home)}")
    if job.status in ("failed", "cancelled"):
        raise typer.Exit(1)


@jobs_app.command("follow")
def jobs_follow(job_id: JobArg) -> None:
    """Follow a job's progress until it ends (Ctrl-C detaches)."""
    try:
        job = follow_and_report(load_settings(), job_id)
    except LunaError as err:
        raise fail(err) from None
    raise typer.Exit(0 if job.status == "succeeded" else 1)


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArg) -> None:
    """Cancel a queued or running job (a running one stops at its next step; nothing is registered). One whose
    adapter was registered already keeps that version, inactive: a cancel during its eval gate activates nothing."""
    try:
        job = trainer_client.cancel(load_settings(), job_id)
    except LunaError as err:
        raise fail(err) from None
    typer.echo(f"{job.id}  {job.status}")


@jobs_app.command("resume")
def jobs_resume(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Submit a failed or cancelled job again with its own parameters and resume on, and follow it: it continues
    from its last epoch checkpoint (`lunatrain lora --resume` resolves the profile's values: another run)."""
    from .flow import service_lora
    from .lora import report

    def refuse_succeeded(job: Job) -> None:
        if job.status == "succeeded":
            raise UsageError(f"Job {job.id} succeeded{': ' + summary(job) if summary(job) else ''}; nothing to resume.")

    try:
        settings = load_settings()
        trainer_client.check_job_id(job_id)  # a malformed id is said as `jobs show` says it
        # What the data root's job database says without a trainer: a job it does not hold, or one that
        # succeeded, starts none (a typo would leave a trainer running for nothing).
        recorded, _ = _recorded(settings, job_id, None)
        # No job database: no trainer ever ran on this data root (it makes one as it starts), so no job either.
        if recorded is NOT_RECORDED or not jobs_db_path(settings.data_dir).is_file():
            raise NotFound(f"No job {job_id!r}; `lunatrain jobs list` lists the jobs.")
        if recorded is not None:
            refuse_succeeded(recorded)
        ensure_trainer(settings)  # on demand, as `lora` submits: the job's hint is read when the trainer stopped
        job = trainer_client.get_job(settings, job_id)
        if not job.finished:
            raise UsageError(f"Job {job.id} is {job.status}; follow it with `lunatrain jobs follow {job.id}`.")
        refuse_succeeded(job)
        try:
            params = job.lora_params().model_copy(update={"resume": True})
        except ValidationError as exc:  # a job an older release recorded, with parameters this one has not
            said = format_validation_error(exc, "parameters", "unknown parameter")
            raise UsageError(
                f"Job {job.id} cannot be resumed by this release ({said.rstrip('.')}); submit it anew with "
                "`lunatrain lora`."
            ) from None
        outcome = service_lora(settings, params, job.options, job.gate_thresholds, stderr=as_json)
        report(settings, outcome, job.options, as_json)
    except LunaError as err:
        raise fail(err) from None


@jobs_app.command("events")
def jobs_events(
    job_id: JobArg,
    after: Annotated[int, typer.Option("--after", min=0, help="only events after this sequence number")] = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="at most this many events")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's events (progress, eval, log, status), oldest first (--json: the API's event page, with
    `hasMore` and `lastSeq` to pass as --after; an empty `data` past the end)."""
    try:
        page = trainer_client.events(load_settings(), job_id, after=after, limit=limit)
    except LunaError as err:
        raise fail(err) from None
    if as_json:
        typer.echo(json_text(page.wire()))
        return
    for ev in page.data:
        typer.echo(f"{ev.seq:>6} {ev.created_at} {describe_event(ev)}")
    if not page.data and after == 0:
        # Every job records its status events, so none at all means the retention policy removed them; an
        # empty output would read as a job that never did anything.
        typer.echo(
            f"Job {job_id} has no events: `lunatrain gc` (and the trainer after each job) removes those of older "
            "finished jobs (ASSISTANT_RETAIN_JOBS, ASSISTANT_RETAIN_JOB_DAYS); `lunatrain jobs show` still shows "
            "its outcome.",
            err=True,
        )
    if page.has_more:
        # A page is --limit events: without this line a cut-short list reads as the whole job. On stderr, so
        # that stdout stays one event a line.
        typer.echo(f"More events follow: `lunatrain jobs events {job_id} --after {page.last_seq}`.", err=True)


# --- following a job -----------------------------------------------------------------------------
def summary(job: Job) -> str:
    if job.status == "succeeded" and job.adapter:
        gate = job.gate or {}
        verdict = "" if not gate else f", gate {'passed' if gate.get('passed') else gate.get('status') or 'not passed'}"
        notes = gate.get("notes") if isinstance(gate.get("notes"), list) else []
        if gate.get("passed") and gate.get("promoted") is False and notes:
            # passed, not made active by this gate: "gate passed" alone reads as active; its note says why
            # ("not activated: the job was cancelled while the gate ran", "already active", "not kept: …")
            verdict += f", {notes[0]}"
        loss = job.metrics.get("valLoss", job.metrics.get("trainLoss"))
        return (
            f"adapter {job.adapter.name}@{job.adapter.version}"
            # the overwrite slot's run: the slot's path holds a later run once another job replaced it
            + (f" rev {job.adapter.revision}" if job.adapter.revision is not None else "")
            + f" ({job.adapter.path})"
            + (f", val loss {loss:.4f}" if isinstance(loss, int | float) else "")
            + verdict
        )
    if job.error:
        return f"{job.error.code}: {job.error.message}"
    p = job.progress
    if job.status in ("running", "cancelling") and p.total_steps:
        return f"step {p.step}/{p.total_steps} ({math.floor(p.percent)}%)"  # cut, as the progress line does
    if job.status == "cancelled":
        return f"at step {p.step} of {p.total_steps}" if p.total_steps else "before its first step"
    return ""


def describe_event(ev: Event) -> str:
    """An event as one line after its type: a training event in the local run's wording (progress.event_line)."""
    data = ev.model_extra or {}
    line = event_line({"type": ev.type, **data})
    if line is not None:
        return f"{ev.type} {line}"
    if ev.type == "status":
        extra = data.get("error") or {}
        return (
            f"status {data.get('status')}"
            + (f" ({extra.get('code')}: {extra.get('message')})" if extra else "")
            # a cancel's message is "cancelled": said once ("status cancelled"), not "status cancelled - cancelled"
            + (f" - {data['message']}" if data.get("message") and data.get("message") != data.get("status") else "")
        )
    return f"{ev.type} " + " ".join(f"{k}={_num(v)}" for k, v in data.items())


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class _Plain:
    """Line output for logs and pipes: every non-progress event, progress at most every 5 s or 10 %."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._last_t = 0.0
        self._last_pct = -100.0

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def show(self, ev: Event) -> None:
        if ev.type == "progress":
            d = ev.model_extra or {}
            pct = float(d.get("percent") or 0)
            if time.monotonic() - self._last_t < 5 and pct - self._last_pct < 10 and pct < 100:
                return
            self._last_t, self._last_pct = time.monotonic(), pct
        typer.echo(describe_event(ev), err=self._stderr)

    def say(self, line: str) -> None:
        typer.echo(line, err=self._stderr)


class _Bar:
    """Rich progress bar with step, loss, tokens/s and ETA; other events print above it."""

    def __init__(self, job_id: str, stderr: bool = False) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        # The ETA is the engine's (it knows the step time without model loading), so no rich time column.
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=stderr),
        )
        self._task = self._progress.add_task(job_id, total=None, info="")

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def show(self, ev: Event) -> None:
        d = ev.model_extra or {}
        if ev.type == "progress":
            info = " ".join(progress_details(d))  # the step is the bar's own column
            self._progress.update(self._task, completed=d.get("step") or 0, total=d.get("totalSteps"), info=info)
        else:
            self.say(describe_event(ev))

    def say(self, line: str) -> None:
        self._progress.console.print(line, markup=False, highlight=False)


# Seconds without an event of a running job after which the follower asks the trainer whether it can still
# record it (a step of a large model on a slow device can take longer: then the answer is simply yes).
SILENCE_S = 15.0


def follow(
    settings: Settings,
    job_id: str,
    *,
    poll: float = 0.5,
    unreachable_s: float = 15.0,
    stderr: bool = False,
    seen: dict[str, Any] | None = None,
) -> Job:
    """Show a job's events as they come (on stderr with `stderr`) until it ends; return the final job.
    Ctrl-C raises KeyboardInterrupt. `seen["status"]`: the job's state at the last poll (what a detach says)."""
    seen = {} if seen is None else seen
    after, lost_since, said_ahead = 0, None, None
    news = time.monotonic()  # when the job last had an event, or its health was last asked about its silence
    with _Bar(job_id, stderr) if is_tty(stderr) else _Plain(stderr) as view:
        while True:
            try:
                page = trainer_client.events(settings, job_id, after=after, limit=500)
                for ev in page.data:
                    view.show(ev)
                if page.data:
                    news = time.monotonic()
                after = page.last_seq
                if page.has_more:
                    continue
                job = trainer_client.get_job(settings, job_id)
                seen["status"] = job.status
                # Ended, and no event came after the last one shown: asked here, where a trainer gone in
                # this moment (one stops after an update once idle) is read from its database below.
                done = job.finished and not trainer_client.events(settings, job_id, after=after, limit=1).data
                lost_since = None
            except ServiceUnavailable as err:
                # The trainer is away. What it recorded before it went lies in its database under this data
                # root: a job it settled as it stopped (an orderly stop: failed, interrupted) is over, and
                # that is the outcome to report, at once.
                recorded, missed = _recorded(settings, job_id, after)
                for ev in missed:
                    view.show(ev)
                    after = ev.seq
                if recorded is NOT_RECORDED:  # the database holds every job the trainer ever accepted here
                    cause = err.message.rstrip(".")
                    raise NotFound(
                        f"No job {job_id} is recorded under this data root ({cause[:1].lower()}{cause[1:]})."
                    ) from None
                if recorded is not None and recorded.finished:
                    return recorded
                if recorded is not None and (ended := as_its_report_says(settings, recorded)) is not None:
                    return ended  # its trainer was killed: the job's own report says how it ended
                # A trainer restarting is not the end of the job: keep asking for a while.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > unreachable_s:
                    # The outcome is not known yet: name the job, or the user (whose screen shows the job id
                    # many lines up, if at all) has no way to look it up once the trainer is back.
                    state = f" (last recorded as {recorded.status})" if recorded is not None else ""
                    raise ServiceUnavailable(
                        f"Stopped following job {job_id}{state}: {err.message.rstrip('.')}; once it is back, "
                        f"`lunatrain jobs follow {job_id}` continues and `lunatrain jobs show {job_id}` says "
                        "how the job ended."
                    ) from None
                time.sleep(1.0)
                continue
            if done:
                return job
            if job.status != "queued" and time.monotonic() - news > SILENCE_S:
                # A trainer that cannot write its database (a full disk) records neither the job's events nor
                # its end: the job would stay `running` for as long as that lasts, and this follower silent.
                news = time.monotonic()
                health = trainer_client.probe(settings)
                if health is not None and health.storage:
                    raise ServiceUnavailable(
                        f"Stopped following job {job_id} (last recorded as {job.status}): the trainer cannot record "
                        f"it: {health.storage} Once that is fixed the trainer records how the job ended: `lunatrain "
                        f"jobs show {job_id}`."
                    )
            if job.status == "queued":
                # A job that cannot start because the trainer's storage fails would wait forever: say why.
                health = trainer_client.probe(settings)
                if health is not None and health.storage:
                    raise ServiceUnavailable(f"Job {job_id} cannot start: {health.storage}")
                # What it waits for, once per change of the jobs ahead: a queued job said nothing while another
                # ran for hours (not at each poll: the step of the one ahead moves on).
                ahead = waiting_behind(settings, job)
                if ahead is not None and ahead[0] != said_ahead:
                    view.say(ahead[1])
                    said_ahead = ahead[0]
            time.sleep(poll)


def waiting_behind(settings: Settings, job: Job) -> tuple[tuple[str, int], str] | None:
    """What a queued `job` waits for: a key that changes only when the jobs ahead do (the first one, how many),
    and a line saying it ("queued behind job … (NAME, running at step 3/40) and 2 more jobs"); None when the
    trainer lists none ahead of it or cannot be asked."""
    try:
        running = _all_jobs(settings, "running") + _all_jobs(settings, "cancelling")
        queued = _all_jobs(settings, "queued")  # newest first, as the queue holds them: the older ones run first
    except LunaError:
        return None
    ids = [j.id for j in queued]
    ahead = running + (list(reversed(queued[ids.index(job.id) + 1 :])) if job.id in ids else [])
    if not ahead:
        return None
    first, p = ahead[0], ahead[0].progress
    step = f" at step {p.step}/{p.total_steps}" if first.status != "queued" and p.total_steps else ""
    more = f" and {counted(len(ahead) - 1, 'more job')}" if len(ahead) > 1 else ""
    line = f"queued behind job {first.id} ({first.params.get('adapterName', '?')}, {first.status}{step}){more}"
    return (first.id, len(ahead)), line


def _all_jobs(settings: Settings, status: str) -> list[Job]:
    """Every job of `status`, newest first, page by page (a queue may hold hundreds)."""
    jobs: list[Job] = []
    while True:
        page = trainer_client.job_page(settings, limit=500, offset=len(jobs), status=status)
        jobs += page.data
        if not page.has_more or not page.data:
            return jobs


NOT_RECORDED: Any = object()  # `_recorded`'s job when the database was read and holds no such job


def _recorded(settings: Settings, job_id: str, after: int | None) -> tuple[Job | None, list[Event]]:
    """The job as the trainer's database under this data root records it, and its events after `after` (none
    for None); (NOT_RECORDED, []) when it holds no such job, (None, []) when there is none or it cannot be
    read."""
    try:
        with existing_store(settings.data_dir) as store:
            if store is None:
                return None, []
            try:
                job, events = store.get(job_id), []
            except NotFound:
                return NOT_RECORDED, []
            while after is not None:
                page = store.events(job_id, after=after, limit=500)
                events += page.data
                if not page.has_more:
                    break
                after = page.last_seq
            return job, events
    except (LunaError, sqlite3.Error, OSError):
        return None, []


def follow_and_report(settings: Settings, job_id: str, *, stderr: bool = False) -> Job:
    """Follow the job, print its outcome (on stderr with `stderr`: `lora --json`, whose stdout is the outcome
    document) and return the job as it ended. Ctrl-C prints how to come back and exits 130 (typer.Exit, so
    that callers such as `lunatrain lora` end the same way)."""
    seen: dict[str, Any] = {}
    try:
        with stops_as_interrupts():  # `timeout` or a closed terminal: said as Ctrl-C is, not a silent end
            job = follow(settings, job_id, stderr=stderr, seen=seen)
    except KeyboardInterrupt as exc:
        said_interrupted()
        how = f"{exc.signum.name}: detached" if isinstance(exc, Signalled) else "Detached"
        # A job still waiting is not said to run: its state as the last poll saw it (asking the trainer again
        # here would keep a detach waiting on one that does not answer).
        goes_on = "stays queued" if seen.get("status") == "queued" else "keeps running"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            typer.echo(
                f"\n{how}; job {job_id} {goes_on} in the trainer. Follow it: `lunatrain jobs follow {job_id}`; "
                f"state: `lunatrain jobs show {job_id}`; stop it: `lunatrain jobs cancel {job_id}`.",
                err=True,
            )
        raise typer.Exit(128 + int(exc.signum) if isinstance(exc, Signalled) else DETACHED) from None
    said = f"Job {job.id} {job.status}" + (f": {summary(job)}" if summary(job) else ".")
    note = _resume_note(settings, job)  # a sentence of its own after the summary, which may end in a period
    typer.echo(said.rstrip(".") + note if note else said, err=stderr)
    return job


def _resume_note(settings: Settings, job: Job) -> str:
    """For a job cancelled after an epoch checkpoint: how to continue it (a cancel keeps the checkpoints, and
    `jobs resume` finishes the run to the weights it would have had); else nothing."""
    if job.status != "cancelled":
        return ""
    from ..service.recovery import checkpoint_since, resume_hint

    # On disk, not in its events: a resume that finished the run took the checkpoints with its publish.
    return f"; {resume_hint(job.id)}." if checkpoint_since(settings, job) else ""
