"""Data-parallel jobs through the real trainer service: with ASSISTANT_LORA_GPUS=2 on CPU the trainer runs
each job's worker under torchrun as two gloo ranks. Shown here: the registered adapter equals a
single-process run with the combined batch; cancel stops every rank and registers nothing; kill -9 of one
rank fails the job with an error naming that rank and its signal, and the registry stays whole; kill -9 of
the trainer stops the ranks and the restarted trainer settles the job like any other.

Run: `.venv/bin/python -m pytest tests/test_service_dataparallel.py -q` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lunatrain import registry
from lunatrain.params import parse_run
from lunatrain.service import client as trainer_client
from lunatrain.settings import load_settings
from lunatrain.train import Status, run_lora

from test_trainer_service import (
    JOB_TIMEOUT, LONG, QUICK, copy_root, launch, prepare_root, running_with_steps, shutdown, submit, versions,
    wait_job, workers_of,
)
from trainer_helpers import gone, wait_for

pytestmark = pytest.mark.slow

# dropout 0 and one seed: both ranks start from the same LoRA weights and draw no masks, so two ranks with
# batchSize 2 take exactly the steps of one process with batchSize 4.
SAME = {"batchSize": 2, "dropout": 0.0, "seed": 7, "learningRate": 5e-3, "maxSteps": 3}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("dataparallel") / "home"
    home.mkdir()
    prepare_root(home)
    return home


@pytest.fixture(scope="module")
def svc(root):
    trainer = launch(root, ASSISTANT_LORA_GPUS="2")
    yield trainer
    shutdown(trainer)


def job_processes(job_id: str, ranks: int = 2) -> tuple[psutil.Process, list[psutil.Process]]:
    """torchrun's agent for the job and its rank processes (once all of them run)."""

    def find() -> tuple[psutil.Process, list[psutil.Process]] | None:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "torch.distributed.run" in cmd and job_id in cmd:
                with_rank = [c for c in proc.children() if "lunatrain.service.worker" in c.cmdline()]
                return (proc, with_rank) if len(with_rank) == ranks else None
        return None

    found = wait_for(find, 60)
    assert found is not None, f"no torchrun agent with {ranks} ranks for {job_id}"
    return found


def rank_of(proc: psutil.Process) -> int:
    return int(proc.environ()["RANK"])


def test_two_rank_job_registers_the_adapter_of_one_process_with_the_combined_batch(svc, tmp_path):
    flags = QUICK | SAME | {"adapterName": "dp", "gate": True}
    job = submit(svc.settings, flags)
    final = wait_job(svc.settings, job.id)
    assert final.status == "succeeded", final
    assert final.gate is not None and final.gate["status"] in ("passed", "failed"), final.gate  # rank 0 gated
    assert final.metrics["steps"] == 3
    assert final.progress.step == 3 and final.progress.total_steps == 3  # rank 0's progress, once per step

    # The reference: one process, batchSize 4, on a copy of the same data root.
    home = tmp_path / "single"
    copy_root(svc.settings.home, home)
    params, _ = parse_run(flags | {"batchSize": 4, "adapterName": "single"})
    single = run_lora(params, load_settings(home=home))
    assert single.status is Status.SUCCEEDED, single.error

    a = load_file(str(single.path / "adapter_model.safetensors"))
    b = load_file(str(svc.settings.home / final.adapter.path / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    assert final.metrics["tokensTrained"] == single.report["metrics"]["tokensTrained"]
    assert [v["jobId"] for v in versions(svc.settings, "dp")] == [job.id]  # rank 0 alone registered


def test_cancel_stops_every_rank_and_registers_nothing(svc):
    settings = svc.settings
    job = submit(settings, LONG | SAME | {"maxSteps": None, "adapterName": "dp-cancel"})
    wait_for(lambda: running_with_steps(trainer_client.get_job(settings, job.id)), JOB_TIMEOUT, 0.3)
    agent, ranks = job_processes(job.id)
    assert sorted(rank_of(r) for r in ranks) == [0, 1]
    assert trainer_client.cancel(settings, job.id).status in ("cancelling", "cancelled")
    final = wait_job(settings, job.id)
    assert final.status == "cancelled" and final.adapter is None and final.error is None, final
    assert wait_for(lambda: all(gone(p.pid) for p in [agent, *ranks]), 30), "a rank outlived the cancel"
    assert versions(settings, "dp-cancel") == []
    assert not list((settings.adapters_dir / "dp-cancel").glob("v*"))


def test_kill_9_of_one_rank_fails_the_job_naming_it_and_leaves_the_registry_whole(svc):
    settings = svc.settings
    job = submit(settings, LONG | SAME | {"maxSteps": None, "adapterName": "dp-killed"})
    wait_for(lambda: running_with_steps(trainer_client.get_job(settings, job.id)), JOB_TIMEOUT, 0.3)
    agent, ranks = job_processes(job.id)
    os.kill(next(r.pid for r in ranks if rank_of(r) == 1), signal.SIGKILL)
    final = wait_job(settings, job.id)
    assert final.status == "failed" and final.adapter is None, final
    assert final.error.code == "child_crashed", final.error
    assert final.error.message.startswith("Rank 1 of the 2 training processes was killed by SIGKILL"), final.error
    assert f"trainer/logs/{job.id}.log" in final.error.message
    assert wait_for(lambda: all(gone(p.pid) for p in [agent, *ranks]), 30), "a rank outlived the crash"
    registry.load(settings)  # still valid
    assert versions(settings, "dp-killed") == []
    assert not list((settings.adapters_dir / "dp-killed").glob("v*"))
    # the service goes on: the next job runs on both ranks again
    again = wait_job(settings, submit(settings, QUICK | SAME | {"maxSteps": 1, "adapterName": "dp-after"}).id)
    assert again.status == "succeeded", again


def test_kill_9_of_the_trainer_stops_the_ranks_and_a_restart_settles_the_job(root, tmp_path):
    home = tmp_path / "home"
    copy_root(root, home)
    trainer = launch(home, ASSISTANT_LORA_GPUS="2")
    port = int(trainer.settings.lora_trainer_url.rsplit(":", 1)[1])
    try:
        job = submit(trainer.settings, LONG | SAME | {"maxSteps": None, "adapterName": "dp-orphan"})
        wait_for(lambda: running_with_steps(trainer_client.get_job(trainer.settings, job.id)), JOB_TIMEOUT, 0.3)
        agent, ranks = job_processes(job.id)
        os.kill(trainer.proc.pid, signal.SIGKILL)
        trainer.proc.wait()
        trainer = launch(home, port, ASSISTANT_LORA_GPUS="2")
        final = wait_job(trainer.settings, job.id, timeout=60)
        assert final.status == "failed" and final.error.code == "interrupted", final
        assert wait_for(lambda: all(gone(p.pid) for p in [agent, *ranks]), 60), "an orphaned rank kept running"
        assert workers_of(home) == []
        registry.load(trainer.settings)
        assert versions(trainer.settings, "dp-orphan") == []
    finally:
        shutdown(trainer)
