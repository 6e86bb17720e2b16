"""Process identity survives wall-clock steps: an owner recorded before an NTP correction is still itself."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from lunatrain import procs


def test_a_start_recorded_before_a_wall_clock_step_still_names_the_process(monkeypatch):
    from psutil import _pslinux

    start = procs.started(os.getpid())
    real = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, "boot_time", lambda: real - 3600)
    assert procs.is_same(os.getpid(), start)
    assert not procs.is_same(os.getpid(), start - 1)  # another process's start


def test_an_epoch_start_from_an_earlier_version_is_still_compared():
    assert procs.is_same(os.getpid(), psutil.Process().create_time())
    assert not procs.is_same(os.getpid(), psutil.Process().create_time() - 60)


def test_a_process_that_ended_is_no_such_process():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(psutil.NoSuchProcess):
        procs.started(child.pid)


def test_the_start_is_the_kernels_count_from_boot_even_for_a_name_with_spaces_and_parens():
    # renames itself, says so, and waits to be killed below (30 s only bounds its life if the test dies)
    code = "open('/proc/self/comm', 'w').write('a) b (c'); print(flush=True); import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # renamed
        assert psutil.Process(child.pid).name() == "a) b (c"
        from psutil import _pslinux

        assert procs.started(child.pid) == _pslinux.Process(child.pid).create_time(monotonic=True)
    finally:
        child.kill()
        child.wait()


def test_a_host_up_for_years_is_not_taken_for_an_epoch_stamp(monkeypatch):
    """Review repro: the first threshold (1e8 s) took the start of a process on a host up for more than 3.2
    years for an epoch stamp of an earlier version, so a live owner looked gone."""
    four_years = 4 * 365 * 86400.0
    monkeypatch.setattr(procs, "started", lambda pid: four_years)
    assert procs.is_same(os.getpid(), four_years)
