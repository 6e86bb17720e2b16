"""The device facts the trainer reports in /health, probed without touching the GPU from the trainer itself."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from typing import Any

import psutil

from ..errors import ServiceUnavailable
from ..settings import Settings
from .warm import WarmWorker

log = logging.getLogger("lunatrain.trainer")


# --- the HTTP app --------------------------------------------------------------------------------
class DeviceProbe:
    """The device facts for /health, measured once in a child process: creating a CUDA context here would
    hold about half a GiB of GPU memory for the trainer's whole life, memory the jobs need. Free memory is
    refreshed live (psutil on CPU, nvidia-smi on CUDA, at most every 2 s); the startup value otherwise."""

    def __init__(self, settings: Settings, warm: WarmWorker) -> None:
        # Set when the probe failed: without the device's facts no job can be planned, so /health says why
        # (degraded) and every job is refused with it, instead of a memory plan for a device of no known kind.
        self.failure: str | None = None
        self.reason = ""
        try:
            self.info: dict[str, Any] = warm.start()  # the warm worker measures first (warm.py)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("device probe failed: %s", exc)
            self.reason = reason = str(exc)[-200:]
            self.info = {"cudaAvailable": False, "type": "unknown", "name": f"device probe failed: {reason}"}
            self.failure = (
                f"The trainer could not probe its device ({reason}), so it can plan and run no job; stop it and "
                "start it again once that is fixed."
            )
        self._checked = 0.0

    def refuse_if_unknown(self) -> None:
        """ServiceUnavailable with the probe's failure, when it failed (a job is refused before it is planned)."""
        if self.failure:
            raise ServiceUnavailable(self.failure, params={"detail": "trainer.no_device", "why": self.reason})

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
