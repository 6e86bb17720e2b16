"""kill -9 at exact points of a job, for the trainer fault-injection suite (tests/test_faults_trainer.py).

Active in a job's worker process only, when `LUNA_KILL` is set (to a folder for the once-markers). The
point comes from the job's adapterName, `kf-TARGET-POINT[-ARG]-…`:
  TARGET  `t` kills the trainer (the worker's parent, or grandparent through the warm worker), `w` the
          worker itself; both with SIGKILL;
  POINT   `progress-K`  after the K-th progress event reached the trainer,
          `published`   the adapter is registered, the trainer not yet told (before the `trained` event),
          `trained`     right after the `trained` event was sent,
          `checkpoint-K` after the K-th epoch checkpoint was saved and its log event reached the trainer,
          `gatestart`   as the eval gate begins, `gateend` once the gate recorded (and maybe promoted),
          `registry-K`  at the K-th replace of lora-adapters.json, after the registry was read under its
                        lock and before the new file replaces it.
Each job is killed at most once (a marker per job id, holding the target, the killing worker's pid and its
parent's), so a resumed run of the same job goes through.
Killing from inside the worker makes the point exact; polling from outside could never hit it reliably.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

KILL_ENV = "LUNA_KILL"


def _is_worker() -> bool:
    try:
        return b"lunatrain.service.worker" in Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return False


def parse(adapter_name: str) -> tuple[str, str, int] | None:
    """(target, point, k) for a `kf-…` adapter name, else None."""
    parts = adapter_name.split("-")
    if len(parts) < 3 or parts[0] != "kf" or parts[1] not in ("t", "w"):
        return None
    k = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 1
    return parts[1], parts[2], k


def _kill(target: str, job_id: str) -> None:
    marker = Path(os.environ[KILL_ENV]) / f"{job_id}.killed"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # this job was killed once already: its resumed run goes through
    os.write(fd, f"{target} {os.getpid()} {os.getppid()}".encode())
    os.close(fd)
    os.kill(_trainer() if target == "t" else os.getpid(), signal.SIGKILL)


def _trainer() -> int:
    """The trainer's pid: the parent, or the parent's parent when this job was forked by the warm worker."""
    parent = os.getppid()
    if b"--warm" in Path(f"/proc/{parent}/cmdline").read_bytes():
        return int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return parent


def install() -> None:
    if not _is_worker():
        return
    from lunatrain import evalgate, flow

    real_train, real_gate, real_replace = flow.train_and_gate, evalgate.gate_candidate, os.replace
    state: dict[str, Any] = {"plan": None, "job": None, "replaces": 0}

    def at(point: str, k: int = 1) -> None:
        plan = state["plan"]
        if plan is not None and plan[1] == point and plan[2] == k:
            _kill(plan[0], state["job"])

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
        if str(dst).endswith("lora-adapters.json"):
            state["replaces"] += 1
            at("registry", state["replaces"])
        return real_replace(src, dst, *a, **kw)

    def gate(*a: Any, **kw: Any) -> Any:
        at("gatestart")
        out = real_gate(*a, **kw)
        at("gateend")
        return out

    def train_and_gate(settings: Any, params: Any, options: Any, **kw: Any) -> Any:
        state["plan"], state["job"] = parse(params.adapter_name), kw.get("job_id")
        emit, trained = kw.get("on_event") or (lambda _e: None), kw.get("on_trained") or (lambda _o: None)
        seen = {"progress": 0, "checkpoint": 0}

        def on_event(event: dict[str, Any]) -> None:
            emit(event)
            if event.get("type") == "progress":
                seen["progress"] += 1
                at("progress", seen["progress"])
            if event.get("type") == "log" and "checkpoint saved" in str(event.get("message")):
                seen["checkpoint"] += 1
                at("checkpoint", seen["checkpoint"])

        def on_trained(outcome: dict[str, Any]) -> None:
            at("published")
            trained(outcome)
            at("trained")

        kw.update(on_event=on_event, on_trained=on_trained)
        return real_train(settings, params, options, **kw)

    flow.train_and_gate, evalgate.gate_candidate, os.replace = train_and_gate, gate, replace
