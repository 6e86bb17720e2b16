"""Data-parallel jobs through the real trainer service: with ASSISTANT_LORA_GPUS=2 on CPU the trainer runs
each job's worker under torchrun as two gloo ranks. Shown here: the registered adapter equals a
single-process run with the combined batch; cancel stops every rank and registers nothing; kill -9 of one
rank fails the job with an error naming that rank and its signal, and the registry stays whole; kill -9 of
the trainer stops the ranks and the restarted trainer settles the job like any other.

Run: `.venv/bin/python -m pytest tests/test_service_dataparallel.py -q` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_trainer_service import (
    JOB_TIMEOUT,
    LONG,
    QUICK,
    copy_root,
    launch,
    poll_job,
    root,  # noqa: F401 - the module's prepared data root (a fixture)
    running_with_steps,
    shutdown,
    submit,
    versions,
    wait_job,
    workers_of,
)

from lunatrain import registry
from lunatrain.errors import UsageError
from lunatrain.params import parse_run
from lunatrain.service import client as trainer_client
from lunatrain.service.jobs import Job, job_log_path
from lunatrain.service.runner import _rank_crash_error
from lunatrain.service.spawn import child_env, job_ranks, worker_argv
from lunatrain.settings import Settings, load_settings
from lunatrain.train import Status, run_lora

import faults
from trainer_helpers import gone, wait_for

# dropout 0 and one seed: both ranks start from the same LoRA weights and draw no masks, so two ranks with
# batchSize 2 take exactly the steps of one process with batchSize 4.
SAME = {"batchSize": 2, "dropout": 0.0, "seed": 7, "learningRate": 5e-3, "maxSteps": 3}


# --- how a job is launched (fast) -----------------------------------------------------------------
def test_one_rank_is_the_plain_worker_and_more_run_under_torchrun():
    assert worker_argv("--job", "j", ranks=1) == [sys.executable, "-m", "lunatrain.service.worker", "--job", "j"]
    argv = worker_argv("--job", "j", ranks=3)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc-per-node") + 1] == "3" and argv[argv.index("--max-restarts") + 1] == "0"
    assert argv[-4:] == ["-m", "lunatrain.service.worker", "--job", "j"]
    assert "--log-dir" not in argv  # torchrun's default, a temp folder; the runner always names one
    kept = worker_argv("--job", "j", ranks=2, log_dir=Path("logs/j.torchrun"))
    assert kept[kept.index("--log-dir") + 1] == "logs/j.torchrun" and kept[-4:] == argv[-4:]


def test_ranks_per_job_follow_the_setting_else_the_visible_gpus(tmp_path):
    auto = load_settings(home=tmp_path)
    assert auto.lora_gpus is None
    assert [job_ranks(auto, d, 0) for d in ("auto", "cpu", "cuda")] == [1, 1, 1]  # CPU machine
    assert [job_ranks(auto, d, 4) for d in ("auto", None, "cuda", "cpu")] == [4, 4, 4, 1]  # a CPU job: one
    two = load_settings(home=tmp_path, lora_gpus=2)
    assert [job_ranks(two, d, 0) for d in ("auto", "cpu")] == [2, 2]  # explicit on a CPU machine: gloo
    assert job_ranks(two, "cuda", 2) == 2 and job_ranks(two, "cpu", 1) == 2
    with pytest.raises(
        UsageError,
        match=r"ASSISTANT_LORA_GPUS=2 asks for more training processes than the 1 "
        r"visible GPU; set it to 1 or less",
    ):
        job_ranks(two, "auto", 1)
    for bad in (0, -1, "two"):
        with pytest.raises(UsageError, match="ASSISTANT_LORA_GPUS"):
            load_settings(home=tmp_path, lora_gpus=bad)


def test_a_rank_crash_is_named_from_torchruns_report(tmp_path):
    log = tmp_path / "data" / "trainer" / "logs" / "j.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "RuntimeError: [gloo] Connection reset by peer\nRoot Cause (first observed failure):\n[0]:\n"
        "  time      : 2026-01-01_00:00:00\n  host      : h\n  rank      : 1 (local_rank: 1)\n"
        "  exitcode  : -9 (pid: 42)  (SIGKILL)\n  error_file: <N/A>\n"
    )
    err = _rank_crash_error(1, 2, log, log.relative_to(tmp_path))
    assert err == {
        "code": "child_crashed",
        "message": "Rank 1 of the 2 training processes was killed by SIGKILL "
        "(often the system's out-of-memory killer); the other ranks were stopped; see data/trainer/logs/j.log.",
        "params": {"detail": "crash.rank.oom", "rank": 1, "ranks": 2, "log": "data/trainer/logs/j.log"},
    }
    log.write_text("no report\n")
    launcher = _rank_crash_error(1, 2, log, tmp_path)
    assert launcher["message"].startswith(
        "The torchrun launcher of the 2 training processes exited with status 1 without a result"
    )
    assert launcher["params"] == {"detail": "crash.launcher.status", "status": 1, "ranks": 2, "log": str(tmp_path)}


def test_a_rank_crash_is_the_error_of_the_rank_that_failed_first(tmp_path):
    """A rank that failed on its own records its error (distributed.write_rank_error); one that only lost its
    connection to it records that, marked. The job's error is the first own one, even where torchrun lists a
    peer it had to stop (review repro: under NCCL the peer sits in its all-reduce and is killed after 30 s,
    and that listing made the job's error "exited with status 1 without a result"). Without an own record,
    a rank torchrun saw die without any record died on its own (a signal): it is named."""
    log = tmp_path / "j.log"

    def summary(*failures: tuple[int, int]) -> None:
        blocks = [
            f"[{i}]:\n  time      : x\n  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: 4{i})\n"
            for i, (rank, code) in enumerate(failures)
        ]
        log.write_text(
            "noise rank : 7\nworker FAILED\nFailures:\n"
            + "".join(blocks[:-1])
            + "Root Cause (first observed failure):\n"
            + blocks[-1]
        )

    oom = {"code": "out_of_memory", "message": "CUDA out of memory.", "params": {"x": 1}}
    lost = {"code": "rank_peer_lost", "message": "another of the 2 training processes failed"}
    summary((0, 1), (1, 1))
    err = _rank_crash_error(1, 2, log, log, {0: (10.0, lost, True), 1: (20.0, oom, False)})
    assert err == oom | {"message": "Rank 1 of the 2 training processes failed: CUDA out of memory."}
    assert _rank_crash_error(1, 2, log, log, {0: (10.0, oom, False), 1: (11.0, oom, False)}) == oom  # alike
    summary((0, -9), (1, 1))  # the stuck peer torchrun killed is listed too: rank 1's own error stands
    assert _rank_crash_error(1, 2, log, log, {1: (20.0, oom, False)})["message"].startswith("Rank 1 of the 2")
    summary((0, 1), (1, -9))  # rank 1 was killed: rank 0's record is only the consequence
    err = _rank_crash_error(1, 2, log, log, {0: (20.0, lost, True)})
    assert err["code"] == "child_crashed" and err["message"].startswith("Rank 1 of the 2 training processes was killed")
    summary((1, -9), (0, 1))  # torchrun saw rank 0 first (one poll saw both): the rank without a record died
    err = _rank_crash_error(1, 2, log, log, {0: (20.0, lost, True)})
    assert err["message"].startswith("Rank 1 of the 2 training processes was killed"), err


def test_a_child_never_imports_from_the_data_root_nor_another_environments_packages(tmp_path, monkeypatch):
    """Packaging repros. (1) Our processes start with the data root as their working directory, which
    `python -m` put first on the import path: a `random.py` there (the data root defaults to where the user
    runs the command) failed every training job. (2) PYTHONPATH led to the installed lunatrain's whole
    site-packages, so a trainer start command running another environment imported this one's torch."""
    import site
    import sysconfig

    from lunatrain.service import spawn

    env = child_env(load_settings(home=tmp_path))
    assert env["PYTHONSAFEPATH"] == "1"
    # lunatrain installed, not a checkout (_SRC is resolved, as Path(__file__).resolve() makes it: a virtual
    # environment reached through a symbolic link is the same one)
    monkeypatch.setattr(spawn, "_SRC", str(Path(sysconfig.get_paths()["purelib"]).resolve()))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert child_env(load_settings(home=tmp_path))["PYTHONPATH"] == "/elsewhere"
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in child_env(load_settings(home=tmp_path))
    monkeypatch.setattr(spawn, "_SRC", site.getusersitepackages())  # review repro: `pip install --user`
    assert "PYTHONPATH" not in child_env(load_settings(home=tmp_path))
    monkeypatch.setattr(spawn, "_SRC", "/checkout/src")  # run from a checkout: the child finds the same one
    assert child_env(load_settings(home=tmp_path))["PYTHONPATH"] == "/checkout/src"


@pytest.mark.slow
def test_a_module_in_the_data_root_does_not_shadow_one_a_job_imports(tmp_path):
    (tmp_path / "json.py").write_text("raise SystemExit('the data root was imported from')\n")
    argv = worker_argv("--job", "j", "--params", json.dumps({"epochs": "many"}))
    env = child_env(load_settings(home=tmp_path))
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "the data root was imported from" not in done.stderr, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])  # the job's own answer: its parameters are refused
    assert result["type"] == "result" and "epochs" in result["error"]["message"], done.stdout


@pytest.mark.slow
def test_only_rank_0_speaks_on_stdout_and_every_rank_ends_in_order(tmp_path):
    """Bad parameters fail before any collective: rank 0 writes the one result line, rank 1 nothing, and
    both exit 0 (an orderly ending), so a failing torchrun means a crashed rank. They fail before torch is
    even imported (Python's import log, -X importtime, has no line for it)."""
    env = child_env(load_settings(home=tmp_path)) | {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    argv = worker_argv("--job", "j", "--params", json.dumps({"epochs": "many"}))
    out = {}
    for rank in ("0", "1"):
        out[rank] = subprocess.run(
            argv, env=env | {"RANK": rank}, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert out[rank].returncode == 0, out[rank].stderr[-2000:]
    lines = [json.loads(ln) for ln in out["0"].stdout.splitlines()]
    assert (
        lines[-1]["type"] == "result" and lines[-1]["status"] == "failed" and "epochs" in lines[-1]["error"]["message"]
    )
    assert out["1"].stdout == "" and "(rank 1 of 2)" in out["1"].stderr
    for done in out.values():
        imported = re.findall(r"^import time:.*\|\s*([\w.]+)$", done.stderr, re.M)
        assert "lunatrain.params" in imported and "torch" not in imported


# --- through the real service (slow) --------------------------------------------------------------
@pytest.fixture(scope="module")
def svc_env(tmp_path_factory) -> dict[str, str]:
    # A temp folder of its own: torchrun's agent would put a log folder there if not told where (see the
    # first test below).
    return {
        "ASSISTANT_LORA_GPUS": "2",
        "TMPDIR": str(tmp_path_factory.mktemp("svc-tmp")),
        # faults of one rank, for the jobs of these names only (tests/hooks/faulthooks.py)
        "LUNATRAIN_FAULT": "rank_error=dp-rank-error,rank_refuses=dp-rank-refuses",
        "PYTHONPATH": faults.with_hooks(),
    }


@pytest.fixture(scope="module")
def svc(root, svc_env):
    trainer = launch(root, **svc_env)
    yield trainer
    shutdown(trainer)  # the one running now: a test that restarts the trainer puts the new one in its place


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


def start_long(settings: Settings, name: str) -> tuple[Job, psutil.Process, list[psutil.Process]]:
    """A job that runs until stopped, caught after its first step: the job, torchrun's agent, its ranks."""
    job = submit(settings, LONG | SAME | {"maxSteps": None, "adapterName": name})
    wait_for(lambda: running_with_steps(poll_job(settings, job.id)), JOB_TIMEOUT, 0.3)
    return job, *job_processes(job.id)


@pytest.mark.slow
def test_kill_9_of_one_rank_fails_the_job_and_the_next_job_trains_like_one_process_with_the_combined_batch(
    svc, tmp_path, subtests
):
    """kill -9 of one rank fails its job with an error naming that rank, and the registry stays whole. The
    service goes on: the next job runs on both ranks again, and the adapter it registers is that of one
    process with the combined batch. One test for both (a two-rank job starts three fresh interpreters), each
    half a subtest of its own: a failure of the first does not keep the second from running and reporting."""
    settings = svc.settings
    with subtests.test("kill -9 of one rank fails the job"):
        assert trainer_client.health(settings).device.ranks == 2
        # Every job of this trainer runs under torchrun: it keeps no warm worker (nothing would be forked).
        assert workers_of(settings.home, warm=True) == []

        job, agent, ranks = start_long(settings, "dp-killed")
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

    with subtests.test("the next job trains like one process with the combined batch"):
        flags = QUICK | SAME | {"adapterName": "dp", "gate": True}
        job = submit(settings, flags)
        final = wait_job(settings, job.id)
        assert final.status == "succeeded", final
        assert final.gate is not None and final.gate["status"] in ("passed", "failed"), final.gate  # rank 0 gated
        assert final.metrics["steps"] == 3
        assert final.progress.step == 3 and final.progress.total_steps == 3  # rank 0's progress, once per step

        # The reference: one process, batchSize 4, on a copy of the same data root.
        home = tmp_path / "single"
        copy_root(settings.home, home)
        params, _ = parse_run(flags | {"batchSize": 4, "adapterName": "single"})
        single = run_lora(params, load_settings(home=home))
        assert single.status is Status.SUCCEEDED, single.error

        a = load_file(str(single.path / "adapter_model.safetensors"))
        b = load_file(str(settings.home / final.adapter.path / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
        assert final.metrics["tokensTrained"] == single.report["metrics"]["tokensTrained"]
        assert [v["jobId"] for v in versions(settings, "dp")] == [job.id]  # rank 0 alone registered

        # Repro: every line of a two-rank job's log came twice, without saying which rank wrote it, under
        # torchrun's OMP_NUM_THREADS banner. Rank 0 says each step for all; the other says who it is.
        said = job_log_path(settings.trainer_logs_dir, job.id).read_text()
        assert "OMP_NUM_THREADS" not in said, said[:2000]
        assert said.count(" parameters: ") == 1 and said.count(" training ") == 1, said
        assert re.search(rf"Z \[rank 1\] worker \d+ started for {job.id} \(rank 1 of 2\)$", said, re.M), said
        assert re.search(rf"Z worker \d+ started for {job.id} \(rank 0 of 2\)$", said, re.M), said

        # torchrun's per-rank logs are kept beside the job's log, not left in the machine's temp folder.
        ranks_dir = settings.data_dir / "trainer" / "logs" / f"{job.id}.torchrun"
        assert sorted(p.name for p in ranks_dir.glob("*/attempt_0/*") if p.is_dir()) == ["0", "1"]
        assert list(Path(psutil.Process(svc.proc.pid).environ()["TMPDIR"]).glob("torchelastic_*")) == []


@pytest.mark.slow
def test_a_failure_of_one_rank_fails_the_job_at_once_with_that_ranks_error(svc, subtests):
    """Review repro: rank 1 failing inside the loop (an out-of-memory on its GPU alone) went on to share its
    outcome while rank 0 waited in the step's all-reduce: every rank hung until the collective timed out
    (30 min on gloo, 10 on NCCL). And rank 1 alone refusing the job in its memory plan (its GPU has less
    free) ended the job with rank 0's "Connection closed by peer", the plan's sentence only in the log. A
    rank that fails now leaves at once, and the job's error is that rank's own."""
    settings = svc.settings
    for name, code, said in (
        ("dp-rank-error", "training_error", "InjectedFault: injected out-of-memory on rank 1"),
        ("dp-rank-refuses", "check_failed", "only 9 GiB is usable on this rank's GPU"),
    ):
        with subtests.test(name):
            job = submit(settings, QUICK | SAME | {"adapterName": name})
            final = wait_job(settings, job.id)  # the shared JOB_TIMEOUT: a hang would take 30 min
            assert final.status == "failed" and final.adapter is None, final
            assert final.error.code == code, final.error
            assert final.error.message.startswith("Rank 1 of the 2 training processes failed: "), final.error
            assert said in final.error.message, final.error
            assert versions(settings, name) == []
            said = job_log_path(settings.trainer_logs_dir, job.id).read_text()
            assert "[rank 1] " in said and said.count(" parameters: ") == 1, said  # rank 1's own failure, labelled
    # review repro: rank 0 recorded its lost connection ("Connection reset by peer") as the run's own failure
    latest = json.loads(settings.lora_latest_report.read_text())
    assert latest["adapterName"] == "dp-rank-error" and latest["error"]["code"] == "rank_peer_lost", latest["error"]


@pytest.mark.slow
def test_cancel_stops_every_rank_and_registers_nothing(svc):
    settings = svc.settings
    job, agent, ranks = start_long(settings, "dp-cancel")
    assert sorted(rank_of(r) for r in ranks) == [0, 1]
    assert trainer_client.cancel(settings, job.id).status in ("cancelling", "cancelled")
    final = wait_job(settings, job.id)
    assert final.status == "cancelled" and final.adapter is None and final.error is None, final
    assert wait_for(lambda: all(gone(p.pid) for p in [agent, *ranks]), 30), "a rank outlived the cancel"
    assert versions(settings, "dp-cancel") == []
    assert not list((settings.adapters_dir / "dp-cancel").glob("v*"))


@pytest.mark.slow
def test_kill_9_of_the_jobs_process_group_takes_every_rank_with_it(svc):
    """What the trainer does when a cancel outlasts its grace: SIGKILL to the job's process group. torchrun
    keeps its ranks out of that group; they die with their launcher all the same."""
    settings = svc.settings
    job, agent, ranks = start_long(settings, "dp-group-killed")
    os.killpg(agent.pid, signal.SIGKILL)
    final = wait_job(settings, job.id)
    assert final.status == "failed" and final.error.code == "child_crashed", final
    assert final.error.message.startswith("The torchrun launcher of the 2 training processes was killed by SIGKILL")
    assert wait_for(lambda: all(gone(p.pid) for p in ranks), 30), "a rank outlived its launcher"
    assert versions(settings, "dp-group-killed") == []


@pytest.mark.slow
def test_kill_9_of_the_trainer_stops_the_ranks_and_a_restart_settles_the_job(svc, svc_env):
    """The module's trainer is the one killed (one trainer start fewer); the restarted one takes its place for
    the tests after this one."""
    home = svc.settings.home
    job, agent, ranks = start_long(svc.settings, "dp-orphan")
    os.kill(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait()
    restarted = launch(home, **svc_env)
    svc.proc, svc.settings = restarted.proc, restarted.settings
    final = wait_job(svc.settings, job.id, timeout=60)
    assert final.status == "failed" and final.error.code == "interrupted", final
    assert wait_for(lambda: all(gone(p.pid) for p in [agent, *ranks]), 60), "an orphaned rank kept running"
    assert workers_of(home) == []
    registry.load(svc.settings)
    assert versions(svc.settings, "dp-orphan") == []


def test_when_every_rank_only_lost_its_peer_the_first_record_is_said(tmp_path):
    """Review repro: with every record marked as a lost peer and none missing, the job's error was torchrun's
    "exited with status 1 without a result", beside the records."""
    log = tmp_path / "j.log"
    log.write_text(
        "worker FAILED\nFailures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 1)\n"
        "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 2)\n"
    )
    lost = {"code": "rank_peer_lost", "message": "another of the 2 training processes failed"}
    err = _rank_crash_error(1, 2, log, log, {0: (20.0, lost, True), 1: (10.0, lost, True)})
    assert err["code"] == "rank_peer_lost" and err["message"].startswith("Rank 1 of the 2 training processes failed: ")


def test_one_lost_peer_without_a_report_is_not_taken_for_the_cause(tmp_path):
    """Review repro: torchrun killed before it wrote a report, one of two ranks recorded that it lost its
    peer: the job blamed that rank ("Rank 0 … failed: another … failed") instead of saying how the launcher
    ended."""
    log = tmp_path / "j.log"
    log.write_text("no report\n")
    lost = {"code": "rank_peer_lost", "message": "another of the 2 training processes failed"}
    err = _rank_crash_error(-9, 2, log, log, {0: (20.0, lost, True)})
    assert err["code"] == "child_crashed" and err["message"].startswith("The torchrun launcher of the 2"), err
