"""The device facts the trainer reports in /health, probed without touching the GPU from the trainer itself."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psutil

from ..errors import ServiceUnavailable
from ..settings import Settings
from .warm import WarmWorker

log = logging.getLogger("lunatrain.trainer")


# --- the HTTP app --------------------------------------------------------------------------------
# How often a failed probe is tried again (each try starts a child that imports torch: seconds of CPU).
RETRY_SECONDS = 30.0
# How long a job request waits for a probe under way before it is refused (the probe goes on).
PROBE_WAIT_SECONDS = 30.0


class DeviceProbe:
    """The device facts for /health, measured in a child process: creating a CUDA context here would hold
    about half a GiB of GPU memory for the trainer's whole life, memory the jobs need. Measured once when it
    works; a probe that failed (a trainer started at boot before its GPU's driver, a moment without free file
    descriptors) is tried again before a job is refused and beside /health's answer, at most every
    RETRY_SECONDS. Free memory is refreshed live (psutil on CPU, nvidia-smi on CUDA, at most every 2 s)."""

    def __init__(self, settings: Settings, warm: WarmWorker) -> None:
        self._warm = warm
        # Every later probe on one thread that lives as long as the trainer: the warm worker a probe starts dies
        # with the thread that started it (PR_SET_PDEATHSIG follows the parent thread, not the process), so a
        # request's thread or one of its own would take it down as it ends, and a job it forked with it.
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-probe")
        self._pending: Future[None] | None = None
        # Called when a probe that had failed works (the runner's GPU count).
        self.found: Callable[[], None] = lambda: None
        # Set while the probe fails: without the device's facts no job can be planned, so /health says why
        # (degraded) and every job is refused with it, instead of a memory plan for a device of no known kind.
        self.failure: str | None = None
        self.reason = ""
        self.info: dict[str, Any] = {}
        self._probe()  # on the thread that starts the trainer, which lives as long as it
        self._checked = 0.0

    def _probe(self) -> None:
        self._tried = time.monotonic()
        try:
            info = self._warm.start()  # the warm worker measures first (warm.py)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("device probe failed: %s", exc)
            self._warm.close(grace=1.0)  # a child that started but did not answer is not left behind
            self.reason = reason = str(exc)[-200:]
            self.info = {"cudaAvailable": False, "type": "unknown", "name": f"device probe failed: {reason}"}
            self.failure = (
                f"The trainer could not probe its device ({reason}), so it can plan and run no job; it tries "
                f"again at the next job or health check (at most every {RETRY_SECONDS:g} s), or restart it once "
                "that is fixed."
            )
            return
        if self.failure is not None:
            log.info("device probe worked on a later try: %s", info.get("name"))
        self.info, self.failure, self.reason = info, None, ""

    def _retry(self) -> None:
        """Probe again when the last probe failed and RETRY_SECONDS have passed (on the prober's thread)."""
        if self._due():  # asked again once, by a request that waited for the one before
            self._probe()
            if self.failure is None:
                self.found()

    def _due(self) -> bool:
        return self.failure is not None and time.monotonic() - self._tried >= RETRY_SECONDS

    @property
    def gpus(self) -> int:
        """The CUDA devices the probe saw (0 on any other device): the default number of ranks per job."""
        return int(self.info.get("count") or 0) if self.info.get("type") == "cuda" else 0

    def refuse_if_unknown(self) -> None:
        """ServiceUnavailable with the probe's failure, when it failed again now (a job is refused before it is
        planned)."""
        if self._due():
            try:  # after a try under way, if one is; a probe that hangs holds no request (nor a shutdown) long
                self._prober.submit(self._retry).result(timeout=PROBE_WAIT_SECONDS)
            except TimeoutError:
                raise ServiceUnavailable(
                    f"The trainer is probing its device again (it failed before: {self.reason}); try again in a "
                    "minute.",
                    params={"detail": "trainer.no_device", "why": self.reason},
                ) from None
        if self.failure:
            raise ServiceUnavailable(self.failure, params={"detail": "trainer.no_device", "why": self.reason})

    def retry_aside(self) -> None:
        """A failed probe tried again on the prober's thread: /health answers now, from what is known."""
        if self._due() and (self._pending is None or self._pending.done()):
            self._pending = self._prober.submit(self._retry)

    def close(self) -> None:
        self._prober.shutdown(wait=False, cancel_futures=True)

    def current(self) -> dict[str, Any]:
        if time.monotonic() - self._checked > 2.0:
            self._checked = time.monotonic()
            free = _free_memory(self.info.get("type"))
            if free is not None:
                total = self.info.get("memoryTotal")  # nvidia-smi rounds to MiB: never report more than total
                self.info = self.info | {"memoryFree": min(free, total) if isinstance(total, int) else free}
        return self.info


def _free_memory(kind: str | None) -> int | None:
    if kind == "cpu":
        return int(psutil.virtual_memory().available)
    if kind != "cuda" or not shutil.which("nvidia-smi"):
        return None
    # The device the jobs see first: CUDA_VISIBLE_DEVICES' first entry (an index or a UUID, both of which
    # nvidia-smi -i accepts), else GPU 0.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    argv = ["nvidia-smi", "-i", visible, "--query-gpu=memory.free", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
        return int(float(out.strip().splitlines()[0])) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
