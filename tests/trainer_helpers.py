"""Helpers for tests that run the real trainer service as a process on a free loopback port.

`free_port()` picks a port, `start_trainer(home, port, env)` starts `lunatrain trainer`
in its own process group and waits (bounded) until /health answers; `stop_group(pid)` ends a process group;
`trainer_processes(port)` finds trainer processes by their command line (to count them, or to prove none
is left). `wait_for(predicate, timeout)` polls until the predicate holds, and returns its last value.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def trainer_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    env |= {"ASSISTANT_HOME": str(home), "ASSISTANT_LORA_TRAINER_URL": f"http://127.0.0.1:{port}"}
    return env | extra


def healthy(url: str, token: str | None = None) -> dict[str, Any] | None:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(url + "/health", timeout=2.0, trust_env=False, headers=headers)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def start_trainer(home: Path, port: int, *, timeout: float = 90.0, **env: str) -> subprocess.Popen:
    log = open(home / f"trainer-{port}.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunatrain", "trainer", "--port", str(port)],
        cwd=home,
        env=trainer_env(home, port, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    token = env.get("ASSISTANT_API_TOKEN")
    if not wait_for(lambda: proc.poll() is not None or healthy(url, token), timeout) or proc.poll() is not None:
        stop_group(proc.pid)
        raise RuntimeError(f"trainer did not start: {(home / f'trainer-{port}.log').read_text()[-2000:]}")
    return proc


def stop_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def trainer_processes(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        is_trainer = "lunatrain" in cmd and "trainer" in cmd
        if proc.info["status"] != psutil.STATUS_ZOMBIE and is_trainer and str(port) in cmd:
            found.append(proc)
    return found


def kill_trainers(port: int) -> None:
    for proc in trainer_processes(port):
        stop_group(proc.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
