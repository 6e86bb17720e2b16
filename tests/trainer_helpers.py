"""Helpers for tests that run the real trainer service as a process on a loopback port.

`start_trainer(home, port=0, env)` starts `lunatrain trainer` in its own process group (port 0: the trainer
binds a port the OS picks, so no other process can take it between choosing and binding) and waits (bounded)
until the address it records in data/trainer/trainer.url answers /health; the process's `url` is that address.
`recorded_url(path, proc, timeout)` waits for such a record; `stop_group(pid)` ends a process group;
`trainer_processes(home)` finds the trainer processes of a data root (to count them, or to prove none is
left). `wait_for(predicate, timeout)` polls until the predicate holds, and returns its last value.
`ON_DEMAND_ENV` is the environment for a test whose command starts the trainer on demand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

T = TypeVar("T")


# For tests whose command or API server starts the trainer on demand: a cold start is two interpreters (the
# trainer, then its warm worker importing torch to measure the device before /health answers), which on a
# loaded 2-core machine can outlast the default 60 s; the test's own bounds apply instead.
ON_DEMAND_ENV = {"ASSISTANT_LORA_ENSURE_TIMEOUT": "300"}


class TrainerProcess(subprocess.Popen):
    url: str  # the address the trainer recorded once it listened


@contextlib.contextmanager
def bound_port() -> Iterator[int]:
    """A port bound, never listening, for the block: connections are refused and nobody else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def trainer_env(home: Path, port: int = 0, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    env["ASSISTANT_HOME"] = str(home)
    if port:  # a fixed port is this data root's address; with port 0 the trainer's record is
        env["ASSISTANT_LORA_TRAINER_URL"] = f"http://127.0.0.1:{port}"
    return env | extra


def healthy(url: str, token: str | None = None) -> dict[str, Any] | None:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(url + "/health", timeout=2.0, trust_env=False, headers=headers)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def read_url(path: Path) -> str | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text.strip() if text.endswith("\n") else None  # written atomically, so whole or absent


def recorded_url(path: Path, proc: subprocess.Popen, timeout: float) -> str | None:
    """The address a server recorded in `path`, once it did (None when `proc` exits or time runs out first).
    Remove an older record before starting the server: this waits for the file to appear."""
    found = wait_for(lambda: read_url(path) or proc.poll() is not None, timeout)
    return found if isinstance(found, str) else None


def start_trainer(home: Path, port: int = 0, *, timeout: float = 300.0, **env: str) -> TrainerProcess:
    """Start `lunatrain trainer --port PORT` on `home` and wait until it answers where it says it listens."""
    record = home / "data" / "trainer" / "trainer.url"
    record.unlink(missing_ok=True)  # an earlier trainer's address is not this one's
    log_path = home / f"trainer-{port}.log"
    log = open(log_path, "ab")  # the child holds it
    proc = TrainerProcess(
        [sys.executable, "-m", "lunatrain", "trainer", "--port", str(port)],
        cwd=home,
        env=trainer_env(home, port, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + timeout
    url = recorded_url(record, proc, timeout)
    token = env.get("ASSISTANT_API_TOKEN")
    up = url and wait_for(lambda: proc.poll() is not None or healthy(url, token), deadline - time.monotonic())
    if not up or proc.poll() is not None:
        stop_group(proc.pid)
        raise RuntimeError(f"trainer did not start: {log_path.read_text()[-2000:]}")
    if port:
        assert url == f"http://127.0.0.1:{port}", url
    proc.url = url
    return proc


def stop_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def trainer_processes(home: Path) -> list[psutil.Process]:
    """Live `lunatrain trainer` processes started in `home` (ensure and start_trainer run them there)."""
    found, where = [], str(Path(home).resolve())
    for proc in psutil.process_iter(["cmdline", "status", "cwd"]):
        cmd = proc.info["cmdline"] or []
        is_trainer = "lunatrain" in cmd and "trainer" in cmd
        if proc.info["status"] != psutil.STATUS_ZOMBIE and is_trainer and proc.info["cwd"] == where:
            found.append(proc)
    return found


def kill_trainers(home: Path) -> None:
    for proc in trainer_processes(home):
        stop_group(proc.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
