"""Training status (GET /assistant/training/status, `lunatrain status`). Run: `pytest tests/test_status.py -q`."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from lunatrain import export, registry, store
from lunatrain.cli import app
from lunatrain.errors import UsageError
from lunatrain.fsio import atomic_write_json
from lunatrain.status import training_status


def _version(name: str, version: str, base: str, fingerprint: str, **extra) -> dict:
    """A curated registry entry of `name@version` trained on `base` (its fingerprint given)."""
    return {
        "name": name,
        "version": version,
        "path": f"data/adapters/{name}/{version}",
        "baseModel": {"id": base, "fingerprint": fingerprint},
        "datasetTier": "curated",
    } | extra


def test_fresh_data_root_reports_zeros_and_creates_nothing(settings, home):
    status = training_status(settings, 5)
    assert status["counts"]["curated"] == {"approved": 0, "pending": 0, "rejected": 0, "total": 0}
    assert (status["curated"], status["ready"], status["minCurated"]) == (0, False, 5)
    for key in ("lastExport", "lastJob", "activeAdapter", "lastPrepare", "lastGate", "changedSinceExport"):
        assert status[key] is None, key
    assert status["activeAdapters"] == []
    assert list(home.iterdir()) == []  # no database, no model, no reports
    assert training_status(settings, 0)["ready"] is True


def test_counts_readiness_and_export_freshness(settings):
    store.load_seed(settings)
    counts = store.counts(settings)
    approved = counts["examples"]["curated"]["approved"]
    status = training_status(settings, approved)
    assert status["ready"] is True and status["curated"] == approved
    assert training_status(settings, approved + 1)["ready"] is False
    assert status["counts"]["conversation"]["pending"] == counts["examples"]["conversation"]["pending"] > 0
    assert status["memory"]["approved"] == counts["memory"]["approved"] > 0
    assert status["memory"]["total"] == sum(counts["memory"].values())
    assert status["lastExport"] is None and status["changedSinceExport"] is True  # data, never exported

    summary = export.export(settings)
    status = training_status(settings, 30)
    assert status["lastExport"]["fingerprint"] == summary.fingerprint
    assert status["lastExport"]["time"] == summary.exported_at
    # the one timestamp format of every report, job and registry entry (wire.now_iso): UTC, milliseconds, Z
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", summary.exported_at), summary.exported_at
    assert status["changedSinceExport"] is False

    store.add_example(settings, prompt="Neue Frage?", response="Neue Antwort.", source="curated", status="approved")
    status = training_status(settings, 30)
    assert status["changedSinceExport"] is True and status["lastExport"]["changedSince"] is True
    assert status["curated"] == approved + 1


def test_last_job_active_adapter_prepare_and_gate_come_from_the_artifacts(settings):
    reports = settings.reports_training_dir
    registry.write_latest(
        settings,
        {
            "status": "failed",
            "jobId": "job-7",
            "adapterName": "luna-adapter",
            "version": None,
            "metrics": {"valLoss": None, "steps": 3},
            "error": {"code": "nan_loss", "message": "loss became nan"},
        },
    )
    atomic_write_json(
        reports / "lora-adapters.json",
        {
            "format": registry.FORMAT,
            "adapters": {
                "luna-adapter": {
                    "versions": [
                        _version("luna-adapter", "v1", "luna-tiny", "f1", gate={"passed": True, "reasons": []}),
                        {
                            "name": "luna-adapter",
                            "version": "v2",
                            "path": "data/adapters/luna-adapter/v2",
                            "baseModel": {"id": "luna-tiny", "fingerprint": "f1"},
                            "gate": {"passed": False, "reasons": ["val loss regresses"]},
                        },
                    ],
                    "aliases": {"latest": "v2", "active": "v1"},
                    "activations": [],
                },
                "other": {
                    "versions": [
                        {
                            "name": "other",
                            "version": "v1",
                            "path": "data/adapters/other/v1",
                            "baseModel": {"id": "org/x", "fingerprint": "f2"},
                        }
                    ],
                    "aliases": {"latest": "v1"},
                    "activations": [],
                },
            },
        },
    )
    atomic_write_json(
        reports / "prepare-latest.json",
        {
            "status": "fail",
            "created": "t1",
            "tier": "curated",
            "checks": [
                {"id": "volume", "severity": "fail"},
                {"id": "truncated", "severity": "warn"},
                {"id": "token_stats", "severity": "info"},
            ],
        },
    )
    atomic_write_json(
        settings.reports_eval_dir / "eval-gate-latest.json",
        {
            "decision": "fail",
            "passed": False,
            "candidate": {"ref": "luna-adapter@v2"},
            "baseline": {"ref": "luna-adapter@v1"},
            "reasons": ["val loss regresses"],
            "promoted": False,
            "created": "t2",
            "metrics": {"goldenPassRate": 0.5},
        },
    )
    s = training_status(settings, 0)
    assert s["lastJob"]["jobId"] == "job-7" and s["lastJob"]["status"] == "failed" and "state" not in s["lastJob"]
    assert s["lastJob"]["error"]["code"] == "nan_loss"
    assert s["activeAdapter"]["name"] == "luna-adapter" and s["activeAdapter"]["version"] == "v1"
    assert s["activeAdapter"]["gate"] == {"passed": True, "reasons": []}
    assert [a["name"] for a in s["activeAdapters"]] == ["luna-adapter"]  # `other` has no active version
    assert s["lastPrepare"] == {
        "status": "fail",
        "created": "t1",
        "tier": "curated",
        "baseModel": None,
        "failed": ["volume"],
        "warned": ["truncated"],
        "fingerprint": None,  # a report without its dataset: nothing to compare with the export
        "matchesExport": None,
    }
    assert s["lastGate"]["candidate"] == "luna-adapter@v2" and s["lastGate"]["passed"] is False
    assert s["lastGate"]["reasons"] == ["val loss regresses"]

    # a torn report is shown as missing, never as an error
    (reports / "prepare-latest.json").write_text("{not json", "utf-8")
    assert training_status(settings, 0)["lastPrepare"] is None


def test_bad_min_curated_is_a_usage_error(settings):
    with pytest.raises(UsageError, match="minCurated"):
        training_status(settings, -1)


def test_cli_plain_and_json(settings):
    store.load_seed(settings)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--minCurated=10000"])
    assert result.exit_code == 0, result.output
    assert (
        "ready: no:" in result.output
        and "curated examples\t" in result.output
        and "last export: never" in result.output
    )
    result = runner.invoke(app, ["status", "--min-curated", "1", "--json"])
    data = json.loads(result.output)
    assert data["ready"] is True and data["minCurated"] == 1
    assert runner.invoke(app, ["status", "--min-curated", "-3"]).exit_code == 2


def test_last_job_comes_from_the_job_store_failed_jobs_included(settings):
    """Repro: a failed trainer job never writes lora-latest.json, so status showed an older succeeded one."""
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobError, JobStore, jobs_db_path

    registry.write_latest(
        settings,
        {
            "status": "succeeded",
            "jobId": "ftjob-old",
            "adapterName": "luna-adapter",
            "version": "v1",
            "created": "2026-01-01T00:00:00+00:00",
            "metrics": {},
        },
    )
    db = JobStore(jobs_db_path(settings.data_dir))
    try:
        job, _ = db.create(LoraParams(adapter_name="mein-adapter"))
        db.set_status(job.id, "failed", error=JobError(code="nan_loss", message="loss became nan").wire())
    finally:
        db.close()
    last = training_status(settings, 0)["lastJob"]
    assert (last["jobId"], last["status"], last["source"]) == (job.id, "failed", "trainer")
    assert last["adapterName"] == "mein-adapter" and last["error"] == {
        "code": "nan_loss",
        "message": "loss became nan",
        "params": None,
    }
    out = CliRunner().invoke(app, ["status"]).output
    # a job without a val loss says nothing of one (it said "val loss None")
    # nor of a version "-": a failed job registered none, and says so (it printed `mein-adapter@-`)
    assert f"last job: failed mein-adapter (no version, {job.id}): loss became nan" in out


def test_a_trainer_job_is_shown_from_its_own_record_not_its_report(settings):
    """Repro: the report a trainer job writes (lora-latest.json, created when the adapter is saved) is newer
    than the job's createdAt, so status showed the report (no finish time, no gate) for the same job."""
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobStore, jobs_db_path

    db = JobStore(jobs_db_path(settings.data_dir))
    try:
        job, _ = db.create(LoraParams(adapter_name="mein-adapter"))
        db.set_status(job.id, "succeeded", gate={"passed": True, "promoted": True, "reasons": []})
    finally:
        db.close()
    later = "2999-01-01T00:00:00+00:00"
    registry.write_latest(settings, {"status": "succeeded", "jobId": job.id, "created": later, "metrics": {}})
    last = training_status(settings, 0)["lastJob"]
    assert (last["jobId"], last["source"]) == (job.id, "trainer") and last["gate"]["passed"] is True, last


def test_a_failed_job_queued_behind_another_is_the_last_job(settings):
    """Long-session repro: a job queued behind a longer one that then failed (a damaged base, a killed worker)
    left status naming the job before it as the last, "succeeded": the failed job was submitted before that
    job's report was written, and the two were compared by those times. A trainer job's report is that job's;
    the trainer's own record says which job came last. While a job waits, status names it too."""
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobError, JobStore, jobs_db_path

    db = JobStore(jobs_db_path(settings.data_dir))
    try:
        first, _ = db.create(LoraParams(adapter_name="a1"))
        second, _ = db.create(LoraParams(adapter_name="brk"))
        db.set_status(first.id, "succeeded", finished_at="2999-01-01T00:00:10.000Z")
        registry.write_latest(settings, {"status": "succeeded", "jobId": first.id, "created": "2999-01-01T00:00:09Z"})
        assert training_status(settings, 0)["lastJob"]["jobId"] == second.id  # queued: the newest job
        db.set_status(second.id, "failed", error=JobError(code="storage_error", message="damaged").wire())
    finally:
        db.close()
    last = training_status(settings, 0)["lastJob"]
    assert (last["jobId"], last["status"], last["source"]) == (second.id, "failed", "trainer"), last
    # a run in this process (no job) after the trainer's last job is still the last one
    registry.write_latest(settings, {"status": "succeeded", "jobId": None, "created": "2999-01-02T00:00:00Z"})
    assert training_status(settings, 0)["lastJob"]["source"] == "report"


def test_a_trainer_jobs_duration_is_the_trainers_measure_and_unknown_where_it_has_none(settings):
    """Repro: `lunatrain status` showed lastJob.durationSeconds null for every job the trainer ran (it read
    a metric the trainer never records): it shows the trainer's own measure of the job's run. Status explore
    repro: for a job killed with its trainer, status filled in finishedAt - startedAt, where finishedAt is when
    the next trainer settled the job, so the time no trainer ran counted as training (65.7 s for a job killed
    after 12 s; a day for a trainer down a day), where the job API says null: unknown, as there."""
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobStore, jobs_db_path

    db = JobStore(jobs_db_path(settings.data_dir))
    try:
        queued, _ = db.create(LoraParams(adapter_name="mein-adapter"))
        db.set_status(queued.id, "cancelled")  # cancelled while queued: it never started, so no duration
        assert training_status(settings, 0)["lastJob"]["durationSeconds"] is None
        settled, _ = db.create(LoraParams(adapter_name="mein-adapter"))
        db.set_status(settled.id, "running", started_at="2026-01-01T12:00:00.000Z")  # a trainer that is gone
        db.set_status(
            settled.id,
            "failed",
            finished_at="2026-01-01T12:01:30.250Z",
            error={"code": "interrupted", "message": "The trainer stopped."},
        )
        assert training_status(settings, 0)["lastJob"]["durationSeconds"] is None  # not 90.25
        job, _ = db.create(LoraParams(adapter_name="mein-adapter"))
        db.set_status(job.id, "queued")
        assert db.claim(job.id)  # as this trainer runs it
        assert training_status(settings, 0)["lastJob"]["durationSeconds"] is None  # still running
        # a running job has no version yet, and that is no news
        assert f"last job: running mein-adapter ({job.id})" in CliRunner().invoke(app, ["status"]).output
        done = db.set_status(job.id, "succeeded", metrics={"valLoss": 7.8153564453125})
    finally:
        db.close()
    last = training_status(settings, 0)["lastJob"]
    assert done.duration_seconds is not None and done.duration_seconds >= 0
    assert (last["jobId"], last["durationSeconds"]) == (job.id, done.duration_seconds), last
    # the plain view rounds the val loss as every other view does (it printed 7.8153564453125)
    assert (
        f"last job: succeeded mein-adapter val loss 7.8154 (no version, {job.id})"
        in CliRunner().invoke(app, ["status"]).output
    )
    out = CliRunner().invoke(app, ["status", "--json"]).output
    assert json.loads(out)["lastJob"]["durationSeconds"] == done.duration_seconds


def test_defaults_tiers_trainer_and_unambiguous_names(home, monkeypatch, dead_port):
    """Repro: minCurated defaulted to 0 (the Luna profile says 30), `ready` looked at the curated tier only,
    no trainer health, and `counts.memory` (examples) sat beside `memory` (memory items)."""

    from lunatrain.settings import load_settings

    settings = load_settings(lora_trainer_url=f"http://127.0.0.1:{dead_port}")
    store.add_example(settings, prompt="Wer?", response="Luna.", source="curated", status="approved")
    store.add_memory(settings, question="Wo wohnt Anna?", answer="In Köln.")
    s = training_status(settings)
    assert s["minCurated"] == 30 and s["ready"] is False
    assert s["examples"]["curated"]["approved"] == 1 and s["examples"]["memory"]["total"] == 0
    assert s["memoryItems"]["approved"] == 1 and s["curatedApproved"] == 1
    assert s["counts"] == s["examples"] and s["memory"] == s["memoryItems"]  # the deprecated names, one release
    assert s["tiers"]["curated"] == {
        "approved": 1,
        "ready": False,
        "reason": "1 approved curated example, 30 required (minCurated)",
        # the same in a code and its values, for the dashboard to say in its language
        "code": "tier.too_few_curated",
        "params": {"curated": 1, "minCurated": 30},
    }
    assert s["tiers"]["merged"]["approved"] == 2
    ready = training_status(settings, 1)["tiers"]
    assert ready["curated"]["ready"] and ready["merged"]["ready"] and ready["memory"]["ready"]
    assert s["trainer"]["reachable"] is False and s["trainer"]["label"] == "Offline"
    out = CliRunner().invoke(app, ["status"], env={"ASSISTANT_LORA_TRAINER_URL": settings.lora_trainer_url}).output
    assert "minCurated 30" in out and "trainer: Offline" in out and "memory items\t1" in out


def test_active_adapter_is_none_when_only_another_base_has_one(settings, tiny):
    """Repro: after switching back to luna-tiny and deactivating its adapter, status named the adapter active on
    the other base as "active adapter", which the served base cannot use (chat answers 404 for its name)."""
    atomic_write_json(
        settings.registry_file,
        {
            "format": registry.FORMAT,
            "adapters": {
                "luna-adapter": {
                    "versions": [_version("luna-adapter", "v1", "org/x", "f2")],
                    "aliases": {"latest": "v1", "active": "v1"},
                    "activations": [],
                }
            },
        },
    )
    s = training_status(settings, 0)
    assert [(a["name"], a["baseModel"], a["matchesBaseModel"]) for a in s["activeAdapters"]] == [
        ("luna-adapter", "org/x", False)
    ]
    assert s["activeAdapter"] is None  # none on the configured base (luna-tiny)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "active adapter: none" in result.output and "also active: luna-adapter@v1 on org/x" in result.output
    # A configured base that cannot be found: the adapter shown is only a guess, and status says so.
    gone = str(settings.home / "models" / "gone")
    from lunatrain.settings import load_settings

    guessed = training_status(load_settings(base_model=gone), 0)
    assert guessed["activeAdapter"]["name"] == "luna-adapter", guessed["activeAdapter"]
    assert guessed["problems"] == [
        f"The configured base model cannot be used (Base model directory {gone!r} does not exist), so the "
        "active adapter shown is a guess; set ASSISTANT_BASE_MODEL to the base model in use."
    ], guessed["problems"]


def test_the_guess_beside_a_missing_configured_base_is_the_version_active_on_its_id(settings, tiny):
    """Switch repro: the configured base's folder moved away, status guessed "active adapter: luna-adapter@v5 on
    …/gemma", the first base in alphabetical order, though the registry held v3 active on exactly the configured
    id. The guess is the one recorded for that id."""
    gone = str(settings.home / "models" / "llama")
    versions = [_version("luna-adapter", "v1", "/a/alpha", "f1"), _version("luna-adapter", "v2", gone, "f2")]
    active = {"f1": {"version": "v1", "baseModel": "/a/alpha"}, "f2": {"version": "v2", "baseModel": gone}}
    adapter = {"versions": versions, "aliases": {"latest": "v2"}, "activeByBase": active, "activations": []}
    atomic_write_json(settings.registry_file, {"format": registry.FORMAT, "adapters": {"luna-adapter": adapter}})
    from lunatrain.settings import load_settings

    guessed = training_status(load_settings(home=settings.home, base_model=gone), 0)
    assert (guessed["activeAdapter"]["version"], guessed["activeAdapter"]["baseModel"]) == ("v2", gone), guessed
    assert "so the active adapter shown is a guess" in guessed["problems"][0]


def test_last_job_prepare_and_gate_name_their_base_model(settings):
    """Repro: after `lunatrain luna --baseModel=org/x` status on luna-tiny said "last gate: passed
    luna-adapter@v2" next to "active adapter: luna-adapter@v1 on luna-tiny", with nothing saying v2's gate,
    job and prepare were for another base model."""
    registry.write_latest(
        settings,
        {
            "status": "succeeded",
            "jobId": None,
            "adapterName": "luna-adapter",
            "version": "v2",
            "created": "2026-01-01T00:00:00+00:00",
            "baseModel": {"id": "org/x", "fingerprint": "f2"},
            "metrics": {"valLoss": 1.5},
        },
    )
    atomic_write_json(settings.prepare_report, {"status": "ok", "created": "t1", "baseModel": "org/x", "checks": []})
    atomic_write_json(
        settings.eval_report,
        {
            "decision": "pass",
            "passed": True,
            "candidate": {"ref": "luna-adapter@v2", "kind": "adapter", "baseModel": "org/x"},
            "baseline": {"ref": "luna-adapter@v1"},
            "reasons": [],
            "created": "t2",
        },
    )
    s = training_status(settings, 0)
    assert s["lastJob"]["baseModel"] == s["lastGate"]["baseModel"] == s["lastPrepare"]["baseModel"] == "org/x"
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "last job: succeeded luna-adapter@v2 on org/x val loss 1.5000" in result.output
    assert "last prepare: ok on org/x (t1)" in result.output
    assert "last gate: passed luna-adapter@v2 on org/x (t2)" in result.output


def test_plain_status_says_the_last_jobs_version_was_refused_by_the_gate(settings, tmp_path):
    """Auto repro: after `auto` trained v2 and the gate refused it, `status` said "last job: succeeded
    luna-adapter@v2 on luna-tiny val loss 8.4993" and nothing else of it; `--json` had `lastJob.gate.passed`
    false, the text line left it out."""
    from helpers import adapter_work_dir

    gate = {"passed": False, "status": "failed", "reasons": ["val loss 8.4993 regresses against luna-adapter@v1"]}
    entry = {"baseModel": {"id": "luna-tiny", "fingerprint": "f1"}, "params": {}, "metrics": {}, "gate": gate}
    registry.publish(settings, "luna-adapter", "versioned", adapter_work_dir(settings, "luna-adapter", "x"), entry)
    report = {"status": "succeeded", "jobId": None, "adapterName": "luna-adapter", "version": "v1"}
    registry.write_latest(settings, report | {"created": "2026-01-01T00:00:00+00:00", "metrics": {"valLoss": 8.4993}})
    assert training_status(settings, 0)["lastJob"]["gate"]["passed"] is False
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("last job:"))
    assert line == "last job: succeeded luna-adapter@v1 val loss 8.4993; the eval gate refused it", line


def test_plain_status_says_when_the_active_adapter_needs_retraining(settings, tiny):
    """Repro: after `lunatrain examples delete` of an example luna-adapter@v1 was trained on, `adapters list`
    said "[stale: retrain needed]" and `status --json` "stale": true, but `lunatrain status` showed "active
    adapter: luna-adapter@v1 on luna-tiny" with nothing about it."""
    from lunatrain.models import resolve_base

    fingerprint = resolve_base(None, settings).fingerprint
    stale = {"reason": "trained on a deleted example", "hashes": ["h"], "at": "t"}
    atomic_write_json(
        settings.registry_file,
        {
            "format": registry.FORMAT,
            "adapters": {
                "luna-adapter": {
                    "versions": [_version("luna-adapter", "v1", "luna-tiny", fingerprint, stale=stale)],
                    "activeByBase": {fingerprint: {"version": "v1", "baseModel": "luna-tiny"}},
                    "aliases": {"latest": "v1", "active": "v1"},
                    "activations": [],
                },
                "other": {
                    "versions": [_version("other", "v1", "luna-tiny", fingerprint, stale=stale)],
                    "activeByBase": {fingerprint: {"version": "v1", "baseModel": "luna-tiny"}},
                    "aliases": {"latest": "v1", "active": "v1"},
                    "activations": [],
                },
            },
        },
    )
    for name in ("luna-adapter", "other"):  # the files PEFT loads: only their absence is said (next test)
        folder = settings.adapters_dir / name / "v1"
        folder.mkdir(parents=True)
        for file in registry.ADAPTER_FILES:
            (folder / file).write_text("{}")
    assert [a["stale"] for a in training_status(settings, 0)["activeAdapters"]] == [True, True]
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "active adapter: luna-adapter@v1 on luna-tiny (stale: retrain needed)\n" in result.output, result.output
    assert "also active: other@v1 on luna-tiny (stale: retrain needed)\n" in result.output, result.output

    # Repro: with the active version's weights deleted, `adapters list` said "[files missing: train it again]"
    # and `lunatrain status` named it as the active adapter with nothing about it.
    (settings.adapters_dir / "luna-adapter" / "v1" / "adapter_model.safetensors").unlink()
    assert [a["filesMissing"] for a in training_status(settings, 0)["activeAdapters"]] == [True, False]
    result = CliRunner().invoke(app, ["status"])
    said = "active adapter: luna-adapter@v1 on luna-tiny (stale: retrain needed) (files missing: train it again)\n"
    assert said in result.output, result.output


def test_the_last_local_runs_gate_comes_from_its_registry_entry(settings):
    """Repro: after `lunatrain lora --local` (the gate refused the new version) `status --json` had
    "lastJob": {…, "gate": null}, while a trainer job's lastJob carries its gate; the decision was in the
    registry entry of that very version."""
    refused = {"status": "failed", "passed": False, "promoted": False, "reasons": ["val loss regresses"]}
    registry.write_latest(
        settings,
        {
            "status": "succeeded",
            "jobId": None,
            "adapterName": "ow",
            "version": "current",
            "revision": 2,
            "created": "2026-01-01T00:00:00+00:00",
            "metrics": {"valLoss": 1.5},
        },
    )
    slot = {"version": "current", "path": "data/adapters/ow/current"}
    atomic_write_json(
        settings.registry_file,
        {
            "format": registry.FORMAT,
            "adapters": {
                "ow": {
                    "versions": [
                        _version("ow", "current", "luna-tiny", "f1", revision=1, gate={"passed": True}) | slot,
                        _version("ow", "current", "luna-tiny", "f1", revision=2, gate=refused, replaced=True) | slot,
                    ],
                    "aliases": {"latest": "current"},
                    "activations": [],
                }
            },
        },
    )
    job = training_status(settings, 0)["lastJob"]
    assert job["source"] == "report" and job["gate"] == {
        "passed": False,
        "promoted": False,
        "reasons": ["val loss regresses"],
    }, job
    registry.write_latest(settings, {"status": "failed", "jobId": None, "adapterName": "ow", "version": None})
    assert training_status(settings, 0)["lastJob"]["gate"] is None  # a run that made no version had no gate


def test_an_adapter_of_another_base_is_not_the_active_one_while_luna_tiny_is_unbuilt(settings):
    """Repro: trained with --baseModel=<a family model> while the configured base is still luna-tiny, which this
    data root had not built yet: status said "active adapter: luna-adapter@v1 on <that model>" with no word of a
    guess, and after anything built luna-tiny the same data said "active adapter: none"."""
    from lunatrain import models

    from helpers import adapter_work_dir

    work = adapter_work_dir(settings, "luna-adapter", "x")
    other = {"baseModel": {"id": "/models/qwen2", "fingerprint": "7" * 64}}
    registry.publish(settings, "luna-adapter", "versioned", work, other)
    registry.activate(settings, "luna-adapter", "v1", own_base=True)
    assert not (settings.models_dir / models.TINY_ID).exists()
    s = training_status(settings, 0)
    assert s["activeAdapter"] is None and s["problems"] == [], s
    assert [(a["name"], a["baseModel"], a["matchesBaseModel"]) for a in s["activeAdapters"]] == [
        ("luna-adapter", "/models/qwen2", False)
    ]
    said = CliRunner().invoke(app, ["status"]).output
    assert "active adapter: none" in said and "also active: luna-adapter@v1 on /models/qwen2" in said, said


def test_a_base_folder_moved_and_configured_at_its_new_place_is_listed_by_its_new_place(
    settings, tmp_path, monkeypatch
):
    """Switch repro: trained and active on /tmp/m2/llama; the folder moved to llama2 and ASSISTANT_BASE_MODEL set
    to it. Chat, the gate and merge take it (the same weights), but `adapters list` still headed the versions
    "base /tmp/m2/llama" and said "[active on /tmp/m2/llama]", a folder that is gone. The base as configured
    now is named, and the one trained on beside it."""
    import shutil

    from lunatrain import models

    from helpers import adapter_work_dir

    models.ensure_tiny(settings)
    before, after = tmp_path / "llama", tmp_path / "llama2"
    shutil.copytree(models.resolve_base(None, settings).path, before)
    fingerprint = models.resolve_base(str(before), settings).fingerprint
    trained = {"baseModel": {"id": str(before), "fingerprint": fingerprint}}
    registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "x"), trained)
    registry.activate(settings, "a", "v1", own_base=True)
    before.rename(after)
    monkeypatch.setenv("ASSISTANT_BASE_MODEL", str(after))
    listed = CliRunner().invoke(app, ["adapters", "list"]).output
    assert f"base {after} (fingerprint {fingerprint[:12]}; trained as {before})" in listed, listed
    assert f"[active on {after}]" in listed and f"[active on {before}]" not in listed, listed
    shown = json.loads(CliRunner().invoke(app, ["adapters", "list", "--json"]).output)
    assert shown["active"][0]["baseLabel"] == str(after) and shown["active"][0]["baseModel"] == str(before), shown
    said = CliRunner().invoke(app, ["status"]).output
    assert "active adapter: a@v1" in said, said


def test_a_version_active_on_another_build_of_the_configured_base_is_said_so(settings):
    """Explore repro: after the base's weights changed under the same name (a folder overwritten, the hub
    cache's refs/main moved by a new `hf download`), status said "active adapter: none" and "also active:
    luna-adapter@v1 on <that name>", and `adapters list` "[active on <that name>]", where `adapters show` says
    it is not active (the base changed): two lines that read as "still served here"."""
    from lunatrain import models

    from helpers import adapter_work_dir

    models.ensure_tiny(settings)
    commit = "1111111111111111111111111111111111111111"
    earlier = {"baseModel": {"id": "luna-tiny", "fingerprint": "7" * 64, "revision": commit}}
    registry.publish(settings, "luna-adapter", "versioned", adapter_work_dir(settings, "luna-adapter", "x"), earlier)
    registry.activate(settings, "luna-adapter", "v1", own_base=True)
    said = CliRunner().invoke(app, ["status"]).output
    assert "active adapter: none" in said, said
    assert "also active: luna-adapter@v1 on another build of luna-tiny (revision 111111111111)" in said, said
    listed = CliRunner().invoke(app, ["adapters", "list"]).output
    assert "[active on another build of luna-tiny (revision 111111111111)]" in listed, listed
    listed = json.loads(CliRunner().invoke(app, ["adapters", "list", "--json"]).output)  # review: and in JSON
    assert listed["active"][0]["baseLabel"] == "another build of luna-tiny (revision 111111111111)", listed
    assert training_status(settings, 0)["activeAdapters"][0]["baseModel"] == "luna-tiny"  # the id stays the id


def test_an_offline_trainer_is_said_to_start_on_demand_only_when_it_does(home, monkeypatch, dead_port):
    """Repro: with ASSISTANT_LORA_ENSURE_ON_DEMAND=false (the guide's §8 setup) status said the offline trainer
    "starts on demand", while every submit then failed: nothing starts it."""
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", f"http://127.0.0.1:{dead_port}")
    said = {}
    for on in ("true", "false"):
        monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", on)
        said[on] = next(ln for ln in CliRunner().invoke(app, ["status"]).output.splitlines() if "trainer:" in ln)
        assert json.loads(CliRunner().invoke(app, ["status", "--json"]).output)["trainer"]["onDemand"] is (on == "true")
    assert said["true"].endswith("; it starts on demand, or run `lunatrain trainer`"), said
    assert "starts on demand" not in said["false"], said
    assert said["false"].endswith(
        "starting it on demand is off (ASSISTANT_LORA_ENSURE_ON_DEMAND=false): run `lunatrain trainer`"
    )


def test_tier_sizes_are_what_export_writes_after_deduplication(settings, dead_port):
    """Repro: a memory item with the content of an approved example was counted twice in
    `tiers.merged.approved` (and in `tiers.memory` when the example's source is memory), while `export`
    writes it once: status promised more samples than the tier file then held."""
    from lunatrain import export
    from lunatrain.settings import load_settings

    settings = load_settings(lora_trainer_url=f"http://127.0.0.1:{dead_port}")
    store.add_example(settings, prompt="Wer?", response="Luna.", source="curated", status="approved")
    store.add_example(settings, prompt="Wo?", response="Hier.", source="memory", status="approved")
    store.add_example(settings, prompt="Wann?", response="Jetzt.", source="conversation", status="approved")
    store.add_example(settings, prompt="Wie?", response="So.", source="curated", status="pending")
    store.add_memory(settings, question="Wer?", answer="Luna.")  # = the curated example
    store.add_memory(settings, question="Wo?", answer="Hier.")  # = the memory-source example
    store.add_memory(settings, question="Was?", answer="Nichts.")
    store.add_memory(settings, question="Wie?", answer="So.")  # = the pending example: not a duplicate
    tiers = training_status(settings, 0)["tiers"]
    written = export.export(settings).counts
    assert (
        {t: tiers[t]["approved"] for t in tiers}
        == {t: written[t]["total"] for t in tiers}
        == {
            "curated": 1,
            "memory": 4,  # Wo? once, Wer?, Was?, Wie? as memory items
            "merged": 5,  # Wer?, Wo?, Wann?, Was?, Wie? (the item): 7 approved, two of them duplicates
        }
    )


def test_a_cancelled_local_run_newer_than_the_last_trainer_job_is_the_last_job(settings):
    """Repro: a cancelled (or failed) run's report carried no time at all (`created: null`), so `status`
    took an older trainer job for the last one. Every run's report says when it ended."""
    from lunatrain.train import Status, run_lora

    from helpers import make_records, recorded_job, write_export

    recorded_job(settings.data_dir, "succeeded", "mein-adapter")
    write_export(settings, make_records(16, val_every=5))
    seen: list[dict] = []
    cut = run_lora(
        {"maxSteps": 3, "rank": 4, "maxSeqLength": 128, "adapterName": "lokal"},
        settings,
        on_event=seen.append,
        should_stop=lambda: any(e["type"] == "progress" for e in seen),
    )
    assert cut.status is Status.CANCELLED
    report = json.loads(settings.lora_latest_report.read_text())
    assert report["created"] and report["created"].endswith("Z"), report.get("created")
    last = training_status(settings, 0)["lastJob"]
    assert (last["status"], last["adapterName"], last["source"]) == ("cancelled", "lokal", "report"), last
    # Reports repro: an in-process run's `created` was when it ended and `finished` null, where a trainer job's
    # are its start and its end. The report is written as the run ends, its duration before.
    from lunatrain.wire import seconds_between

    assert last["finished"] == report["created"] and last["created"] < last["finished"], last
    assert seconds_between(last["created"], last["finished"]) == pytest.approx(report["durationSeconds"], abs=0.002)
    for edited in ({"created": 7}, {"durationSeconds": "long"}, {"durationSeconds": float("inf")}):
        atomic_write_json(settings.lora_latest_report, report | edited)
        assert training_status(settings, 0)["lastJob"]["created"] is None


def test_last_prepare_says_when_it_checked_an_older_export(settings):
    """Repro: after a new export, `status` still said "last prepare: ok" for the prepare of the export before
    (whose data passed, while the new one may not), and the API's lastPrepare had no fingerprint to tell. It
    names the fingerprint it checked and whether that is the current export's."""
    from lunatrain import export as ex
    from lunatrain import prepare, store
    from lunatrain.formats import make_draft
    from lunatrain.params import parse_params

    store.add_examples(settings, [make_draft(prompt=f"Frage {i}?", response=f"Antwort {i}.") for i in range(12)])
    ex.export(settings)
    prepare.prepare(settings, parse_params({"maxSeqLength": 128}))
    last = training_status(settings, 0)["lastPrepare"]
    assert last["fingerprint"] == ex.read_summary(settings)["fingerprint"] and last["matchesExport"] is True, last
    assert "older export" not in CliRunner().invoke(app, ["status"]).output
    # a file of this export edited in place: prepare fails on it and records a fingerprint of the files as
    # they are, but it checked the current export all the same (not "an older one: run prepare")
    with open(ex.export_dir(settings) / ex.SPLIT_FILES["train"], "a", encoding="utf-8") as fh:
        fh.write("\n")
    assert prepare.prepare(settings, parse_params({"maxSeqLength": 128})).status == "fail"
    assert training_status(settings, 0)["lastPrepare"]["matchesExport"] is True

    store.add_examples(settings, [make_draft(prompt="Noch eine Frage?", response="Noch eine Antwort.")])
    ex.export(settings)
    last = training_status(settings, 0)["lastPrepare"]
    assert last["matchesExport"] is False, last
    out = CliRunner().invoke(app, ["status"]).output
    line = next(x for x in out.splitlines() if x.startswith("last prepare"))
    assert line.endswith("of an older export; run `lunatrain prepare`"), line


def test_a_tier_whose_current_export_has_no_train_sample_is_not_ready(settings):
    """Tier repro: two memory items whose hashes both fell in val made `status` say the memory tier was ready
    (`ready: true`, the dashboard "Memory: ja"); prepare then failed with empty_train and lora refused. Where
    the last export is current, its train split says whether a tier has anything to train on."""
    from lunatrain.formats import make_draft

    store.add_examples(settings, [make_draft(prompt=f"Frage {i}?", response="Antwort.") for i in range(40)])
    store.add_memory(settings, question="Wie heißt mein Hund?", answer="Bruno.")
    export.export(settings, val_ratio=0.98, test_ratio=0.0)  # almost everything in val: memory's one item too
    counts = export.read_summary(settings)["counts"]["memory"]
    assert counts["train"] == 0 and counts["total"] == 1, counts
    tier = training_status(settings, 0)["tiers"]["memory"]
    assert tier["ready"] is False and tier["reason"] == "the current export's memory tier has no train sample", tier
    store.add_memory(settings, question="Wie heißt meine Katze?", answer="Mia.")  # changed since: not known
    assert training_status(settings, 0)["tiers"]["memory"]["ready"] is True


def test_the_last_job_after_the_clock_stepped_back_is_the_one_that_made_the_newer_version(settings):
    """Repro: the clock stepped back an hour after a trainer job made luna-adapter@v2; a local run then made
    v3, and `status` named the job (v2) the last one: it compared the two end times as text. Two versions
    of one adapter on one base say by their numbers which came last, whatever the clock said."""
    from datetime import timedelta

    from lunatrain.fsio import atomic_write_text
    from lunatrain.wire import iso, utc_now

    from helpers import recorded_job

    adapter = {"name": "luna-adapter", "version": "v2", "path": "data/adapters/luna-adapter/v2"}
    job = recorded_job(settings.data_dir, "succeeded", adapter=adapter)
    report = {
        "status": "succeeded",
        "jobId": None,
        "adapterName": "luna-adapter",
        "version": "v3",
        "baseModel": {"id": "luna-tiny"},
        "created": iso(utc_now() - timedelta(hours=1)),
        "durationSeconds": 12.5,
    }
    settings.lora_latest_report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.lora_latest_report, json.dumps(report))
    last = training_status(settings, 0)["lastJob"]
    assert (last["source"], last["version"]) == ("report", "v3"), last
    # the other way round: the job made the newer version, the run's report says a later time
    report |= {"version": "v1", "created": iso(utc_now() + timedelta(hours=1))}
    atomic_write_text(settings.lora_latest_report, json.dumps(report))
    last = training_status(settings, 0)["lastJob"]
    assert (last["source"], last["jobId"], last["version"]) == ("trainer", job.id, "v2"), last


def test_a_numbered_version_and_an_overwrite_run_of_one_adapter_are_ordered_by_time(settings):
    """Review repro: a trainer job made luna-adapter@v3, an hour later a local run with
    `--adapterStrategy=overwrite` made its slot (`current`); `lastJob` named the job, ranking the slot below
    every numbered version. A run chooses its strategy: a number and a slot revision say nothing about which
    came first, their times do."""
    from datetime import timedelta

    from lunatrain.fsio import atomic_write_text
    from lunatrain.wire import iso, utc_now

    from helpers import recorded_job

    adapter = {"name": "luna-adapter", "version": "v3", "path": "data/adapters/luna-adapter/v3"}
    recorded_job(settings.data_dir, "succeeded", adapter=adapter)
    report = {
        "status": "succeeded",
        "jobId": None,
        "adapterName": "luna-adapter",
        "version": "current",
        "revision": 1,
        "baseModel": {"id": "luna-tiny"},
        "created": iso(utc_now() + timedelta(hours=1)),
    }
    settings.lora_latest_report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.lora_latest_report, json.dumps(report))
    last = training_status(settings, 0)["lastJob"]
    assert (last["source"], last["version"], last["revision"]) == ("report", "current", 1), last


def test_a_damaged_trainer_database_is_a_problem_status_names_not_a_traceback(settings):
    """Review repro: with data/trainer/jobs.db damaged ("file is not a database"), `lunatrain status` ended in
    a traceback, and the API's /status answered 500. Status answers; the damaged part is one of its problems."""
    from lunatrain.service.jobs import jobs_db_path

    path = jobs_db_path(settings.data_dir)
    path.parent.mkdir(parents=True)
    path.write_text("garbage " * 100)
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    said = json.loads(result.output)
    assert said["lastJob"] is None
    assert [p for p in said["problems"] if str(path) in p and "file is not a database" in p], said["problems"]
    # coded, so the dashboard says it in its language (as every other status reason)
    coded = {"code": "status.jobs_db_damaged", "params": {"path": str(path), "reason": "file is not a database"}}
    assert said["problemCodes"] == [coded], said["problemCodes"]
    # what is active is known all the same (the registry is fine): none, not "unknown"
    assert said["activeAdaptersKnown"] is True
    text = CliRunner().invoke(app, ["status"])
    assert text.exit_code == 0 and "active adapter: none" in text.output, text.output


@pytest.mark.parametrize(
    ("report", "content", "command"),
    [
        ("prepare_report", {"status": "ok", "checks": "x"}, "lunatrain prepare"),
        ("prepare_report", '{"status": "ok", "chec', "lunatrain prepare"),  # cut short
        ("lora_latest_report", {"status": "succeeded", "adapterName": "a", "metrics": "x"}, "lunatrain lora"),
        ("eval_report", {"passed": True, "candidate": "x", "reasons": []}, "lunatrain eval-gate"),
        ("eval_report", [], "lunatrain eval-gate"),
    ],
    ids=repr,
)
def test_a_report_that_cannot_be_read_is_a_problem_status_names_not_a_traceback(settings, report, content, command):
    """Repro: a field of the wrong type in prepare-latest.json, lora-latest.json or eval-gate-latest.json ended
    `lunatrain status` in a traceback and GET /assistant/training/status in a 500, and a cut-short
    prepare-latest.json showed "last prepare: never" with nothing saying why. These reports only say what
    happened: status answers, and names the report as one of its problems."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    path = getattr(settings, report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    [problem] = [line for line in result.output.splitlines() if line.startswith("problem: ")]
    assert problem.startswith(f"problem: The report {path} cannot be read (") and f"`{command}`" in problem, problem
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.get("/assistant/training/status")
    assert res.status_code == 200, res.text
    said = res.json()
    assert said["lastPrepare"] is None and said["lastGate"] is None and said["lastJob"] is None, said
    [coded] = said["problemCodes"]
    assert coded["code"] == "status.report_unreadable" and coded["params"]["path"] == str(path), coded
    assert coded["params"]["command"] == command, coded


@pytest.mark.parametrize("damage", ["emptied", "table dropped", "folder"])
def test_a_trainer_database_without_its_jobs_is_said_as_it_is_not_as_a_permission(settings, damage):
    """Corruption repro: an emptied jobs.db, or one whose `jobs` table was dropped, got the advice to `chmod` it
    (permissions were fine, and the trainer creates the table when it starts), and a folder at jobs.db showed no
    problem at all although the trainer refuses to start on it."""
    import sqlite3

    from lunatrain.service.jobs import JobStore, jobs_db_path

    path = jobs_db_path(settings.data_dir)
    path.parent.mkdir(parents=True)
    if damage == "folder":
        path.mkdir()
    else:
        JobStore(path).close()
        if damage == "emptied":
            path.write_bytes(b"")
        else:
            db = sqlite3.connect(path)
            db.execute("DROP TABLE jobs")
            db.close()
    said = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
    (coded,) = said["problemCodes"]
    (problem,) = said["problems"]
    assert "chmod" not in problem and str(path) in problem, problem
    assert coded["params"]["path"] == str(path), coded
    if damage == "folder":
        assert coded["code"] == "status.jobs_db_folder", coded
        assert "is a folder, not a file" in problem and "remove or rename that folder" in problem, problem
    else:
        assert coded["code"] == "status.jobs_db_empty", coded
        assert "no such table: jobs" in problem and "start the trainer, which creates it" in problem, problem


def test_a_locked_trainer_database_is_said_busy_not_unreadable(settings, monkeypatch):
    """Repro: while another process held jobs.db locked, status said "cannot be read by this process
    (database is locked) ... give this user read access to it (`chmod`)": advice about permissions for a lock
    that goes away by itself."""
    import sqlite3

    from lunatrain.service import jobs
    from lunatrain.service.jobs import JobStore, jobs_db_path

    path = jobs_db_path(settings.data_dir)
    path.parent.mkdir(parents=True)
    JobStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(jobs, "SQLITE_BUSY_TIMEOUT_S", 0.1)
    try:
        said = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
    finally:
        holder.rollback()
        holder.close()
    (coded,) = said["problemCodes"]
    assert coded["code"] == "status.jobs_db_busy", coded
    (problem,) = said["problems"]
    assert "locked by another process" in problem and "chmod" not in problem and "move it aside" not in problem


def test_a_registry_that_fails_for_another_reason_is_a_coded_problem(settings, monkeypatch):
    """Repro: a registry read that failed neither as damage nor as a permission (a storage fault) was said in
    English only: it carried no message code, so the German dashboard showed the English sentence."""
    from lunatrain import registry
    from lunatrain.errors import StorageError

    def failing(_settings):
        raise StorageError("Cannot read registry.json: Input/output error.")

    monkeypatch.setattr(registry, "list_active", failing)
    said = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
    where = str(registry.registry_path(settings))
    reason = "Cannot read registry.json: Input/output error"
    assert said["problemCodes"] == [{"code": "status.registry_error", "params": {"path": where, "reason": reason}}]
    assert said["problems"] == [f"{reason}."]  # the error's own sentence, which names the file
    assert said["activeAdaptersKnown"] is False


def test_a_luna_profile_that_does_not_load_is_a_problem_of_status_not_its_refusal(settings, home):
    """Explore repro: one typo in <data root>/profiles/luna.toml made `GET /status` (no parameters) a 422 and
    `lunatrain status` exit 2, taking the dashboard's overview down with it: the place a user looks for what
    is wrong. Status answers with the bundled profile's minCurated, and the profile's sentence is a problem."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    path = home / "profiles" / "luna.toml"
    path.parent.mkdir()
    path.write_text("[lora]\nepoch = 3\n")
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    said = json.loads(result.output)
    assert said["minCurated"] == 30  # the bundled profile's
    (problem,) = said["problems"]
    assert problem.startswith(f"The profile {path} cannot be used ([lora]: Invalid parameters: epoch"), problem
    assert problem.endswith("; minCurated is the bundled luna profile's (30) until it is fixed."), problem
    (coded,) = said["problemCodes"]
    assert coded["code"] == "status.profile_unusable" and coded["params"]["path"] == str(path), coded
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        answer = client.get("/assistant/training/status")
        # German-page explore repro: the dashboard asks with its own minCurated, and then the broken profile
        # (which `luna` refuses) was in no problem at all.
        given = client.get("/assistant/training/status", params={"minCurated": 12}).json()
    assert answer.status_code == 200 and answer.json()["problems"] == [problem], answer.text
    assert given["minCurated"] == 12 and [c["code"] for c in given["problemCodes"]] == ["status.profile_broken"]
    assert given["problems"][0].endswith("; `lunatrain luna` refuses to run until it is fixed."), given["problems"]
    text = CliRunner().invoke(app, ["status"])
    assert text.exit_code == 0 and "epoch: unknown parameter" in text.output, text.output


def test_an_api_server_started_before_an_update_says_so_in_its_status(settings):
    """A `lunatrain serve` started before lunatrain was updated keeps serving the code it imported then (the
    trainer restarts itself once idle; the API cannot without dropping the user's page). Its status names
    that as a problem, with the way out, so the dashboard shows it; one started after says nothing."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    api = create_app(settings)
    with TestClient(api, base_url="http://127.0.0.1") as client:
        assert client.get("/assistant/training/status").json()["problems"] == []
        api.state.code = "the files it started with"  # what an update on disk makes of the signature
        said = client.get("/assistant/training/status", params={"minCurated": 1}).json()
    assert said["problems"] == [
        "lunatrain was updated since this API server started, and it still runs the code from before; "
        "restart `lunatrain serve`."
    ], said["problems"]
    assert said["problemCodes"] == [{"code": "status.api_outdated", "params": {}}], said["problemCodes"]


def test_status_names_the_data_root_database_and_base_model_it_read(settings, monkeypatch):
    """Settings repro: a mistyped ASSISTANT_HOME showed all zeros (exit 0) with nothing naming the root read, and
    no command said which database and base model were in effect. `status` names them, and where the base model
    comes from (the luna profile, ASSISTANT_BASE_MODEL, or the default); a database URL without its password."""
    runner = CliRunner()
    for var in ("ASSISTANT_BASE_MODEL", "ASSISTANT_DB_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ASSISTANT_HOME", str(settings.home))
    plain = runner.invoke(app, ["status"])
    assert plain.exit_code == 0, plain.output
    assert f"data root: {settings.home}\n" in plain.output, plain.output
    assert "database: sqlite data/assistant.db\n" in plain.output, plain.output
    assert "base model: luna-tiny (the default)\n" in plain.output, plain.output
    monkeypatch.setenv("ASSISTANT_BASE_MODEL", "acme/x")
    said = json.loads(runner.invoke(app, ["status", "--json"]).stdout)["settings"]
    assert said == {
        "dataRoot": str(settings.home),
        "database": "sqlite data/assistant.db",
        "baseModel": "acme/x",
        "baseModelFrom": "ASSISTANT_BASE_MODEL",
    }, said
    monkeypatch.delenv("ASSISTANT_BASE_MODEL")
    monkeypatch.setenv("assistant_base_model", "acme/lower")  # read too (review repro: said "the default")
    assert "base model: acme/lower (ASSISTANT_BASE_MODEL)\n" in runner.invoke(app, ["status"]).output
    monkeypatch.delenv("assistant_base_model")
    mine = settings.home / "profiles" / "luna.toml"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text('[lora]\nbaseModel = "acme/y"\n', "utf-8")
    assert "base model: acme/y (the luna profile)\n" in runner.invoke(app, ["status"]).output
    mine.unlink()
    from lunatrain.settings import load_settings

    shown = store.database_shown(load_settings(db_url="postgresql+psycopg://me:secret@127.0.0.1:9/db"))
    assert shown == "postgresql+psycopg://me:***@127.0.0.1:9/db", shown


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("wrong type", "not a lunatrain export summary"),
        ("cut short", "not valid JSON: Unterminated string starting at line 1 column 12"),
        ("folder", "Is a directory"),
    ],
)
def test_an_unreadable_export_summary_is_coded_with_its_reason_not_the_english_sentence(settings, damage, reason):
    """Corruption repro: the German dashboard said "Der letzte Export kann nicht gelesen werden: /…/summary.json is
    not a lunatrain export summary; run `lunatrain export` again": the whole English sentence was its reason."""
    store.load_seed(settings)
    export.export(settings)
    path = export.export_dir(settings) / export.SUMMARY_FILE
    if damage == "wrong type":
        path.write_text(json.dumps(json.loads(path.read_text()) | {"counts": "x"}))
    elif damage == "cut short":
        path.write_text('{"format": "x')
    else:
        path.unlink()
        path.mkdir()
    said = training_status(settings, 0)
    (problem,) = said["problems"]
    assert str(path) in problem and "lunatrain export" in problem, problem
    (coded,) = said["problemCodes"]
    assert coded == {"code": "status.export_unreadable", "params": {"path": str(path), "reason": reason}}, coded
    # and the export is no "never": it exists, its summary cannot be read
    from typer.testing import CliRunner

    from lunatrain.cli import app

    shown = CliRunner().invoke(app, ["status"]).output
    assert re.search(r"^last export:? +unreadable \(see the problem below\)$", shown, re.M), shown


def _last_job_with_report(settings, report: dict) -> tuple[dict, str]:
    """`lastJob` and the `status` command's text with `report` as lora-latest.json."""
    from lunatrain.fsio import atomic_write_text

    settings.lora_latest_report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.lora_latest_report, json.dumps(report))
    return training_status(settings, 0)["lastJob"], CliRunner().invoke(app, ["status"]).output


@pytest.mark.parametrize("reported", ["succeeded", "failed"])
def test_a_job_whose_trainer_was_killed_is_said_as_its_report_says_not_running(settings, reported):
    """Days repro: after `kill -9` of the trainer, `status` and GET /status said "last job: running" for days
    (nothing started a trainer whose recovery would settle it), while lora-latest.json, written by the job's
    own process for the same job id, said it had ended (succeeded with its version active, or interrupted). With
    no trainer running, the job's record cannot be right and the report is; with one running, the record is."""
    import fcntl

    from lunatrain.fsio import atomic_write_text
    from lunatrain.service.lock import lock_path
    from lunatrain.wire import now_iso

    from helpers import recorded_job

    job = recorded_job(settings.data_dir, "running")
    report = {
        "status": reported,
        "jobId": job.id,
        "adapterName": "luna-adapter",
        "version": "v2" if reported == "succeeded" else None,
        "baseModel": {"id": "luna-tiny"},
        "created": now_iso(),
        "durationSeconds": 12.5,
    }
    if reported == "failed":
        report["error"] = {"code": "interrupted", "message": "Stopped at step 3 of 40: the trainer process is gone."}
    last, said = _last_job_with_report(settings, report)
    assert (last["jobId"], last["status"], last["source"]) == (job.id, reported, "report"), last
    assert f"last job: {reported}" in said and "last job: running" not in said, said
    lock_path(settings).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(settings), "a+b") as held:  # a trainer runs: its record is the whole story
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert training_status(settings, 0)["lastJob"]["status"] == "running"
    # Review repro: a resumed job keeps its id; the report of its earlier try, which ended before this try
    # began, says nothing of this one.
    later = recorded_job(settings.data_dir, "running", started_at="2999-01-01T00:00:00.000Z")
    report |= {"jobId": later.id}
    atomic_write_text(settings.lora_latest_report, json.dumps(report))
    assert training_status(settings, 0)["lastJob"]["status"] == "running"


@pytest.mark.parametrize("recorded", ["running", "queued"])
def test_a_resume_job_whose_trainer_stopped_is_not_said_failed_by_its_report(settings, recorded):
    """Jobs repro: `jobs resume` of a cancelled job, then the trainer stopped (TERM: the job requeued; kill -9:
    left running, which the next trainer's recovery requeues). The job's own process wrote lora-latest.json as
    it stopped (failed, interrupted), and `status` said "last job: failed" for a job that went on, from its last
    checkpoint, once a trainer started again. A resume job is continued, not ended, by a trainer's stop."""
    from lunatrain.fsio import atomic_write_text
    from lunatrain.wire import now_iso

    from helpers import recorded_job

    job = recorded_job(settings.data_dir, recorded, resume=True)
    report = {
        "status": "failed",
        "jobId": job.id,
        "adapterName": "luna-adapter",
        "version": None,
        "baseModel": {"id": "luna-tiny"},
        "created": now_iso(),
        "error": {"code": "interrupted", "message": "Stopped at step 535 of 1220: the trainer is stopping."},
    }
    last, said = _last_job_with_report(settings, report)
    assert (last["jobId"], last["status"], last["source"]) == (job.id, recorded, "trainer"), last
    assert f"last job: {recorded}" in said and "failed" not in said, said
    if recorded == "running":  # its version registered before the kill: an end (recovery settles it succeeded)
        report |= {"status": "succeeded", "version": "v2", "error": None, "path": "data/adapters/luna-adapter/v2"}
        atomic_write_text(settings.lora_latest_report, json.dumps(report))
        assert training_status(settings, 0)["lastJob"]["status"] == "succeeded"


def test_a_jobs_report_whose_job_an_older_job_database_lacks_is_ordered_by_its_version(settings):
    """Backup repro: with only data/trainer/jobs.db restored from an older backup, `status` said "last job:
    succeeded luna-adapter@v1" (the older database's newest job), while lora-latest.json named a newer trainer
    job that made v2, active: a report of a job the database holds is that job's, but one it lacks is not."""
    from lunatrain.fsio import atomic_write_text
    from lunatrain.wire import now_iso

    from helpers import recorded_job

    adapter = {"name": "luna-adapter", "version": "v1", "path": "data/adapters/luna-adapter/v1"}
    recorded_job(settings.data_dir, "succeeded", adapter=adapter, finished_at="2999-01-01T00:00:00.000Z")
    report = {
        "status": "succeeded",
        "jobId": "ftjob-0123456789abcdef0123",  # a job the restored database never saw
        "adapterName": "luna-adapter",
        "version": "v2",
        "baseModel": {"id": "luna-tiny"},
        "created": now_iso(),
        "durationSeconds": 12.5,
    }
    settings.lora_latest_report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.lora_latest_report, json.dumps(report))
    last = training_status(settings, 0)["lastJob"]
    assert (last["source"], last["version"], last["jobId"]) == ("report", "v2", report["jobId"]), last


def test_a_running_job_no_trainer_holds_is_a_problem_status_names(settings):
    """Status explore repro: with the trainer, its worker and the job all killed together (no report written),
    status said "last job: running" with no problem, while nothing ran; only a next trainer settles the job."""
    import fcntl

    from lunatrain.service.lock import lock_path

    from helpers import recorded_job

    job = recorded_job(settings.data_dir, "running")
    status = training_status(settings, 0)
    assert status["lastJob"]["status"] == "running"
    said = (
        f"Job {job.id} is recorded as running, but no trainer holds this data root (it was stopped or killed with "
        "the job); the next trainer settles it: `lunatrain health --ensure-trainer`."
    )
    assert said in status["problems"], status["problems"]
    at = status["problems"].index(said)
    assert status["problemCodes"][at] == {
        "code": "status.job_without_trainer",
        "params": {"jobId": job.id, "status": "running"},
    }
    assert said in CliRunner().invoke(app, ["status"]).output
    lock_path(settings).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(settings), "a+b") as held:  # a trainer runs it: no problem
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert not [p for p in training_status(settings, 0)["problems"] if "no trainer holds" in p]


def test_an_export_without_its_database_is_not_up_to_date_and_the_missing_database_is_named(settings):
    """Status explore repro: with data/assistant.db deleted and the export kept, status said the export was
    "(up to date)" (changedSinceExport false) right under "ready: no: 0 approved", and named no problem."""
    from lunatrain import store

    from helpers import make_records, write_export

    write_export(settings, make_records(20))
    assert not store.has_database(settings)
    status = training_status(settings, 0)
    assert status["changedSinceExport"] is None and status["lastExport"]["changedSince"] is None, status
    said = (
        "There is no database at data/assistant.db, so every count is 0 and the export (made from one) cannot be "
        "compared with it: restore it, or import the examples again and export."
    )
    assert said in status["problems"], status["problems"]
    shown = CliRunner().invoke(app, ["status"]).output
    assert "(up to date)" not in shown and said in shown, shown
    assert not store.has_database(settings)  # status created none


def test_a_trainer_address_held_by_another_root_is_named_not_called_startable(settings, monkeypatch):
    """Status explore repro: with this root's trainer address held by another data root's trainer, status
    said "Offline …; it starts on demand, or run `lunatrain trainer`" (both fail there) and named no problem,
    while `lunatrain health` and provider-health named the holder."""
    from lunatrain.service import client

    holder = "the trainer of another data root (/srv/other)"
    monkeypatch.setattr(
        client, "own_health", lambda s, timeout=3.0: (_ for _ in ()).throw(client.other_data_root(s, holder))
    )
    status = training_status(settings, 0)
    assert status["trainer"]["heldBy"] == holder and status["trainer"]["label"] == "Offline"
    held = [p for p in status["problems"] if p.startswith("The trainer address")]
    assert held and holder in held[0], status["problems"]
    code = status["problemCodes"][status["problems"].index(held[0])]
    assert code["code"] == "trainer.address_held" and code["params"] == {"url": status["trainer"]["url"]}, code
    shown = CliRunner().invoke(app, ["status"]).output
    assert f"its address is held by {holder} (see problems)" in shown and "starts on demand" not in shown, shown


def test_a_trainer_database_on_a_full_disk_is_said_full_not_unreadable(settings, monkeypatch):
    """Disk-full repro: on a nearly full disk status said the trainer's job database "cannot be read by this
    process (disk I/O error) … give this user read access to it (`chmod`)": SQLite could not grow its -shm file,
    and no permission was missing."""
    import contextlib
    import sqlite3

    from lunatrain import status
    from lunatrain.service import jobs
    from lunatrain.service.jobs import JobStore, jobs_db_path

    path = jobs_db_path(settings.data_dir)
    path.parent.mkdir(parents=True)
    JobStore(path).close()
    failed = sqlite3.OperationalError("disk I/O error")
    failed.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"

    @contextlib.contextmanager
    def full(_data_dir):
        raise failed
        yield

    monkeypatch.setattr(jobs, "existing_store", full)
    monkeypatch.setattr(status, "nearly_full", lambda _path: True)
    said = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
    (coded,) = said["problemCodes"]
    assert coded["code"] == "status.jobs_db_disk_full", coded
    (problem,) = said["problems"]
    assert problem == (
        f"The trainer's job database {path} cannot be read while its disk is full (disk I/O error), so the "
        "trainer's last job is unknown; free some space (`lunatrain gc` removes what the retention policy allows)."
    ), problem
    # review repro: the plain form said "last job: never" right above that problem
    plain = CliRunner().invoke(app, ["status"]).output
    assert "last job: unknown" in plain.splitlines(), plain
