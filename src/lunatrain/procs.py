"""Which process is which, across processes and restarts: a pid plus the moment it started.

A pid alone may be reused by an unrelated process, so every record of "the process that owns this" keeps its
start too. That start is taken from a clock that never steps: on Linux the kernel's count of clock ticks from
boot to the process's creation (/proc/PID/stat). psutil's `create_time()` adds the boot time as of now to it,
and the boot time moves with every wall-clock step (an NTP correction, a suspended laptop): after one, a
running owner would look like another process, and its live run would be settled as orphaned.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

# Starts recorded by earlier versions are epoch seconds (above 1.7e9); a start since boot is below this
# unless the host has run for 31 years.
_EPOCH_STAMPS = 1e9


def started(pid: int) -> float:
    """When `pid` started, in seconds on a clock that does not step; raises psutil.NoSuchProcess when it does
    not run, psutil.Error when it cannot be asked."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the line: starttime
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            raise psutil.NoSuchProcess(pid) from None
    except (OSError, IndexError, ValueError):
        pass
    return psutil.Process(pid).create_time()  # no /proc (macOS): wall-clock based, the best there is


def is_same(pid: int, start: float) -> bool:
    """Whether the process running as `pid` is the one recorded as started at `start` (by `started`, or as
    epoch seconds by an earlier version); raises psutil.NoSuchProcess when none runs."""
    if start > _EPOCH_STAMPS:
        return abs(psutil.Process(pid).create_time() - start) <= 0.5
    return abs(started(pid) - start) < 0.005  # the same tick count: exact up to float rounding


def data_root_of(proc: psutil.Process, *, unset_is_cwd: bool = True) -> Path | None:
    """The data root the lunatrain process `proc` works for, read as settings.py reads ASSISTANT_HOME: any case of
    the name, without surrounding spaces, `~` its own home (not this process's), relative to its working
    directory. Unset: its working directory (the default root), or None without `unset_is_cwd`. psutil.Error
    when the process cannot be read (another user's, gone)."""
    env = {k.upper(): v for k, v in proc.environ().items()}
    named = env.get("ASSISTANT_HOME", "").strip()
    if not named and not unset_is_cwd:
        return None
    if named == "~" or named.startswith("~/"):
        named = env.get("HOME", "~") + named[1:]
    return Path(proc.cwd()) / Path(named).expanduser()  # an absolute one replaces the working directory
