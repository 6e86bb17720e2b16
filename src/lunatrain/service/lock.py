"""One trainer per data root: an exclusive lock held for the process's life, the pid file, the log's bound."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

import psutil

from ..errors import Conflict
from ..fsio import atomic_write_text
from ..settings import Settings

TRAINER_LOG_BYTES = 10 * 1024 * 1024  # trainer.log (and one trainer.log.1) stay under this while running
_instance_lock: IO[bytes] | None = None


def lock_path(settings: Settings) -> Path:
    """The file a trainer holds locked for as long as it serves the data root (`claim_data_root`)."""
    return settings.trainer_dir / "trainer.lock"


def claim_data_root(settings: Settings) -> None:
    """Hold an exclusive lock for this process's life: two trainers on one data root would run two jobs
    on one device and race on the same database. The kernel drops it when the process dies, even by -9."""
    global _instance_lock
    path = lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+b")  # held open on purpose until exit
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise another_trainer(settings) from None
    _instance_lock = fh


def another_trainer(settings: Settings) -> Conflict:
    """The refusal of a second trainer for a data root whose trainer runs (its pid and address, as known)."""
    return Conflict(
        f"Another trainer is already running for the data root {settings.home}{_running_where(settings)}; "
        "use it, or stop it before starting another."
    )


def _running_where(settings: Settings) -> str:
    """` (pid N, at URL)` from the running trainer's pid file and address record, as far as they are there:
    with --port 0 its address is a port the OS picked, which the user cannot guess."""
    found = [f"pid {pid}"] if (pid := read_pid(settings)) is not None else []
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if url := settings.trainer_url_file.read_text(encoding="utf-8").strip():
            found.append(f"at {url}")
    return f" ({', '.join(found)})" if found else ""


def pid_path(settings: Settings) -> Path:
    return settings.reports_training_dir / "trainer.pid"


def write_pid(settings: Settings, pid: int | None = None) -> None:
    atomic_write_text(pid_path(settings), f"{pid or os.getpid()}\n")


def read_pid(settings: Settings) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(pid_path(settings).read_text().strip())
    return None


def remove_pid(settings: Settings, pid: int | None = None, previous: int | None = None) -> None:
    """Remove the pid file if it still names `pid` (default: this process), never another trainer's; with
    `previous` (what the file named before `pid` was written) still running as this data root's trainer,
    give the file back to it. (A pid file copied with the data root names another root's trainer.)"""
    if read_pid(settings) != (pid or os.getpid()):
        return
    with contextlib.suppress(OSError):
        if previous is not None and psutil.pid_exists(previous) and trainer_lock_held(settings):
            write_pid(settings, previous)
        else:
            pid_path(settings).unlink()


def trainer_lock_held(settings: Settings) -> bool:
    """Whether a process holds this data root's trainer lock (`claim_data_root`): a trainer of it runs."""
    path = lock_path(settings)
    try:
        with open(path, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no trainer ever ran here
        return False
    return False
