"""The flows' own rules at every entry point: minCurated before any job starts (CLI `lora`, local or
through the trainer, and `POST …/lora/start`), and exit 1 when the eval gate refuses a freshly trained
adapter. Run: `.venv/bin/python -m pytest tests/test_flow_entry.py -q`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import registry
from lunatrain.api.main import create_app
from lunatrain.cli import app
from lunatrain.prepare import volume_check
from lunatrain.service.jobs import jobs_db_path
from lunatrain.settings import load_settings

from helpers import make_records, write_export, write_small_suite

FAST = ["--epochs", "1", "--maxSteps", "2", "--batchSize", "8", "--rank", "4", "--maxSeqLength", "128"]


@pytest.fixture(autouse=True)
def small_suite(settings) -> None:
    """These tests are about the flows' steps and decisions: they gate on three short cases (helpers.py)."""
    write_small_suite(settings)


def test_min_curated_is_checked_before_any_job_starts(settings, monkeypatch):
    """Repro: `lunatrain lora --minCurated=500` and `POST …/lora/start {"minCurated": 500}` trained anyway."""
    write_export(settings, make_records(40))
    curated = sum(1 for _ in (settings.training_dir / "assistant-sft-curated.jsonl").open())
    # an unreachable trainer that must not even be started: the check comes first
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")
    for extra in ([], ["--local"]):
        r = CliRunner().invoke(app, ["lora", *FAST, "--minCurated=500", *extra])
        assert r.exit_code == 1, r.output
        assert f"{curated} approved curated examples, 500 required (minCurated)" in r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.post("/assistant/training/lora/start", json={"minCurated": 500, "epochs": 1})
    assert res.status_code == 409 and res.json()["error"]["code"] == "check_failed", res.text
    assert "500 required (minCurated)" in res.json()["error"]["message"]
    # which check, with its values: a client says it in its own language (the dashboard's German page)
    assert res.json()["error"]["params"] == {"check": "check.volume.too_few", "curated": curated, "minCurated": 500}
    assert registry.list_adapters(settings) == {}  # nothing trained
    assert not jobs_db_path(settings.data_dir).exists()  # nothing submitted: no trainer was ever asked
    assert not (settings.reports_training_dir / "trainer.pid").exists()  # and none started


def test_a_gated_run_reads_the_golden_suite_before_it_trains_or_queues(settings, monkeypatch):
    """Explore repro: a regex typo in the user's golden suite was found by the gate after the whole run had
    trained (hours on a real model), while a bad [gate] table was refused up front. A gated run reads the
    suite first, in the CLI, through the API and in the trainer; an ungated one does not need it."""
    write_export(settings, make_records(40))
    settings.eval_dir.mkdir(parents=True, exist_ok=True)
    (settings.eval_dir / "mine.jsonl").write_text(
        '{"id": "x", "prompt": "Hi", "checks": [{"type": "regex", "value": "(a"}]}\n'
    )
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")  # no trainer is asked: the check is first
    said = f"{settings.eval_dir / 'mine.jsonl'}:1: check 1: bad regex '(a'"
    for extra in ([], ["--local"]):
        r = CliRunner().invoke(app, ["lora", *FAST, "--minCurated=1", *extra])
        assert r.exit_code == 2 and said in r.output, r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.post("/assistant/training/lora/start", json={"minCurated": 1, "epochs": 1})
    assert res.status_code == 422 and said in res.json()["error"]["message"], res.text
    assert registry.list_adapters(settings) == {} and not jobs_db_path(settings.data_dir).exists()
    assert not registry.work_root(settings, "luna-adapter").exists()  # nothing began to train
    r = CliRunner().invoke(app, ["lora", *FAST, "--minCurated=1", "--local", "--no-gate"])
    assert r.exit_code == 0, r.output


def test_lora_before_any_export_says_to_export_not_to_add_examples(settings, monkeypatch):
    """Repro: after `lunatrain examples seed` (273 approved curated examples), `lunatrain lora` said "no approved
    curated examples yet … load the bundled ones (`lunatrain examples seed`)": the examples were there, the
    export was not. Every entry point now names the missing step, as `prepare` does."""
    from lunatrain import store

    store.load_seed(settings)
    store.dispose_stores()
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")  # the check comes before any trainer
    says = f"No export found in {settings.training_dir}; run `lunatrain export` first."
    for extra in ([], ["--local"]):
        r = CliRunner().invoke(app, ["lora", *FAST, "--minCurated=30", *extra])
        assert r.exit_code == 1, r.output
        assert says in r.output and "examples seed" not in r.output, r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.post("/assistant/training/lora/start", json={"minCurated": 30, "epochs": 1})
    assert res.status_code == 404 and res.json()["error"]["code"] == "export.missing", res.text
    assert res.json()["error"]["message"] == says
    assert not jobs_db_path(settings.data_dir).exists()  # nothing submitted
    assert not settings.training_dir.exists() or not any(settings.training_dir.iterdir())  # nothing exported
    # an export older than the examples: the sentence says so beside the count
    write_export(settings, make_records(5))
    r = CliRunner().invoke(app, ["lora", *FAST, "--minCurated=30"])
    assert r.exit_code == 1, r.output
    assert (
        "30 required (minCurated); curate more or lower it; the database changed since the last export; run "
        "`lunatrain export`." in " ".join(r.output.split())
    ), r.output


def test_lora_start_with_a_profile_takes_its_values_under_the_body(settings, monkeypatch):
    """`POST …/lora/start` ran the library defaults only, while `lunatrain lora` runs the luna profile: with
    `profile` it resolves as the CLI does (the profile's minCurated here, checked before any trainer call)."""
    write_export(settings, make_records(20))
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:9")  # never reached when refused
    monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", "false")  # past the checks: 503, no trainer started
    start = "/assistant/training/lora/start"
    with TestClient(create_app(load_settings()), base_url="http://127.0.0.1") as client:
        refused = client.post(start, json={"profile": "luna", "epochs": 1})
        assert refused.status_code == 409 and "30 required (minCurated)" in refused.json()["error"]["message"]
        # the body's value wins over the profile's; then the unreachable trainer is the answer
        assert client.post(start, json={"profile": "luna", "minCurated": 5}).status_code == 503
        assert client.post(start, json={"epochs": 1}).status_code == 503  # no profile: library defaults (0)
        missing = client.post(start, json={"profile": "nope"})
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"], missing.text
        assert client.post(start, json={"profile": "../x"}).status_code == 422
    assert not jobs_db_path(settings.data_dir).exists()


def test_exit_1_when_the_gate_refuses_the_new_adapter(settings, home):
    """Repro: the gate refused the new adapter (it stays registered, inactive) and the command exited 0."""
    write_export(settings, make_records(40))
    (home / "profiles").mkdir()
    # a bar no adapter clears: val loss at most 1% of the base model's
    (home / "profiles" / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.01\n")
    r = CliRunner().invoke(app, ["lora", "--local", "--profile", "strict", *FAST, "--json"])
    assert r.exit_code == 1, r.output
    outcome = json.loads(r.stdout)  # stdout is the outcome alone (the progress went to stderr)
    assert outcome["status"] == "succeeded" and outcome["gate"]["passed"] is False
    entry = registry.get_version(settings, outcome["adapter"]["name"], outcome["adapter"]["version"])
    assert entry["gate"]["passed"] is False  # registered, kept inactive, and the exit code says so
    # without the gate the same run is a success
    r = CliRunner().invoke(app, ["lora", "--local", "--profile", "strict", *FAST, "--no-gate"])
    assert r.exit_code == 0, r.output


def test_the_flow_summary_counts_the_tier_it_trains_on(settings):
    """`luna --datasetTier=merged` trained the merged tier but its export line counted the curated one."""
    from lunatrain import store

    store.load_seed(settings)
    r = CliRunner().invoke(app, ["luna", "--local", "--datasetTier=merged", *FAST, "--no-gate"])
    counts = json.loads((settings.training_dir / "assistant-sft-summary.json").read_text())["counts"]
    store.dispose_stores()
    assert r.exit_code in (0, 1), r.output
    merged = counts["merged"]
    assert f"{merged['total']} merged samples ({merged['train']} train, {merged['val']} val)" in r.output
    assert merged["total"] != counts["curated"]["total"]  # the two lines differ, so the test tells them apart
    said = (
        r"val loss   \d+\.\d{4} vs base \d+\.\d{4} \((about the same as|\d+\.\d% (lower|higher) than) the base model\)"
    )
    assert re.search(said, r.output), r.output


def test_the_summary_notes_are_the_last_gates(settings):
    """The first gate of a fresh data root runs before the export and notes "no export: losses on val/test were
    not measured"; by the summary the lora step's gate has measured them, and only its notes stand there."""
    from lunatrain import store

    store.load_seed(settings)
    r = CliRunner().invoke(app, ["luna", "--local", *FAST])
    store.dispose_stores()
    assert r.exit_code in (0, 1), r.output  # 1: the gate may refuse a two-step adapter
    assert "val loss" in r.output and "no export" not in r.output, r.output


def test_the_flow_summary_says_in_words_how_the_val_loss_compares_with_the_base():
    """Repro: the summary said "val loss 8.0573 vs base 8.0577 (+0.0% better)", and a worse adapter read
    "-3.0% better"."""
    from lunatrain.flow import versus_base

    assert versus_base(8.0573, 8.0577) == "about the same as the base model"
    assert versus_base(6.0, 8.0) == "25.0% lower than the base model"
    assert versus_base(8.24, 8.0) == "3.0% higher than the base model"


def test_the_summary_of_a_quantized_run_says_its_val_loss_is_on_the_quantized_base(settings):
    """Repro: `luna --quantize 4bit` summed up "val loss 8.4454 vs base 8.4670", then its gate line said 8.4451
    for the same adapter: the run measures on the 4-bit base it trained with, the gate on the full base."""
    from lunatrain.flow import FlowResult, summary_lines
    from lunatrain.params import parse_params
    from lunatrain.train import quantization

    entry = {
        "name": "luna-adapter",
        "version": "v1",
        "path": "data/adapters/luna-adapter/v1",
        "baseModel": {"id": "luna-tiny", "fingerprint": "f" * 64},
        "metrics": {"valLoss": 8.4454, "baseValLoss": 8.4670},
    }
    plain = summary_lines(settings, FlowResult(parse_params({}), adapter=entry))
    four = summary_lines(
        settings, FlowResult(parse_params({}), adapter=entry | {"quantization": quantization("4bit", None)})
    )
    said = [line for line in four if line.startswith("val loss")]
    assert said == [
        "val loss   8.4454 vs base 8.4670 (0.3% lower than the base model, both on the 4-bit base the run trained with)"
    ]
    assert [line for line in plain if line.startswith("val loss")] == [
        "val loss   8.4454 vs base 8.4670 (0.3% lower than the base model)"
    ]
    # Repro: `files` named the adapter's folder within the data root, `reports` by absolute paths: both within.
    for report in (settings.lora_latest_report, settings.eval_report):
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("{}")
    assert [
        line
        for line in summary_lines(settings, FlowResult(parse_params({}), adapter=entry))
        if line[:5] in ("files", "repor")
    ] == [
        "files      data/adapters/luna-adapter/v1/ (adapter)",
        "reports    reports/training/ (lora-latest.json), reports/eval/eval-gate-latest.json",
    ]


def test_a_failed_flow_names_only_the_reports_that_exist(settings, tiny):
    """Repro: `luna` failing at prepare listed lora-latest.json and lora-adapters.json among its reports,
    which no step had written."""
    from lunatrain import store

    store.load_seed(settings)
    r = CliRunner().invoke(app, ["luna", "--local", *FAST, "--minCurated=100000"])
    store.dispose_stores()
    assert r.exit_code == 1 and "Step prepare failed" in r.output, r.output
    [line] = [line for line in r.output.splitlines() if line.startswith("reports ")]
    for report in (settings.lora_latest_report, settings.registry_file):
        assert not report.exists() and report.name not in line, line
    for report in (settings.prepare_report, settings.eval_report):
        assert report.exists() and report.name in line, line


def test_a_flow_on_an_empty_store_says_how_to_get_examples(settings, tiny):
    """Repro: `lunatrain luna` before any example was added or seeded failed with "volume (0), empty_train
    (0); fix the examples listed in reports/training/prepare-latest.json, or lower --minCurated": there were
    no examples to fix, and nothing named how to get some. The step and the check now name the commands."""
    r = CliRunner().invoke(app, ["luna", "--local", *FAST])
    assert r.exit_code == 1, r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: Step prepare failed: status fail: volume (0), empty_train (0); "), error
    assert "fix the examples listed" not in error
    for command in ("lunatrain examples add", "lunatrain examples import", "lunatrain examples seed"):
        assert command in error, error
    report = json.loads(settings.prepare_report.read_text())
    [volume] = [c for c in report["checks"] if c["id"] == "volume"]
    assert volume["code"] == "check.volume.none" and "`lunatrain examples seed`" in volume["message"], volume
    # with examples that fall short of minCurated, the sentence stays the one about curating more
    few = volume_check(10, 30)
    assert few.code == "check.volume.too_few" and few.message.endswith("curate more or lower it"), few
    assert volume_check(0, 0).severity == "info"  # minCurated 0: an empty store is no problem of volume


def test_auto_on_an_empty_store_says_how_to_get_examples_and_a_tier_all_in_val_says_so(settings, tiny):
    """Guide repro: `lunatrain auto` (`npm run train:auto`) from nothing ended with "fix the examples listed in
    reports/training/prepare-latest.json", which lists none: auto asks for no minimum of curated examples, so
    the volume check passed and only the empty train split failed. The same sentence came when a tier's few
    samples all fell into val, where nothing is to fix either: there are too few."""
    from lunatrain import export, store

    r = CliRunner().invoke(app, ["auto", "--local", *FAST])
    assert r.exit_code == 1, r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert "empty_train (0)" in error and "fix the examples listed" not in error, error
    assert "lunatrain examples seed" in error, error
    # Review repro: the memory tier was told to add and approve examples; its samples are memory items
    r = CliRunner().invoke(app, ["auto", "--local", "--datasetTier", "memory", *FAST])
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 1 and "`lunatrain memory add`" in error and "`lunatrain memory approve`" in error, error
    assert "examples approve" not in error, error

    # one approved example that lands in val (a val ratio of 1 is refused: find one that hashes there)
    for i in range(200):
        ex = store.add_example(settings, prompt=f"Frage {i}?", response=f"Antwort {i}.")
        if export.export(settings).counts["curated"]["train"] == 0:
            break
        store.delete_examples(settings, [ex.id])
    else:
        pytest.fail("no example hashed into val")
    r = CliRunner().invoke(app, ["auto", "--local", *FAST])
    assert r.exit_code == 1, r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert "fix the examples listed" not in error and "fell into val/test" in error, error


@pytest.mark.slow
def test_ctrl_c_stops_a_local_run_at_a_step_and_says_how_to_resume(settings, tiny):
    """Ctrl-C on `lora --local` ended the process with exit 130 and not a word: no report, no sentence, and
    nothing said about the epoch checkpoints a `--resume` continues from. The first Ctrl-C now stops the loop
    after the step it is in (as a cancel does), the run is recorded as cancelled, and one sentence says so."""
    write_export(settings)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("lunatrain")), "lora", "--local", "--epochs=100", "--batchSize=2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        # the second epoch has begun: the first one's checkpoint exists, and 99 are left to interrupt
        for line in proc.stdout:
            if line.startswith("epoch 1 done"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    sentence = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: Interrupted: training stopped at step \d+ of \d+ and is recorded as cancelled; "
        r"run the same command with --resume to continue from the last epoch checkpoint\.",
        sentence,
    ), err
    assert json.loads(settings.lora_latest_report.read_text())["status"] == "cancelled"
    assert not registry.list_adapters(settings)  # nothing was registered


@pytest.mark.slow
def test_two_flows_at_once_on_one_data_root_train_once(settings, tiny):
    """Unattended-run repro: a cron run overlapping a manual one (or a timer catching up) both trained and
    registered v1 and v2 with the same weights: nothing kept two flows of one data root apart. The second now
    waits for the first, then finds the data unchanged and trains nothing."""
    from lunatrain import store

    store.load_seed(settings)
    store.dispose_stores()
    command = [str(Path(sys.executable).with_name("lunatrain")), "luna", "--local", *FAST]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert _versions(settings) == ["v1"], outputs
    trained = [o for o in outputs if "not trained again" not in o]
    waited = [o for o in outputs if "not trained again" in o]
    assert len(trained) == 1 and len(waited) == 1, outputs
    assert re.search(
        r"^==> waiting for the flow already running on this data root \(pid \d+, since ", waited[0], re.M
    ), waited[0]


def test_a_waiting_flow_names_the_flow_it_waits_for_also_the_moment_it_took_the_lock(settings, monkeypatch):
    """CI repro: the second of two flows started at once said "(pid ?, since ?)": it read the lock file in the
    moment between the first flow taking the lock and naming itself there. It reads again until the holder
    has named itself (or the lock comes free); and an ended flow's name is gone from the file."""
    import fcntl
    import threading

    from lunatrain import flow

    path = settings.data_dir / flow.FLOW_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    said: list[str] = []
    named = threading.Event()
    with open(path, "a+b") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # taken, not named yet

        def meanwhile(_seconds: float) -> None:  # while the waiter looks again, the holder names itself
            holder.write(b"4242 2026-12-06T18:43:52.760Z")
            holder.flush()
            named.set()

        monkeypatch.setattr(flow.time, "sleep", meanwhile)
        inside: list[str] = []

        def waiter() -> None:
            with flow.one_flow_at_a_time(settings, said.append):
                inside.append(path.read_text())

        thread = threading.Thread(target=waiter)
        thread.start()
        assert named.wait(60), said  # the waiter looked again instead of saying what it read first
        while not said:  # it names the holder before it waits for the lock
            thread.join(0.01)
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)  # the holder ends
        thread.join(60)
    assert said == ["waiting for the flow already running on this data root (pid 4242, since 2026-12-06T18:43:52.760Z)"]
    assert inside and inside[0].split()[0] == str(os.getpid())
    assert path.read_text() == ""


def test_a_flow_waits_for_a_job_already_training_its_data_and_then_trains_nothing(settings, tiny, monkeypatch):
    """Review repro: a `luna` detached from its job (stopped by `timeout` while it followed) released the flow's
    lock while the job went on training; the next `luna` submitted the same data and parameters again: two
    versions with the same weights. A flow that finds such a job queued or running follows it, and trains
    only if what it registered is not this data's run (the job may have read an older export)."""
    from lunatrain import flow, store
    from lunatrain.params import parse_params
    from lunatrain.service import client
    from lunatrain.service.jobs import Job
    from lunatrain.train import run_lora

    store.load_seed(settings)
    params = flow.resolve_base(settings, parse_params({"epochs": 1, "maxSteps": 2, "batchSize": 8, "rank": 4}))
    twin = Job(id="ftjob-" + "1" * 24, status="running", created_at="2026-12-06T00:00:00.000Z", params=params.wire())
    other = Job(id="ftjob-" + "2" * 24, status="queued", created_at="2026-12-06T00:00:00.000Z",
                params=params.wire() | {"seed": 99})  # fmt: skip
    monkeypatch.setattr(client, "list_jobs", lambda _s, *, limit=20, status=None: [twin, other] if status else [])
    followed, trained = [], []

    def follow(job_id: str) -> dict:  # the twin ends: it trained this very export
        followed.append(job_id)
        assert run_lora(params, settings).ok
        return {}

    def lora_step(*_a, **_k) -> dict:
        trained.append(True)
        raise AssertionError("trained again")

    result = flow.run_flow(settings, params, flow.FlowOptions(), lora_step, follow_job=follow)
    assert followed == [twin.id] and trained == [], (followed, trained)
    lora = result.steps[-1]
    assert lora.ok and "was trained on this data with these parameters; not trained again" in lora.summary, lora
    # a job of these parameters that trained other data (an older export): its outcome is no repeat
    store.add_example(settings, prompt="Was ist neu?", response="Ein Beispiel mehr.")
    followed.clear()
    monkeypatch.setattr(flow, "unchanged_version", lambda *a, **k: None)
    with pytest.raises(AssertionError, match="trained again"):
        flow.run_flow(
            settings, params, flow.FlowOptions(), lora_step, follow_job=lambda job_id: followed.append(job_id) or {}
        )
    assert followed == [twin.id] and trained == [True]
    # Review repros: a job of these parameters under other gate thresholds (a stricter profile's) or with the
    # gate off is no twin: its version would be reported as this flow's "gate passed"; a base model the API
    # kept relative to the data root is the same base; a twin that ended cancelled leaves a checkpoint that the
    # flow's own run continues (resume), instead of training from step 0 and breaking the twin's resume hint.
    strict = {"minGoldenPassRate": 0.9}
    gated_off = twin.model_copy(update={"id": "ftjob-" + "3" * 24, "options": flow.FlowOptions(gate=False)})
    stricter = twin.model_copy(update={"id": "ftjob-" + "4" * 24, "gate_thresholds": strict})
    monkeypatch.setattr(
        client, "list_jobs", lambda _s, *, limit=20, status=None: [gated_off, stricter] if status else []
    )
    assert flow.active_twin(settings, params, flow.FlowOptions(), None) is None
    assert flow.active_twin(settings, params, flow.FlowOptions(), strict) == stricter
    (settings.home / "models").mkdir()
    shutil.copytree(tiny, settings.home / "models" / "mine")
    mine = params.model_copy(update={"base_model": str(settings.home / "models" / "mine")})
    relative = twin.model_copy(update={"params": mine.wire() | {"baseModel": "models/mine"}})
    monkeypatch.setattr(client, "list_jobs", lambda _s, *, limit=20, status=None: [relative] if status else [])
    assert flow.active_twin(settings, mine, flow.FlowOptions(), None) == relative
    monkeypatch.setattr(client, "list_jobs", lambda _s, *, limit=20, status=None: [twin] if status else [])
    sent: list = []
    with pytest.raises(AssertionError, match="trained again"):
        flow.run_flow(
            settings,
            params,
            flow.FlowOptions(),
            lambda _s, p, _o: sent.append(p.resume) or lora_step(),
            follow_job=lambda job_id: {"status": "cancelled", "jobId": job_id},
        )
    assert sent == [True]
    store.dispose_stores()


def test_a_start_joins_a_twin_only_while_it_trains_the_data_exported_now(settings, monkeypatch):
    """A queued twin reads the export current when it starts: joined. A running one read the export current
    when it started: joined while the tier's file is the same (an export of the same data), not once data
    exported since differs; nor when no export of its start is kept, or it has no start time."""
    from lunatrain import export, flow, store
    from lunatrain.params import parse_params
    from lunatrain.service import client
    from lunatrain.service.jobs import Job
    from lunatrain.wire import now_iso

    store.load_seed(settings)
    export.export(settings)
    params = flow.resolve_base(settings, parse_params({"datasetTier": "memory", "maxSteps": 2}))
    started = now_iso()
    running = Job(
        id="ftjob-" + "5" * 24, status="running", created_at=started, started_at=started, params=params.wire()
    )
    queued = running.model_copy(update={"status": "queued", "started_at": None})
    jobs: list[Job] = []
    monkeypatch.setattr(
        client, "list_jobs", lambda _s, *, limit=20, status=None: [j for j in jobs if j.status == status]
    )

    def twin() -> Job | None:
        return flow.joinable_twin(settings, params, flow.FlowOptions(), None)

    jobs[:] = [queued]
    assert twin() == queued
    jobs[:] = [running]
    export.export(settings)  # the same data again: the tier's file is the one the job read
    assert twin() == running
    jobs[:] = [running.model_copy(update={"started_at": None})]
    assert twin() is None
    jobs[:] = [running.model_copy(update={"started_at": "2020-01-01T00:00:00.000Z"})]  # before every export kept
    assert twin() is None
    jobs[:] = [running]
    store.add_memory(settings, question="Was trinkt Luna?", answer="Luna mag Tee.")
    export.export(settings)  # other data: the job read an older export, so this start trains
    assert twin() is None
    jobs[:] = [queued]
    assert twin() == queued
    store.dispose_stores()


def test_a_start_checks_for_a_twin_and_submits_under_the_data_roots_lock(settings, tiny, monkeypatch):
    """Repro: the twin check and the submit were one step within a process only (a thread lock): `lunatrain lora`
    in two terminals, or the API and the CLI, started at the same moment both found no twin and both queued,
    two versions of the same weights. Each holds the data root's submit lock across both steps, so the second
    finds the first's job."""
    import fcntl

    from lunatrain import export, flow, store
    from lunatrain.params import parse_params
    from lunatrain.service import client
    from lunatrain.service import ensure as ensure_module
    from lunatrain.service.jobs import Job
    from lunatrain.wire import now_iso

    store.load_seed(settings)
    export.export(settings)
    params = parse_params({"datasetTier": "memory", "maxSteps": 2})
    monkeypatch.setattr(ensure_module, "ensure_trainer", lambda _s: None)
    held: list[bool] = []

    settings.trainer_dir.mkdir(parents=True, exist_ok=True)

    def another_process_would_wait() -> bool:
        with open(settings.trainer_dir / "submit.lock", "a+b") as other:  # another open file: another process
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
            return False

    def twin(*_args) -> None:
        held.append(another_process_would_wait())

    def submit(*_args) -> Job:
        held.append(another_process_would_wait())
        return Job(id="ftjob-" + "6" * 24, status="queued", created_at=now_iso(), params=params.wire())

    monkeypatch.setattr(flow, "joinable_twin", twin)
    monkeypatch.setattr(client, "submit", submit)
    job, joined = flow.submit_or_join(settings, params, flow.FlowOptions())
    assert job.id == "ftjob-" + "6" * 24 and not joined
    assert held == [True, True]
    assert not another_process_would_wait()  # released after the submit
    store.dispose_stores()


def test_a_flows_export_keeps_the_split_ratios_of_the_current_export(settings, tiny, monkeypatch):
    """Split-leak repro: `export --valRatio 0.3 --testRatio 0.1`, then `auto`: the flow exported again at the
    environment's 0.1 / 0.0 without a word, so 30 samples the user had put in val/test were trained on and the
    val losses of earlier versions no longer compared. A flow's export keeps the current export's ratios where
    the environment sets none; a ratio the environment sets wins."""
    from lunatrain import export, flow, store
    from lunatrain.params import parse_params

    store.load_seed(settings)
    export.export(settings, val_ratio=0.3, test_ratio=0.1)

    class Trained(Exception):
        pass

    def lora_step(*_a, **_k):
        raise Trained

    params = flow.resolve_base(settings, parse_params({"epochs": 1, "maxSteps": 1}))
    monkeypatch.setattr(flow, "unchanged_version", lambda *a, **k: None)
    with pytest.raises(Trained):
        flow.run_flow(settings, params, flow.FlowOptions(), lora_step)
    assert export.read_summary(settings)["ratios"] == {"train": 0.6, "val": 0.3, "test": 0.1}
    monkeypatch.setenv("ASSISTANT_TRAIN_TEST_RATIO", "0.05")
    from lunatrain.settings import load_settings

    assert export.kept_ratios(load_settings()) == {"val_ratio": 0.3, "test_ratio": None}
    # Review repros: a kept ratio that does not fit with one set (0.3 + 0.7) was refused naming a flag no one
    # passed; the settings' pair is taken then. And `lunatrain export` or the dashboard's Export with no ratio
    # went back to the defaults: they keep the split too, and a ratio named wins.
    monkeypatch.setenv("ASSISTANT_TRAIN_TEST_RATIO", "0.7")
    assert export.kept_ratios(load_settings()) == {"val_ratio": None, "test_ratio": None}
    monkeypatch.delenv("ASSISTANT_TRAIN_TEST_RATIO")
    from typer.testing import CliRunner

    from lunatrain.cli import app

    assert CliRunner().invoke(app, ["export"]).exit_code == 0
    assert export.read_summary(settings)["ratios"] == {"train": 0.6, "val": 0.3, "test": 0.1}
    assert CliRunner().invoke(app, ["export", "--testRatio", "0"]).exit_code == 0
    assert export.read_summary(settings)["ratios"] == {"train": 0.7, "val": 0.3, "test": 0.0}
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    with TestClient(create_app(load_settings()), base_url="http://127.0.0.1") as api:
        assert api.post("/assistant/training/export", json={}).json()["ratios"]["val"] == 0.3
    store.dispose_stores()


def test_a_job_checks_its_min_curated_again_on_the_export_it_starts_on(settings, tiny):
    """Queue repro: minCurated was checked only when a job was queued; a job accepted with 473 curated examples
    trained on 241 after 200 were rejected and exported again while it waited, its record still saying
    minCurated 400. The job's own start checks it on the export it reads."""
    from lunatrain import export, flow, prepare, registry, store
    from lunatrain.errors import CheckFailed
    from lunatrain.params import parse_params

    store.load_seed(settings)
    export.export(settings)
    count = prepare.curated_count(settings)
    params = parse_params({"epochs": 1, "maxSteps": 1, "batchSize": 4})
    with pytest.raises(CheckFailed, match="Not enough data") as refused:
        flow.train_and_gate(settings, params, flow.FlowOptions(gate=False, min_curated=count + 1))
    assert refused.value.params == {"check": "check.volume.too_few", "curated": count, "minCurated": count + 1}
    assert not registry.list_adapters(settings)
    store.dispose_stores()


def test_a_flow_whose_preflight_warned_names_the_checks_that_warned(settings, tiny):
    """Day-2 explore repro: a flow named a failed preflight check in its summary ("status fail: export_stale
    (1)") but a warning only as "status warn": what to act on took another `lunatrain prepare`."""
    from lunatrain import flow, store
    from lunatrain.params import parse_params

    store.load_seed(settings)
    store.add_example(settings, prompt="Was ist 3+4?", response="7.")  # a trivial answer: a warning
    params = parse_params({"epochs": 1, "maxSteps": 1, "batchSize": 4})

    def lora_step(*_a, **_k) -> dict:  # not this test's part
        return {"status": "failed", "error": {"message": "not run here"}}

    from lunatrain.errors import CheckFailed

    with pytest.raises(CheckFailed, match="^Step lora failed") as stopped:
        flow.run_flow(settings, params, flow.FlowOptions(gate=False), lora_step)
    summary = next(step.summary for step in stopped.value.details.steps if step.step == "prepare")
    assert summary.startswith("status warn: ") and "trivial_response (1)" in summary, summary
    store.dispose_stores()


def _ends_interrupted(r, sentence: str) -> None:
    assert r.exit_code == 130, r.output
    assert r.output.strip().splitlines()[-1] == sentence, r.output


def test_ctrl_c_before_the_first_epoch_ends_says_there_is_no_checkpoint_to_resume(settings, tiny, monkeypatch):
    """Repro: Ctrl-C on `lora --local` during its first epoch advised "run the same command with --resume to
    continue from the last epoch checkpoint", though no epoch had ended and so no checkpoint existed: the
    resume then started over. The sentence now says so, and advises --resume only with a checkpoint."""
    from lunatrain.cli import flow as cli_flow

    write_export(settings, make_records(40))
    enter = cli_flow._CtrlC.__enter__

    def pressed_at_once(self):  # a real SIGINT, to the handler the command installs
        entered = enter(self)
        os.kill(os.getpid(), signal.SIGINT)
        return entered

    monkeypatch.setattr(cli_flow._CtrlC, "__enter__", pressed_at_once)
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--minCurated", "0"])
    _ends_interrupted(
        r,
        "error: Interrupted: training stopped at step 0 of 2, before its first epoch ended, and is recorded as "
        "cancelled; no checkpoint was saved, so running the command again starts over.",
    )
    assert "--resume" not in r.output
    assert json.loads(settings.lora_latest_report.read_text())["status"] == "cancelled"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_a_closed_terminal_stops_a_local_run_as_ctrl_c_does(settings, tiny, monkeypatch, sig):
    """Repro: SIGTERM (a `kill`, a service manager) or SIGHUP (the terminal closed) during `lora --local` ended
    the process at once, with exit 143/129 and not a word: no report, `status` naming an older run, nothing
    about the checkpoint a --resume continues from. Both now stop the loop after its step, as Ctrl-C does:
    the run is recorded as cancelled, one sentence names the signal, and the exit status is the signal's."""
    from lunatrain.cli import flow as cli_flow

    write_export(settings, make_records(40))
    enter = cli_flow._CtrlC.__enter__

    def signalled_at_once(self):  # a real signal, to the handler the command installs
        entered = enter(self)
        os.kill(os.getpid(), sig)
        return entered

    monkeypatch.setattr(cli_flow._CtrlC, "__enter__", signalled_at_once)
    before = signal.getsignal(sig)
    if before is signal.SIG_IGN:  # this suite runs under nohup: the command leaves an ignored signal ignored
        monkeypatch.setattr(
            signal, "getsignal", lambda s, real=signal.getsignal: signal.SIG_DFL if s == sig else real(s)
        )
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--minCurated", "0"])
    assert r.exit_code == 128 + sig, r.output
    name = signal.Signals(sig).name
    assert r.output.strip().splitlines()[-1] == (
        f"error: Interrupted ({name}): training stopped at step 0 of 2, before its first epoch ended, and is "
        "recorded as cancelled; no checkpoint was saved, so running the command again starts over."
    ), r.output
    assert json.loads(settings.lora_latest_report.read_text())["status"] == "cancelled"
    monkeypatch.undo()
    assert signal.getsignal(sig) == before  # the command's handler is gone again


def test_ctrl_c_after_the_last_step_says_the_run_had_finished(settings, tiny, monkeypatch):
    """Resume repro: Ctrl-C just after the last epoch's checkpoint printed "stopping after this step", and then
    the adapter was registered and the command ended 0: the press came after the loop's last look at it. It
    is said now that the press came too late to stop the run, which finished and is kept."""
    from lunatrain.cli import flow as cli_flow

    write_export(settings, make_records(40))
    real = cli_flow.train_and_gate

    def pressed_after_the_last_step(*args, on_trained, **kwargs):
        def then_trained(outcome):
            os.kill(os.getpid(), signal.SIGINT)  # the press lands before the command stops at once on one
            on_trained(outcome)

        return real(*args, on_trained=then_trained, **kwargs)

    monkeypatch.setattr(cli_flow, "train_and_gate", pressed_after_the_last_step)
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--minCurated", "0"])
    assert r.exit_code == 0, r.output
    assert "Ctrl-C: stopping after this step" in r.stderr
    assert "Ctrl-C came after the last step, too late to stop the run: it finished and is kept." in r.stderr, r.stderr
    assert "luna-adapter@v1 written" in r.stdout or "Adapter luna-adapter@v1" in r.stdout, r.stdout


def test_a_signal_ignored_when_a_local_run_starts_stays_ignored(monkeypatch):
    """`nohup lunatrain lora --local …` must train on when its terminal closes: the stop handler leaves an
    ignored SIGHUP (or SIGTERM) ignored. Ctrl-C it takes in any case, as it did before it took the others."""
    from lunatrain.cli.flow import _CtrlC

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _CtrlC() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == stop._press
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_ctrl_c_during_the_gate_of_a_local_run_names_the_ungated_version_and_what_to_do(settings, tiny, monkeypatch):
    """Repro: Ctrl-C while `lora --local` gated its new version ended with "Interrupted (Ctrl-C) before the
    command finished": nothing said that the version was trained and registered but not gated (so not
    served), and an overwrite run's revision stayed staged beside its slot. The sentence now names the
    version and the commands; a staged revision is discarded and the slot keeps what it served."""
    from lunatrain import evalgate

    write_export(settings, make_records(40))
    home = settings.home
    (home / "profiles").mkdir()
    (home / "profiles" / "lenient.toml").write_text("[gate]\nmaxValLossRatioVsBase = 100.0\nmaxLossRegression = 10.0\n")
    overwrite = [
        "lora",
        "--local",
        *FAST,
        "--adapterName",
        "ow",
        "--adapterStrategy",
        "overwrite",
        "--profile",
        "lenient",
    ]
    assert CliRunner().invoke(app, overwrite).exit_code == 0  # revision 1 holds the slot

    def ctrl_c(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evalgate, "gate_candidate", ctrl_c)
    _ends_interrupted(
        CliRunner().invoke(app, ["lora", "--local", *FAST, "--adapterName", "vs", "--minCurated", "0"]),
        "error: Interrupted during the eval gate: vs@v1 is trained and registered but not gated, so it is not "
        "served; `lunatrain eval-gate --adapter vs@v1` scores it and `lunatrain adapters activate vs@v1` serves it.",
    )
    entry = registry.get_version(settings, "vs", "v1")
    assert not entry.get("gate") and not [a for a in registry.list_active(settings) if a["name"] == "vs"], entry

    _ends_interrupted(
        CliRunner().invoke(app, overwrite),
        "error: Interrupted during the eval gate: revision 2 of ow@current was not gated and is discarded; the slot "
        "still serves revision 1. Run the command again to train it anew.",
    )
    slot = registry.get_version(settings, "ow", "current")
    assert slot["revision"] == 1 and not slot.get("staged"), slot
    assert [a["version"] for a in registry.list_active(settings) if a["name"] == "ow"] == ["current"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_during_the_gate_of_a_local_run_says_what_ctrl_c_says(settings, tiny, monkeypatch, sig):
    """Repro: SIGTERM (a `kill`, a service manager) or SIGHUP (the terminal closed) while `lora --local` gated
    its new version ended the command with 143 and not a word, where Ctrl-C names the ungated version and
    what to do; the README promises the same for all three. It says the same now, with the signal's status."""
    import time

    from lunatrain import evalgate

    write_export(settings, make_records(40))

    def signalled(*_a, **_k):
        os.kill(os.getpid(), sig)
        for _ in range(500):  # the handler runs at the next bytecode; this only waits for it
            time.sleep(0.01)
        raise AssertionError("the signal was not taken")

    def default_action(signum, _frame):  # what the process would do without the command's handler: die
        raise RuntimeError(f"{signal.Signals(signum).name} took its default action")

    monkeypatch.setattr(evalgate, "gate_candidate", signalled)
    previous = signal.signal(sig, default_action)
    try:
        r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--adapterName", "vs", "--minCurated", "0"])
    finally:
        signal.signal(sig, previous)
    assert r.exit_code == 128 + sig, (r.exit_code, r.output, r.exception)
    assert r.output.strip().splitlines()[-1] == (
        f"error: Interrupted ({sig.name}) during the eval gate: vs@v1 is trained and registered but not gated, so "
        "it is not served; `lunatrain eval-gate --adapter vs@v1` scores it and `lunatrain adapters activate vs@v1` "
        "serves it."
    ), r.output
    assert not registry.get_version(settings, "vs", "v1").get("gate")


def test_a_signal_after_the_gate_is_not_said_as_an_interrupted_gate_nor_as_ctrl_c(settings, tiny, monkeypatch):
    """Review repro: SIGTERM while `lora --local` cleaned up after a gate that had passed (its retention,
    which may wait for a concurrent gc) ended with "Interrupted (Ctrl-C) before the command finished." and
    130: the handler that says a signal during the gate stayed armed after it. Once the gate is over the
    signal takes its own course again, as before the run."""
    from lunatrain import retention

    write_export(settings, make_records(40))

    def signalled(*_a, **_k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal was not taken")

    def default_action(signum, _frame):
        raise RuntimeError(f"{signal.Signals(signum).name} took its default action")

    monkeypatch.setattr(retention, "after_run", signalled)
    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--adapterName", "vs", "--minCurated", "0"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(r.exception, RuntimeError) and "SIGTERM took its default action" in str(r.exception), (
        r.exit_code,
        r.output,
    )
    assert "Ctrl-C" not in r.output and "Interrupted" not in r.output, r.output


def test_a_base_model_directory_relative_to_the_working_directory_reaches_the_trainer_absolute(
    settings, tmp_path, monkeypatch
):
    """Repro: in `models/`, `lunatrain lora --baseModel=qwen-tiny` failed (exit 2, "neither 'luna-tiny', a
    local model directory, nor a hub id") while `--local` trained: the trainer works in the data root and got
    the name relative to the user's working directory."""
    from lunatrain.cli.flow import resolve

    work = tmp_path / "work"
    (work / "mine").mkdir(parents=True)
    monkeypatch.chdir(work)
    for profile in (None, "luna"):
        assert resolve(settings, profile, {"baseModel": "mine"}).params.base_model == str(work / "mine")
    monkeypatch.setenv("ASSISTANT_BASE_MODEL", "./mine")
    assert resolve(load_settings(), None, {}).params.base_model == str(work / "mine")
    for ref in ("luna-tiny", "Qwen/Qwen2.5-0.5B"):  # no such directory: passed on as named
        assert resolve(settings, None, {"baseModel": ref}).params.base_model == ref


def test_the_last_jobs_report_carries_its_gate_and_whether_an_overwrite_run_was_kept(settings, home):
    """Repro: after an overwrite run the gate refused, lora-latest.json named data/adapters/ow/current (which
    still holds the revision before it) with no gate at all, as if it were what is served."""
    write_export(settings, make_records(40))
    (home / "profiles").mkdir()
    (home / "profiles" / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.01\n")
    # a bar every adapter clears (two steps may not beat the base model yet)
    (home / "profiles" / "lenient.toml").write_text("[gate]\nmaxValLossRatioVsBase = 100.0\nmaxLossRegression = 10.0\n")
    overwrite = ["lora", "--local", *FAST, "--adapterName", "ow", "--adapterStrategy", "overwrite"]
    assert CliRunner().invoke(app, [*overwrite, "--profile", "lenient"]).exit_code == 0
    latest = json.loads(settings.lora_latest_report.read_text())
    assert (latest["revision"], latest["gate"]["passed"], latest["kept"]) == (1, True, True), latest
    assert CliRunner().invoke(app, [*overwrite, "--profile", "strict"]).exit_code == 1
    latest = json.loads(settings.lora_latest_report.read_text())
    assert (latest["revision"], latest["gate"]["passed"], latest["kept"]) == (2, False, False), latest
    assert "val loss" in latest["gate"]["reasons"][0]
    # a versioned run: its gate, and nothing about a slot
    assert (
        CliRunner().invoke(app, ["lora", "--local", *FAST, "--adapterName", "vs", "--profile", "lenient"]).exit_code
        == 0
    )
    latest = json.loads(settings.lora_latest_report.read_text())
    assert latest["adapterName"] == "vs" and latest["gate"]["passed"] is True and "kept" not in latest


def test_lora_reports_the_job_the_follower_saw_settled_when_its_trainer_has_stopped(settings, monkeypatch, capsys):
    """Repro: the trainer stopped during a `lunatrain lora` job (it settled the job `failed (interrupted)` as it
    went); the follower read that from the job store and printed it, then `lora` asked the stopped trainer for the
    job again: "error: The trainer at http://127.0.0.1:5051 is not reachable … start it with `lunatrain
    trainer`" (the default address: the port-0 trainer's record was gone), and `--json` printed nothing."""
    from lunatrain.cli import flow as cli_flow
    from lunatrain.cli import trainer as cli_trainer
    from lunatrain.errors import ServiceUnavailable
    from lunatrain.params import FlowOptions, LoraParams
    from lunatrain.service import client
    from lunatrain.service.jobs import Job

    job = {"id": "ftjob-gone", "status": "running", "createdAt": "2026-12-04T00:00:00Z", "params": {}}
    settled = job | {"status": "failed", "error": {"code": "interrupted", "message": "The trainer stopped."}}
    joined: list[bool] = [False]
    monkeypatch.setattr(cli_flow, "submit_or_join", lambda *a, **k: (Job.model_validate(job), joined[0]))
    monkeypatch.setattr(cli_trainer, "follow", lambda *a, **k: Job.model_validate(settled))

    def gone(*_a, **_k):
        raise ServiceUnavailable(
            "The trainer at http://127.0.0.1:5051 is not reachable (nothing accepts connections there)."
        )

    monkeypatch.setattr(client, "get_job", gone)
    outcome = cli_flow.service_lora(settings, LoraParams(), FlowOptions(), stderr=True)
    assert outcome["status"] == "failed" and outcome["error"]["code"] == "interrupted" and outcome["jobId"] == job["id"]
    assert "Job ftjob-gone failed" in capsys.readouterr().err
    # A job of another terminal already training this: followed, and said so (not "Submitted").
    joined[0] = True
    assert cli_flow.service_lora(settings, LoraParams(), FlowOptions(), stderr=True)["jobId"] == job["id"]
    said = capsys.readouterr().err
    assert "Job ftjob-gone (running) already trains these parameters on this export: following it." in said, said
    assert "Submitted" not in said


def test_following_a_running_job_whose_end_the_trainer_cannot_record_stops_and_says_why(settings, monkeypatch):
    """Disk-full repro: the disk filled during a trainer job; its worker was gone at once, but the trainer could not
    write the job's end to its database (health `degraded`, retrying every 60 s), so the job stayed `running` and
    `lunatrain lora` printed nothing more until it was killed, then said the job "keeps running". A follower that
    hears nothing while the trainer reports a storage problem stops, saying it and how to learn the outcome."""
    from lunatrain.cli import trainer as cli_trainer
    from lunatrain.errors import ServiceUnavailable
    from lunatrain.service import client
    from lunatrain.service.jobs import EventPage, Health, Job

    full = "The disk is full: the trainer's job database /x/jobs.db cannot be written (database or disk is full)."
    job = Job.model_validate(
        {"id": "ftjob-full", "status": "running", "createdAt": "2026-12-07T00:00:00Z", "params": {}}
    )
    health = Health(status="degraded", storage=None)
    monkeypatch.setattr(client, "events", lambda *_a, **_k: EventPage(data=[], has_more=False, last_seq=7))
    monkeypatch.setattr(client, "get_job", lambda *_a, **_k: job)
    monkeypatch.setattr(client, "probe", lambda *_a, **_k: health)
    clock = [0.0]
    monkeypatch.setattr(cli_trainer.time, "monotonic", lambda: clock[0])

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] > 120:
            raise AssertionError("still following after two minutes of silence")
        if clock[0] > 20:  # the disk fills: the trainer says so from now on
            health.storage = full

    monkeypatch.setattr(cli_trainer.time, "sleep", sleep)
    with pytest.raises(ServiceUnavailable) as stopped:
        cli_trainer.follow(settings, job.id)
    assert stopped.value.message == (
        f"Stopped following job ftjob-full (last recorded as running): the trainer cannot record it: {full} Once "
        "that is fixed the trainer records how the job ended: `lunatrain jobs show ftjob-full`."
    ), stopped.value.message
    assert 20 < clock[0] < 60, clock  # a while after the problem, not at the first silent poll


def test_following_a_job_whose_trainer_was_killed_ends_as_the_jobs_own_report_says(settings, monkeypatch, dead_port):
    """Days repro: the trainer was killed during a `luna` job's eval gate; the job's own process still
    registered and activated its version and wrote lora-latest.json (succeeded), but the follower gave up:
    "lora FAILED … Stopped following job … (last recorded as running)", exit 1. With no trainer holding the
    data root, the job's report says how it ended."""
    from lunatrain.cli import trainer as cli_trainer
    from lunatrain.errors import ServiceUnavailable
    from lunatrain.fsio import atomic_write_text
    from lunatrain.wire import now_iso

    from helpers import recorded_job

    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", f"http://127.0.0.1:{dead_port}")
    here = load_settings(home=settings.home)
    job = recorded_job(here.data_dir, "running", started_at=now_iso())
    report = {
        "jobId": job.id,
        "status": "succeeded",
        "adapterName": "luna-adapter",
        "version": "v2",
        "path": "data/adapters/luna-adapter/v2",
        "revision": None,
        "created": now_iso(),
        "metrics": {"valLoss": 2.1},
        "gate": {"status": "passed", "passed": True, "promoted": True},
    }
    here.lora_latest_report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(here.lora_latest_report, json.dumps(report))
    ended = cli_trainer.follow(here, job.id, unreachable_s=0.0)
    assert ended.status == "succeeded" and ended.adapter is not None and ended.adapter.version == "v2", ended
    assert ended.gate and ended.gate["passed"] is True and ended.metrics["valLoss"] == 2.1
    for other in (
        json.dumps(report | {"jobId": "ftjob-other"}),  # a report of another job says nothing of this one
        json.dumps(report | {"adapterName": 3}),  # nor one edited into another shape
        '{"jobId": "' + job.id + '", "status": "succ',  # nor one cut short
    ):
        atomic_write_text(here.lora_latest_report, other)
        with pytest.raises(ServiceUnavailable, match="Stopped following job"):
            cli_trainer.follow(here, job.id, unreachable_s=0.0)
    # Jobs repro: `jobs resume` followed its job, the trainer was stopped, and the follower said "Job … failed:
    # interrupted" (exit 1) from the job's report, while the job was requeued and went on from its checkpoint
    # once a trainer started. A resume job a trainer's stop left queued (or running) has not ended.
    for recorded in ("queued", "running"):
        resumed = recorded_job(here.data_dir, recorded, resume=True, started_at=now_iso())
        stopped = report | {"jobId": resumed.id, "status": "failed", "version": None, "created": now_iso()}
        stopped["error"] = {"code": "interrupted", "message": "Stopped at step 5 of 40: the trainer is stopping."}
        atomic_write_text(here.lora_latest_report, json.dumps(stopped))
        with pytest.raises(
            ServiceUnavailable, match=f"Stopped following job {resumed.id} .last recorded as {recorded}"
        ):
            cli_trainer.follow(here, resumed.id, unreachable_s=0.0)


def test_device_cuda_without_a_gpu_is_refused_before_the_flow_runs(settings, no_gpu, monkeypatch, dead_port):
    """Repro: `lunatrain luna --device=cuda` (through the trainer) on a machine without CUDA ran the eval-gate
    step (rewriting its report) and the export, and was refused only by prepare."""
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", "false")
    write_export(settings, make_records(24))
    gate_report = settings.eval_report
    for command in ("luna", "auto"):
        r = CliRunner().invoke(app, [command, "--device", "cuda", "--maxSteps", "1"])
        assert r.exit_code == 2 and r.output.strip().splitlines() == [
            "error: device 'cuda' was requested but no CUDA GPU is available; set device to cpu or auto."
        ], r.output
    assert not gate_report.exists()


def test_a_mistyped_target_module_is_refused_before_the_flow_changes_anything(settings):
    """Repro: `lunatrain luna --targetModules=q_prj` exited 2 (usage) after its eval-gate step rewrote the gate
    report and its export step published a new export (pruning older ones)."""
    write_export(settings, make_records(24))
    current = (settings.training_dir / "current").resolve() if (settings.training_dir / "current").exists() else None
    r = CliRunner().invoke(app, ["luna", "--targetModules", "q_prj", "--local"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "targetModules ['q_prj'] name no module of base model 'luna-tiny'" in r.output, r.output
    assert not (settings.eval_report).exists()
    now = (settings.training_dir / "current").resolve() if (settings.training_dir / "current").exists() else None
    assert now == current


def test_an_unknown_chat_template_is_refused_before_a_trainer_starts_or_a_model_is_copied(settings, monkeypatch):
    """CLI repro: `lora --chatTemplate=nonexist` started a trainer on demand (left running), copied luna-tiny into
    the data root and only then was refused, by the trainer; `prepare` refuses the same name with nothing
    started. It is refused first, as `luna` refuses it."""
    from lunatrain.service import ensure

    started: list[str] = []
    monkeypatch.setattr(ensure, "ensure_trainer", lambda *a, **k: started.append("trainer"))
    write_export(settings, make_records(24))
    before = sorted(p.relative_to(settings.home) for p in settings.home.rglob("*"))
    r = CliRunner().invoke(app, ["lora", "--chatTemplate", "nonexist"])
    assert (
        r.exit_code == 2 and r.output.strip() == "error: Unknown chatTemplate 'nonexist'; bundled templates: chatml."
    ), r.output
    assert started == [] and sorted(p.relative_to(settings.home) for p in settings.home.rglob("*")) == before


def test_a_failed_local_run_points_at_its_own_log_not_at_the_trainers_jobs(settings, tiny):
    """Repro: `luna --local` whose training failed said "see `lunatrain jobs list`": no job exists for a run
    in the command's own process. A run through the trainer still points at its job."""
    from lunatrain import flow, store
    from lunatrain.errors import CheckFailed
    from lunatrain.params import FlowOptions, parse_params

    store.load_seed(settings)
    failed = {"status": "failed", "adapter": None, "metrics": {}, "gate": None}
    failed["error"] = {"code": "nan_loss", "message": "loss became nan at step 2"}
    params, options = parse_params({"maxSeqLength": 128}), FlowOptions(min_curated=0, gate=False)
    for job_id, says in ((None, "see the run's log above"), ("ftjob-1", "see `lunatrain jobs list`")):
        with pytest.raises(CheckFailed) as refused:
            flow.run_flow(settings, params, options, lambda *_a, j=job_id: failed | {"jobId": j})
        message = refused.value.message
        assert message.startswith("Step lora failed: job failed: loss became nan at step 2; " + says), message
    store.dispose_stores()


def test_a_step_that_cannot_write_its_report_says_that_fix_not_the_steps_own(settings, tiny):
    """Repro: `lunatrain luna --local` on a data root whose reports this user may not write ended "Step
    eval-gate failed: Writing …/eval-gate-latest.json failed: Permission denied …; fix, roll back or deactivate
    the active adapter …": advice to roll back a good adapter because a file could not be written. A storage
    failure carries its own fix; the step's advice is for the step's own failures.
    And it is said before the first step: the gate no longer runs (minutes, on a real model) only to find
    it cannot write its report; the same for the export's and prepare's folders."""
    from faults import read_only

    write_export(settings, make_records(40))
    for folder in (settings.reports_eval_dir, settings.training_dir, settings.reports_training_dir):
        with read_only(folder):  # (which makes the folder where it is missing)
            before = sorted(p.relative_to(settings.home) for p in settings.home.rglob("*"))
            r = CliRunner().invoke(app, ["luna", "--local", *FAST])
            after = sorted(p.relative_to(settings.home) for p in settings.home.rglob("*"))
        assert r.exit_code == 1, r.output
        [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert error.startswith(f"error: Cannot run the flow for luna-adapter: nothing can be written in {folder} ("), (
            error
        )
        assert "Read-only file system" in error and "roll back" not in error and "deactivate" not in error, error
        assert error.endswith("make it writable or point ASSISTANT_HOME at another data root."), error
        assert "eval-gate" not in r.output, r.output  # no step ran
        assert after == before


def _versions(settings, name="luna-adapter"):
    return [v["version"] for v in registry.list_adapters(settings).get(name, {}).get("versions", [])]


def test_an_unchanged_day_trains_nothing_and_names_the_version_it_would_repeat(settings, tiny):
    """Repro: `luna` on data and parameters that had not changed trained again and registered a version whose
    weights were byte-identical to the last one, every day, without a word. The lora step now names the
    version it would repeat and trains nothing; `--retrain` trains anyway."""
    from lunatrain import store

    store.load_seed(settings)
    first = CliRunner().invoke(app, ["luna", "--local", *FAST])
    assert first.exit_code == 0 and _versions(settings) == ["v1"], first.output
    again = CliRunner().invoke(app, ["luna", "--local", *FAST])
    assert again.exit_code == 0, again.output
    assert re.search(
        r"^lora +ok .*luna-adapter@v1 was trained on this data with these parameters; not trained again "
        r"\(--retrain trains anyway\)$",
        again.output,
        re.M,
    ), again.output
    assert re.search(r"^adapter +luna-adapter@v1 on luna-tiny \(active\)$", again.output, re.M), again.output
    # Unattended-run repro: nothing in the flow's output said when it ran, so a cron log of many days could
    # not tell the runs apart; the summary opens with the run's start and end (UTC, as every record).
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.search(rf"^run +{stamp} to {stamp}$", again.output, re.M), again.output
    assert _versions(settings) == ["v1"]
    forced = CliRunner().invoke(app, ["luna", "--local", *FAST, "--retrain"])
    assert forced.exit_code == 0 and _versions(settings) == ["v1", "v2"], forced.output
    store.dispose_stores()


def test_what_makes_a_day_unchanged_is_the_tier_file_the_parameters_and_the_base(settings, tiny):
    """The rule behind the repro above, each part alone: another seed, tier, tier file or chat template is a new
    run; only when all match is the newest version on the base repeated."""
    from lunatrain import flow, prepare, store
    from lunatrain.params import parse_params
    from lunatrain.train import run_lora

    store.load_seed(settings)
    CliRunner().invoke(app, ["export"])
    params = parse_params({"epochs": 1, "maxSteps": 2, "batchSize": 8, "rank": 4, "maxSeqLength": 128})
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params)) is None  # nothing trained
    assert run_lora(params, settings).ok
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params))["version"] == "v1"
    # a memory item changes the export but not the curated tier's file this run trains: still a repeat (it was
    # trained again, to a byte-identical adapter)
    store.add_memory(settings, question="Wie heißt mein Hund?", answer="Bruno.")
    CliRunner().invoke(app, ["export"])
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params))["version"] == "v1"
    # a version from before its trained content's key was recorded is a repeat on the very same tier file
    path = registry.registry_path(settings)
    saved = path.read_text()
    data = json.loads(saved)
    del data["adapters"]["luna-adapter"]["versions"][0]["trainedKey"]
    path.write_text(json.dumps(data))
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params))["version"] == "v1"
    path.write_text(saved)
    # Memory-workflow repro: new tags on an example (delete and add: a new id) changed the tier file, but
    # nothing a run trains on; the next run trained again, to byte-identical weights. The same trained content
    # (each split's messages in order) is a repeat.
    tier_file = prepare.prepare(settings, params).dataset["tierSha256"]
    ex = store.list_examples(settings, source="curated", status="approved", limit=1)[0]
    store.delete_examples(settings, [ex.id])
    again = dict(prompt=ex.prompt, response=ex.response, system=ex.system, turns=list(ex.turns), rating=ex.rating)
    store.add_example(settings, **again, tags=[*ex.tags, "edited"], conversation_id=ex.conversation_id)
    CliRunner().invoke(app, ["export"])
    prepared = prepare.prepare(settings, params)
    assert prepared.dataset["tierSha256"] != tier_file
    assert flow.unchanged_version(settings, params, prepared)["version"] == "v1"
    # trained by two processes (the trainer's ASSISTANT_LORA_GPUS=2): another combined batch, another run
    report_file = settings.adapters_dir / "luna-adapter" / "v1" / registry.REPORT_FILE
    saved = report_file.read_text()
    report_file.write_text(json.dumps(json.loads(saved) | {"dataParallel": {"ranks": 2, "backend": "gloo"}}))
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params)) is None
    # what counts is the processes the flow's lora step trains in (`--local`: one, whatever the trainer's)
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params), ranks=2)["version"] == "v1"
    report_file.write_text(saved)
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params), ranks=2) is None
    for changed in ({"seed": 8}, {"datasetTier": "merged"}, {"chatTemplate": "chatml"}, {"adapterName": "other"}):
        other = parse_params(params.wire() | changed)
        assert flow.unchanged_version(settings, other, prepare.prepare(settings, other)) is None, changed
    # Repro: a version whose files were lost was "not trained again" every day, with "train it again" beside it
    # and exit 0: its files are not there to repeat
    weights = settings.adapters_dir / "luna-adapter" / "v1" / "adapter_model.safetensors"
    weights.rename(weights.with_suffix(".away"))
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params)) is None
    weights.with_suffix(".away").rename(weights)
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params))["version"] == "v1"
    # a version registered before its run's key was recorded is not known to be a repeat: trained again, once
    saved = path.read_text()
    data = json.loads(saved)
    for key in ("runKey", "trainedKey"):
        del data["adapters"]["luna-adapter"]["versions"][0][key]
    path.write_text(json.dumps(data))
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params)) is None
    path.write_text(saved)
    store.add_example(settings, prompt="Was ist neu?", response="Ein Beispiel mehr.")
    CliRunner().invoke(app, ["export"])
    assert flow.unchanged_version(settings, params, prepare.prepare(settings, params)) is None  # another tier file
    store.dispose_stores()


def test_a_day_that_would_repeat_a_refused_version_fails_and_says_how_to_use_it(settings, tiny, home):
    """Repro: after the gate refused a version, every `auto` on the same data trained and registered another
    refused copy, and the error said "`lunatrain adapters show NAME`, then run again" (NAME as written). The
    repeat is refused without training, naming the version, why, and how to activate it anyway."""
    from lunatrain import store

    store.load_seed(settings)
    (home / "profiles").mkdir()
    (home / "profiles" / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.01\n")  # no adapter clears it
    for _ in range(2):
        r = CliRunner().invoke(app, ["auto", "--local", "--profile", "strict", *FAST])
        assert r.exit_code == 1 and _versions(settings) == ["v1"], r.output
        [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert "NAME" not in error and "`lunatrain adapters show luna-adapter@v1` says why" in error, error
        assert "`lunatrain adapters activate luna-adapter@v1`" in error, error
    assert "was trained on this data with these parameters; not trained again" in error, error
    assert "gated now, it is refused" in error, error
    # Nothing changed but the gate's thresholds: the same version is judged again under them, not retrained.
    r = CliRunner().invoke(app, ["auto", "--local", *FAST])
    assert r.exit_code == 0 and "gated now, it passed" in r.output, r.output
    assert _versions(settings) == ["v1"] and registry.get_version(settings, "luna-adapter", "active")["version"] == "v1"
    store.dispose_stores()


def test_a_repeat_of_the_active_version_reuses_the_first_steps_decision(settings, tiny, home, monkeypatch):
    """Review repro: a refused version activated by hand was evaluated twice by the next `auto`: by the first
    step (the active version, against the base model) and again by the lora step's repeat, under the same
    thresholds; on a real model that doubles the gate's minutes. The repeat records the first decision."""
    from lunatrain import evalgate, store

    store.load_seed(settings)
    (home / "profiles").mkdir()
    (home / "profiles" / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.01\n")
    assert CliRunner().invoke(app, ["auto", "--local", "--profile", "strict", *FAST]).exit_code == 1
    assert CliRunner().invoke(app, ["adapters", "activate", "luna-adapter@v1"]).exit_code == 0
    runs = []
    real = evalgate._run
    monkeypatch.setattr(evalgate, "_run", lambda *a, **k: runs.append(a[1]) or real(*a, **k))
    r = CliRunner().invoke(app, ["auto", "--local", *FAST])
    assert r.exit_code == 0 and "gated now, it passed" in r.output, r.output
    assert len(runs) == 1, runs
    gate = registry.get_version(settings, "luna-adapter", "v1")["gate"]
    assert gate["passed"] is True
    # Lifecycle repro: the pass replaced the refusal, which then was gone from the registry, gate.json and
    # `adapters show` (the reason the user had activated it by hand against). It is kept beside the pass.
    refusal = gate["earlierRefusal"]
    assert refusal["status"] == "failed" and refusal["reasonCodes"] and refusal["thresholds"], refusal
    kept = json.loads(
        (settings.home / registry.get_version(settings, "luna-adapter", "v1")["path"] / "gate.json").read_text()
    )
    assert kept["earlierRefusal"] == refusal
    shown = CliRunner().invoke(app, ["adapters", "list"])
    assert "[gate passed, refused earlier]" in shown.output, shown.output
    store.dispose_stores()


def test_a_pass_that_promotes_a_refused_version_keeps_its_refusal(settings, tiny, home):
    """Review repro: a version the gate refused under strict thresholds, judged again by the next `auto` under
    the profile's own and promoted, lost its refusal: the promotion writes its gate outcome with the
    activation, a path that did not keep it (`adapters list` said only "gate passed")."""
    from lunatrain import store

    store.load_seed(settings)
    (home / "profiles").mkdir()
    (home / "profiles" / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.01\n")
    assert CliRunner().invoke(app, ["auto", "--local", "--profile", "strict", *FAST]).exit_code == 1
    r = CliRunner().invoke(app, ["auto", "--local", *FAST])
    assert r.exit_code == 0 and "gated now, it passed" in r.output, r.output
    entry = registry.get_version(settings, "luna-adapter", "v1")
    assert entry["gate"]["passed"] is True and entry["gate"]["promoted"] is True, entry["gate"]
    assert entry["gate"]["earlierRefusal"]["status"] == "failed", entry["gate"]
    kept = json.loads((settings.home / entry["path"] / "gate.json").read_text())
    assert kept["earlierRefusal"] == entry["gate"]["earlierRefusal"]
    assert "[gate passed, refused earlier]" in CliRunner().invoke(app, ["adapters", "list"]).output
    store.dispose_stores()


def test_a_repeat_of_a_version_never_gated_gates_it_instead_of_passing_it_by(settings, tiny):
    """Review repro: a newest version without a gate decision (trained with --no-gate, a gate that failed to
    run, a trainer gone before its gate) counted as repeated and passed: the flow said "not trained again"
    and exited 0 with the version never judged nor active. It is gated now."""
    from lunatrain import store

    store.load_seed(settings)
    r = CliRunner().invoke(app, ["luna", "--local", *FAST, "--no-gate"])
    assert r.exit_code == 0 and _versions(settings) == ["v1"], r.output
    assert registry.get_version(settings, "luna-adapter", "v1").get("gate") is None
    r = CliRunner().invoke(app, ["luna", "--local", *FAST])
    assert r.exit_code == 0 and "not trained again" in r.output and "gated now, it passed" in r.output, r.output
    assert registry.get_version(settings, "luna-adapter", "v1")["gate"]["passed"] is True
    assert registry.get_version(settings, "luna-adapter", "active")["version"] == "v1" and _versions(settings) == ["v1"]
    store.dispose_stores()


def test_a_day_whose_data_went_back_to_an_older_version_reuses_that_version(settings, tiny, home):
    """Repro: the unchanged-day rule looked at the newest version only. Data that went back to what an older
    version was trained on (the example added since is rejected again) trained a third version, byte-identical
    to the first. That version is named instead; when it is not the one served, the gate judges it now against
    the one that is, as it would have judged the copy."""
    from lunatrain import store

    store.load_seed(settings)
    (home / "profiles").mkdir()
    (home / "profiles" / "lax.toml").write_text("[gate]\nmaxLossRegression = 10.0\n")
    assert CliRunner().invoke(app, ["auto", "--local", *FAST]).exit_code == 0
    added = store.add_example(settings, prompt="Was ist neu?", response="Ein Beispiel mehr.")
    r = CliRunner().invoke(app, ["auto", "--local", *FAST, "--no-gate"])
    assert r.exit_code == 0 and _versions(settings) == ["v1", "v2"], r.output
    store.set_status(settings, [added.id], "rejected")

    r = CliRunner().invoke(app, ["auto", "--local", *FAST])  # v1 is the one served: nothing to do
    assert r.exit_code == 0 and _versions(settings) == ["v1", "v2"], r.output
    assert re.search(
        r"^lora +ok .*luna-adapter@v1 was trained on this data with these parameters; not trained", r.output, re.M
    )
    assert "gated now" not in r.output, r.output

    assert CliRunner().invoke(app, ["adapters", "activate", "luna-adapter@v2"]).exit_code == 0
    r = CliRunner().invoke(app, ["auto", "--local", "--profile", "lax", *FAST])
    assert r.exit_code == 0 and _versions(settings) == ["v1", "v2"], r.output
    assert "luna-adapter@v1 was trained on this data with these parameters; not trained again" in r.output, r.output
    assert "gated now, it passed" in r.output, r.output
    v1 = registry.get_version(settings, "luna-adapter", "v1")
    assert v1["gate"]["passed"] is True and v1["gate"]["baseline"] == "luna-adapter@v2", v1["gate"]
    assert registry.get_version(settings, "luna-adapter", "active")["version"] == "v1"
    store.dispose_stores()


def test_a_failed_preflight_names_min_curated_only_when_the_volume_check_failed(settings, tiny):
    """Repro: every failed prepare step of `luna` ended "…, or lower --minCurated", also when the failure was a
    literal `<|im_end|>` in an example with 274 approved examples against a minimum of 30."""
    from lunatrain import store

    store.load_seed(settings)
    store.add_example(settings, prompt="Was beendet eine Runde?", response="Das Zeichen <|im_end|> tut es.")
    r = CliRunner().invoke(app, ["luna", "--local", *FAST])
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 1 and "special_tokens" in error and "minCurated" not in error, r.output
    # Auto repro: the volume check's failure said "volume (6); …, or lower --minCurated", without the number
    # required (from a profile the user may not know of); the check's own sentence says both.
    r = CliRunner().invoke(app, ["luna", "--local", *FAST, "--minCurated=100000"])
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 1 and "100000 required (minCurated); curate more or lower it; fix the examples" in error
    assert error.endswith("listed in reports/training/prepare-latest.json."), r.output
    bad = next(e for e in store.list_examples(settings, limit=1000) if "<|im_end|>" in e.response)
    store.delete_examples(settings, [bad.id])
    r = CliRunner().invoke(app, ["luna", "--local", *FAST, "--minCurated=100000"])
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert re.search(
        r"volume \(\d+\); \d+ approved curated examples, 100000 required \(minCurated\); curate more or "
        r"lower it\.$",
        error,
    ), r.output
    store.dispose_stores()


def test_the_summary_names_only_the_reports_this_run_wrote(settings, tiny):
    """Auto repro: after a gate the day before, `auto` refused for a golden suite mistake ended its summary with
    "reports    reports/eval/eval-gate-latest.json": yesterday's report, whose decision was "pass". The
    summary names the reports this run wrote."""
    from lunatrain import store

    assert CliRunner().invoke(app, ["eval-gate"]).exit_code == 0
    (settings.eval_dir / "mine.jsonl").write_text("{bad\n", "utf-8")
    store.load_seed(settings)
    r = CliRunner().invoke(app, ["auto", "--local", *FAST])
    assert r.exit_code == 2, r.output
    assert re.search(r"eval-gate +FAILED", r.output) and "eval-gate-latest.json" not in r.output, r.output
    store.dispose_stores()


def test_a_start_on_a_tier_with_nothing_in_train_is_refused_before_it_is_queued(settings, tiny):
    """Memory repro: one memory item (the export said it fell into val) and `lora --datasetTier=memory` was
    submitted (the API answered 202), then the job failed "The memory tier has no training samples; add
    examples and export again" (the tier has a sample: it is in val). The check before a job is queued refuses
    it, with the export's own sentence; a local run says the same."""
    from lunatrain import export, flow, store
    from lunatrain.errors import CheckFailed
    from lunatrain.params import FlowOptions, LoraParams

    store.add_memory(settings, question="Was ist Fakt 17?", answer="Fakt 17 ist wahr.")
    export.export(settings)
    params = LoraParams(dataset_tier="memory")
    with pytest.raises(CheckFailed) as refused:
        flow.check_data(settings, params, FlowOptions(min_curated=0))
    assert refused.value.code == "export.nothing_to_train", refused.value
    said = "The one sample of the memory tier fell into val/test (val ratio 0.1, test ratio 0.0), so a run on it"
    assert refused.value.message.startswith(said), refused.value.message
    r = CliRunner().invoke(app, ["lora", "--local", "--datasetTier=memory", "--minCurated=0", *FAST])
    assert r.exit_code == 1 and said in r.output, r.output
    store.dispose_stores()


def _full_disk(path):
    import errno

    from lunatrain import fsio

    return fsio.storage_error(OSError(errno.ENOSPC, "No space left on device"), path)


def test_a_gate_that_cannot_record_its_promotion_says_so_last_without_a_class_name(settings, monkeypatch):
    """Repro: when the registry write promoting the new version failed (a full disk), `lora --local` exited 1
    with the output ending "Validation loss …" and no sentence, and the reason read "DiskFull: The disk is
    full: …" mid-output. The last line says what happened, in the error's own words."""

    write_export(settings, make_records(40))

    def full(*_a, **_k):
        raise _full_disk(registry.registry_path(settings))

    monkeypatch.setattr(registry, "activate", full)
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--minCurated=0"])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Eval gate: error: The disk is full: writing ") and "DiskFull" not in r.output, r.output
    assert "not active" in last, last
    assert "Eval gate: passed" not in r.output
    assert registry.list_adapters(settings)["luna-adapter"]["activeByBase"] == {}


def test_a_gate_report_that_cannot_be_written_does_not_undo_a_recorded_promotion(settings, monkeypatch):
    """Repro: when eval-gate-latest.json could not be written after the registry had recorded the promotion,
    `lora --local` exited 1 with "eval gate error: DiskFull: …" mid-output and "Eval gate: passed." last, the
    version active all the same. The registry's decision stands, and the run succeeds."""
    from lunatrain import evalgate

    write_export(settings, make_records(40))
    real = evalgate.atomic_write_json

    def full_at_the_report(path, *a, **k):
        if path == settings.eval_report:
            raise _full_disk(path)
        return real(path, *a, **k)

    monkeypatch.setattr(evalgate, "atomic_write_json", full_at_the_report)
    r = CliRunner().invoke(app, ["lora", "--local", *FAST, "--minCurated=0"])
    assert r.exit_code == 0, r.output
    *_, passed, note = r.output.strip().splitlines()  # the gate's decision, then its note on the report
    assert passed == "Eval gate: passed." and note.startswith("Note: its report was not written: The disk is full"), (
        r.output
    )
    assert note.endswith("try again.") and not note.endswith(".."), note
    active = registry.get_version(settings, "luna-adapter", "active")
    assert active["gate"]["passed"] is True and not settings.eval_report.exists()


def test_an_unknown_adapter_for_the_gate_step_is_said_without_advice_for_an_active_one(settings, tiny):
    """Unattended-run repro: `auto --adapter nope` on a root with nothing registered ended "No adapter named
    'nope' …; fix, roll back or deactivate the active adapter (`lunatrain adapters rollback luna-adapter`, …)":
    advice for a gate that failed on an active version, whose commands would fail themselves."""
    from lunatrain import store

    store.load_seed(settings)
    r = CliRunner().invoke(app, ["auto", "--local", "--adapter", "nope", *FAST])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: Step eval-gate failed: No adapter named 'nope'"), last
    assert "roll back" not in last and "deactivate" not in last, last
    store.dispose_stores()


def test_a_refusal_in_the_lora_step_says_its_own_fix_only(settings, tiny):
    """Repro: an overwrite run on a second base, whose slot holds a run on the first, was refused (rightly) with
    "…train under another --adapterName, or with --adapterStrategy versioned; see `lunatrain jobs list`, then
    run again": with --local there is no job, and running again cannot succeed. A refusal says its own fix."""
    import shutil

    from lunatrain import store

    store.load_seed(settings)
    flags = ["luna", "--local", *FAST, "--adapterStrategy", "overwrite", "--no-gate"]
    first = CliRunner().invoke(app, flags)
    assert first.exit_code == 0, first.output
    other = settings.models_dir / "tiny2"
    shutil.copytree(tiny, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"initializer_range": 0.021}))
    refused = CliRunner().invoke(app, [*flags, "--baseModel", str(other)])
    assert refused.exit_code == 1, refused.output
    said = refused.output.strip().splitlines()[-1]
    assert said.startswith("error: Step lora failed: ") and "--adapterStrategy versioned" in said, said
    assert "jobs list" not in said and said.endswith("."), said
    store.dispose_stores()


def test_a_base_model_that_fails_the_first_gate_step_gets_advice_that_runs(settings, tiny, home):
    """CLI-text repro: with no adapter active, the first step judges the base model itself; when that failed
    a profile's strict [gate], the error said "roll back or deactivate the active adapter (`lunatrain adapters
    rollback NAME`, …)", and both commands failed (exit 2): nothing was active. It names what can be done."""
    from lunatrain import store

    store.load_seed(settings)
    (home / "profiles").mkdir()
    (home / "profiles" / "strict.toml").write_text("[gate]\nminGoldenPassRate = 1.0\n")
    r = CliRunner().invoke(app, ["auto", "--local", "--profile", "strict", *FAST])
    assert r.exit_code == 1, r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: Step eval-gate failed: base:luna-tiny failed: golden pass rate 0.00"), error
    assert "rollback" not in error and "deactivate" not in error, error
    assert "no adapter is active on the base model" in error and "[gate] thresholds of profile strict" in error, error
    assert "`lunatrain lora --profile strict`" in error, error
    store.dispose_stores()


def test_the_summary_says_when_the_trainer_trained_another_build_of_the_base(settings):
    """Explore repro: the trainer resolved a hub id in its own Hugging Face cache (another HF_HOME): prepare and
    the gate checked one commit, the job trained another, and the summary said "(active)" for an adapter that
    `status` a moment later called not active on the configured base. The summary says what happened."""
    from lunatrain import models, registry
    from lunatrain.flow import FlowResult, summary_lines
    from lunatrain.params import parse_params

    here = models.resolve_base(None, settings)
    entry = {
        "name": "luna-adapter",
        "version": "v1",
        "path": "data/adapters/luna-adapter/v1",
        "baseModel": {"id": here.id, "fingerprint": "e" * 64, "revision": "a" * 40},
        "metrics": {},
    }
    data = {"adapters": {"luna-adapter": {"versions": [entry], "activeByBase": {"e" * 64: {"version": "v1"}}}}}
    registry.registry_path(settings).parent.mkdir(parents=True, exist_ok=True)
    registry.registry_path(settings).write_text(json.dumps(data))
    (line,) = [
        s for s in summary_lines(settings, FlowResult(parse_params({}), adapter=entry)) if s.startswith("adapter ")
    ]
    assert line == (
        f"adapter    luna-adapter@v1 on {here.id} (active on the build of {here.id} the trainer found, revision "
        "aaaaaaaaaaaa, not the one this command resolves: give the trainer the same Hugging Face cache (HF_HOME) "
        "or model directory)"
    ), line
    # not active (the gate refused it, or ran not): said all the same, since retraining through the same
    # trainer would train that build again
    data["adapters"]["luna-adapter"]["activeByBase"] = {}
    registry.registry_path(settings).write_text(json.dumps(data))
    (line,) = [
        s for s in summary_lines(settings, FlowResult(parse_params({}), adapter=entry)) if s.startswith("adapter ")
    ]
    assert line.startswith(f"adapter    luna-adapter@v1 on {here.id} (not active; trained on the build of"), line


def test_a_submitting_command_allowed_to_fetch_fetches_the_base_before_the_trainer_looks(
    settings, monkeypatch, dead_port
):
    """Settings repro: `ASSISTANT_HUB_DOWNLOAD=true lunatrain lora --baseModel org/name` was refused by a
    trainer started without it, with "set ASSISTANT_HUB_DOWNLOAD=true", which the user had done: the trainer
    reads only its own environment. The command allowed to fetch fetches a hub id the cache lacks before it
    submits (the trainer of this machine then finds it there), as prepare and `lora --local` do."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    write_export(settings, make_records(40))
    asked = []

    def snapshot(repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("local_files_only")))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        raise OSError("no network here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite's conftest sets it
    monkeypatch.setenv("ASSISTANT_HUB_DOWNLOAD", "true")
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("ASSISTANT_LORA_ENSURE_ON_DEMAND", "false")
    r = CliRunner().invoke(app, ["lora", "--baseModel", "acme/absent", "--minCurated", "0"])
    assert r.exit_code == 2 and "Base model 'acme/absent' could not be fetched: no network here" in r.output, r.output
    # one fetch, after the cache was asked (the profile asks it too: is the base a mixture of experts?)
    assert asked[-1] == ("acme/absent", False) and set(asked[:-1]) == {("acme/absent", True)}, asked


@pytest.mark.parametrize(
    ("lost", "said"),
    [
        ("adapter_model.safetensors", r"its files are missing under data/adapters \(adapter_model.safetensors\)"),
        ("adapter_config.json", r"its files are missing under data/adapters \(adapter_config.json\)"),
        ("", r"its files are damaged \(adapter_model.safetensors is cut short or not safetensors\)"),  # not gone
    ],
)
def test_a_flow_whose_active_version_lost_its_files_trains_a_new_one(settings, tiny, lost, said):
    """Backup repro: with only data/adapters restored from an older backup, the active version's files were gone;
    `luna` (and `--retrain`) failed at its first step, before any training, with "The files of luna-adapter@v2
    are missing …; train it again", which is what the failing command was for. The first step has nothing to
    judge then and says so; the run trains, and its version is judged and made active. A version named with
    --adapter is still refused."""
    from lunatrain import store

    store.load_seed(settings)
    assert CliRunner().invoke(app, ["luna", "--local", *FAST]).exit_code == 0
    weights = settings.adapters_dir / "luna-adapter" / "v1" / "adapter_model.safetensors"
    if lost:
        (weights.parent / lost).unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    r = CliRunner().invoke(app, ["luna", "--local", *FAST])
    assert r.exit_code == 0, r.output
    assert re.search(
        rf"^eval-gate +ok .*luna-adapter@v1 is active, but {said}: "
        r"nothing to judge before this run, which trains a new version$",
        r.output,
        re.M,
    ), r.output
    assert _versions(settings) == ["v1", "v2"]
    assert registry.get_version(settings, "luna-adapter", "active")["version"] == "v2"
    named = CliRunner().invoke(app, ["eval-gate", "--adapter", "luna-adapter@v1"])
    assert named.exit_code == 1 and "train it again" in named.output, named.output
    store.dispose_stores()


def test_a_flow_stopped_by_its_preflight_on_a_fresh_root_does_not_say_there_is_no_export(settings, tiny):
    """Tier repro: on a data root without an export, a `luna` stopped by prepare printed "note no export: losses
    on val/test were not measured" under its own "export ok" row: the first step's gate ran before the export."""
    from lunatrain import store

    store.load_seed(settings)
    r = CliRunner().invoke(app, ["luna", "--local", "--minCurated", "100000", *FAST])
    assert r.exit_code == 1 and re.search(r"^export +ok ", r.output, re.M), r.output
    assert "no export" not in r.output, r.output
    store.dispose_stores()
