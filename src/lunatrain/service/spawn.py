"""The one way lunatrain starts its own processes (the trainer, a job's worker, the device probe): the same
Python, the same lunatrain (installed or run from a checkout), the data root passed explicitly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..settings import Settings

_SRC = str(Path(__file__).resolve().parents[2])  # the directory holding the `lunatrain` package


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment with ASSISTANT_HOME set to `settings.home`, and PYTHONPATH leading to the
    lunatrain this process runs, so a child never imports another copy."""
    env = dict(os.environ, ASSISTANT_HOME=str(settings.home), **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def lunatrain_argv(*args: str) -> list[str]:
    """`lunatrain ARGS…` run by this interpreter (no dependence on a console script being on PATH)."""
    return [sys.executable, "-m", "lunatrain", *args]


def worker_argv(*args: str) -> list[str]:
    """A job's child process (internal protocol, see worker.py)."""
    return [sys.executable, "-m", "lunatrain.service.worker", *args]
