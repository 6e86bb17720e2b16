"""Ensure the trainer: return its health, starting it first when it is not reachable (guide §"Ensure").

One function for the assistant API (`?ensureTrainer=true`, the start endpoints) and the CLI
(`--ensure-trainer`). The trainer is started detached — its own session, so it outlives the caller and a
Ctrl-C in the caller's terminal never reaches it — on the host and port of ASSISTANT_LORA_TRAINER_URL (on a
free port the OS picks when that address serves another data root), or
by ASSISTANT_LORA_TRAINER_START_CMD (split like a shell would, never run through one). Its output goes to
`reports/training/trainer.log`, its pid to `reports/training/trainer.pid`.

Concurrent callers (threads or processes) start one trainer: check-and-start runs under a file lock, and
whoever gets the lock second finds the first one's trainer healthy.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ServiceUnavailable, UsageError
from ..fsio import file_lock, storage_error
from ..settings import Settings
from ..wire import now_iso
from . import client as trainer_client
from .jobs import Health
from .lock import TRAINER_LOG_BYTES, read_pid, remove_pid, trainer_lock_held, write_pid
from .spawn import child_env, lunatrain_argv

_POLL_S = 0.25
# The trainer rolls trainer.log over itself while running (service/app.py); what its process writes to
# stderr outside logging (a crash at start-up) lands in the same file, so a start also moves a log over
# this size to trainer.log.1.
LOG_KEEP_BYTES = TRAINER_LOG_BYTES
_started: list[subprocess.Popen[bytes]] = []  # kept so that exited trainers get reaped, not left as zombies


def log_path(settings: Settings) -> Path:
    return settings.reports_training_dir / "trainer.log"


def ensure_trainer(settings: Settings, *, timeout: float | None = None, explicit: bool = False) -> Health:
    """The trainer's health; start it and wait (at most `timeout`, default ASSISTANT_LORA_ENSURE_TIMEOUT)
    when it does not answer.

    With ASSISTANT_LORA_ENSURE_ON_DEMAND=false nothing is started and an unreachable trainer is a
    ServiceUnavailable — unless `explicit` (the user asked for it: `--ensure-trainer`, `?ensureTrainer=true`).
    """
    _reap()
    health = trainer_client.probe(settings)
    # An outdated idle trainer is about to stop: wait for it and start the updated one, where we may start one.
    restart = (settings.lora_ensure_on_demand or explicit) and health is not None and _stops_for_update(health)
    if health is not None and trainer_client.serves_this_root(settings, health) and not restart:
        return health
    if not settings.lora_ensure_on_demand and not explicit:
        if health is None:
            raise ServiceUnavailable(
                f"The trainer {trainer_client.where(settings)} is not reachable and starting it on demand is "
                "off (ASSISTANT_LORA_ENSURE_ON_DEMAND=false); start it with `lunatrain trainer`.",
                params={"detail": "trainer.on_demand_off"},
            )
        # Another data root's trainer (or another service) answers at our address: this root's trainer is not
        # running either, and starting one on a free port is starting it on demand, which is off.
        _refuse_chosen_address(settings, health)
        raise ServiceUnavailable(
            f"The trainer address {trainer_client.base_url(settings)} is held by {trainer_client.holder(health)}, "
            f"and this data root's trainer ({settings.home}) is not running; starting it on demand is off "
            "(ASSISTANT_LORA_ENSURE_ON_DEMAND=false): start it with `lunatrain trainer --port 0`.",
            params=trainer_client.held_detail(settings),
        )
    start_argv(settings)  # a start command that cannot be, refused before anything is written here
    timeout = settings.lora_ensure_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    with file_lock(settings.trainer_dir / "ensure.lock"):
        # Another caller may have started it while we waited for the lock. The full probe timeout: a trainer
        # that answers slowly (a busy machine) must not be taken for none, or a second one would be started.
        health = trainer_client.probe(settings)
        if health is not None and trainer_client.serves_this_root(settings, health) and _stops_for_update(health):
            health = _wait_stopped(settings, deadline, timeout)
        port = None
        if health is not None:
            if trainer_client.serves_this_root(settings, health):
                return health
            _refuse_chosen_address(settings, health)
            port = 0  # our address serves another data root: ours goes on a free port and records it
        elif trainer_client.base_url(settings).rstrip("/") != settings.lora_trainer_url.rstrip("/"):
            # Nothing answers where our last trainer recorded it served, a port other than the configured one
            # (which may have been taken then, and still be): start on a free port again.
            port = 0
        if time.monotonic() >= deadline:
            raise _timeout(settings, timeout)
        previous = read_pid(settings)
        proc = start_trainer(settings, port=port)
        try:
            return _wait_healthy(settings, proc, deadline, timeout)
        except ServiceUnavailable:
            # The process it names exited or was stopped: a pid file left naming it would send the next
            # `kill $(cat trainer.pid)` to whatever reuses that pid. A trainer that is still running (one that
            # answered too slowly, whose data root the new one found taken) gets its record back.
            remove_pid(settings, proc.pid, previous=previous)
            raise


def _stops_for_update(health: Health) -> bool:
    """This root's trainer runs lunatrain's code from before an update and has no job: it stops by itself
    (runner.py, UPDATE_GRACE_S after its last job), so that the updated trainer can start. A busy one
    finishes its queue first, and a job submitted now joins that queue."""
    return health.code_changed and not (health.queue.running or health.queue.queued)


def _wait_stopped(settings: Settings, deadline: float, timeout: float) -> Health | None:
    """Wait until the outdated trainer has stopped (None), or another answers for this data root (its
    health: it may have been started by a concurrent caller without the lock, e.g. by hand). Stopped means
    gone, not only quiet: it closes its listening socket before it has let go of the data root's trainer
    lock, and a trainer started in between refused to start ("Another trainer is already running")."""
    while True:
        health = trainer_client.probe(settings, timeout=1.0)
        if health is not None and not (trainer_client.serves_this_root(settings, health) and health.code_changed):
            return health
        if health is None and not trainer_lock_held(settings):
            return None
        if time.monotonic() >= deadline:
            pid = read_pid(settings)
            raise ServiceUnavailable(
                f"The trainer {trainer_client.where(settings)} runs lunatrain's code from before an update and "
                f"did not stop within {timeout:g}s to start again with the updated code; stop it"
                + (f" (`kill {pid}`)" if pid else "")
                + " and run the command again.",
                params={"detail": "trainer.update_timeout", "seconds": timeout},
            )
        time.sleep(_POLL_S)


def _refuse_chosen_address(settings: Settings, health: Health) -> None:
    """The trainer at our address serves another data root. With an address the user chose, refuse; else
    the caller starts our own trainer on a port the OS picks, and that trainer records it under this data
    root (binding the port itself: a port picked here and bound later could be taken in between)."""
    if trainer_client.chosen_address(settings) or settings.lora_trainer_start_cmd:
        raise trainer_client.other_data_root(settings, trainer_client.holder(health))


def start_argv(settings: Settings, port: int | None = None) -> list[str]:
    """How the trainer is started: ASSISTANT_LORA_TRAINER_START_CMD, else `lunatrain trainer` on the host and
    port of ASSISTANT_LORA_TRAINER_URL (`port` instead when given; 0: a free one)."""
    if settings.lora_trainer_start_cmd:
        try:
            argv = shlex.split(settings.lora_trainer_start_cmd)
        except ValueError as exc:
            raise UsageError(f"Invalid ASSISTANT_LORA_TRAINER_START_CMD: {exc}.") from None
        if not argv:
            raise UsageError("ASSISTANT_LORA_TRAINER_START_CMD is empty.")
        return argv
    refuse_tls(settings)
    host, configured = trainer_client.trainer_address(settings)
    port = configured if port is None else port
    return lunatrain_argv("trainer", "--host", host, "--port", str(port), "--log-file", str(log_path(settings)))


def refuse_tls(settings: Settings) -> None:
    """UsageError for an https:// trainer address: `lunatrain trainer` serves plain http, so its clients would
    never reach it there (a trainer behind TLS is started by ASSISTANT_LORA_TRAINER_START_CMD)."""
    if settings.lora_trainer_url.lower().startswith("https:"):
        raise UsageError(
            f"ASSISTANT_LORA_TRAINER_URL is {settings.lora_trainer_url}, but `lunatrain trainer` serves plain http: "
            "use http://HOST:PORT, or set ASSISTANT_LORA_TRAINER_START_CMD to start a trainer behind TLS there."
        )


def _shown(settings: Settings, argv: list[str]) -> str:
    """The command as the log and a message show it: without the API token, which a start command may pass
    on (`ssh gpu-box env ASSISTANT_API_TOKEN=… lunatrain trainer`); the log is what users paste into issues."""
    # Each word masked before quoting: a token with a quote or a space is quoted apart, into pieces.
    token = settings.api_token
    return shlex.join([word.replace(token, "***") for word in argv] if token else argv)


def start_trainer(settings: Settings, port: int | None = None) -> subprocess.Popen[bytes]:
    """Start the trainer detached, logging to trainer.log; does not wait for it."""
    argv = start_argv(settings, port)
    log = log_path(settings)
    env = child_env(settings, ours=not settings.lora_trainer_start_cmd)
    with _start_log(settings, log, f"\n--- {now_iso()} starting trainer: {_shown(settings, argv)}\n") as fh:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=settings.home,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceUnavailable(
                f"Could not start the trainer ({_shown(settings, argv)}): {exc}.",
                params={"detail": "trainer.start_failed", "why": str(exc)},
            ) from None
    _started.append(proc)
    write_pid(settings, proc.pid)
    return proc


@contextlib.contextmanager
def _start_log(settings: Settings, log: Path, header: str) -> Iterator[BinaryIO]:
    """trainer.log opened for the new trainer's output, `header` written first. A write that fails (a full
    disk) is said in the one storage sentence before anything starts, and a log it left empty goes."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        if log.exists() and log.stat().st_size > LOG_KEEP_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))
        fh = open(log, "ab", buffering=0)  # closed below; unbuffered: a failed write leaves nothing to flush
    except OSError as exc:
        raise storage_error(exc, f"the trainer log {log}") from exc
    with fh:
        try:
            fh.write(header.encode())
        except OSError as exc:
            with contextlib.suppress(OSError):
                if log.stat().st_size == 0:
                    log.unlink()
            raise storage_error(exc, f"the trainer log {log}") from exc
        yield fh


def _refusal(log: Path) -> str | None:
    """The sentence a trainer that refused to start ended its log with (`error: …`, as every command says
    it), else None (a traceback, a start command's own words: the log says those)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - 4096, 0))
            last = fh.read().decode("utf-8", "replace").strip().splitlines()[-1:]
    except OSError:
        return None
    return last[0].removeprefix("error: ").strip() if last and last[0].startswith("error: ") else None


def _wait_healthy(settings: Settings, proc: subprocess.Popen[bytes], deadline: float, timeout: float) -> Health:
    rel_log = settings.shown(log_path(settings))
    while True:
        # Until the new trainer records its address, the record (or the default) may still name another
        # data root's trainer: only our own data root's answer counts.
        health = trainer_client.probe(settings, timeout=1.0)
        if health is not None and trainer_client.serves_this_root(settings, health):
            return health
        code = proc.poll()
        # Exit 0 may be a start command that daemonizes and returns; keep polling for that one.
        if code not in (None, 0):
            said = _refusal(log_path(settings))
            if said:  # the trainer said why in one sentence (a job database it cannot open): that is the news
                raise ServiceUnavailable(
                    f"The trainer exited while starting (status {code}): {said.rstrip('.')}; see {rel_log}.",
                    params={"detail": "trainer.refused_start", "status": code, "why": said, "log": rel_log},
                )
            raise ServiceUnavailable(
                f"The trainer exited while starting (status {code}); see {rel_log} for why.",
                params={"detail": "trainer.exited_starting", "status": code, "log": rel_log},
            )
        if time.monotonic() >= deadline:
            if proc.poll() is None:  # half-started: do not leave it behind to confuse the next attempt
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise _timeout(settings, timeout)
        time.sleep(_POLL_S)


def _timeout(settings: Settings, timeout: float) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The trainer did not become healthy {trainer_client.where(settings)} within {timeout:g}s; "
        f"see {settings.shown(log_path(settings))}.",
        params={"detail": "trainer.start_timeout", "seconds": timeout, "log": settings.shown(log_path(settings))},
    )


def _reap() -> None:
    for proc in list(_started):
        if proc.poll() is not None:
            with contextlib.suppress(ValueError):  # another thread reaped it first
                _started.remove(proc)
