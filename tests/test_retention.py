"""Retention: `lunatrain gc --dry-run` lists exactly what the policy removes, `gc` removes it, and the
registry, adapter versions, unfinished jobs and the current export stay. Run: `pytest tests/test_retention.py -q`."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lunatrain import export as ex
from lunatrain import fsio, retention, store
from lunatrain.cli import app
from lunatrain.formats import make_draft
from lunatrain.params import LoraParams
from lunatrain.service.jobs import JobStore, jobs_db_path
from lunatrain.settings import Settings

from faults import read_only
from test_registry import _publish


def _cache(path: Path, fingerprint: str | None) -> None:
    """A valid safetensors file without tensors, metadata as tokens._write_cache writes it."""
    meta = {"key": "k", "format": "1"} | ({"fingerprint": fingerprint} if fingerprint else {})
    header = json.dumps({"__metadata__": meta}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1000)


def _age(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    for p in [*path.rglob("*"), path]:
        os.utime(p, (t, t), follow_symlinks=False)


def _ranks_log(logs: Path, job_id: str) -> None:
    for rank in ("0", "1"):
        folder = logs / f"{job_id}.torchrun" / "run_x" / "attempt_0" / rank
        folder.mkdir(parents=True)
        (folder / "error.json").write_text("{}")


def _world(settings: Settings) -> dict:
    """Ten finished jobs (two of them 40 days old), one running; four exports; caches; run work dirs."""
    jobs = JobStore(jobs_db_path(settings.data_dir))
    logs = settings.trainer_logs_dir
    logs.mkdir(parents=True)
    ids = []
    for i in range(10):
        job, _ = jobs.create(LoraParams())
        for step in range(5):
            jobs.add_event(job.id, "log", {"message": f"step {step}"})
        old = "2020-01-01T00:00:00.000Z" if i < 2 else None
        jobs.set_status(job.id, "failed" if i % 3 else "succeeded", **({"finished_at": old} if old else {}))
        (logs / f"{job.id}.log").write_text("x" * 500)
        if i % 4 == 0:  # a data-parallel job: torchrun's per-rank files beside its log
            _ranks_log(logs, job.id)
        ids.append(job.id)
    running, _ = jobs.create(LoraParams())
    jobs.set_status(running.id, "running")
    (logs / f"{running.id}.log").write_text("running")
    _ranks_log(logs, running.id)
    jobs.close()

    for i in range(4):
        store.add_examples(settings, [make_draft(prompt=f"Frage {i}", response="Antwort")])
        ex.export(settings)
    fingerprint = ex.read_summary(settings)["fingerprint"]
    tokens = settings.cache_dir / "tokens"
    _cache(tokens / "curated-current.safetensors", fingerprint)
    _cache(tokens / "curated-old.safetensors", "0" * 64)
    _cache(tokens / "curated-unlabelled.safetensors", None)

    _publish(str(settings.home), "a", "kept")  # a registered version: never touched
    idle = settings.adapters_dir / "a" / ".work" / "idle-run"
    (idle / "checkpoints" / "epoch-001").mkdir(parents=True)
    (idle / "checkpoints" / "epoch-001" / "adapter.safetensors").write_bytes(b"w" * 2000)
    _age(idle, 10)
    fresh = settings.adapters_dir / "a" / ".work" / "fresh-run"
    (fresh / "checkpoints").mkdir(parents=True)
    return {"ids": ids, "running": running.id, "idle": idle, "fresh": fresh}


def _state(settings: Settings) -> dict:
    import sqlite3

    db = sqlite3.connect(jobs_db_path(settings.data_dir))
    events = dict(db.execute("SELECT job_id, COUNT(*) FROM events GROUP BY job_id").fetchall())
    jobs = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    db.close()
    files = sorted(str(p.relative_to(settings.home)) for p in settings.home.rglob("*") if p.is_file())
    return {"events": events, "jobs": jobs, "files": files}


def test_dry_run_lists_and_gc_removes_exactly_the_policy(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASSISTANT_RETAIN_JOBS", "6")  # of 10 finished jobs: the 4 oldest go by count
    monkeypatch.setenv("ASSISTANT_RETAIN_EXPORTS", "2")
    w = _world(settings)
    registry_before = (settings.reports_training_dir / "lora-adapters.json").read_bytes()
    before = _state(settings)

    r = CliRunner().invoke(app, ["gc", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    planned = json.loads(r.output)
    assert _state(settings) == before  # a dry run changes nothing
    kinds: dict[str, list[str]] = {}
    for item in planned["items"]:
        kinds.setdefault(item["kind"], []).append(item["path"])
        assert item["bytes"] > 0
    # newest first: the 6 newest finished are kept (the running job takes no place among them); ids[0..3] go
    # (0, 1 are also old)
    gone = w["ids"][:4]
    assert sorted(kinds["job-log"]) == sorted(
        [f"data/trainer/logs/{j}.log" for j in gone] + [f"data/trainer/logs/{j}.torchrun" for j in gone[::4]]
    )
    assert len(kinds["job-events"]) == 4
    # four exports, the fixture's settings (3) pruned the first already; gc under RETAIN_EXPORTS=2 one more
    assert len(kinds["export"]) == 1 and all(ex.current_id(settings) not in p for p in kinds["export"])
    assert sorted(kinds["token-cache"]) == [
        "data/cache/tokens/curated-old.safetensors",
        "data/cache/tokens/curated-unlabelled.safetensors",
    ]
    assert kinds["run-workdir"] == ["data/adapters/a/.work/idle-run"]
    assert planned["bytes"] == sum(i["bytes"] for i in planned["items"])

    r = CliRunner().invoke(app, ["gc"])
    assert r.exit_code == 0 and "Removed" in r.output, r.output
    # one line per item, then the sum in words ("Removed 1 export, 5 job-events, 7 job-log, …" read wrong)
    assert r.output.splitlines()[-1].startswith(
        "Removed 1 export, 4 jobs' events, 5 job logs, 1 run work directory, 2 token caches: "
    ), r.output
    after = _state(settings)
    assert set(after["events"]) == set(before["events"]) - set(gone)
    assert after["jobs"] == before["jobs"]  # job rows stay: every job id still answers
    assert not w["idle"].exists() and w["fresh"].exists()
    assert (settings.cache_dir / "tokens" / "curated-current.safetensors").exists()
    assert len(ex.export_ids(settings)) == 2 and ex.read_tier(settings, "curated").records
    assert (settings.reports_training_dir / "lora-adapters.json").read_bytes() == registry_before
    logs = settings.data_dir / "trainer" / "logs"
    assert (logs / f"{w['running']}.log").exists() and (logs / f"{w['running']}.torchrun").is_dir()
    assert sorted(p.name for p in logs.glob("*.torchrun")) == sorted(
        f"{j}.torchrun" for j in (w["running"], w["ids"][4], w["ids"][8])
    )
    assert retention.collect(settings, dry_run=True).items == []  # nothing left to do


def test_age_rule_removes_old_jobs_within_the_count(settings: Settings) -> None:
    w = _world(settings)
    report = retention.collect(settings, dry_run=True)
    logs = {i.path for i in report.items if i.kind == "job-log"}
    old = w["ids"][:2]  # the two 40-day-old ones; the first ran under torchrun
    assert logs == {f"data/trainer/logs/{j}.log" for j in old} | {f"data/trainer/logs/{old[0]}.torchrun"}
    assert all("days ago" in i.reason for i in report.items if i.kind == "job-log")


def test_only_finished_jobs_count_toward_the_jobs_kept(settings: Settings) -> None:
    """Long-session repro: with ASSISTANT_RETAIN_JOBS=8 and five jobs queued or running, gc (and the trainer's
    cleanup after each job) removed the logs of five of the eight most recent finished jobs: the waiting
    ones took their places. README promises the most recent *finished* jobs."""
    jobs = JobStore(jobs_db_path(settings.data_dir))
    settings.trainer_logs_dir.mkdir(parents=True)
    finished = []
    for _ in range(10):
        job, _ = jobs.create(LoraParams())
        jobs.set_status(job.id, "succeeded")
        (settings.trainer_logs_dir / f"{job.id}.log").write_text("done")
        finished.append(job.id)
    for status in ("running", "queued", "queued", "queued", "queued"):
        job, _ = jobs.create(LoraParams())
        if status == "running":
            jobs.set_status(job.id, "running")
    jobs.close()
    report = retention.collect(settings.model_copy(update={"retain_jobs": 8}), dry_run=True)
    gone = {i.path for i in report.items if i.kind == "job-log"}
    assert gone == {f"data/trainer/logs/{j}.log" for j in finished[:2]}, gone


def test_the_jobs_kept_are_those_that_finished_last_and_the_reasons_read_right_at_the_edges(
    settings: Settings,
) -> None:
    """Explore repros: the most recent finished jobs were ranked by when they were submitted, so a job
    cancelled while queued (submitted later, ended first) kept its events where the one that ran and ended
    after it lost them; and the reasons read "beyond the 0 most recent finished jobs", "older than the 1 newest
    exports", "unchanged for 0 days (over 0)"."""
    jobs = JobStore(jobs_db_path(settings.data_dir))
    settings.trainer_logs_dir.mkdir(parents=True)
    ran, _ = jobs.create(LoraParams(adapter_name="a"))
    cancelled, _ = jobs.create(LoraParams(adapter_name="b"))
    jobs.set_status(cancelled.id, "cancelled", finished_at="2026-12-01T10:00:00+00:00")
    jobs.set_status(ran.id, "succeeded", finished_at="2026-12-01T10:05:00+00:00")
    jobs.close()
    for job in (ran, cancelled):
        (settings.trainer_logs_dir / f"{job.id}.log").write_text("done")
    now = retention.parse_iso("2026-12-01T11:00:00+00:00")
    one = retention.collect(settings.model_copy(update={"retain_jobs": 1}), dry_run=True, now=now)
    assert {i.path: i.reason for i in one.items if i.kind == "job-log"} == {
        f"data/trainer/logs/{cancelled.id}.log": "beyond the most recent finished job"
    }
    none = retention.collect(settings.model_copy(update={"retain_jobs": 0}), dry_run=True, now=now)
    assert {i.reason for i in none.items if i.kind == "job-log"} == {
        "no finished job is kept (ASSISTANT_RETAIN_JOBS=0)"
    }
    run = settings.adapters_dir / "c" / ".work" / "run"
    run.mkdir(parents=True)
    (run / "x").write_text("x")
    _age(run, 0.2)
    fresh = retention.collect(settings.model_copy(update={"retain_checkpoint_days": 0}), dry_run=True)
    [reason] = [i.reason for i in fresh.items if i.kind == "run-workdir"]
    assert reason == "unchanged for 5 hours (kept 0 days)", reason
    # gc repro: a folder of two minutes ago read "unchanged for 1 hour"; under an hour is said in minutes
    _age(run, 2 / 1440)
    fresh = retention.collect(settings.model_copy(update={"retain_checkpoint_days": 0}), dry_run=True)
    [reason] = [i.reason for i in fresh.items if i.kind == "run-workdir"]
    assert reason == "unchanged for 2 minutes (kept 0 days)", reason


def test_a_jobs_database_that_is_no_file_keeps_the_run_work_directories(settings: Settings) -> None:
    """Explore repro: a jobs.db that is a link to an unmounted volume (or a folder) counted as "no jobs": gc
    removed the run work directories and exited 0, where a jobs database it cannot read keeps them, says so
    and exits 1 (README)."""
    run = settings.adapters_dir / "x" / ".work" / "run1"
    run.mkdir(parents=True)
    _age(run, 30)
    db = jobs_db_path(settings.data_dir)
    db.parent.mkdir(parents=True, exist_ok=True)
    db.symlink_to("/nonexistent-volume/jobs.db")
    r = CliRunner().invoke(app, ["gc"])
    assert r.exit_code == 1 and "cannot be used" in r.output, r.output
    assert run.is_dir() and db.is_symlink() and not Path("/nonexistent-volume").exists()


def test_dry_run_on_a_read_only_data_root(settings: Settings) -> None:
    """Repro: `gc --dry-run` on a read-only data root (a backup, a mounted snapshot) failed ("Cleaning up …
    failed: Read-only file system"), though a dry run only reads: it opened the export lock for writing. It
    lists the same plan as on a writable root; `gc` itself says in one sentence that it cannot remove."""
    _world(settings)
    planned = retention.collect(settings, dry_run=True).to_dict()
    before = _state(settings)
    with read_only(settings.home):
        r = CliRunner().invoke(app, ["gc", "--dry-run", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output) == planned
        r = CliRunner().invoke(app, ["gc"])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
        assert "Traceback" not in r.output
    assert _state(settings) == before


def test_gc_on_an_empty_data_root(home: Path) -> None:
    r = CliRunner().invoke(app, ["gc", "--dry-run"])
    assert r.exit_code == 0 and "Would remove nothing" in r.output, r.output


def test_cache_fingerprint_of_a_real_cache(settings: Settings) -> None:
    from lunatrain import models, tokens

    from helpers import write_export

    write_export(settings)
    tok = models.load_tokenizer(None, settings)
    tier = tokens.tokenize_tier(settings, "curated", tok, 128)
    assert retention.cache_fingerprint(tier.path) == ex.read_summary(settings)["fingerprint"]


def _left_by_an_ended_process(parent: Path, name: str) -> Path:
    """A staging folder made by a process that then ended without removing it (a merge killed mid-write)."""
    code = (
        "import sys; from pathlib import Path; from lunatrain.fsio import staging_dir;"
        "p = staging_dir(Path(sys.argv[1]), sys.argv[2]); (p / 'model.safetensors').write_bytes(b'x' * 4096);"
        "print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(parent), name], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_staging_folders_of_ended_processes_go_and_those_of_live_ones_stay(settings: Settings) -> None:
    """Repro: a merge killed while writing left `data/models/merged/.luna-adapter-v1.XXXX` (the size of a
    whole model) that neither the next merge nor `gc` removed. Staging folders now name their process; `gc`
    removes those whose process has ended on this machine, and those of another machine once nothing in
    them changed for a day. The folder of a process still running stays.

    Repro: a user's own hidden folders named `.NAME.<8 letters or digits>` (`.my-base.original`, a merge kept
    as `.luna-adapter-v1.previous`) were taken for an older release's staging folders and removed, by `gc`
    and by every merge, once idle for a day. Only names with this release's HOST-PID part are staging
    folders now."""
    merged = settings.models_dir / "merged"
    dead = _left_by_an_ended_process(merged, "luna-adapter-v1")
    live = fsio.staging_dir(merged, "luna-adapter-v2")  # this test's own process: alive
    foreign_old = merged / ".luna-adapter-v3.0a1b2c3d-4242.k2j4h5g6"  # another machine's, idle for 2 days
    foreign_new = merged / ".luna-adapter-v4.0a1b2c3d-4242.a8s7d6f5"  # another machine's, just written
    previous = merged / ".luna-adapter-v1.previous"  # the user's: a merge kept aside, idle for 2 days
    original = settings.models_dir / ".my-base.original"  # the user's: a base model's copy
    for folder in (foreign_old, foreign_new, previous, original):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"y" * 100)
    for folder in (foreign_old, previous, original):
        old = time.time() - 2 * 86400
        for p in (folder / "model.safetensors", folder):
            os.utime(p, (old, old))
    kept = merged / ".keep-me"  # a hidden folder not of our making
    kept.mkdir()
    os.utime(kept, (time.time() - 9 * 86400,) * 2)

    planned = json.loads(CliRunner().invoke(app, ["gc", "--dry-run", "--json"]).output)["items"]
    staging = {i["path"]: i for i in planned if i["kind"] == "staging"}
    rel = lambda p: str(p.relative_to(settings.home))
    assert set(staging) == {rel(dead), rel(foreign_old)}, planned
    assert staging[rel(dead)]["bytes"] == 4096 and "ended" in staging[rel(dead)]["reason"], staging
    assert "unchanged for 2 days" in staging[rel(foreign_old)]["reason"], staging
    assert dead.is_dir()  # a dry run removes nothing

    r = CliRunner().invoke(app, ["gc"])
    assert r.exit_code == 0 and "2 staging folders" in r.output.splitlines()[-1], r.output
    assert not dead.exists() and not foreign_old.exists()
    assert live.is_dir() and foreign_new.is_dir() and kept.is_dir() and previous.is_dir() and original.is_dir()


def test_the_work_directory_of_a_job_still_to_run_is_kept_whatever_its_age(settings: Settings) -> None:
    """Repro: a job requeued to resume (its trainer stopped, then stayed down for over a week) lost its
    checkpoints to `gc`, which went by the work directory's age alone: the restarted trainer said "no
    checkpoint to resume from; starting fresh". The work directories of an adapter with a queued or running
    job stay; once the job has ended they age out as before."""
    jobs = JobStore(jobs_db_path(settings.data_dir))
    waiting, _ = jobs.create(LoraParams(adapter_name="b", resume=True))
    jobs.set_status(waiting.id, "queued")
    run = settings.adapters_dir / "b" / ".work" / "resumable-run"
    (run / "checkpoints" / "epoch-001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-001" / "adapter.safetensors").write_bytes(b"w" * 2000)
    _age(run, 10)
    try:
        for args in (["gc", "--dry-run", "--json"], ["gc"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0 and "resumable-run" not in r.output, r.output
        assert (run / "checkpoints" / "epoch-001" / "adapter.safetensors").is_file()
        jobs.set_status(waiting.id, "cancelled")
    finally:
        jobs.close()
    r = CliRunner().invoke(app, ["gc"])
    assert r.exit_code == 0 and "data/adapters/b/.work/resumable-run" in r.output, r.output
    assert not run.exists()


def test_a_job_queued_while_gc_waits_for_an_export_keeps_its_work_directory(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repro: gc read which adapters had jobs to run, then waited for an export in progress (its lock),
    then removed work directories by what it had read before: a `jobs resume` queued meanwhile lost its
    checkpoint ("no checkpoint to resume from; starting fresh"). Which jobs wait is read when it matters."""
    from lunatrain import retention

    run = settings.adapters_dir / "c" / ".work" / "resumable-run"
    (run / "checkpoints" / "epoch-001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-001" / "adapter.safetensors").write_bytes(b"w" * 2000)
    _age(run, 10)
    jobs = JobStore(jobs_db_path(settings.data_dir))
    exports = retention._exports

    def export_meanwhile(*args, **kwargs):  # the resume is queued while gc waits for the export's lock
        waiting, _ = jobs.create(LoraParams(adapter_name="c", resume=True))
        jobs.set_status(waiting.id, "queued")
        return exports(*args, **kwargs)

    monkeypatch.setattr(retention, "_exports", export_meanwhile)
    try:
        r = CliRunner().invoke(app, ["gc"])
        assert r.exit_code == 0 and "resumable-run" not in r.output, r.output
        assert (run / "checkpoints" / "epoch-001" / "adapter.safetensors").is_file()
    finally:
        jobs.close()


def test_gc_keeps_the_work_directory_of_a_local_run_in_progress(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: with ASSISTANT_RETAIN_CHECKPOINT_DAYS=0, a `gc` while `lora --local` trained removed the run's
    work directory and its first epoch's checkpoint (the resume point), since a local run has no job row to
    keep it. A run holds its work directory while it trains; gc leaves it, and takes an idle one beside it."""
    from lunatrain.params import parse_params
    from lunatrain.settings import load_settings
    from lunatrain.train import run_lora

    from helpers import make_records, write_export

    write_export(settings, make_records(40, val_every=5))
    monkeypatch.setenv("ASSISTANT_RETAIN_CHECKPOINT_DAYS", "0")
    work = settings.adapters_dir / "luna-adapter" / ".work"
    idle = work / "idle-run"
    idle.mkdir(parents=True)
    (idle / "report.json").write_text("{}")
    _age(idle, 1)
    seen: list[dict] = []
    during: list[tuple[list[str], list[Path]]] = []

    def gc_after_the_first_epoch() -> bool:
        if not during and any(e["type"] == "eval" and e.get("epoch") == 1 for e in seen):
            report = retention.collect(load_settings())
            during.append(
                ([i.path for i in report.items if i.kind == "run-workdir"], sorted(work.glob("*/checkpoints/epoch-*")))
            )
        return False

    params = parse_params({"epochs": 2, "batchSize": 4, "rank": 4, "maxSeqLength": 128, "seed": 7})
    result = run_lora(params, settings, on_event=seen.append, should_stop=gc_after_the_first_epoch)
    assert result.ok, result.error
    [(removed, checkpoints)] = during
    assert removed == ["data/adapters/luna-adapter/.work/idle-run"]
    assert len(checkpoints) == 1 and checkpoints[0].name == "epoch-001", checkpoints
    assert not idle.exists()
    # Once the run is published, its work directory has become the version's folder; nothing is held after.
    assert list(work.iterdir()) == []


def test_a_local_run_applies_the_policy_as_a_trainer_job_does(settings: Settings, tiny: Path) -> None:
    """Repro: a trainer job applies the retention policy when it ends, but `lora --local` and the daily
    `luna --local` never did: a token cache per changed export and the work directories of cancelled runs
    piled up until someone ran `gc`. A local run ends with the same policy."""
    store.load_seed(settings)
    assert CliRunner().invoke(app, ["export"]).exit_code == 0
    _cache(settings.cache_dir / "tokens" / "curated-old.safetensors", "0" * 64)  # an earlier export's
    old_run = settings.adapters_dir / "luna-adapter" / ".work" / "cancelled-run"
    (old_run / "checkpoints").mkdir(parents=True)
    _age(old_run, 30)
    fast = ["--epochs", "1", "--maxSteps", "2", "--batchSize", "8", "--rank", "4", "--maxSeqLength", "128"]
    r = CliRunner().invoke(app, ["lora", "--local", *fast])
    store.dispose_stores()
    assert r.exit_code == 0, r.output
    assert not (settings.cache_dir / "tokens" / "curated-old.safetensors").exists()
    assert not old_run.exists()
    caches = list((settings.cache_dir / "tokens").glob("*.safetensors"))
    assert len(caches) == 1 and retention.cache_fingerprint(caches[0]) == ex.read_summary(settings)["fingerprint"]


def test_a_run_that_ended_early_keeps_the_checkpoint_it_offers_to_resume_from(settings: Settings) -> None:
    """Explore repro: with ASSISTANT_RETAIN_CHECKPOINT_DAYS=0 a run stopped by Ctrl-C (or a job whose worker
    was killed) said "run the same command with --resume to continue from the last epoch checkpoint", and the
    retention applied as it ended removed that checkpoint the same moment. The adapter of a run that did not
    succeed keeps its work directories then; a later `gc` judges them by their age."""
    run = settings.adapters_dir / "luna-adapter" / ".work" / "cut-short"
    (run / "checkpoints" / "epoch-001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-001" / "adapter.safetensors").write_bytes(b"w" * 100)
    now = settings.model_copy(update={"retain_checkpoint_days": 0})
    retention.after_run(now, resumable="luna-adapter")
    assert (run / "checkpoints" / "epoch-001" / "adapter.safetensors").is_file()
    retention.after_run(now, resumable="other-adapter")
    assert not run.exists()


def test_an_old_export_that_is_a_link_outside_goes_as_a_link_and_what_it_names_stays(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: an old export folder replaced by a link to a folder outside the data root was reported by every
    `gc` as "Removed 1 export" while the link stayed: rmtree refuses a link, and its error was ignored. The
    link itself goes; the folder it names, outside the data root, is never touched."""
    monkeypatch.setenv("ASSISTANT_RETAIN_EXPORTS", "1")
    store.add_examples(settings, [make_draft(prompt="Frage", response="Antwort")])
    ex.export(settings)
    first = ex.current_id(settings)
    outside = tmp_path / "outside"
    (settings.training_dir / ".exports" / first).rename(outside)
    (settings.training_dir / ".exports" / first).symlink_to(outside)
    store.add_examples(settings, [make_draft(prompt="Frage 2", response="Antwort 2")])
    ex.export(settings)
    r = CliRunner().invoke(app, ["gc"])  # under RETAIN_EXPORTS=1 the first export goes: the link
    assert r.exit_code == 0 and "Removed 1 export" in r.output, r.output
    assert not (settings.training_dir / ".exports" / first).is_symlink()
    assert outside.is_dir() and any(outside.iterdir())
    r = CliRunner().invoke(app, ["gc"])
    assert r.exit_code == 0 and "export" not in r.output, r.output


def test_a_dry_run_leaves_no_journal_files_beside_the_jobs_database(settings: Settings) -> None:
    """Repro: `gc --dry-run` (and `status`, any reader beside a stopped trainer) left `jobs.db-wal` and
    `jobs.db-shm` where there were none: SQLite makes both for a read-only reader of a WAL-mode database and
    cannot remove them on close. A reader now leaves the folder as it found it."""
    _world(settings)
    trainer = settings.data_dir / "trainer"
    before = sorted(p.name for p in trainer.iterdir())
    assert "jobs.db-wal" not in before
    r = CliRunner().invoke(app, ["gc", "--dry-run"])
    assert r.exit_code == 0, r.output
    jobs = JobStore(jobs_db_path(settings.data_dir), read_only=True)
    assert jobs.list()
    jobs.close()
    assert sorted(p.name for p in trainer.iterdir()) == before


def test_a_damaged_jobs_database_does_not_stop_the_rest_of_gc(settings: Settings) -> None:
    """Repro: with `jobs.db` damaged, `gc` removed nothing at all ("The jobs database … cannot be used"),
    though old exports, unused token caches and killed merges' staging folders do not depend on it. They
    go now; the job events stay, and so do run work directories (whether a job still waits to resume from
    one cannot be read). gc says so in one sentence and exits 1."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("ASSISTANT_RETAIN_EXPORTS", "2")
    try:
        w = _world(settings)
        db = jobs_db_path(settings.data_dir)
        db.write_bytes(b"this is not a database" * 100)
        dead = _left_by_an_ended_process(settings.models_dir / "merged", "luna-adapter-v1")
        for args in (["gc", "--dry-run", "--json"], ["gc"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 1, r.output
            assert "Traceback" not in r.output
            assert f"error: The jobs database {db} cannot be used" in r.output, r.output
            assert "run work directories and job events were kept" in r.output, r.output
        planned = json.loads(CliRunner().invoke(app, ["gc", "--dry-run", "--json"]).stdout)
        assert planned["items"] == [] and planned["problems"], planned
        assert not dead.exists()
        assert len(ex.export_ids(settings)) == 2
        assert not (settings.cache_dir / "tokens" / "curated-old.safetensors").exists()
        assert w["idle"].is_dir()
    finally:
        monkeypatch.undo()


def test_a_jobs_database_damaged_where_only_the_second_read_looks_is_said_as_it_is(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review repro: the job events went (the first read worked), then the read of the jobs to run failed, and
    gc said "the run work directories and job events were kept" beside the events it listed as removed."""
    import sqlite3

    run = settings.adapters_dir / "x" / ".work" / "run1"
    run.mkdir(parents=True)
    _age(run, 30)

    def damaged(_settings):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(retention, "_unfinished_adapters", damaged)
    report = retention.collect(settings)
    assert run.is_dir() and len(report.problems) == 1, report.problems
    assert report.problems[0].endswith("the run work directories were kept."), report.problems


def test_the_space_of_removed_job_events_comes_back_to_the_disk(settings: Settings) -> None:
    """Explore repro: gc said "Removed 2 jobs' events, 2 job logs: 0.4 MB" and 2.4 kB came back: the events
    were deleted from jobs.db, whose file kept its size (and its log 4 MB). The file shrinks now."""
    jobs = JobStore(jobs_db_path(settings.data_dir))
    for _ in range(2):
        job, _ = jobs.create(LoraParams())
        for step in range(1500):
            jobs.add_event(job.id, "progress", {"step": step, "loss": 1.0 / (step + 1), "pad": "x" * 200})
        jobs.set_status(job.id, "succeeded")
    jobs.close()
    db = jobs_db_path(settings.data_dir)
    wal = db.with_name(db.name + "-wal")

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (db, wal) if p.exists())

    before = on_disk()
    report = retention.collect(settings.model_copy(update={"retain_jobs": 0}))
    said = sum(i.bytes for i in report.items if i.kind == "job-events")
    assert said > 500_000, report.items
    assert before - on_disk() > said / 2, (before, on_disk(), said)


def test_gc_says_sizes_in_the_unit_that_fits():
    """Numbers repro: several GB of old checkpoints read "5432.1 MB"."""
    from lunatrain.retention import size_text

    assert [size_text(n) for n in (512, 99_999, 100_000, 5_432_100_000)] == ["0.5 kB", "100.0 kB", "0.1 MB", "5.4 GB"]


def test_two_collections_at_once_remove_each_thing_once_and_both_succeed(settings: Settings) -> None:
    """Repro: two `gc` at once (or a user's beside the one a trainer runs after each job): one failed with
    "Cleaning up under <home> failed: No such file or directory." (it measured a folder the other was
    removing), or both claimed the same exports. Now they take turns: each thing is removed and reported
    once, and the second finds what the first left."""
    import threading

    world = _world(settings)
    for _ in range(3):
        ex.export(settings)  # three more exports to remove, whose folders take a while to measure
    planned = {i.path for i in retention.collect(settings, dry_run=True).items}
    reports: list[retention.GcReport] = []
    errors: list[BaseException] = []

    def gc() -> None:
        try:
            reports.append(retention.collect(settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=gc) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [i.path for r in reports for i in r.items]
    assert sorted(claimed) == sorted(planned), claimed  # each once, between them
    assert retention.collect(settings, dry_run=True).items == []
    assert world["fresh"].is_dir()


def test_a_thing_gone_while_it_is_measured_counts_as_gone(tmp_path: Path) -> None:
    """What another program removes while gc measures it is no error: it is gone, with what was counted."""
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.jsonl").write_text("x" * 100)
    assert fsio.tree_size(folder) == 100
    assert fsio.tree_size(tmp_path / "never-was") == 0


def test_a_token_cache_that_cannot_be_removed_is_named_and_the_rest_is_collected(
    settings: Settings, monkeypatch
) -> None:
    """ "Cleaning up under <home> failed: Permission denied." left the user to search the data root for it. Review
    repro: a token cache that could not be removed (or a folder by a cache's name) still stopped all of gc, on
    every run, where the other kinds had become gc's problems. It is named, and the rest is collected."""
    _world(settings)
    odd = settings.cache_dir / "tokens" / "curated-folder.safetensors"  # a folder where a cache file belongs
    (odd / "inner").mkdir(parents=True)
    refused: list[Path] = []
    unlink = Path.unlink

    def refuse_caches(path: Path, missing_ok: bool = False) -> None:
        if path.name != "curated-old.safetensors":
            return unlink(path, missing_ok=missing_ok)
        refused.append(path)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "unlink", refuse_caches)
    r = CliRunner().invoke(app, ["gc"])
    monkeypatch.undo()
    assert r.exit_code == 1 and refused, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {settings.shown(refused[0])} could not be removed (Permission denied); it stays: give this user "
        "the right to remove it, or remove it as its owner."
    ], r.output
    assert not odd.exists() and "token-cache" in r.output and "run-workdir" in r.output, r.output


def test_gc_on_a_data_root_that_does_not_exist_removes_nothing(tmp_path, monkeypatch) -> None:
    """Review repro: with the collection lock on the data root folder, `gc --dry-run` on a root that does not
    exist (yet) said "Cleaning up … failed: No such file or directory" and exit 1; it removes nothing."""
    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path / "not-yet"))
    for args in (["gc", "--dry-run"], ["gc"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "remove" in r.output.lower(), r.output
    assert not (tmp_path / "not-yet").exists()


def test_the_jobs_kept_are_those_that_ended_last_whatever_clock_stamped_them(settings: Settings) -> None:
    """Clocks repro: with ASSISTANT_RETAIN_JOBS, gc kept the jobs with the latest recorded finish time,
    whichever clock wrote it: after a trainer had run with its clock a year ahead, RETAIN_JOBS=1 removed the
    newest job's events and log and kept the older one stamped 2027. Jobs rank by the order they ended in."""
    jobs = JobStore(jobs_db_path(settings.data_dir))
    settings.trainer_logs_dir.mkdir(parents=True)
    ahead, _ = jobs.create(LoraParams(adapter_name="a"))
    later, _ = jobs.create(LoraParams(adapter_name="b"))
    jobs.set_status(ahead.id, "succeeded", finished_at="2027-12-01T10:00:00+00:00")  # a clock a year ahead
    jobs.set_status(later.id, "succeeded", finished_at="2026-12-01T10:05:00+00:00")  # ended after it
    jobs.close()
    for job in (ahead, later):
        (settings.trainer_logs_dir / f"{job.id}.log").write_text("done")
    now = retention.parse_iso("2026-12-01T11:00:00+00:00")
    one = retention.collect(settings.model_copy(update={"retain_jobs": 1}), dry_run=True, now=now)
    assert [i.path for i in one.items if i.kind == "job-log"] == [f"data/trainer/logs/{ahead.id}.log"]


def test_a_fresh_checkpoint_is_kept_by_a_process_whose_clock_runs_ahead_of_the_files(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clocks repro: a trainer whose clock ran 8 days ahead of the files' (another machine on a shared data root,
    a clock not yet set) removed another adapter's resume checkpoint seconds after it was written, as
    "unchanged for 8 days (kept 7 days)". A folder's idle time is measured on the clock that stamps the files:
    the time of a file written now in the data root."""
    run = settings.adapters_dir / "c" / ".work" / "run"
    run.mkdir(parents=True)
    (run / "checkpoint").write_text("x")  # written now, by the files' clock
    real = time.time()
    ahead = real + 8 * 86400
    monkeypatch.setattr(retention.time, "time", lambda: ahead)
    monkeypatch.setattr(retention, "utc_now", lambda: datetime.fromtimestamp(ahead, UTC))
    report = retention.collect(settings)  # the removal a trainer makes after each job (a dry run reads no file clock)
    assert not [i for i in report.items if i.kind == "run-workdir"] and (run / "checkpoint").exists(), report.items
    for p in [*run.rglob("*"), run]:  # and one idle for 9 days by the files' clock still goes
        os.utime(p, (real - 9 * 86400, real - 9 * 86400))
    report = retention.collect(settings)
    assert [i.kind for i in report.items if i.kind == "run-workdir"] == ["run-workdir"] and not run.exists()
    assert not list(settings.data_dir.glob(".gc-clock*"))


@pytest.mark.parametrize("kind", ["export", "run-workdir", "staging"])
def test_what_gc_could_not_remove_is_never_said_removed(
    settings: Settings, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repro: export folders another user had made (or made read-only) could not be removed, and `gc`
    said "Removed 3 exports: 1.3 MB.", exit 0, every time again: the folder removal ignored its errors. A
    folder that stays is not said removed; `gc` names it in one sentence and exits 1, the rest removed."""
    monkeypatch.setenv("ASSISTANT_RETAIN_EXPORTS", "1")
    world = _world(settings)
    planned = retention.collect(Settings(home=settings.home, retain_exports=1), dry_run=True).to_dict()["items"]
    plan = {i["kind"]: i["path"] for i in planned}
    if kind == "staging":
        plan[kind] = str(
            _left_by_an_ended_process(settings.models_dir / "merged", "luna-adapter-v1").relative_to(settings.home)
        )
    stuck = settings.home / plan[kind]
    assert stuck.is_dir() and (kind != "run-workdir" or stuck == world["idle"])
    (stuck / "inner").mkdir()
    _age(stuck, 10)  # as idle as before: gc judges a run folder by its newest file
    held = fsio.tree_size(stuck)
    with read_only(stuck / "inner"):  # one folder inside it cannot be emptied
        r = CliRunner().invoke(app, ["gc"])
        assert stuck.is_dir()
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert not [line for line in lines if plan[kind] in line and not line.startswith("error: ")], r.output
    # gc repro: the sentence said "could not be removed; it stays" while every file in it had gone (only the
    # folder that could not be emptied stayed): what went is said, and what is left
    assert held > 0 and fsio.tree_size(stuck) == 0
    assert lines[-1] == (
        f"error: {plan[kind]} could only be removed in part (Device or resource busy: {plan[kind]}/inner): "
        f"{retention.size_text(held)} of it went, what is left (empty folders) stays: give this user the right to "
        "remove it, or remove it as its owner."
    ), r.output
    # review repro: the first folder that stayed stopped gc there; everything else still goes
    after = retention.collect(Settings(home=settings.home, retain_exports=1), dry_run=True).to_dict()["items"]
    assert [i for i in after if (i["kind"], i["path"]) != (kind, plan[kind])] == [], after  # (a run folder
    # that was partly emptied is no longer idle: its files changed)


def test_a_job_log_that_is_a_folder_goes_with_its_events_and_the_rest_of_gc_goes_on(settings: Settings) -> None:
    """Corruption repro: a job log replaced by a folder made every `gc` fail ("Is a directory") after it had
    deleted that job's events, and the other logs and the rest of the collection stayed, on every run."""
    w = _world(settings)
    old = w["ids"][0]
    log = settings.trainer_logs_dir / f"{old}.log"
    log.unlink()
    (log / "inner").mkdir(parents=True)
    (log / "inner" / "x").write_text("x" * 100)
    planned = retention.collect(settings, dry_run=True)
    assert f"data/trainer/logs/{old}.log" in {i.path for i in planned.items if i.kind == "job-log"}
    report = retention.collect(settings)
    assert report.problems == []
    assert not log.exists() and not (settings.trainer_logs_dir / f"{w['ids'][1]}.log").exists()
    assert {(i.kind, i.path) for i in report.items} == {(i.kind, i.path) for i in planned.items}


def test_a_job_log_that_cannot_be_removed_is_a_problem_and_the_rest_of_gc_goes_on(settings: Settings) -> None:
    w = _world(settings)
    old = w["ids"][0]
    log = settings.trainer_logs_dir / f"{old}.log"
    log.unlink()
    (log / "inner").mkdir(parents=True)
    with read_only(log / "inner"):
        r = CliRunner().invoke(app, ["gc"])
        assert log.is_dir()
    assert r.exit_code == 1, r.output
    shown = f"data/trainer/logs/{old}.log"
    assert not [line for line in r.output.splitlines() if shown in line and not line.startswith("error: ")]
    assert r.output.strip().splitlines()[-1] == (
        f"error: {shown} could not be removed (Device or resource busy: {shown}/inner); it stays: give "
        "this user the right to remove it, or remove it as its owner."
    ), r.output
    assert not (settings.trainer_logs_dir / f"{w['ids'][1]}.log").exists()  # the other old job's log went


def _fill(folder: Path) -> Path:
    """A file that takes every byte left on `folder`'s file system."""
    filler = folder / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    return filler


def test_gc_on_a_disk_full_under_the_jobs_database_says_so_and_collects_the_rest(settings: Settings) -> None:
    """Limits repro: on a full disk `gc`, which every disk-full message recommends, said the healthy jobs
    database "cannot be used (database or disk is full)" (SQLite cannot even read a WAL database without room
    for its index). It says the disk is full, and still removes what needs no jobs database."""
    from faults import small_disk

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("ASSISTANT_RETAIN_EXPORTS", "2")
    try:
        with small_disk(settings.data_dir / "trainer", "2m"):
            w = _world(settings)
            filler = _fill(settings.data_dir / "trainer")
            r = CliRunner().invoke(app, ["gc"])
            assert r.exit_code == 1, r.output
            db = jobs_db_path(settings.data_dir)
            assert f"error: The disk holding the jobs database {db} is full" in r.output, r.output
            assert "cannot be used" not in r.output and "run `lunatrain gc` again" in r.output, r.output
            assert len(ex.export_ids(settings)) == 2  # what needs no jobs database went
            assert w["idle"].is_dir() and (settings.trainer_logs_dir / f"{w['ids'][0]}.log").exists()  # kept
            filler.unlink()
    finally:
        monkeypatch.undo()


def test_gc_on_a_full_disk_first_frees_what_lets_it_read_the_jobs_database(settings: Settings) -> None:
    """Limits repro, continued: the job steps ran first, so on a full data root gc failed at the jobs database
    before it removed the old exports whose room would have let it read that database. They go first now."""
    from faults import small_disk

    with small_disk(settings.home, "4m"):
        w = _world(settings)
        oldest = settings.training_dir / ex.EXPORTS_DIR / ex.export_ids(settings)[0]
        (oldest / "bulk.bin").write_bytes(b"x" * 1_500_000)  # an old export that frees room once removed
        filler = _fill(settings.home)
        report = retention.collect(settings.model_copy(update={"retain_jobs": 3, "retain_exports": 2}))
        assert report.problems == [], report.problems
        kinds = {i.kind for i in report.items}
        assert {"export", "job-events", "job-log", "run-workdir"} <= kinds, report.items
        assert not (settings.trainer_logs_dir / f"{w['ids'][0]}.log").exists() and not w["idle"].exists()
        filler.unlink()
