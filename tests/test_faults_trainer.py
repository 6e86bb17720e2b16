"""Fault injection for the trainer service: kill -9 of the trainer and of a job's worker at seeded points
of real jobs (real `lunatrain trainer` processes, real worker children, luna-tiny), then the invariants.

Points (tests/hooks/killpoints.py kills from inside the worker, so each point is exact): mid-step after the
k-th progress event, once the adapter is registered (before and after the `trained` event), as the eval
gate begins and after it recorded, and between the registry's read and its replace; for the trainer with
`resume: true` also after an epoch checkpoint of a three-epoch job. The trainer is killed with and without
`resume: true` and restarted on the same data root; a killed worker leaves its trainer running. After each
iteration: the registry loads and every version folder in it is complete; no job id has two versions; no
job is left active once the trainer settled it; a job whose adapter was registered ended `succeeded` with
that adapter; one that registered nothing ended failed (or, resumed, succeeded). After a trainer kill
also: the job had been forked from the trainer's warm worker, which went with its trainer; a job that
registered nothing and may not resume ended `failed (interrupted)`; the checkpoint job resumed from its
checkpoint instead of starting over.

The table goes to bench/results/faults.md ("Trainer and worker kill -9").
Run: `pytest -m slow tests/test_faults_trainer.py -p no:cacheprovider` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_trainer_service import (
    QUICK,
    all_events,
    launch,
    poll_job,
    prepare_root,
    shutdown,
    submit,
    workers_of,
)

from lunatrain import registry
from lunatrain.errors import ServiceUnavailable
from lunatrain.service import client as trainer_client
from lunatrain.service.jobs import TERMINAL, Job, job_log_path

import faults
from trainer_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Three steps: a kill after step 1 or 2 is mid-run. A job is mostly process start-up and model loading.
FLAGS = QUICK | {"maxSteps": 3}
SETTLE_S = 300.0  # bound on a job reaching a final state (resumed jobs train again); a passing run takes seconds
ACTIVE = ("running", "queued", "cancelling", "validating")
REGISTERED_POINTS = ("published", "trained", "gatestart", "gateend")
POINT_TEXT = {
    "progress": "mid-step (after progress event k)",
    "published": "adapter registered, before the trained event",
    "trained": "after the trained event",
    "gatestart": "during the gate (as it begins)",
    "gateend": "during the gate (after it recorded)",
    "registry": "between registry read and replace",
    "checkpoint": "after epoch 1's checkpoint (three epochs)",
}
CHECKED = "invariants 1-5 (see above)"
# Trainer kills, each with a restarted trainer: every point with and without resume, and the checkpoint
# point with resume (the one that continues a three-epoch job from its checkpoint).
TRAINER_POINTS = ["progress", "published", "trained", "gatestart", "gateend", "registry"]
TRAINER_SEEDS = range(100, 113)  # 13 iterations
WORKER_SEEDS = range(200, 217)  # 17 iterations (30 in all)
# The checkpoint job: three epochs on the memory tier, a checkpoint after each (the kill follows epoch 1's).
CHECKPOINT_FLAGS = {"epochs": 3, "maxSteps": None}


@dataclass(frozen=True)
class Plan:
    seed: int
    target: str  # "t" trainer, "w" worker
    point: str
    k: int
    resume: bool
    gate: bool

    @property
    def adapter(self) -> str:
        return f"kf-{self.target}-{self.point}-{self.k}-s{self.seed}"

    @property
    def flags(self) -> dict:
        extra = CHECKPOINT_FLAGS if self.point == "checkpoint" else {}
        return FLAGS | extra | {"adapterName": self.adapter, "resume": self.resume, "gate": self.gate}


def plans(target: str, seeds: range) -> list[Plan]:
    """One plan per seed: the points in turn (for the trainer each with resume off, then on, then the
    checkpoint point with resume), the step k, the registry write and whether the gate runs drawn from the
    seed."""
    points = TRAINER_POINTS if target == "t" else [p for p in POINT_TEXT if p != "checkpoint"]
    out = []
    for i, seed in enumerate(seeds):
        rng = random.Random(seed)
        point = points[i % len(points)] if target == "w" or i < 2 * len(points) else "checkpoint"
        # The trainer's resumed registry kill runs the gate, so its k may hit the gate's own registry write.
        gated = point.startswith("gate") or (target == "t" and point == "registry" and i >= len(points))
        gate = gated or rng.random() < 0.3
        k = rng.randint(1, 2) if point == "progress" or (point == "registry" and gate) else 1
        resume = i >= len(points) if target == "t" else rng.random() < 0.5
        out.append(Plan(seed, target, point, k, resume, gate))
    return out


def fresh_root(tmp_path_factory, name: str) -> tuple[Path, dict[str, str]]:
    home = tmp_path_factory.mktemp(name) / "home"
    home.mkdir()
    prepare_root(home)
    markers = home.parent / "kill-markers"
    markers.mkdir()
    return home, faults.kill_env(markers)


def killed(home: Path, job: Job) -> list[str] | None:
    """The kill's marker (target, the killing worker's pid, its parent's pid), once the job was killed."""
    marker = home.parent / "kill-markers" / f"{job.id}.killed"
    return marker.read_text().split() if marker.exists() else None


def warm_pid(home: Path, trainer) -> int:
    """The warm worker of a trainer that answered /health (it answers after the worker's probe): its child.
    (A job it forks carries its command line until the job renames itself: a child of the warm worker.)"""
    warm = [w for w in workers_of(home, warm=True) if w.ppid() == trainer.proc.pid]
    assert len(warm) == 1, warm
    return warm[0].pid


def killed_or_done(trainer, job: Job) -> bool:
    """The trainer died (killed at the point), or the job ended without reaching it."""
    if trainer.proc.poll() is not None:
        return True
    try:
        return trainer_client.get_job(trainer.settings, job.id).status in TERMINAL
    except ServiceUnavailable:  # dying right now: the next poll sees its exit
        return False


def settled(settings, job_id: str) -> Job:
    job = wait_for(lambda: (j := poll_job(settings, job_id)) is not None and j.status in TERMINAL and j, SETTLE_S, 0.5)
    return job or trainer_client.get_job(settings, job_id)


def invariants(settings, plan: Plan, job: Job, home: Path) -> list[str]:
    """Every broken invariant as one line (empty when all held)."""
    broken = []
    try:
        reg = registry.load(settings)
    except Exception as exc:  # an unreadable registry is itself the finding
        return [f"registry does not load: {exc}"]
    entries = [e for a in reg["adapters"].values() for e in a["versions"]]
    for e in entries:
        folder = settings.home / e["path"]
        for name in ("adapter_model.safetensors", "training-report.json"):
            if not (folder / name).is_file():
                broken.append(f"{e['name']}@{e['version']} lacks {name}")
    ids = Counter(e.get("jobId") for e in entries if e.get("jobId"))
    broken += [f"job {j} has {n} versions" for j, n in ids.items() if n > 1]
    stuck = [j.id for j in trainer_client.list_jobs(settings, limit=500) if j.status in ACTIVE]
    broken += [f"jobs left active: {stuck}"] if stuck else []
    entry = registry.find_by_job(settings, job.id)
    if entry is not None:
        if (
            job.status != "succeeded"
            or job.adapter is None
            or (job.adapter.name, job.adapter.version) != (entry["name"], entry["version"])
        ):
            broken.append(
                f"registered {entry['name']}@{entry['version']} but the job ended {job.status}: "
                f"{job.error and job.error.message}"
            )
        recorded = (entry.get("gate") or {}).get("status")
        if recorded and (job.gate or {}).get("status") != recorded:
            broken.append(f"the version's gate was {recorded}, the job says {job.gate}")
    elif job.status == "succeeded" or plan.point in REGISTERED_POINTS:
        broken.append(f"job {job.status} with adapter {job.adapter} but nothing registered for it")
    elif job.status not in ("failed", "cancelled"):
        broken.append(f"job ended {job.status}")
    if plan.point in ("progress", "registry") and plan.target == "t" and plan.resume and entry is None:
        broken.append(f"resume: true, but the job ended {job.status} ({job.error and job.error.code})")
    if (
        plan.target == "t"
        and not plan.resume
        and entry is None
        and (job.error is None or job.error.code != "interrupted")
    ):
        broken.append(
            f"the trainer was killed, nothing registered, no resume, but the job ended {job.status} "
            f"({job.error and job.error.code}), not failed (interrupted)"
        )
    if plan.target == "t":
        # Repro: the worker that outlived its trainer stopped as if cancelled ("training cancelled: cancelled
        # at step 2 of 3" in the job's log and lora-latest.json) while the job ended failed (interrupted);
        # and the restarted trainer's log never said how it settled the job.
        log = job_log_path(settings.trainer_logs_dir, job.id)
        if log.is_file() and "training cancelled" in log.read_text(errors="replace"):
            broken.append("the job's log says it was cancelled; its trainer was killed")
        said = (home / "trainer-0.log").read_text(errors="replace")
        if f"job {job.id} was running when the trainer stopped" not in said:
            broken.append("the restarted trainer's log does not say how it settled the job")
    if plan.point == "checkpoint":
        broken += resumed_from_checkpoint(settings, job)
    if trainer_client.health(settings).queue.running:
        broken.append("the trainer's health counts a running job")
    if workers_of(home):
        broken.append("a worker is left running")
    return broken


def resumed_from_checkpoint(settings, job: Job) -> list[str]:
    """The restarted trainer ran the job a second time from its latest checkpoint, to its last step."""
    messages = [m for e in all_events(settings, job.id) if (m := e.model_extra.get("message"))]
    broken = [] if job.status == "succeeded" and job.attempts == 2 else [f"ended {job.status}, {job.attempts} runs"]
    if not any(m.startswith("requeued after the trainer stopped") for m in messages):
        broken.append("no 'requeued after the trainer stopped' event")
    # The orphan stops at its next step, but may have saved another epoch's checkpoint by then: the resume
    # starts from the latest one. What matters is that it did not start over.
    if not any(re.match(r"resumed from epoch [12] ", m) for m in messages):
        broken.append(f"the job did not resume from a checkpoint: {messages}")
    if (job.metrics or {}).get("steps") != (job.metrics or {}).get("totalSteps"):
        broken.append(f"it stopped short: {job.metrics}")
    return broken


def run_kind(tmp_path_factory, target: str, todo: list[Plan]) -> tuple[list[faults.Row], list[str]]:
    home, env = fresh_root(tmp_path_factory, f"kill-{target}")
    trainer = launch(home, **env)
    warm = warm_pid(home, trainer)
    tally: dict[tuple[str, bool], list[int]] = {}  # (point, resume) -> [injected, held]
    failures = []
    try:
        for plan in todo:
            job = submit(trainer.settings, plan.flags)
            forked_by, broken = warm, []  # the job runs in a fork of the warm worker of the trainer it went to
            if target == "t":
                # The hook kills the trainer at the point; then a new trainer on the same data root settles it.
                wait_for(lambda t=trainer, j=job: killed_or_done(t, j), SETTLE_S, 0.3)
                if trainer.proc.poll() is not None:
                    # The job was forked from the warm worker, which must go with its trainer.
                    if not wait_for(lambda: not workers_of(home, warm=True), 60):
                        broken.append("the warm worker outlived its trainer")
                    trainer = launch(home, **env)  # a port of its own (0): nothing to race for
                    warm = warm_pid(home, trainer)
            final = settled(trainer.settings, job.id)
            wait_for(lambda: not workers_of(home), 60)  # a worker still finishing, or an orphan being stopped
            injected = killed(home, final)
            if not injected:
                broken.append(f"the kill at {plan.point} was never reached (job {final.status})")
            elif int(injected[2]) != forked_by:
                broken.append(f"the job's worker was a child of {injected[2]}, not of the warm worker {forked_by}")
            broken += invariants(trainer.settings, plan, final, home)
            got = tally.setdefault((plan.point, plan.resume), [0, 0])
            got[0] += 1
            got[1] += not broken
            print(
                f"{plan.adapter} resume={plan.resume} gate={plan.gate}: {final.status}"
                f"{' ' + final.error.code if final.error else ''} {broken or 'ok'}",
                flush=True,
            )
            failures += [f"{plan.adapter}: {b}" for b in broken]
    finally:
        shutdown(trainer)
    who = "trainer" if target == "t" else "worker"
    rows = [
        faults.Row(
            f"kill -9 {POINT_TEXT[point]}", f"{who}, resume {'on' if resume else 'off'}", *tally[point, resume], CHECKED
        )
        for point in POINT_TEXT
        for resume in (False, True)
        if (point, resume) in tally
    ]
    return rows, failures


NOTE = (
    "Real `lunatrain trainer` processes and worker children on luna-tiny (3 steps, memory tier, the gate "
    "on for some jobs; the checkpoint point: three epochs), killed with SIGKILL from inside the worker at the "
    "point (tests/hooks/killpoints.py); after a trainer kill a new trainer starts on the same data root. "
    "Seeds: trainer 100-112, worker 200-216. Checked after each: (1) the registry loads and every version "
    "folder in it has its weights and training report; (2) no job id has two versions; (3) no job is left "
    "running/queued/cancelling, and the trainer's health counts none running; (4) a job whose adapter was "
    "registered ended `succeeded` with it, its gate as recorded on the version; (5) the kill was reached in "
    "a fork of the trainer's warm worker and no worker is left running. After a trainer kill also: its warm "
    "worker went with it; a job that registered nothing and may not resume ended `failed (interrupted)`; "
    "the checkpoint job ran a second time, resumed from a checkpoint, to its last step."
)


def check_kind(tmp_path_factory, target: str, todo: list[Plan], section: str) -> None:
    """Run seeded iterations, record their rows in bench/results/faults.md, fail on any break. (The worker
    kind lives in test_faults_worker.py and the trainer kills with resume on in test_faults_trainer_resume.py:
    pytest-xdist runs files side by side.)"""
    rows, failures = run_kind(tmp_path_factory, target, todo)
    if rows:
        faults.record(section, rows, note=NOTE)
    assert not failures, "\n".join(failures)


def trainer_plans(resume: bool) -> list[Plan]:
    return [plan for plan in plans("t", TRAINER_SEEDS) if plan.resume == resume]


def test_kill_9_of_the_trainer_at_seeded_points(tmp_path_factory):
    check_kind(tmp_path_factory, "t", trainer_plans(resume=False), "Trainer kill -9")
