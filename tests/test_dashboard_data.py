"""The dashboard's error paths in a real headless Chromium against a real `lunatrain serve` (no training): what
the data panel, the job panel and the adapter table say when an answer fails and once the next one succeeds,
a threshold the data panel cannot use, and server codes said in the page's language. Server errors are the
server's own, or an answer replaced on the way (`page.route`), which also stands in for a job or an adapter.

Run: `.venv/bin/python -m pytest tests/test_dashboard_data.py -q` (needs /usr/bin/chromium).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# The dashboard tests' marks (slow, needs Chromium), its browser and page fixtures and helpers.
from test_dashboard import browser, expect, hold_first_answer, open_page, page, pytestmark, shot, tabs  # noqa: F401

from dashboard_helpers import Services, running_services

NO_EVENTS = {"data": [], "lastSeq": 0, "hasMore": False}  # a job's event page with nothing in it


def answer(page, pattern: str, body: object, status: int = 200) -> None:
    """Requests matching `pattern` are answered with `body` as JSON, on the way, instead of by the server."""
    page.route(
        pattern, lambda route: route.fulfill(status=status, content_type="application/json", body=json.dumps(body))
    )


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with running_services(tmp_path_factory.mktemp("data-home")) as svc:
        yield svc


def test_a_successful_export_clears_the_errors_it_made_stale(page, services: Services, output_dir: Path) -> None:
    open_page(page, services)
    alerts = page.locator("#alerts .message")
    # Preflight before any export: the server refuses (nothing to check yet).
    page.get_by_role("button", name="Preflight (prepare)").click()
    expect(alerts.filter(has_text="Preflight (prepare)")).to_have_count(1)
    # in the page's language (it showed the server's English sentence), naming the folder
    expect(alerts.filter(has_text="Preflight (prepare)")).to_contain_text("Noch kein Export in /")
    expect(alerts.filter(has_text="No export found")).to_have_count(0)
    # The first export fails with a server error, the second goes through.
    failed = {"n": 0}

    def fail_once(route) -> None:
        if failed["n"]:
            route.continue_()
            return
        failed["n"] += 1
        body = {"error": {"code": "internal_error", "message": "disk full"}}
        route.fulfill(status=500, content_type="application/json", body=json.dumps(body))

    page.route("**/assistant/training/export", fail_once)
    export = page.get_by_role("button", name="Exportieren")
    export.click()
    expect(alerts.filter(has_text="disk full")).to_have_count(1)
    export.click()
    expect(page.locator("#notices")).to_contain_text("Export fertig")
    shot(page, output_dir, "1-export-after-failure")
    # Neither the export's failure nor "no export yet" is true any more.
    expect(alerts).to_have_count(0)


def test_an_invalid_threshold_is_marked_and_not_sent(page, services: Services, output_dir: Path) -> None:
    open_page(page, services)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/assistant/training/prepare" in r.url else None)
    threshold = page.get_by_label("Mindestanzahl kuratierter Beispiele (minCurated)")
    threshold.fill("-5")
    page.get_by_role("button", name="Preflight (prepare)").click()
    expect(threshold).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#data-min-curated-error")).to_have_text("Erlaubt: ganze Zahl von 0 bis 10.000.000.")
    expect(threshold).to_be_focused()
    shot(page, output_dir, "1-invalid-threshold")
    # A valid value clears the mark and is what the next preflight asks with.
    threshold.fill("3")
    expect(threshold).not_to_have_attribute("aria-invalid", "true")
    with page.expect_request("**/assistant/training/prepare") as asked:
        page.get_by_role("button", name="Preflight (prepare)").click()
    assert json.loads(asked.value.post_data or "{}")["minCurated"] == 3
    assert len(sent) == 1, sent


def test_the_preflight_checks_the_job_the_training_form_would_start(page, services: Services) -> None:
    """Explore repro: the preflight button sent only minCurated, so its step estimate and memory plan were the
    profile's job, not the form's: 4-bit weights, a batch size or an epoch count typed there changed
    nothing. It sends the form's run parameters (not the job's own minCurated and gate: the data panel's
    threshold is the one it checks), and says so."""
    open_page(page, services)
    page.get_by_label("Epochen").fill("2")
    page.get_by_label("Batchgröße").fill("3")
    page.locator("#lora-form details.advanced summary").click()
    page.get_by_label("Basismodell quantisieren (QLoRA)").select_option("4bit")
    button = page.get_by_role("button", name="Preflight (prepare)")
    expect(button).to_have_accessible_description(re.compile("Trainingsformular"))
    with page.expect_request("**/assistant/training/prepare") as asked:
        button.click()
    sent = json.loads(asked.value.post_data or "{}")
    assert (sent["epochs"], sent["batchSize"], sent["quantize"]) == (2, 3, "4bit"), sent
    assert "gate" not in sent and sent["minCurated"] == 30, sent
    # Review repro: Start resolved the fields the form lacks (targetModules, chatTemplate) from the library
    # defaults and the preflight from the luna profile, and a field cleared in the form was left out, so the
    # preflight took the profile's value for it. Both name the profile the form shows, and send a cleared
    # field as null.
    page.locator("#f-maxSteps").fill("")
    answer(page, "**/assistant/training/lora/start", {"error": {"code": "x", "message": "no"}}, status=503)
    with page.expect_request("**/assistant/training/prepare") as asked:
        button.click()
    with page.expect_request("**/assistant/training/lora/start") as started:
        page.locator("#start-button").click()
    checked, start = (json.loads(r.value.post_data or "{}") for r in (asked, started))
    assert checked["maxSteps"] is None and start["maxSteps"] is None, (checked, start)
    assert checked.get("profile", "luna") == start["profile"] == "luna", (checked, start)
    run = {k: v for k, v in start.items() if k not in ("minCurated", "gate")}
    assert run == {k: v for k, v in checked.items() if k != "minCurated"} | {"profile": "luna"}
    # a field the form refuses is marked there, and nothing is sent
    page.get_by_label("Epochen").fill("0")
    sent_later: list[str] = []
    page.on("request", lambda r: sent_later.append(r.url) if "/assistant/training/prepare" in r.url else None)
    button.click()
    expect(page.get_by_label("Epochen")).to_have_attribute("aria-invalid", "true")
    assert sent_later == []


def test_a_job_poll_error_is_cleared_once_the_polls_answer_again(page, services: Services, output_dir: Path) -> None:
    # The trainer's answers for one running job, replaced on the way: the first poll of the job fails with a
    # bare 500 (a proxy's page, no JSON); the next one, held until the test has seen the error, says the job
    # succeeded.
    job = {"id": "ftjob-review", "status": "running", "progress": {"step": 1, "totalSteps": 4, "percent": 25}}
    done = job | {"status": "succeeded", "progress": {"step": 4, "totalSteps": 4, "percent": 100}}
    polls = {"n": 0}
    held: list = []

    def trainer(route) -> None:
        if "jobId=" not in route.request.url:  # the page's "latest job" on load
            route.fulfill(status=200, content_type="application/json", body=json.dumps(job))
            return
        polls["n"] += 1
        if polls["n"] == 1:
            route.fulfill(status=500, content_type="text/html", body="<h1>oops</h1>")
            return
        held.append(route)

    page.route("**/assistant/training/lora/status*", trainer)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services)
    alerts = page.locator("#alerts .message")
    expect(alerts).to_have_count(1)
    expect(alerts).to_contain_text("500")
    for _ in range(300):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the page did not poll the job again"
    held.pop().fulfill(status=200, content_type="application/json", body=json.dumps(done))
    expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded")
    shot(page, output_dir, "1-job-after-poll-error")
    # The failed poll is history: the job's panel answers again and says how it ended.
    expect(alerts).to_have_count(0)


@pytest.mark.parametrize(
    ("query", "said"), [("", "Training beendet (abgebrochen)"), ("?lang=en", "Training ended (cancelled)")]
)
def test_the_last_log_line_names_the_jobs_state_in_the_pages_language(
    page, services: Services, query: str, said: str
) -> None:
    # A cancelled job as the trainer reports it (its answers replaced on the way): its last log line is the
    # trainer's "training ended" with the state as a code.
    job = {"id": "ftjob-ended", "status": "cancelled", "progress": {"step": 2, "totalSteps": 4, "percent": 50}}
    ended = {
        "seq": 1,
        "type": "log",
        "message": "training cancelled: ",
        "code": "log.training_ended",
        "params": {"status": "cancelled", "message": ""},
    }
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": [ended], "lastSeq": 1, "hasMore": False})
    open_page(page, services, query)
    expect(page.locator("#job-facts")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "said"),
    [("", "Epoche 2 fertig: Val-Loss 7,9415, Checkpoint gespeichert"), ("?lang=en", "val loss 7.9415, checkpoint")],
)
def test_the_last_log_line_gives_a_loss_its_four_decimals(page, services: Services, query: str, said: str) -> None:
    """German-page explore repro: "Letzte Meldung" said "Val-Loss 7,942" where the job's facts and the server's
    sentence say 7,9415: a loss in a log line was given four significant digits instead of four decimals."""
    job = {"id": "ftjob-epoch", "status": "running", "progress": {"step": 2, "totalSteps": 4, "percent": 50}}
    done = {
        "seq": 1,
        "type": "log",
        "message": "epoch 2 done: val loss 7.9415, checkpoint saved",
        "code": "log.epoch_done",
        "params": {"epoch": 2, "valLoss": 7.941538},
    }
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": [done], "lastSeq": 1, "hasMore": False})
    open_page(page, services, query)
    expect(page.locator("#job-facts")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "samples", "steps", "said"),
    [
        ("", 1, 1, "Training: 1 Beispiel, 1 Schritt auf CPU"),
        ("", 40, 1, "Training: 40 Beispiele, 1 Schritt auf CPU"),
        ("?lang=en", 1, 3, "Training 1 sample, 3 steps on CPU"),
    ],
)
def test_a_log_line_counting_two_things_says_each_in_its_number(page, services, query, samples, steps, said) -> None:
    """German-page explore repro: a job of one step logged "Training: 40 Beispiele, 1 Schritte auf CPU" (a text
    counting two things had one wording for both); each noun is said in its own number."""
    job = {"id": "ftjob-one", "status": "running", "progress": {"step": 0, "totalSteps": steps, "percent": 0}}
    started = {
        "seq": 1,
        "type": "log",
        "message": "training …",
        "code": "log.training_started",
        "params": {"samples": samples, "steps": steps, "device": "cpu"},
    }
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": [started], "lastSeq": 1, "hasMore": False})
    open_page(page, services, query)
    expect(page.locator("#job-facts")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "long", "short"),
    [("", "~25 h 1 min auf CUDA", "~1 min 28 s auf CPU"), ("?lang=en", "~25 h 1 min on CUDA", "~1 min 28 s on CPU")],
    ids=["de", "en"],
)
def test_the_preflight_estimate_is_said_in_its_units(page, services: Services, query, long, short) -> None:
    """Numbers repro: the estimate was always seconds, to four significant digits: "~90,060 s" for a 25-hour
    run, where the command line said "~25.0h"."""

    def estimate(steps: int, seconds: float, device: str) -> dict:
        params = {"steps": steps, "seconds": seconds, "device": device}
        return {
            "id": "estimate",
            "severity": "info",
            "count": steps,
            "code": "check.estimate.computed",
            "params": params,
        }

    report = {"status": "ok", "checks": [estimate(90_000, 90061.5, "cuda"), estimate(40, 87.5, "cpu")]}
    answer(page, "**/assistant/training/prepare*", report)
    open_page(page, services, query)
    page.locator("#prepare-button").click()
    rows = page.locator("#checks-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text(long)
    expect(rows.nth(1)).to_contain_text(short)


def test_a_crashed_job_is_said_in_german_whole(page, services: Services, tmp_path: Path) -> None:
    """Cross-surface repro: a job whose training process was killed showed "Fehler: Der Trainingsprozess ist
    abgestürzt: The training process was killed by SIGKILL (often the system's out-of-memory killer); last log
    line: …": the error had no params to say it with. The trainer's own error, as it records it."""
    import signal

    from lunatrain.service.runner import _crash_error

    log = tmp_path / "data" / "trainer" / "logs" / "ftjob-crashed.log"
    log.parent.mkdir(parents=True)
    log.write_text("epoch 1 done: val loss 7.8748, checkpoint saved\n")
    error = _crash_error(-signal.SIGKILL, log, log.relative_to(tmp_path))
    error["params"]["resumeJob"] = "ftjob-crashed"  # what the runner adds after a checkpoint
    progress = {"step": 480, "totalSteps": 482, "percent": 99.59}
    job = {"id": "ftjob-crashed", "status": "failed", "progress": progress, "error": error}
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services)
    expect(page.locator("#job-error")).to_have_text(
        "Fehler: Der Trainingsprozess ist abgestürzt: von SIGKILL beendet (oft der Speicherwächter des Systems, wenn "
        "der Arbeitsspeicher ausgeht); siehe data/trainer/logs/ftjob-crashed.log; letzte Logzeile: „epoch 1 done: val "
        "loss 7.8748, checkpoint saved“. `lunatrain jobs resume ftjob-crashed` setzt ihn ab dem letzten Checkpoint "
        'fort (in der API: seine Parameter mit "resume": true erneut senden).'
    )
    expect(page.locator("#job-percent")).to_have_text("99 %")  # numbers repro: it said 100 % at step 480 of 482


@pytest.mark.parametrize(
    ("query", "diverged", "interrupted", "stale"),
    [
        (
            "",
            "Fehler: Der Loss wurde ungültig (NaN/unendlich) bei Schritt 1: die Lernrate senken oder die Daten prüfen",
            "Fehler: Der Trainingsprozess wurde vorzeitig beendet bei Schritt 128 von 1.550. `lunatrain jobs resume "
            'ftjob-cut` setzt ihn ab dem letzten Checkpoint fort (in der API: seine Parameter mit "resume": true '
            "erneut senden).",
            "Prüfung nicht bestanden: 1 Beispiel im Export wurde seitdem gelöscht; neu exportieren",
        ),
        (
            "?lang=en",
            "Error: The loss became invalid (NaN/infinite) at step 1: lower the learning rate or check the data",
            "Error: The training process stopped early at step 128 of 1,550. `lunatrain jobs resume ftjob-cut` "
            'continues it from its last checkpoint (in the API: submit its parameters again with "resume": true).',
            "1 sample in the export was deleted since; export again",
        ),
    ],
    ids=["de", "en"],
)
def test_a_diverged_an_interrupted_job_and_a_stale_export_are_said_whole_in_the_pages_language(
    page, services: Services, query: str, diverged: str, interrupted: str, stale: str
) -> None:
    """German-page explore repros: a diverged job said "Der Loss wurde ungültig (NaN/unendlich): gradient norm
    became nan at step 1; lower the learning rate …" (the error had no params); an interrupted job said only
    "Der Trainingsprozess wurde vorzeitig beendet", without its step or how to resume it (the resume hint was in
    the English sentence alone); Start on an export holding deleted content was refused in English. The errors
    as their producers make them."""
    from lunatrain.train import _diverged

    stop = _diverged("gradient norm", float("nan"), 1)
    cut = {"code": "interrupted", "message": "Stopped at step 128 of 1550: …"}
    cut["params"] = {"step": 128, "totalSteps": 1550, "epochsDone": 4, "resumeJob": "ftjob-cut"}  # the runner's
    jobs = {
        "ftjob-nan": {"code": stop.code, "message": stop.message, "params": stop.params},
        "ftjob-cut": cut,
    }
    error = {  # as export.refuse_withdrawn raises it (test_stale.py)
        "code": "check_failed",
        "message": "The export holds 1 sample deleted since it was written; run `lunatrain export` first, …",
        "params": {"check": "check.export_stale.deleted", "count": 1, "deleted": 1, "rejected": 0},
    }
    answer(page, "**/assistant/training/lora/start", {"error": error}, status=409)
    for job_id, job_error in jobs.items():
        job = {"id": job_id, "status": "failed", "progress": {"step": 1, "totalSteps": 4}, "error": job_error}
        answer(page, "**/assistant/training/lora/status*", job)
        answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
        open_page(page, services, query)
        expect(page.locator("#job-error")).to_have_text(diverged if job_id == "ftjob-nan" else interrupted)
    page.locator("#start-button").click()
    expect(page.locator("#alerts")).to_contain_text(stale)


@pytest.mark.parametrize(
    ("query", "said"),
    [("", "Fehler: Der Loss wurde ungültig (NaN/unendlich)"), ("?lang=en", "Error: The loss became invalid")],
)
def test_a_failed_job_says_why_in_the_pages_language(page, services: Services, query: str, said: str) -> None:
    # A job the trainer ended `failed`: the panel names its error (translated by its code), not only the state.
    job = {
        "id": "ftjob-failed",
        "status": "failed",
        "progress": {"step": 1, "totalSteps": 4, "percent": 25},
        "error": {"code": "nan_loss", "message": "loss became nan at step 2"},
    }
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services, query)
    expect(page.locator("#job-error")).to_be_visible()
    expect(page.locator("#job-error")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "Daten: Der Server hat mit HTTP 502 ohne Begründung geantwortet."),
        ("?lang=en", "Data: The server answered HTTP 502 without saying why."),
    ],
)
def test_an_error_page_without_a_message_is_said_in_the_pages_language(
    page, services: Services, query: str, said: str
) -> None:
    # A proxy's error page in front of the API: no JSON, only a status line whose reason phrase is English.
    page.route(
        "**/assistant/training/status*",
        lambda route: route.fulfill(status=502, content_type="text/html", body="<h1>Bad Gateway</h1>"),
    )
    open_page(page, services, query)
    expect(page.locator("#alerts .message-text")).to_have_text(said)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "Adapter: Die Adapter-Registry reports/training/lora-adapters.json kann nicht gelesen werden (a folder "
             "stands in its place); sie bleibt unverändert: `lunatrain adapters repair` baut sie aus den "
             "Adapter-Ordnern neu auf"),
        ("?lang=en", "Adapters: The adapter registry reports/training/lora-adapters.json cannot be read (a folder "
                     "stands in its place); it was left untouched: `lunatrain adapters repair` rebuilds it from the "
                     "adapter folders"),
    ],
)  # fmt: skip
def test_an_unreadable_registry_is_said_once_in_the_pages_language(page, services: Services, query, said) -> None:
    """Corruption repro: the Adapter panel's banner put its label's sentence before the server's English one,
    which says the same ("… cannot be read; it was left untouched (…): The adapter registry … cannot be read
    …"), in German too. The error carries its path and reason: one sentence, in the page's language."""
    from lunatrain.registry import _unreadable

    err = _unreadable(Path("reports/training/lora-adapters.json"), "a folder stands in its place")
    body = {"error": {"code": err.code, "message": err.message, "params": err.params}}
    answer(page, "**/assistant/training/adapters", body, status=503)
    open_page(page, services, query)
    banner = page.locator("#alerts .message-text").filter(has_text="adapters repair")
    expect(banner.first).to_have_text(said)
    # and the panel is no heading alone (corruption repro): it says its list could not be read
    expect(page.locator("#adapters-unreadable")).to_be_visible()
    expect(page.locator("#adapters-empty")).to_be_hidden()


def test_a_refused_activation_gives_the_keyboard_back_its_button(page, services: Services) -> None:
    # One trained version in the registry and a server that fails to activate it (answers replaced on the way).
    version = {"version": "v1", "created": "2026-01-01T00:00:00Z", "metrics": {"valLoss": 1.5, "baseValLoss": 2.0}}
    table = {
        "bases": [
            {"baseModel": "luna-tiny", "adapters": [{"name": "luna-adapter", "aliases": {}, "versions": [version]}]}
        ]
    }
    answer(page, "**/assistant/training/adapters", table)
    failure = {"error": {"code": "internal_error", "message": "registry locked"}}
    answer(page, "**/assistant/training/adapters/*/activate", failure, status=500)
    open_page(page, services)
    activate = page.get_by_role("button", name="luna-adapter v1 aktivieren")
    activate.focus()
    page.keyboard.press("Enter")
    page.get_by_role("button", name="Bestätigen").press("Enter")
    expect(page.locator("#alerts .message", has_text="registry locked")).to_be_visible()
    # Keyboard users stay where they were, on the button they can press again, not back at the page's start.
    expect(activate).to_be_enabled()
    expect(activate).to_be_focused()


def test_cancel_keeps_the_keyboard_in_the_job_panel(page, services: Services) -> None:
    # A running job and a trainer that accepts its cancel (answers replaced on the way); the job stays in
    # "cancelling", so the pressed button stays disabled.
    job = {"id": "ftjob-cancel", "status": "running", "progress": {"step": 1, "totalSteps": 400, "percent": 0.25}}
    cancelling = job | {"status": "cancelling"}
    page.route(
        "**/assistant/training/lora/status*",
        lambda route: route.fulfill(
            status=200,
            content_type="application/json",
            body=json.dumps(cancelling if "jobId=" in route.request.url else job),
        ),
    )
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    answer(page, "**/assistant/training/lora/jobs/*/cancel", cancelling)
    open_page(page, services)
    cancel = page.get_by_role("button", name="Abbrechen")
    cancel.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#notices")).to_contain_text("Abbruch von Job ftjob-cancel angefordert")
    expect(cancel).to_be_disabled()
    # The disabled button cannot hold the focus: the job's panel does, not the page's start.
    expect(page.locator("#job-heading")).to_be_focused()


@pytest.mark.parametrize(
    ("status", "content_type", "body", "said"),
    [
        # a bare status page: the sentence names the status, so the prefix does not name it again
        (
            500,
            "text/html",
            "<h1>Internal Server Error</h1>",
            "Fehler: Der Server hat mit HTTP 500 ohne Begründung geantwortet.",
        ),
        # a refusal with a message of its own: the prefix names the status the message does not
        (
            503,
            "application/json",
            json.dumps({"error": {"code": "odd_case", "message": "Gerade nicht."}}),
            "Fehler (503): Gerade nicht.",
        ),
    ],
)
def test_an_error_names_its_http_status_once(page, services: Services, status, content_type, body, said) -> None:
    """Repro: a start answered by a bare 500 said "Fehler (500): Der Server hat mit HTTP 500 ohne Begründung
    geantwortet." — the status twice."""
    page.route(
        "**/assistant/training/lora/quick-start",
        lambda route: route.fulfill(status=status, content_type=content_type, body=body),
    )
    open_page(page, services)
    page.get_by_role("button", name="Schnellstart").click()
    expect(page.locator("#alerts .message-text")).to_have_text(said)


@pytest.mark.parametrize(
    ("query", "button", "said"),
    [
        (
            "",
            "Beispiel-Adapter",
            "Fehler (503): Trainer nicht erreichbar: Der Trainer läuft nicht, und der Start bei Bedarf ist aus "
            "(ASSISTANT_LORA_ENSURE_ON_DEMAND=false); oben „Trainer starten“ wählen oder `lunatrain trainer` ausführen.",
        ),
        (
            "?lang=en",
            "Example adapter",
            "Error (503): Trainer not reachable: The trainer is not running and starting it on demand is off",
        ),
    ],
    ids=["de", "en"],
)
def test_a_trainer_not_started_on_demand_is_said_in_the_pages_language(
    page, services: Services, dead_port: int, tmp_path: Path, query: str, button: str, said: str
) -> None:
    """Guide repro (ASSISTANT_LORA_ENSURE_ON_DEMAND=false, as the guide's §8 recommends): the German page said
    "Fehler (503): Trainer nicht erreichbar: The trainer for … is not reachable and starting it on demand is off
    …" — the server's English sentence after a German label. The refusal is the API's own (on demand off)."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app
    from lunatrain.settings import load_settings

    off = load_settings(
        home=tmp_path / "off", lora_ensure_on_demand=False, lora_trainer_url=f"http://127.0.0.1:{dead_port}"
    )
    with TestClient(create_app(off), base_url="http://127.0.0.1") as client:
        refused = client.post("/assistant/training/lora/example-adapter")
    assert refused.status_code == 503, refused.text
    answer(page, "**/assistant/training/lora/example-adapter", refused.json(), status=503)
    open_page(page, services, query)
    page.get_by_role("button", name=button, exact=True).click()
    expect(page.locator("#alerts .message-text")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "button", "said"),
    [
        ("", "Schnellstart", "nur Adaptername, Datensatz und Basismodell"),
        ("?lang=en", "Quick start", "only the adapter name"),
    ],
)
def test_quick_start_says_which_fields_of_the_form_it_takes(page, services: Services, query, button, said) -> None:
    """Repro: quick start took three fields of the form and ignored the rest (epochs, rank, …) without a word;
    the button's description now says so, in the page's language."""
    open_page(page, services, query)
    expect(page.get_by_role("button", name=button, exact=True)).to_have_accessible_description(re.compile(said))


@pytest.mark.parametrize(
    ("query", "said"),
    [("", "t1 v1 · neu trainieren · Dateien fehlen"), ("?lang=en", "t1 v1 · retrain needed · files missing")],
)
def test_a_stale_active_adapter_says_retrain_needed_in_the_data_panel(page, services: Services, query, said) -> None:
    """Repro: after deleting examples the active adapter was trained on, the adapter table marked it "neu
    trainieren" but the data panel's "Aktiver Adapter" named it as if it were current. Status explore repro:
    the same for an active adapter whose files are gone, which `lunatrain status` marks."""

    def stale_active(route) -> None:
        status = route.fetch().json()
        status["activeAdapter"] = {
            "name": "t1",
            "version": "v1",
            "baseModel": "luna-tiny",
            "stale": True,
            "filesMissing": True,
        }
        route.fulfill(json=status)

    page.route("**/assistant/training/status*", stale_active)
    open_page(page, services, query)
    expect(page.locator("#data-facts")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "Auch aktiv\nmixa v1 · neu trainieren; old v3 (auf Qwen/Qwen2.5-0.5B)"),
        ("?lang=en", "Also active\nmixa v1 · retrain needed; old v3 (on Qwen/Qwen2.5-0.5B)"),
    ],
)
def test_every_active_adapter_is_named_in_the_data_panel(page, services: Services, query, said) -> None:
    """Forget and dashboard-scale repro: with two adapters active on the configured base (the state in which
    `eval-gate` refuses to pick one) and one active on another base, the data panel named one; `lunatrain status`
    says "also active: …" for the others, one of them stale."""
    active = {"name": "luna-adapter", "version": "v2", "baseModel": "luna-tiny", "matchesBaseModel": True}
    others = [
        {"name": "mixa", "version": "v1", "baseModel": "luna-tiny", "matchesBaseModel": True, "stale": True},
        {"name": "old", "version": "v3", "baseModel": "Qwen/Qwen2.5-0.5B", "matchesBaseModel": False},
    ]

    def several(route) -> None:
        route.fulfill(json=route.fetch().json() | {"activeAdapter": active, "activeAdapters": [active, *others]})

    page.route("**/assistant/training/status*", several)
    open_page(page, services, query)
    facts = page.locator("#data-facts")
    expect(facts).to_contain_text("luna-adapter v2")
    assert said in facts.inner_text(), facts.inner_text()


@pytest.mark.parametrize(
    ("query", "unknown"), [("", "Aktiver Adapter\nunbekannt"), ("?lang=en", "Active adapter\nunknown")]
)
def test_a_registry_that_cannot_be_read_leaves_the_active_adapter_unknown_and_says_why(
    page, services: Services, query, unknown
) -> None:
    """Repro: with the adapter registry damaged, `lunatrain status` said "active adapter: unknown" and named the
    problem with its fix; the data panel said "Aktiver Adapter: keiner" and showed no problem at all."""
    problem = "The adapter registry reports/training/lora-adapters.json cannot be read (a folder stands in its place)"
    code = {"code": "status.registry_unreadable", "params": {"path": "reports/training/lora-adapters.json"}}

    def damaged(route) -> None:
        status = route.fetch().json()
        status |= {"activeAdapter": None, "activeAdapters": [], "activeAdaptersKnown": False}
        route.fulfill(json=status | {"problems": [problem], "problemCodes": [code]})

    page.route("**/assistant/training/status*", damaged)
    open_page(page, services, query)
    facts = page.locator("#data-facts")
    said = "kann nicht gelesen werden" if not query else "cannot be read"
    expect(facts).to_contain_text(said)  # in the page's language, from its code
    expect(facts).to_contain_text("lunatrain adapters repair")
    assert unknown in facts.inner_text()


@pytest.mark.parametrize(("query", "said"), [("", "Letzter Export\nunbekannt"), ("?lang=en", "Last export\nunknown")])
def test_an_export_whose_summary_cannot_be_read_is_no_never(page, services: Services, query, said) -> None:
    """Corruption repro: with the export summary damaged the data panel said "Letzter Export: noch keiner" right
    above "database changed since export: yes": an export exists, only its summary cannot be read."""
    path = "data/training/current/assistant-sft-summary.json"
    code = {"code": "status.export_unreadable", "params": {"path": path, "reason": "not valid JSON"}}

    def damaged(route) -> None:
        status = route.fetch().json() | {"lastExport": None}
        route.fulfill(
            json=status | {"problems": [f"The export summary {path} cannot be read."], "problemCodes": [code]}
        )

    page.route("**/assistant/training/status*", damaged)
    open_page(page, services, query)
    facts = page.locator("#data-facts")
    expect(facts).to_contain_text("lunatrain export")
    assert said in facts.inner_text()


@pytest.mark.parametrize(
    ("query", "said"),
    [
        (
            "",
            "Memory: nein (der aktuelle Export hat in der Stufe Memory kein Trainingsbeispiel (alle in Val oder Test))",
        ),
        ("?lang=en", "memory: no (the current export's memory tier has no train sample (all are in val or test))"),
    ],
)
def test_a_tier_that_is_not_ready_says_why_in_the_data_panel(page, services: Services, query, said) -> None:
    """Tier repro: the data panel said only "Memory: nein" where the command line and the API say why."""

    def tiers(route) -> None:
        status = route.fetch().json()
        why = {"code": "tier.no_train_sample", "params": {"tier": "memory"}, "reason": "English"}
        status["tiers"] = {"memory": {"approved": 2, "ready": False} | why}
        route.fulfill(json=status)

    page.route("**/assistant/training/status*", tiers)
    open_page(page, services, query)
    expect(page.locator("#data-facts")).to_contain_text(said)


def test_bidi_controls_in_a_sample_are_shown_as_escapes_and_right_to_left_cases_keep_their_direction(
    page, services: Services
) -> None:
    """Unicode explore repros: a U+202E in a user's answer turned the rest of the line around in the preflight's
    sample, so the template's own terminator read `<|dne_mi|>` in the one view meant to check it (`prepare
    --show` writes `\\u202e`); an Arabic golden case's button was laid out left to right."""
    pieces = [
        {"text": "<|im_start|>user\nHallo \u202eWelt<|im_end|>\n<|im_start|>assistant\n", "trained": False},
        {"text": "Gut \u202edanke\u2066!<|im_end|>", "trained": True},
    ]
    report = {"status": "ok", "checks": [], "samples": [{"tokens": 20, "trainedTokens": 8, "pieces": pieces}]}
    answer(page, "**/assistant/training/prepare", report)
    answer(
        page,
        "**/assistant/chat/examples",
        {"examples": [{"id": "ar", "prompt": "مرحبا كيف حالك؟ Luna 123", "lang": "ar", "messages": []}]},
    )
    open_page(page, services, "?lang=en")
    page.locator("#prepare-button").click()
    sample = page.locator("#sample-text")
    expect(sample.locator("mark.trained")).to_have_text("Gut \\u202edanke\\u2066!<|im_end|>")
    expect(sample.locator(".unseen")).to_have_text(["\\u202e", "\\u202e", "\\u2066"])
    assert "\u202e" not in sample.text_content() and "\u2066" not in sample.text_content()
    page.locator("#try").scroll_into_view_if_needed()  # the panel asks for its examples once it is seen
    expect(page.locator("#try-example-list button")).to_have_attribute("dir", "auto")
    for box in ("#try-prompt", "#try-base", "#try-adapter"):
        expect(page.locator(box)).to_have_attribute("dir", "auto")


@pytest.mark.parametrize(
    ("query", "step", "repeat"),
    [
        ("", "~1 Optimierungsschritt,", "(1 davon in einem anderen Teil als das Beispiel, das es doppelt"),
        ("?lang=en", "~1 optimizer step,", "(1 of them in another split than the sample it repeats"),
    ],
    ids=["de", "en"],
)
def test_one_step_and_one_repeat_across_splits_are_said_in_the_singular(
    page, services: Services, query: str, step: str, repeat: str
) -> None:
    """German-page explore repros: "~1 Optimierungsschritte" for a run of one step, and "(1 davon in einem anderen
    Teil als das Beispiel, das sie doppeln …)" for one near-duplicate across splits."""
    estimate = {"id": "estimate", "severity": "info", "count": 1, "message": "~1 optimizer step, …"}
    estimate |= {"code": "check.estimate.computed", "params": {"steps": 1, "seconds": 0.4, "device": "cpu"}}
    twin = {"id": "duplicate_normalized", "severity": "warn", "count": 1, "examples": ["ex-2"], "message": "…"}
    twin |= {"code": "check.duplicate_normalized.found", "params": {"count": 1, "acrossSplits": 1}}
    answer(page, "**/assistant/training/prepare", {"status": "warn", "checks": [twin, estimate]})
    open_page(page, services, query)
    page.locator("#prepare-button").click()
    rows = page.locator("#checks-table tbody tr")
    expect(rows.nth(0)).to_contain_text(repeat)
    expect(rows.nth(1)).to_contain_text(step)


def test_a_check_counting_one_record_is_said_in_the_singular(page, services: Services) -> None:
    """Repro: the preflight table said "1 Beispiele mit leerer Antwort" and "1 samples with an empty response"."""

    def check(count: int) -> dict:
        return {
            "id": "empty_response",
            "severity": "fail",
            "count": count,
            "examples": ["ex-1", "ex-2"][:count],
            "message": "server sentence",
            "code": "check.empty_response.found",
            "params": {"count": count},
        }

    for query, one, two in (
        ("", "1 Beispiel mit leerer Antwort", "2 Beispiele mit leerer Antwort"),
        ("?lang=en", "1 sample with an empty response", "2 samples with an empty response"),
    ):
        page.unroute("**/assistant/training/prepare")
        answer(page, "**/assistant/training/prepare", {"status": "fail", "checks": [check(1), check(2)]})
        open_page(page, services, query)
        page.locator("#prepare-button").click()
        rows = page.locator("#checks-table tbody tr")
        expect(rows.nth(0)).to_contain_text(one)
        expect(rows.nth(1)).to_contain_text(two)
        # Repro: the table named no record to fix, while the CLI and the report list them.
        expect(rows.nth(0).locator(".check-examples")).to_have_text(" (ex-1)")
        expect(rows.nth(1).locator(".check-examples")).to_have_text(" (ex-1, ex-2)")


@pytest.mark.parametrize(
    ("query", "typed", "steps"),
    [("", "10.000", 10_000), ("", "10000", 10_000), ("?lang=en", "10,000", 10_000), ("?lang=en", "10000", 10_000)],
)
def test_a_whole_number_with_thousands_separators_is_read_in_the_pages_locale(
    page, services: Services, query: str, typed: str, steps: int
) -> None:
    """Repro: the hint writes "1 bis 1.000.000"; typing "10.000" into Max. Schritte as the hint writes it sent
    maxSteps 10 (the dot read as a decimal point), and "10,000" on the English page did the same."""
    page.route(
        "**/assistant/training/lora/start",
        lambda route: route.fulfill(
            status=503, content_type="application/json", body=json.dumps({"error": {"code": "x", "message": "no"}})
        ),
    )
    open_page(page, services, query)
    page.locator("#f-maxSteps").fill(typed)
    with page.expect_request("**/assistant/training/lora/start") as asked:
        page.locator("#start-button").click()
    assert json.loads(asked.value.post_data or "{}")["maxSteps"] == steps


@pytest.mark.parametrize(("query", "typed"), [("", "1,000"), ("?lang=en", "1.000"), ("", "3.5"), ("?lang=en", "1,5")])
def test_a_whole_number_with_a_separator_it_cannot_mean_is_refused(page, services: Services, query, typed) -> None:
    """A separator the page's locale does not group with is a decimal mark: "1,000" on the German page is one,
    not a thousand, and is said to be no whole number rather than sent as 1."""
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/lora/start" in r.url else None)
    open_page(page, services, query)
    page.locator("#f-epochs").fill(typed)
    page.locator("#start-button").click()
    expect(page.locator("#f-epochs")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-epochs-error")).to_have_text(
        "Bitte eine ganze Zahl eingeben." if not query else "Please enter a whole number."
    )
    assert sent == []


@pytest.mark.parametrize(
    ("query", "said"),
    [("", "12.345 Beispiele mit leerer Antwort"), ("?lang=en", "12,345 samples with an empty response")],
)
def test_a_large_count_in_a_server_message_is_said_exactly(page, services: Services, query: str, said: str) -> None:
    """Repro: numbers in a server message were rounded to four significant digits, so a check counting 12345
    records said "12.350 Beispiele mit leerer Antwort"."""
    check = {
        "id": "empty_response",
        "severity": "fail",
        "count": 12345,
        "examples": ["ex-1"],
        "message": "server sentence",
        "code": "check.empty_response.found",
        "params": {"count": 12345},
    }
    answer(page, "**/assistant/training/prepare", {"status": "fail", "checks": [check]})
    open_page(page, services, query)
    page.locator("#prepare-button").click()
    expect(page.locator("#checks-table tbody tr").first).to_contain_text(said)
    expect(page.locator("#checks-table .check-examples")).to_have_text(" (ex-1, …)")  # more than it lists


@pytest.mark.parametrize(
    ("query", "said"),
    [("", "Mit inzwischen gelöschten Inhalten trainiert"), ("?lang=en", "Trained on content deleted since")],
)
def test_the_retrain_badge_explains_itself_in_the_pages_language(page, services: Services, query, said) -> None:
    """Repro: the "neu trainieren" badge's tooltip was the registry's English sentence ("trained on a deleted
    example") on the German page too."""
    version = {
        "version": "v1",
        "created": "2026-01-01T00:00:00Z",
        "metrics": {"valLoss": 1.5, "baseValLoss": 2.0},
        "stale": {"reason": "trained on a deleted example", "hashes": ["abc"], "at": "2026-01-02T00:00:00Z"},
    }
    table = {
        "bases": [
            {"baseModel": "luna-tiny", "adapters": [{"name": "luna-adapter", "aliases": {}, "versions": [version]}]}
        ]
    }
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services, query)
    # As text beside the badge: a tooltip reaches neither keyboard, touch nor screen reader.
    expect(page.locator(".badge-stale + .badge-note")).to_have_text(said)


@pytest.mark.parametrize(
    ("query", "badge", "why"),
    [
        ("", "Dateien fehlen", "Dateien fehlen unter data/adapters (adapter_config.json); neu trainieren"),
        ("?lang=en", "files missing", "its files are missing under data/adapters (adapter_config.json); retrain it"),
    ],
)
def test_a_version_whose_files_are_gone_is_marked_and_offers_no_activation(
    page, services: Services, query, badge, why
) -> None:
    """Repro: a version whose files were deleted by hand looked like any other; "Aktivieren" was answered by a
    404, and the active one gave no hint that it could no longer be served."""
    gone = {
        "active": False,
        "code": "adapter.files_missing",
        "reason": "its files are missing",
        "params": {"name": "a", "version": "v2", "baseModel": "luna-tiny", "missing": ["adapter_config.json"]},
    }
    active = {
        "active": True,
        "code": "adapter.active",
        "reason": "active",
        "params": {"name": "a", "version": "v1", "baseModel": "luna-tiny"},
    }
    versions = [
        {"version": "v1", "created": "2026-01-01T00:00:00Z", "metrics": {}, "state": active, "filesMissing": True},
        {"version": "v2", "created": "2026-01-02T00:00:00Z", "metrics": {}, "state": gone, "filesMissing": True},
    ]
    table = {
        "bases": [
            {
                "baseModel": "luna-tiny",
                "adapters": [{"name": "a", "aliases": {"latest": "v2", "active": "v1"}, "versions": versions}],
            }
        ]
    }
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services, query)
    for v in ("v1", "v2"):
        row = page.locator(f"tr[data-version={v}]")
        expect(row.locator(".badge-missing")).to_have_text(badge)
        expect(row.locator("button", has_text=re.compile("^(Aktivieren|Activate)$"))).to_have_count(0)
    expect(page.locator("tr[data-version=v2] .inactive-reason")).to_have_text(why)
    expect(page.locator("tr[data-version=v1] .badge-active")).to_have_count(
        1
    )  # still active: the badge says why it is not served


@pytest.mark.parametrize(("query", "tick"), [("", "10.000"), ("?lang=en", "10,000")])
def test_the_loss_charts_step_axis_writes_numbers_in_the_pages_locale(page, services: Services, query, tick) -> None:
    """Repro: the chart's step axis wrote "10000" under a job whose facts said "Schritt 12.000 / 20.000"."""
    job = {"id": "ftjob-long", "status": "running", "progress": {"step": 12_000, "totalSteps": 20_000, "percent": 60}}
    points = [
        {"seq": i + 1, "type": "progress", "step": s, "loss": 2.0 - i * 0.1} for i, s in enumerate((1, 6000, 12_000))
    ]
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": points, "lastSeq": 3, "hasMore": False})
    open_page(page, services, query)
    axis = page.locator("#loss-chart .chart-grid text")
    expect(axis.filter(has_text=re.compile(rf"^{re.escape(tick)}$"))).to_have_count(1)
    expect(axis.filter(has_text=re.compile(r"^\d{5}$"))).to_have_count(0)


def test_send_without_a_model_list_asks_for_it_again_instead_of_sending_no_model(page, services: Services) -> None:
    """Repro: when listing the models failed, "Senden" sent the message with no model and showed the server's
    "Ungültige Anfrage: model: Input should be a valid string." under the base model's column."""
    models = {"n": 0}

    def failing_models(route) -> None:
        models["n"] += 1
        body = {"error": {"code": "internal_error", "message": "model list failed"}}
        route.fulfill(status=500, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/models*", failing_models)
    chats: list[str] = []
    page.on("request", lambda r: chats.append(r.url) if "/v1/chat/completions" in r.url else None)
    open_page(page, services)
    page.locator("#try").scroll_into_view_if_needed()
    alerts = page.locator("#alerts .message")
    expect(alerts.filter(has_text="model list failed")).to_have_count(1)
    expect(page.locator("#try-model option")).to_have_count(0)  # no longer says "Wird geladen …"
    page.get_by_label("Nachricht").fill("Hallo")
    with page.expect_request("**/v1/models*"):  # the send asks for the list again
        page.get_by_role("button", name="Senden").click()
    expect(page.get_by_role("button", name="Senden")).to_be_enabled()
    expect(page.locator("#try-base-meta")).not_to_contain_text("Input should be")
    assert chats == [], chats
    # Once the list answers, the same button sends to the base model.
    page.unroute("**/v1/models*")
    with page.expect_request("**/v1/chat/completions") as asked:
        page.get_by_role("button", name="Senden").click()
    assert json.loads(asked.value.post_data or "{}")["model"] == "luna-tiny"


@pytest.mark.parametrize(
    ("button", "route", "body", "notice"),
    [
        ("Exportieren", "**/assistant/training/export", {"counts": {"merged": {"total": 5}}}, "Export fertig"),
        ("Preflight (prepare)", "**/assistant/training/prepare", {"status": "ok", "checks": []}, "Preflight"),
    ],
)
def test_a_data_action_keeps_the_keyboard_on_its_button(page, services: Services, button, route, body, notice) -> None:
    """Repro: the button was disabled while it worked, which sends the focus to the page's start; after an
    export by keyboard, the next Tab began again at "Zum Inhalt springen"."""
    answer(page, route, body)
    open_page(page, services)
    action = page.get_by_role("button", name=button, exact=True)
    action.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#notices")).to_contain_text(notice)
    expect(action).to_be_enabled()
    expect(action).to_be_focused()


def test_send_by_keyboard_keeps_the_focus_on_send(page, services: Services) -> None:
    """Repro: Send was disabled while the answers streamed, which sends the focus to the page's start; after
    the answer a keyboard user's next Tab began again at "Zum Inhalt springen"."""
    answer(
        page, "**/v1/models*", {"object": "list", "data": [{"id": "luna-tiny", "object": "model", "owned_by": "base"}]}
    )
    chunk = {"model": "luna-tiny", "choices": [{"index": 0, "delta": {"content": "Hallo!"}, "finish_reason": "stop"}]}
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        ),
    )
    open_page(page, services)
    page.locator("#try").scroll_into_view_if_needed()
    expect(page.locator("#try-base-label")).to_contain_text("luna-tiny")
    # No adapter yet: the list is disabled, and the hint that says why is what it is described by.
    choice = page.get_by_label("Adapter-Version", exact=True)
    expect(choice).to_be_disabled()
    expect(choice).to_have_accessible_description(
        "Noch kein Adapter für dieses Basismodell: erst trainieren, dann vergleichen."
    )
    page.get_by_label("Nachricht").fill("Hallo")
    send = page.get_by_role("button", name="Senden")
    send.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#try-base")).to_have_text("Hallo!")
    expect(send).to_be_enabled()
    expect(send).to_be_focused()


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "Nachrichten und max_tokens überschreiten den Kontext des Modells: der Prompt hat 3.900 Tokens, mit "
         "max_tokens 1.024, der Kontext 4.096 Tokens"),
        ("?lang=en", "Messages and max_tokens exceed the model's context: the prompt has 3,900 tokens, with "
         "max_tokens 1,024, the context 4,096 tokens"),
    ],
)  # fmt: skip
def test_a_prompt_over_the_context_is_said_with_its_numbers_in_the_pages_language(page, services, query, said):
    """German-page explore repro: the try panel said the context-length refusal as the server's English
    sentence (its numbers in English) after the German short text. It says it with the numbers it carries."""
    answer(
        page, "**/v1/models*", {"object": "list", "data": [{"id": "luna-tiny", "object": "model", "owned_by": "base"}]}
    )
    refused = {
        "message": "The prompt has 3900 tokens; with max_tokens 1024 that is over the model's context of 4096 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
        "params": {"tokens": 3900, "maxTokens": 1024, "context": 4096},
    }
    answer(page, "**/v1/chat/completions", {"error": refused}, 400)
    open_page(page, services, query)
    page.locator("#try").scroll_into_view_if_needed()
    page.locator("#try-prompt").fill("Hallo")
    page.locator("#try-send").click()
    expect(page.locator("#try-base-meta")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "typed", "said"), [("", "1.000", "mindestens 1.000"), ("?lang=en", "1,000", "least 1,000")]
)
def test_the_data_threshold_reads_a_grouped_number_in_the_pages_locale(
    page, services: Services, query, typed, said
) -> None:
    """Repro: "1.000" as the threshold asked the server with minCurated=1 ("Bereit: 273 von mindestens 1")."""
    open_page(page, services, query)
    threshold = page.locator("#data-min-curated")
    threshold.fill(typed)
    with page.expect_request(re.compile(r".*/assistant/training/status\?minCurated=1000$")):
        threshold.press("Enter")
    expect(page.locator("#data-ready")).to_contain_text(said)
    expect(threshold).not_to_have_attribute("aria-invalid", "true")


def test_a_long_remaining_time_is_said_in_hours(page, services: Services) -> None:
    """Repro: a job with two hours to go said "Restzeit 125 min 0 s"."""
    job = {
        "id": "ftjob-slow",
        "status": "running",
        "progress": {"step": 10, "totalSteps": 400, "percent": 2.5, "etaSeconds": 7530},
    }
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services)
    expect(page.locator("#job-facts")).to_contain_text("Restzeit2 h 5 min")


@pytest.mark.parametrize(("query", "said"), [("", "30 %"), ("?lang=en", "30%")])
def test_the_jobs_percentage_is_written_as_the_pages_language_writes_it(page, services: Services, query, said) -> None:
    """Repro: the English page wrote the progress as "30 %", with the German space before the sign."""
    job = {"id": "ftjob-third", "status": "running", "progress": {"step": 3, "totalSteps": 10, "percent": 30}}
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services, query)
    expect(page.locator("#job-percent")).to_have_text(said)


@pytest.mark.parametrize(
    ("query", "locked", "hint", "refused", "unsendable"),
    [
        ("", "Token nötig", "API-Token fehlt oder ist falsch", "Dieses Token wurde abgelehnt.", "druckbaren ASCII"),
        ("?lang=en", "Token needed", "API token missing or wrong", "This token was refused.", "printable ASCII"),
    ],
    ids=["de", "en"],
)
def test_an_api_with_a_token_asks_for_it_once_and_loads_once_it_is_given(
    page, tmp_path_factory: pytest.TempPathFactory, output_dir: Path, query, locked, hint, refused, unsendable
) -> None:
    """Repro: with ASSISTANT_API_TOKEN set, the page showed its token form, but the trainer's label said
    "Prüfe …" for good, as if an answer were still coming; three panels each reported the refusal, and the
    adapter panel said that no adapter had been trained yet."""
    token = "s3cret-token"
    with running_services(tmp_path_factory.mktemp("token-home"), ASSISTANT_API_TOKEN=token) as svc:
        page.goto(f"{svc.api_url}/{query}")
        label = page.locator("#provider-label")
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#api-token")).to_be_focused()
        expect(page.locator("section[aria-busy]")).to_have_count(0)  # every panel's call was answered (401)
        expect(label).to_have_attribute("data-state", "locked")
        expect(label).to_have_text(locked)
        expect(page.locator("#provider-device")).to_have_text(hint)
        expect(page.locator("#trainer-start")).to_be_hidden()
        expect(page.locator("#alerts .message")).to_have_count(0)  # the form and the label say it, once
        expect(page.locator("#adapters-empty")).to_be_hidden()
        shot(page, output_dir, "1-token-asked")

        # The form is a landmark of its own (explore repro: it lay outside every landmark).
        expect(page.get_by_role("form", name=re.compile("ASSISTANT_API_TOKEN"))).to_be_visible()
        expect(page.locator("#api-token")).not_to_have_attribute("aria-invalid", "true")  # asked, not refused yet

        # A wrong token is refused: the form comes back and nothing loads.
        with page.expect_response(lambda r: r.status == 401 and "/assistant/training/" in r.url):
            page.fill("#api-token", "wrong")
            page.locator("#token-form button[type=submit]").click()
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("section[aria-busy]")).to_have_count(0)
        expect(label).to_have_attribute("data-state", "locked")
        expect(page.locator("#alerts .message")).to_have_count(0)
        # explore repro: the refusal was neither announced nor tied to the field
        field = page.locator("#api-token")
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_have_attribute("aria-describedby", "api-token-error")
        expect(page.locator("#api-token-error")).to_have_attribute("role", "alert")
        expect(page.locator("#api-token-error")).to_have_text(refused)

        # Dashboard repro: a token pasted with typographic quotes (or a € or an emoji) cannot be sent in a
        # header: every request failed in the browser, the page said the server was unreachable, hid the form
        # and stayed so after a reload (the token was kept). It is refused at the field, and a kept one dropped.
        sent: list[str] = []
        page.on("request", lambda r: sent.append(r.url))
        page.fill("#api-token", "\u201cs3cret-token\u201d")
        page.locator("#token-form button[type=submit]").click()
        expect(page.locator("#api-token-error")).to_contain_text(unsendable)
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#alerts .message")).to_have_count(0)
        assert sent == [], sent  # nothing was tried with it
        page.evaluate("sessionStorage.setItem('lunatrain.apiToken', '\u201cs3cret-token\u201d')")
        page.reload()
        expect(page.locator("#token-form")).to_be_visible()
        expect(label).to_have_attribute("data-state", "locked")
        expect(page.locator("#alerts .message")).to_have_count(0)

        # The right one: every panel loads, and the label tells the trainer's state (not started here).
        page.fill("#api-token", token)
        page.locator("#api-token").press("Enter")
        expect(page.locator("#token-form")).to_be_hidden()
        expect(page.locator("#main")).to_be_focused()  # explore repro: the focus fell to the page's body
        expect(label).to_have_attribute("data-state", "offline")
        expect(page.locator("section[aria-busy]")).to_have_count(0)
        expect(page.locator("#data-ready")).not_to_have_attribute("data-ready", "unknown")
        expect(page.locator("#trainer-start")).to_be_visible()
        expect(page.locator("#adapters-empty")).to_be_visible()  # now it is known: none yet
        shot(page, output_dir, "2-token-given")


def test_the_schema_page_shows_every_operation_with_nothing_fetched_from_elsewhere(page, services: Services) -> None:
    """/docs renders in a browser that can reach nothing but the API (it was blank offline: its scripts came
    from a CDN), and lists as many operations as the schema has."""
    elsewhere: list[str] = []

    def only_the_api(route) -> None:
        if route.request.url.startswith(services.api_url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_api)
    schema = page.request.get(f"{services.api_url}/openapi.json").json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    page.goto(f"{services.api_url}/docs")
    expect(page.locator(".opblock")).to_have_count(operations)
    assert elsewhere == []


def route_job_lists(page, jobs: dict[str, list]) -> None:
    """`GET /lora/jobs?status=S` answered from `jobs[S]` as it is when asked (a test changes it meanwhile)."""

    def job_list(route) -> None:
        status = re.search(r"status=(\w+)", route.request.url)
        data = jobs.get(status.group(1) if status else "", [])
        route.fulfill(status=200, content_type="application/json", body=json.dumps({"data": data}))

    page.route("**/assistant/training/lora/jobs?*", job_list)


def _job(job_id: str, status: str, name: str) -> dict:
    return {"id": job_id, "status": status, "params": {"adapterName": name}, "progress": {"step": 1, "totalSteps": 4}}


def test_a_job_queued_behind_a_running_one_leaves_that_one_in_reach(page, services: Services) -> None:
    """Repro: with one job running, "Beispiel-Adapter" queued a second; the panel switched to it, said
    "started", and nothing on the page showed or could cancel the running job, not even after a reload (the
    panel then showed the queued job, cancelled meanwhile). Jobs as the trainer reports them, replaced on the way."""
    running = _job("ftjob-running", "running", "long-run")
    queued = _job("ftjob-queued", "queued", "example-adapter")
    jobs = {"running": [running], "queued": []}

    route_job_lists(page, jobs)
    page.route(
        "**/assistant/training/lora/status?jobId=*",
        lambda route: route.fulfill(
            status=200,
            content_type="application/json",
            body=json.dumps(running if "ftjob-running" in route.request.url else queued),
        ),
    )
    # The latest job is a finished one; the running one is what the panel shows as the page loads.
    answer(page, "**/assistant/training/lora/status", _job("ftjob-old", "succeeded", "old"))
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)

    def start(route) -> None:
        jobs["queued"] = [queued]
        route.fulfill(
            status=202, content_type="application/json", body=json.dumps({"jobId": queued["id"], "job": queued})
        )

    page.route("**/assistant/training/lora/example-adapter", start)
    open_page(page, services)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-running")

    page.get_by_role("button", name="Beispiel-Adapter").click()
    expect(page.locator("#notices")).to_have_text("Job ftjob-queued wartet hinter ftjob-running.")
    expect(page.locator("#job-id")).to_have_text("Job ftjob-queued")
    # Named by the words it shows (label in name, WCAG 2.5.3), what it does said as its description.
    other = page.get_by_role("button", name="ftjob-running · long-run · läuft", exact=True)
    expect(other).to_be_visible()
    expect(other).to_have_accessible_description("Job ftjob-running (long-run, läuft) anzeigen")
    other.click()
    expect(page.locator("#job-id")).to_have_text("Job ftjob-running")
    expect(page.get_by_role("button", name="ftjob-queued · example-adapter · wartet", exact=True)).to_be_visible()

    # The running job fails: said as bad news, not in the colour of success; the queued one is current now.
    running["status"] = "failed"
    jobs.update(running=[], queued=[queued | {"status": "running"}])
    queued["status"] = "running"
    expect(page.locator("#notices .message.warning")).to_have_text("Job ftjob-running: fehlgeschlagen.")
    expect(page.locator("#job-id")).to_have_text("Job ftjob-queued")
    expect(page.locator("#job-others")).to_be_hidden()


def test_a_job_that_runs_at_once_is_said_started_and_a_job_in_two_lists_is_listed_once(
    page, services: Services
) -> None:
    """The new job was accepted as queued but runs by the time the lists are read, with a job from another tab
    waiting behind it: "gestartet", not "wartet hinter" that one. A job that moved from `queued` to `running`
    between the list requests is in both answers: one button, in its later state."""
    mine = _job("ftjob-mine", "queued", "example-adapter")
    moving = _job("ftjob-moving", "running", "other-tab")
    jobs: dict[str, list] = {"running": [], "queued": []}
    route_job_lists(page, jobs)
    answer(page, "**/assistant/training/lora/status", _job("ftjob-old", "succeeded", "old"))
    answer(page, "**/assistant/training/lora/status?jobId=*", mine | {"status": "running"})
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)

    def start(route) -> None:
        jobs.update(running=[mine | {"status": "running"}], queued=[_job("ftjob-later", "queued", "later")])
        route.fulfill(status=202, content_type="application/json", body=json.dumps({"jobId": mine["id"], "job": mine}))

    page.route("**/assistant/training/lora/example-adapter", start)
    page.clock.install()
    open_page(page, services)
    page.get_by_role("button", name="Beispiel-Adapter").click()
    expect(page.locator("#notices")).to_have_text("Job ftjob-mine gestartet.")

    jobs.update(running=[moving], queued=[moving | {"status": "queued"}])
    page.clock.run_for(6_000)  # the polls read the lists again
    buttons = page.locator("#job-others button")
    expect(buttons.filter(has_text="ftjob-moving")).to_have_count(1)
    expect(buttons.filter(has_text="ftjob-moving")).to_have_text("ftjob-moving · other-tab · läuft")


@pytest.mark.parametrize(
    ("joined", "seeded", "said"),
    [
        (
            True,
            None,
            "Job ftjob-twin trainiert diese Parameter auf diesen Daten bereits (wohl aus einem anderen Tab); "
            "kein zweiter gestartet.",
        ),
        # Guide repro: on an empty database it added 318 examples and 41 memory items and said only "gestartet"
        (
            False,
            {"examplesAdded": 318, "memoryAdded": 41},
            "Job ftjob-twin gestartet. Dafür kamen 318 Beispiele und 41 Memory-Einträge aus dem mitgelieferten "
            "Datensatz in die leere Datenbank.",
        ),
    ],
    ids=["joined", "seeded"],
)
def test_an_example_adapter_start_says_what_it_joined_or_seeded(
    page, services: Services, joined: bool, seeded: dict | None, said: str
) -> None:
    """A start the server answered with the job that already trains these parameters on this data (`joined`,
    from another tab): the page follows that job and says no second one was started, not "gestartet". One that
    seeded an empty store with the bundled dataset says what it added (the API's `seeded`)."""
    running = _job("ftjob-twin", "running", "example-adapter")
    route_job_lists(page, {"running": [running], "queued": []})
    answer(page, "**/assistant/training/lora/status", _job("ftjob-old", "succeeded", "old"))
    answer(page, "**/assistant/training/lora/status?jobId=*", running)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    accepted = {"jobId": running["id"], "job": running, "joined": joined, "seeded": seeded}
    answer(page, "**/assistant/training/lora/example-adapter", accepted, 202)
    open_page(page, services)
    page.get_by_role("button", name="Beispiel-Adapter").click()
    expect(page.locator("#notices")).to_have_text(said)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-twin")


def test_events_of_a_job_the_panel_moved_away_from_are_not_drawn_for_the_next(page, services: Services) -> None:
    """The first job's event page answers only after the user followed another job: its last message and
    loss points are not shown as the other job's."""
    first, second = _job("ftjob-first", "running", "one"), _job("ftjob-second", "running", "two")
    route_job_lists(page, {"running": [first, second]})
    answer(page, "**/assistant/training/lora/status", first)
    answer(page, "**/assistant/training/lora/status?jobId=ftjob-second", second)
    answer(page, "**/assistant/training/lora/status?jobId=ftjob-first", first)
    answer(page, "**/lora/jobs/ftjob-second/events*", NO_EVENTS)
    held: list = []
    page.route("**/lora/jobs/ftjob-first/events*", lambda route: held.append(route))  # answered below, after the switch
    page.clock.install()  # no poll asks again meanwhile
    open_page(page, services)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-first")
    page.get_by_role("button", name="ftjob-second · two · läuft", exact=True).click()
    expect(page.locator("#job-id")).to_have_text("Job ftjob-second")
    assert held, "the first job's events were never asked for"
    late = {
        "data": [
            {"seq": 1, "type": "progress", "step": 1, "loss": 3.0},
            {"seq": 2, "type": "log", "message": "first job's message"},
        ],
        "lastSeq": 2,
        "hasMore": False,
    }
    with page.expect_request_finished(lambda r: "ftjob-first/events" in r.url):
        held[0].fulfill(status=200, content_type="application/json", body=json.dumps(late))
    page.clock.run_for(3_000)  # the second job's next polls redraw its panel
    expect(page.locator("#job-id")).to_have_text("Job ftjob-second")
    expect(page.locator("#job-facts")).not_to_contain_text("first job's message")
    expect(page.locator("#loss-chart .chart-train")).to_have_count(0)


def test_a_long_queue_lists_the_jobs_that_run_next(page, services: Services) -> None:
    """Long-session repro: with 22 jobs queued, "Weitere Jobs" listed 20 and left out the two oldest, the ones
    that run next: each list is newest first, and the page asked for a page of 20. The trainer's answer here
    is a page of the size asked for, newest first, as the real one is."""
    queued = [_job(f"ftjob-q{i:02d}", "queued", f"a{i}") for i in range(25)][::-1]  # newest first

    def job_list(route) -> None:
        status = re.search(r"status=(\w+)", route.request.url).group(1)
        limit = int(re.search(r"limit=(\d+)", route.request.url).group(1))
        data = queued if status == "queued" else [_job("ftjob-run", "running", "long")] if status == "running" else []
        route.fulfill(status=200, content_type="application/json", body=json.dumps({"data": data[:limit]}))

    page.route("**/assistant/training/lora/jobs?*", job_list)
    answer(page, "**/assistant/training/lora/status?jobId=*", _job("ftjob-run", "running", "long"))
    answer(page, "**/assistant/training/lora/status", _job("ftjob-run", "running", "long"))
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services, "?lang=en")
    buttons = page.locator("#job-others button")
    expect(buttons).to_have_count(20)
    expect(buttons.first).to_contain_text("ftjob-q00")  # the oldest: it runs next
    expect(buttons.last).to_contain_text("ftjob-q19")
    expect(page.locator("#job-others")).to_contain_text("and 5 more queued")


def test_a_job_started_elsewhere_is_followed_without_a_reload(page, services: Services) -> None:
    """Repro: a second tab kept showing the finished job while another tab's new job ran; only a reload
    showed it. The page's clock is run forward to its next background refresh instead of waiting for it."""
    jobs: dict[str, list] = {"running": []}

    page.clock.install()
    route_job_lists(page, jobs)
    answer(page, "**/assistant/training/lora/status", _job("ftjob-done", "succeeded", "old"))
    answer(page, "**/assistant/training/lora/status?jobId=*", _job("ftjob-elsewhere", "running", "other-tab"))
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-done")
    jobs["running"] = [_job("ftjob-elsewhere", "running", "other-tab")]
    page.clock.run_for(16_000)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-elsewhere")


def test_a_job_that_started_and_ended_between_two_refreshes_is_shown(page, services: Services) -> None:
    """Explore repro: a tab left open went on saying "Kein Job gestartet." (or showing an older job) after a
    short job started and ended elsewhere between two background refreshes, which ask only for unfinished
    jobs, while the data panel of the same tab named it as the last job."""
    latest = {"job": _job("ftjob-done", "succeeded", "old")}
    page.clock.install()
    route_job_lists(page, {"running": []})
    page.route(
        "**/assistant/training/lora/status",
        lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(latest["job"])),
    )
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-done")
    page.clock.run_for(16_000)  # a refresh with nothing new leaves it
    expect(page.locator("#job-id")).to_have_text("Job ftjob-done")
    latest["job"] = _job("ftjob-short", "succeeded", "short")
    page.clock.run_for(16_000)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-short")
    # Review repro: a job created later but ended before the one shown (queued, then cancelled while the shown
    # one ran and failed) replaced the failure the user was reading.
    failed = _job("ftjob-a", "failed", "a") | {
        "createdAt": "2026-12-01T10:00:00Z",
        "finishedAt": "2026-12-01T10:30:00Z",
    }
    answer(page, "**/assistant/training/lora/status?jobId=ftjob-a", failed)
    latest["job"] = failed
    page.clock.run_for(16_000)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-a")
    latest["job"] = _job("ftjob-b", "cancelled", "b") | {
        "createdAt": "2026-12-01T10:05:00Z",
        "finishedAt": "2026-12-01T10:06:00Z",
    }
    asked = []  # following a job reads its events at once: none may be asked for ftjob-b
    page.on("request", lambda r: asked.append(r.url) if "/jobs/ftjob-b/" in r.url else None)
    with page.expect_response(lambda r: urlsplit(r.url).path.endswith("/lora/status") and "jobId" not in r.url):
        page.clock.run_for(16_000)
    page.wait_for_timeout(1000)  # the page's own continuation after that answer (the clock is the page's, not this)
    assert asked == [] and page.locator("#job-id").text_content() == "Job ftjob-a", asked


def _run_and_see_the_health_asked(page, ms: int) -> None:
    """Run the page's clock `ms` forward, then once more to its next health poll, waiting for that request: the
    requests the first run made have been seen by then (their events come after the clock call returns)."""
    page.clock.run_for(ms)
    with page.expect_request(lambda r: urlsplit(r.url).path.endswith("/lora/provider-health")):
        page.clock.run_for(16_000)


def test_a_page_following_a_job_shows_what_changed_elsewhere_and_asks_an_offline_trainer_nothing(
    page, services: Services
) -> None:
    """Tabs explore repros: while a page followed a running job (hours on a real run), its background refresh of
    the adapter table, the data panel and the model choice stopped: an adapter activated from the command line
    or another tab did not show for the whole job. And with the trainer offline, every open page asked for its
    job lists, the latest job and the followed job's state, each a 503 (an error in the browser's console), for
    what the header already says."""
    page.clock.install()
    running = _job("ftjob-run", "running", "long")
    route_job_lists(page, {"running": [running]})
    answer(page, "**/assistant/training/lora/status*", running)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    table = {"name": "before"}
    page.route(
        "**/assistant/training/adapters",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(_adapters(table["name"]))
        ),
    )
    open_page(page, services)
    expect(page.locator("#job-id")).to_have_text("Job ftjob-run")
    expect(page.locator("#adapter-groups")).to_contain_text("before")
    table["name"] = "activated-elsewhere"
    page.clock.run_for(16_000)
    expect(page.locator("#adapter-groups")).to_contain_text("activated-elsewhere")
    # The trainer goes away: once the header says so and its job reads are refused, nothing of the trainer's
    # is asked until it is back.
    answer(page, "**/assistant/training/lora/provider-health*", {"label": "Offline", "reachable": False})
    gone = {"error": {"code": "service_unavailable", "message": "The trainer is not running."}}
    for pattern in ("**/assistant/training/lora/status*", "**/assistant/training/lora/jobs*"):
        answer(page, pattern, gone, status=503)
    page.clock.run_for(16_000)
    expect(page.locator("#provider-label")).to_have_attribute("data-state", "offline")
    page.clock.run_for(16_000)  # the refusals that tell the page to wait
    asked: list[str] = []
    page.on("request", lambda r: asked.append(urlsplit(r.url).path) if "/lora/" in r.url else None)
    _run_and_see_the_health_asked(page, 46_000)
    assert set(asked) == {"/assistant/training/lora/provider-health"}, asked


def test_a_page_opened_beside_a_stopped_trainer_asks_it_nothing_after_its_first_refusal(
    page, services: Services
) -> None:
    """Upgrade explore repro: a page opened while the trainer was stopped asked for the job lists again 15 s
    later (its first refusals came before the header knew the trainer was offline), then stopped."""
    page.clock.install()
    open_page(page, services)  # this module's trainer is not running: the job reads are refused (503)
    expect(page.locator("#provider-label")).to_have_attribute("data-state", "offline")
    asked: list[str] = []
    page.on("request", lambda r: asked.append(urlsplit(r.url).path) if "/lora/" in r.url else None)
    _run_and_see_the_health_asked(page, 46_000)
    assert set(asked) == {"/assistant/training/lora/provider-health"}, asked


def test_the_job_panel_beside_a_stopped_trainer_does_not_say_no_job_was_started(page, services: Services) -> None:
    """German-page explore repro: with the trainer offline the job panel said "Kein Job gestartet." beside a
    data panel naming the last job. It says the trainer is offline; with no job at all, that none was started."""
    open_page(page, services)  # this module's trainer is not running: the job reads are refused (503)
    expect(page.locator("#job-none")).to_have_text(
        "Der Trainer ist offline: seine Jobs stehen hier, sobald er wieder läuft (den letzten nennt der Datenbereich)."
    )
    page.route("**/assistant/training/lora/jobs*", lambda route: route.fulfill(json={"data": [], "hasMore": False}))
    answer(page, "**/assistant/training/lora/status", {"error": {"code": "not_found", "message": "none"}}, 404)
    page.reload()
    expect(page.locator("#job-none")).to_have_text("Kein Job gestartet.")


def test_the_adapter_panel_says_it_could_read_its_list_again_when_the_same_list_comes_back(
    page, services: Services
) -> None:
    """Review repro: once a reload of the list failed (after a job ended) the panel said it could not be read, and
    the next background refresh, bringing back the very list it showed before, left that line standing."""
    state = {"job": _job("ftjob-run", "running", "run"), "fail": False}
    page.clock.install()
    route_job_lists(page, {"running": [state["job"]]})
    for pattern in ("**/assistant/training/lora/status", "**/assistant/training/lora/status?jobId=*"):
        page.route(pattern, lambda route: route.fulfill(json=state["job"]))
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)

    def adapters(route) -> None:
        if state["fail"]:
            route.fulfill(status=503, json={"error": {"code": "storage_error", "message": "The disk failed."}})
        else:
            route.fulfill(json=_adapters("same"))

    page.route("**/assistant/training/adapters", adapters)
    open_page(page, services)
    expect(page.locator("#adapter-groups")).to_contain_text("same")
    state["fail"], state["job"] = True, _job("ftjob-run", "succeeded", "run")
    route_job_lists(page, {"running": []})
    page.clock.run_for(5_000)  # the followed job ends: the panel reads its list again, which fails
    expect(page.locator("#adapters-unreadable")).to_be_visible()
    state["fail"] = False
    page.clock.run_for(16_000)  # the background refresh: the same list as before
    expect(page.locator("#adapters-unreadable")).to_be_hidden()


def _adapters(name: str) -> dict:
    """An adapter table with one version the eval gate refused."""
    version = {
        "version": "v1",
        "created": "2026-12-01T10:00:00+00:00",
        "metrics": {"valLoss": 2.5, "baseValLoss": 2.4},
        "gate": {"passed": False, "status": "failed", "reasons": ["val loss rose"]},
        "state": {"active": False, "code": "adapter.gate_failed", "params": {}, "reason": "refused"},
    }
    return {"bases": [{"baseModel": "luna-tiny", "adapters": [{"name": name, "aliases": {}, "versions": [version]}]}]}


@pytest.mark.parametrize(
    ("query", "regressed", "more"),
    [
        (
            "",
            "Fall greet (data/eval/my.jsonl:2): contains, stops – die Vergleichsbasis bestand ihn",
            "… und 3 weitere (alle nennt `lunatrain eval-gate --adapter luna-adapter@v1`)",
        ),
        (
            "?lang=en",
            "case greet (data/eval/my.jsonl:2): contains, stops – the baseline passed it",
            "… and 3 more (`lunatrain eval-gate --adapter luna-adapter@v1` names them all)",
        ),
    ],
)
def test_a_refused_version_lists_the_golden_cases_it_failed(page, services: Services, query, regressed, more) -> None:
    """A refused version said only why in numbers ("golden pass rate 0.00 regresses …"): which case to fix
    was in a report the next gate overwrites. Its failed cases are listed, those the baseline passed first."""
    body = _adapters("luna-adapter")
    gate = body["bases"][0]["adapters"][0]["versions"][0]["gate"]
    gate["failedCases"] = [
        {"id": "greet", "source": "data/eval/my.jsonl:2", "checks": ["contains", "stops"], "baselinePassed": True},
        {"id": "short", "source": "data/eval/my.jsonl:5", "checks": ["max_chars"], "baselinePassed": False},
    ]
    gate["failedCaseCount"] = 5
    answer(page, "**/assistant/training/adapters", body)
    open_page(page, services, query)
    items = page.locator('tr[data-version="v1"] .gate-cases li')
    expect(items).to_have_count(3)
    expect(items.nth(0)).to_have_text(regressed)
    expect(items.nth(1)).to_contain_text("short (data/eval/my.jsonl:5): max_chars")
    expect(items.nth(2)).to_have_text(more)


def test_a_refused_versions_failed_cases_are_folded_so_its_row_stays_short_on_a_phone(page, services: Services) -> None:
    """Dashboard-scale repro: at 360 px each refused version's row was about 1,500 px tall, most of it its ten
    failed cases in a 128 px column (a page of 72 rows 73,533 px long). The cases are folded under one line that
    says how many; opening it shows them."""
    body = _adapters("luna-adapter")
    gate = body["bases"][0]["adapters"][0]["versions"][0]["gate"]
    gate["failedCases"] = [
        {"id": f"case-{i}", "source": f"data/eval/luna-golden.jsonl:{i}", "checks": ["contains", "stops"]}
        for i in range(10)
    ]
    gate["failedCaseCount"] = 12
    answer(page, "**/assistant/training/adapters", body)
    page.set_viewport_size({"width": 360, "height": 800})
    open_page(page, services, "?lang=en")
    row = page.locator('tr[data-version="v1"]')
    folded = row.locator(".gate-cases-fold > summary")
    expect(folded).to_have_text("12 failed golden cases")
    assert row.bounding_box()["height"] < 700, row.bounding_box()
    expect(row.locator(".gate-cases li").first).to_be_hidden()
    folded.click()
    expect(row.locator(".gate-cases li").first).to_be_visible()
    expect(row.locator(".gate-cases li")).to_have_count(11)


def route_models(page, served: dict[str, bool]) -> None:
    """`/v1/models` answered with the base, luna-adapter and luna-adapter@v1; without the adapter's name once
    `served["active"]` is false (deactivated meanwhile), as it is when asked."""

    def models(route) -> None:
        data = [{"id": "luna-tiny", "object": "model", "owned_by": "base"}]
        data += [{"id": n, "object": "model", "owned_by": "lunatrain"} for n in ("luna-adapter", "luna-adapter@v1")]
        data = data if served["active"] else data[:1] + data[2:]
        route.fulfill(status=200, content_type="application/json", body=json.dumps({"object": "list", "data": data}))

    page.route("**/v1/models", models)


def test_a_change_made_elsewhere_reaches_the_adapter_table_and_the_model_choice(page, services: Services) -> None:
    """Repro: after `lunatrain adapters activate` in a shell, the data panel named the new active version at its
    next background refresh, while the adapter table on the same page kept the old one active (its Deactivate
    then failed with 422) and "Try it" kept offering a model /v1/models no longer had, until a reload. Both
    follow the background refresh now; one that brought nothing new leaves them as they were (the focus too)."""
    served = {"active": True}

    def adapters(route) -> None:
        body = _adapters("luna-adapter")
        body["bases"][0]["adapters"][0]["versions"][0]["state"] = {
            "active": served["active"],
            "code": "adapter.deactivated",
            "params": {},
        }
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.clock.install()
    page.route("**/assistant/training/adapters", adapters)
    route_models(page, served)
    open_page(page, services, "?lang=en")
    row = page.locator('tr[data-version="v1"]')
    choice = page.locator("#try-model option")
    page.locator("#try").scroll_into_view_if_needed()  # the model choice loads once its panel is seen
    expect(choice).to_have_count(2)
    expect(row.get_by_role("button", name="Deactivate luna-adapter on this base model")).to_be_visible()
    row.get_by_role("button", name="Deactivate luna-adapter on this base model").focus()
    page.clock.run_for(16_000)  # a background refresh with nothing new
    expect(row.get_by_role("button", name="Deactivate luna-adapter on this base model")).to_be_focused()

    served["active"] = False  # deactivated in a shell
    page.clock.run_for(16_000)
    expect(row.get_by_role("button", name="Activate luna-adapter v1")).to_be_visible()
    expect(row.locator(".badge-active")).to_have_count(0)
    expect(choice).to_have_count(1)
    expect(choice).to_have_text(["luna-adapter@v1"])


def _ask_in_the_try_panel(page, services: Services, *, choices: int) -> None:
    """Open the page, wait for the try panel's model choice (`choices` models) and send "Hallo?"."""
    open_page(page, services)
    page.locator("#try").scroll_into_view_if_needed()  # the panel asks for its models once it is seen
    expect(page.locator("#try-model option")).to_have_count(choices)
    page.locator("#try-prompt").fill("Hallo?")
    page.locator("#try-send").click()


def _sse(text: str, model: str) -> str:
    chunk = {"model": model, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
    done = {"model": model, "choices": [], "usage": {"completion_tokens": 1}}
    return f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(done)}\n\ndata: [DONE]\n\n"


def test_a_column_the_busy_server_turned_away_waits_for_it_and_answers(page, services: Services) -> None:
    """Try-panel explore repro: with ASSISTANT_INFER_MAX_CONCURRENT=1 the server turns the second of the two
    columns' requests away at once (429, Retry-After), and that column showed the error on every Send. It waits
    for the server, saying so, and answers."""
    busy = {"error": {"message": "The server is busy.", "type": "rate_limit_error", "param": None, "code": "busy"}}
    turned_away: list[str] = []

    def chat(route) -> None:
        model = json.loads(route.request.post_data)["model"]
        if model != "luna-tiny" and not turned_away:
            turned_away.append(model)
            route.fulfill(status=429, json=busy, headers={"Retry-After": "1"})
        else:
            route.fulfill(status=200, content_type="text/event-stream", body=_sse(f"Antwort von {model}", model))

    route_models(page, {"active": True})
    page.route("**/v1/chat/completions", chat)
    _ask_in_the_try_panel(page, services, choices=2)
    expect(page.locator("#try-base")).to_have_text("Antwort von luna-tiny")
    expect(page.locator("#try-adapter")).to_have_text("Antwort von luna-adapter")
    expect(page.locator("#try-adapter-meta")).not_to_contain_text("Fehler")
    assert turned_away == ["luna-adapter"]


def test_a_listed_version_whose_files_are_gone_is_said_in_the_pages_language(page, services: Services) -> None:
    """Try-panel explore repro: a version the panel still listed, whose files were deleted, answered "Dieses
    Modell wird hier nicht angeboten: The files of … are missing …": the rest of the sentence in English."""
    gone = {
        "message": "The files of luna-adapter@v1 are missing under data/adapters (adapter_config.json); train it again.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
        "params": {"missing": ["adapter_config.json"]},
    }
    route_models(page, {"active": True})
    page.route(
        "**/v1/chat/completions",
        lambda route: (
            route.fulfill(status=404, json={"error": gone})
            if json.loads(route.request.post_data)["model"] != "luna-tiny"
            else route.fulfill(status=200, content_type="text/event-stream", body=_sse("Hallo.", "luna-tiny"))
        ),
    )
    _ask_in_the_try_panel(page, services, choices=2)
    expect(page.locator("#try-adapter-meta")).to_have_text(
        "Fehler: Dieses Modell wird hier nicht angeboten: seine Dateien fehlen unter data/adapters "
        "(adapter_config.json); neu trainieren"
    )


def test_an_example_clicked_while_answers_stream_sends_no_second_pair(page, services: Services) -> None:
    """Try-panel explore repro: the example buttons stayed active while answers streamed; a second click (or a
    double click) sent a second pair of requests whose pieces were written into the same boxes as the first's
    ("GesGes.GesGes."). One question at a time, as Send; then the buttons take clicks again."""
    pending: list = []
    route_models(page, {"active": True})
    page.route("**/v1/chat/completions", lambda route: pending.append(route))  # held: still generating
    answer(page, "**/assistant/chat/examples", {"examples": [{"id": "hi", "prompt": "Wer bist du?", "messages": []}]})
    open_page(page, services)
    page.locator("#try").scroll_into_view_if_needed()
    expect(page.locator("#try-model option")).to_have_count(2)
    example = page.locator("#try-example-list button")
    example.click()
    expect(example).to_have_attribute("aria-disabled", "true")
    example.click(force=True)  # a user's click all the same
    example.dblclick(force=True)
    page.evaluate("() => new Promise((done) => setTimeout(done, 300))")  # a second pair would be asked by now
    assert len(pending) == 2, [r.request.post_data for r in pending]
    for route in pending:
        model = json.loads(route.request.post_data)["model"]
        route.fulfill(status=200, content_type="text/event-stream", body=_sse("Luna.", model))
    expect(page.locator("#try-base")).to_have_text("Luna.")
    expect(example).not_to_have_attribute("aria-disabled", "true")


def test_the_adapter_column_is_cleared_when_no_adapter_is_left_to_ask(page, services: Services) -> None:
    """Try-panel explore repro: once no adapter was left (deactivated elsewhere), a Send left the adapter column
    with the last version's heading and "Fertig · 1 Token" beside an empty answer."""
    served = {"active": True}
    page.clock.install()
    page.route(
        "**/v1/models",
        lambda route: route.fulfill(
            json={
                "object": "list",
                "data": [{"id": "luna-tiny", "object": "model", "owned_by": "base"}]
                + ([{"id": "luna-adapter@v1", "object": "model", "owned_by": "lunatrain"}] if served["active"] else []),
            }
        ),
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=_sse("Luna.", json.loads(route.request.post_data)["model"]),
        ),
    )
    _ask_in_the_try_panel(page, services, choices=1)
    expect(page.locator("#try-adapter")).to_have_text("Luna.")
    served["active"] = False
    page.clock.run_for(16_000)  # the background refresh: no adapter left
    expect(page.locator("#try-model")).to_be_disabled()
    page.locator("#try-send").click()
    expect(page.locator("#try-base-meta")).to_contain_text("Fertig")
    expect(page.locator("#try-adapter")).to_have_text("")
    expect(page.locator("#try-adapter-meta")).to_have_text("")
    expect(page.locator("#try-adapter-label")).to_have_text("Adapter")


def test_a_changed_model_list_leaves_send_disabled_while_an_answer_is_on_its_way(page, services: Services) -> None:
    """Review repro: the background refresh redrew the model choice when it changed, and with it turned Send
    on again while the answer to the first question was still on its way: a second click sent a second
    request beside it."""
    served = {"active": True}
    pending: list = []

    page.clock.install()
    route_models(page, served)
    page.route("**/v1/chat/completions", lambda route: pending.append(route))  # never answered: still generating
    open_page(page, services, "?lang=en")
    page.locator("#try").scroll_into_view_if_needed()
    expect(page.locator("#try-model option")).to_have_count(2)
    page.locator("#try-prompt").fill("Hallo?")
    send = page.locator("#try-send")
    send.click()
    expect(send).to_have_attribute("aria-busy", "true")
    served["active"] = False  # deactivated in a shell
    page.clock.run_for(16_000)
    expect(page.locator("#try-model option")).to_have_count(1)
    expect(send).to_be_disabled()


def test_times_name_their_zone(browser, services: Services) -> None:
    """Cross-surface repro: in Berlin the page showed a version's time as "06.12.2026, 00:21:55" where the
    command line and the API said 2026-12-05T23:21:55Z: another day, and nothing said which clock."""
    context = browser.new_context(timezone_id="Europe/Berlin")
    try:
        page = context.new_page()
        body = _adapters("luna-adapter")
        body["bases"][0]["adapters"][0]["versions"][0]["created"] = "2026-12-05T23:21:55.334Z"
        answer(page, "**/assistant/training/adapters", body)
        open_page(page, services)
        expect(page.locator('tr[data-version="v1"] td').nth(1)).to_have_text("06.12.2026, 00:21:55 MEZ")
    finally:
        context.close()


def test_report_links_send_the_token_and_a_refused_version_is_named_before_activating(page, services: Services) -> None:
    """Repro: with an API token, "Bericht" and "Loss-Kurve" opened a tab that said only `unauthorized` (a
    plain link sends no token); activating a version the eval gate refused asked the same question as any
    other; a 64-character adapter name pushed the table's actions out of view."""
    name = "x" * 64
    answer(page, "**/assistant/training/adapters", _adapters(name))
    sent: list[str | None] = []

    def report(route) -> None:
        sent.append(route.request.headers.get("authorization"))
        if route.request.headers.get("authorization") == "Bearer t0ken":
            route.fulfill(status=200, content_type="application/json", body=json.dumps({"report": "of v1"}))
        else:
            route.fulfill(status=401, content_type="application/json", body=json.dumps({"error": {"code": "x"}}))

    page.route(f"**/adapters/{name}/versions/v1/report", report)
    page.goto(f"{services.api_url}/")
    page.evaluate("sessionStorage.setItem('lunatrain.apiToken', 't0ken')")
    open_page(page, services)
    with page.context.expect_page() as opened:
        page.get_by_role("link", name=f"Bericht zum Training von {name} v1").click()
    tab = opened.value
    expect(tab.locator("body")).to_contain_text('"report": "of v1"')
    tab.close()
    assert sent == ["Bearer t0ken"]

    wrap = page.locator(".adapter-group .table-wrap")
    assert wrap.evaluate("(el) => el.scrollWidth <= el.clientWidth"), "the table scrolls sideways"
    page.get_by_role("button", name=f"{name} v1 aktivieren").click()
    expect(page.locator("#confirm-text")).to_contain_text(f"Das Eval-Gate hat {name} v1 abgelehnt.")
    page.keyboard.press("Escape")


@pytest.mark.parametrize(
    ("query", "typed", "sent"),
    [
        (
            "",
            {"alpha": "2.048", "maxGradNorm": "1.000", "learningRate": "0,0002", "weightDecay": "0.002"},
            {"alpha": 2048, "maxGradNorm": 1000, "learningRate": 0.0002, "weightDecay": 0.002},
        ),
        (
            "?lang=en",
            {"alpha": "2,048.5", "maxGradNorm": "1,000", "learningRate": "0.0002", "weightDecay": "0,5"},
            {"alpha": 2048.5, "maxGradNorm": 1000, "learningRate": 0.0002, "weightDecay": 0.5},
        ),
    ],
    ids=["de", "en"],
)
def test_a_decimal_field_reads_thousands_separators_as_the_hints_write_them(
    page, services: Services, query: str, typed: dict, sent: dict
) -> None:
    """Repro: the hint says "höchstens 4.096"; "2.048" typed into alpha was sent as 2.048, and "1.000" into
    maxGradNorm as 1 (and "2,048" on the English page likewise)."""
    answer(page, "**/assistant/training/lora/start", {"error": {"code": "x", "message": "no"}}, status=503)
    open_page(page, services, query)
    page.evaluate("document.querySelector('details.advanced').open = true")
    for field, text in typed.items():
        page.locator(f"#f-{field}").fill(text)
    with page.expect_request("**/assistant/training/lora/start") as asked:
        page.locator("#start-button").click()
    body = json.loads(asked.value.post_data or "{}")
    assert {k: body.get(k) for k in sent} == sent


def test_switching_the_language_keeps_what_was_typed(page, services: Services) -> None:
    """Repro: epochs 7 and minCurated 12 typed, then "English": the form showed the defaults again."""
    open_page(page, services)
    page.locator("#f-epochs").fill("7")
    page.locator("#f-alpha").fill("2.048")  # two thousand and forty-eight on this page, and on the next
    page.locator("#data-min-curated").fill("1.200")
    with page.expect_navigation():
        page.locator("#lang-switch").click()
    expect(page.locator("html")).to_have_attribute("lang", "en")  # the page the link loaded: no second load
    expect(page.locator("#f-epochs")).to_have_value("7")
    expect(page.locator("#f-alpha")).to_have_value("2048")
    expect(page.locator("#data-min-curated")).to_have_value("1200")
    # and back: a decimal typed here is written in the German notation there ("1.125" would read as 1125)
    page.locator("#f-alpha").fill("1.125")
    with page.expect_navigation():
        page.locator("#lang-switch").click()
    expect(page.locator("html")).to_have_attribute("lang", "de")
    expect(page.locator("#f-alpha")).to_have_value("1,125")
    expect(page.locator("#f-epochs")).to_have_value("7")
    page.reload()  # said once: a later load shows the profile's values again
    expect(page.locator("#f-epochs")).to_have_value("3")  # the profile's own, once the defaults arrived
    expect(page.locator("#f-alpha")).to_have_value("")  # the profile's: alpha follows rank


def test_a_page_that_cannot_reach_its_server_says_so_and_a_click_keeps_its_error(page, services: Services) -> None:
    """Repro: with the API down, the header offered "Trainer starten" (which needs that API); once it was back,
    "Trainer: Der Server ist nicht erreichbar" stayed; and the poll errors pushed the error of the user's own
    click out of the list."""
    open_page(page, services)
    page.route("**/assistant/training/**", lambda route: route.abort())
    page.locator("#provider-refresh").click()
    expect(page.locator("#provider-device")).to_contain_text("Die Seite erreicht ihren Server nicht")
    expect(page.locator("#trainer-start")).to_be_hidden()
    page.get_by_role("button", name="Exportieren").click()
    clicked = page.locator("#alerts .message", has_text="Exportieren:")
    expect(clicked).to_have_count(1)
    # Background refreshes that fail in other words fill the list: the click's error stays.
    page.evaluate(
        """async () => {
            const { showError } = await import('/static/ui.js');
            for (const n of [1, 2, 3, 4, 5]) showError({ code: 'network', message: `poll ${n}` }, `Panel ${n}`,
                { background: true });
        }"""
    )
    expect(page.locator("#alerts .message")).to_have_count(4)
    expect(clicked).to_have_count(1)
    page.unroute("**/assistant/training/**")
    page.locator("#provider-refresh").click()
    expect(page.locator("#provider-label")).not_to_have_attribute("data-state", "checking")
    expect(page.locator("#alerts .message[data-code=network]")).to_have_count(0)


@pytest.mark.parametrize(
    ("query", "log", "error"),
    [
        (
            "",
            "Eval-Gate nicht bestanden: luna-adapter v8 (Val-Loss 2,5 schlechter als luna-adapter@v1 (2,4: +4 %, "
            "erlaubt +2 %); Val-Loss 7,8718 ist das 0,92978-fache des Basismodells (8,4663; erlaubt 0,92977))",
            "Fehler: Der Datensatz „Memory“ hat keine Trainingsbeispiele",
        ),
        (
            "?lang=en",
            "Eval gate failed: luna-adapter v8 (val loss 2.5 regresses against luna-adapter@v1 (2.4: +4%, allowed "
            "+2%); val loss 7.8718 is 0.92978 x the base model's (8.4663; allowed 0.92977))",
            "Error: The memory tier has no training samples",
        ),
    ],
    ids=["de", "en"],
)
def test_the_gates_reasons_and_a_jobs_error_are_said_in_the_pages_language(
    page, services: Services, query: str, log: str, error: str
) -> None:
    """Repro: the German page said "Eval-Gate nicht bestanden: … (golden pass rate 0.00 regresses against …)"
    and "Fehler: Prüfung nicht bestanden: The memory tier has no training samples"; the English gate text said
    "allowed +2%" where the page said "+0,02". Numbers repro: a ratio and its limit both read "0,9298" (four
    significant digits) where the command line said 0.92978 and 0.92977; and the rise of a loss was left out.
    The first reason is as older releases recorded it (no rise, no digits), the second as judged today."""
    from lunatrain.evalgate import judge, parse_thresholds

    reason = {
        "code": "gate.loss_regression",
        "params": {"split": "val", "loss": 2.5, "baseline": "luna-adapter@v1", "baselineLoss": 2.4, "allowed": 0.02},
    }
    base = {"valLoss": 8.4663, "testLoss": None, "goldenPassRate": 0.0}
    vs_base = {"kind": "base", "ref": "base:luna-tiny", "source": "evaluated", "metrics": base}
    [(_, ratio)] = judge(
        base | {"valLoss": 7.8718}, base, vs_base, parse_thresholds({"maxValLossRatioVsBase": 0.92977})
    )
    gate = {
        "seq": 1,
        "type": "log",
        "message": "eval gate failed: val loss 2.5000 regresses against luna-adapter@v1 (2.4000, allowed +2%)",
        "code": "log.gate_failed",
        "params": {"name": "luna-adapter", "version": "v8", "reasons": "English", "reasonCodes": [reason, ratio]},
    }
    job = {
        "id": "ftjob-refused",
        "status": "failed",
        "error": {
            "code": "train.no_samples",
            "message": "The memory tier has no training samples; add examples and export again.",
            "params": {"tier": "memory"},
        },
    }
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": [gate], "lastSeq": 1, "hasMore": False})
    open_page(page, services, query)
    expect(page.locator("#job-facts")).to_contain_text(log)
    expect(page.locator("#job-error")).to_contain_text(error)


@pytest.mark.parametrize(
    ("query", "notes"),
    [
        (
            "",
            [
                "Golden-Fall identity (golden.jsonl:2) ausgelassen: die Chat-Vorlage nimmt seine Systemnachricht "
                "nicht an (System role not supported)",
                "das Basismodell wurde unquantisiert geladen, nicht in 4bit wie beim Training (bitsandbytes is not "
                "installed here)",
                "die aktive Version luna-adapter@v1 wurde neu gemessen: ihr Gate-Ergebnis stammt von anderen "
                "Voraussetzungen "
                "(Golden-Suite (geändert oder von dieser Version anders gelesen), Val/Test-Daten)",
                "die aktive Version luna-adapter@v2 wurde neu gemessen: ihr Gate-Ergebnis stammt von anderen "
                "Voraussetzungen "
                "(Val/Test-Daten, Datensatz-Stufe)",
                "die aktive Version luna-adapter@v3 (trainiert unquantisiert) wurde auf dem Basismodell in 4bit "
                "gemessen, wie der Kandidat trainierte, nicht wie sie ausgeliefert wird",
                "an older note",
            ],
        ),
        (
            "?lang=en",
            [
                "golden case identity (golden.jsonl:2) was left out: the chat template refuses its system message "
                "(System role not supported)",
                "the base model was loaded unquantized, not in 4bit as the adapter trained (bitsandbytes is not "
                "installed here)",
                "the active luna-adapter@v1 was measured again: its gate record was made on another golden suite "
                "(changed, or read otherwise by this release), val/test data",
                "the active luna-adapter@v2 was measured again: its gate record was made on another val/test data, tier",
                "the active luna-adapter@v3 (trained unquantized) was measured on the base loaded in 4bit as the "
                "candidate trained, not as it is served",
                "an older note",
            ],
        ),
    ],
    ids=["de", "en"],
)
def test_the_gates_notes_are_shown_with_its_reasons_in_the_pages_language(
    page, services: Services, query: str, notes: list[str]
) -> None:
    """Repro: a Gemma 2 user's gate left out a golden case and a QLoRA adapter was gated unquantized, and the
    adapter table said only "bestanden": the gate's notes (what the decision rests on besides the numbers) were
    English sentences in the registry, shown nowhere on the page. A note recorded before notes had codes shows
    as written; "stays registered but inactive" repeats the cell's state and is not shown twice."""
    from lunatrain.messages import Note

    said = [
        Note(
            "gate.case_left_out",
            "case 'identity' (golden.jsonl:2) was left out: …",
            case="identity",
            source="golden.jsonl:2",
            why="System role not supported",
        ),
        Note("gate.unquantized", "…", quantize="4bit", why="bitsandbytes is not installed here"),
        # review repro: which parts of the record differ were English words inside the German line
        Note(
            "gate.baseline_measured_again",
            "…",
            ref="luna-adapter@v1",
            changed="golden suite (changed, or read otherwise by this release), val/test data",
            changedKeys=["suite", "data"],
        ),
        # upgrade repro: a note the previous release recorded has no keys: read back from its English words
        Note("gate.baseline_measured_again", "…", ref="luna-adapter@v2", changed="val/test data, tier"),
        # guide repro: "(trainiert unquantized)", an English word in the German line
        Note("gate.baseline_quantized", "…", ref="luna-adapter@v3", trained="unquantized", quantize="4bit"),
        Note("gate.stays_inactive", "stays registered but inactive: …", reasons="…"),
    ]
    gate = {
        "status": "passed",
        "passed": True,
        "reasons": [],
        "notes": [*said, "an older note"],
        "noteCodes": [n.coded for n in said] + [None],
    }
    version = {"version": "v1", "created": "2026-12-01T10:00:00+00:00", "metrics": {}, "gate": gate}
    table = {"bases": [{"baseModel": "luna-tiny", "adapters": [{"name": "a", "aliases": {}, "versions": [version]}]}]}
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services, query)
    expect(page.locator("tr[data-version=v1] .gate-notes li")).to_have_text(notes)


@pytest.mark.parametrize(
    ("query", "gate", "said", "kind"),
    [
        (
            "",
            {"status": "failed", "passed": False},
            "Job ftjob-g: erfolgreich, Eval-Gate nicht bestanden: nicht aktiviert.",
            "warning",
        ),
        ("", {"status": "error"}, "Job ftjob-g: erfolgreich, Eval-Gate Fehler im Gate: nicht aktiviert.", "warning"),
        (
            "?lang=en",
            {"status": "failed", "passed": False},
            "Job ftjob-g: succeeded, eval gate failed: not activated.",
            "warning",
        ),
        ("", {"status": "passed", "passed": True, "promoted": True}, "Job ftjob-g: erfolgreich.", "notice"),
        # review repros: passed and not activated (cancelled while the gate ran) was a plain success too
        (
            "",
            {"status": "passed", "passed": True, "promoted": False, "noteCodes": [{"code": "gate.cancelled"}]},
            "Job ftjob-g: erfolgreich, Eval-Gate bestanden; nicht aktiviert: der Job wurde abgebrochen, während das "
            "Gate lief.",
            "warning",
        ),
        (
            "?lang=en",
            {"status": "passed", "passed": True, "promoted": False, "noteCodes": [None, {"code": "gate.cancelled"}]},
            "Job ftjob-g: succeeded, eval gate passed; not activated: the job was cancelled while the gate ran.",
            "warning",
        ),
        (
            "",
            {"status": "passed", "passed": True, "promoted": False, "noteCodes": [{"code": "gate.already_active"}]},
            "Job ftjob-g: erfolgreich.",
            "notice",
        ),
    ],
    ids=["de-refused", "de-error", "en-refused", "de-passed", "de-cancelled", "en-cancelled", "de-already-active"],
)
def test_a_job_whose_adapter_the_gate_refused_does_not_finish_as_a_plain_success(
    page, services: Services, query: str, gate: dict, said: str, kind: str
) -> None:
    """Guide repro: after "Schnellstart" the notice said "Job …: erfolgreich." while the gate had refused the new
    version (the job panel further down said "Gate: nicht bestanden", the command line said FAILED, exit 1)."""
    job = {"id": "ftjob-g", "status": "running", "progress": {"step": 1, "totalSteps": 2}}
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", NO_EVENTS)
    open_page(page, services, query)
    expect(page.locator("#job-facts")).to_be_visible()
    answer(page, "**/assistant/training/lora/status*", job | {"status": "succeeded", "gate": gate})
    notice = page.locator("#notices .message", has_text="ftjob-g")
    expect(notice).to_have_text(said)
    expect(notice).to_have_class(re.compile(kind))


@pytest.mark.parametrize(
    ("query", "exported", "volume"),
    [
        ("", "Export fertig: 1 Beispiel.", "1 freigegebenes kuratiertes Beispiel (minCurated 1)"),
        ("?lang=en", "Export done: 1 example.", "1 approved curated example (minCurated 1)"),
    ],
    ids=["de", "en"],
)
def test_one_exported_example_is_said_in_the_singular(
    page, services: Services, query: str, exported: str, volume: str
) -> None:
    """Repro: "Export fertig: 1 Beispiele." and "1 freigegebene kuratierte Beispiele (minCurated 1)"."""
    answer(page, "**/assistant/training/export", {"counts": {"merged": {"total": 1}}})
    check = {
        "id": "volume",
        "severity": "info",
        "count": 1,
        "message": "1 approved curated example (minCurated 1)",
        "code": "check.volume.ok",
        "params": {"curated": 1, "minCurated": 1},
    }
    answer(page, "**/assistant/training/prepare", {"status": "ok", "checks": [check]})
    open_page(page, services, query)
    page.locator("#export-button").click()
    expect(page.locator("#notices")).to_have_text(exported)
    page.locator("#prepare-button").click()
    expect(page.locator("#checks-table tbody tr").first).to_contain_text(volume)


def test_the_german_page_writes_its_numbers_dates_and_words_as_german_readers_expect(page, services: Services) -> None:
    """Repro (an accessibility and localisation review of the German page): the training form showed
    "Lernrate 0.01" and "Dropout 0.05" beside hints in German notation ("0 bis 0,5", "1.024"); the data panel
    said "Bereit je Tier" (a German reader reads "animal") where the form says "Datensatz-Stufe"; dates had a
    two-digit year ("05.12.26")."""
    version = {"version": "v1", "created": "2026-12-01T10:00:00+00:00", "metrics": {}}
    table = {"bases": [{"baseModel": "luna-tiny", "adapters": [{"name": "a", "aliases": {}, "versions": [version]}]}]}
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services)
    expect(page.locator("#f-learningRate")).to_have_value(re.compile(r"^0,\d+$"))
    expect(page.locator("#f-dropout")).to_have_value(re.compile(r"^0,\d+$"))
    expect(page.locator("#data-facts")).to_contain_text("Bereit je Datensatz-Stufe")
    expect(page.locator("#data-facts")).not_to_contain_text("Tier")
    expect(page.locator("tr[data-version=v1]")).to_contain_text("01.12.2026")


def test_the_ready_sentence_is_written_only_when_it_changes(page, services: Services) -> None:
    """Repro: the "Bereit: 272 von mindestens 30 kuratierten Beispielen" line, a polite live region, was
    written anew with the same text at every 15-second refresh, so a screen reader could read it again and
    again into whatever the user was doing."""
    page.clock.install()
    open_page(page, services)
    expect(page.locator("#data-ready")).not_to_be_empty()
    page.evaluate(
        """() => { window.rewrites = 0;
        new MutationObserver((m) => { window.rewrites += m.length; })
          .observe(document.getElementById("data-ready"), { childList: true, characterData: true, subtree: true }); }"""
    )
    with page.expect_request_finished(lambda r: "/assistant/training/status" in r.url):
        page.clock.run_for(16_000)  # the background refresh reads the status again
    page.clock.run_for(1_000)
    assert page.evaluate("window.rewrites") == 0


def test_dismissing_a_message_keeps_keyboard_focus_on_the_messages_or_the_control(page, services: Services) -> None:
    """Repro: pressing Enter on a message's × removed the focused button and left focus on the page's body:
    the next Tab went somewhere else entirely, and a screen reader said nothing. Focus now goes to the next
    message's ×, and from the last one back to the control that failed."""
    answer(page, "**/assistant/training/export", {"error": {"code": "conflict", "message": "eins"}}, status=409)
    open_page(page, services)
    export = page.get_by_role("button", name="Exportieren", exact=True)
    export.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#alerts .message")).to_have_count(1)
    answer(page, "**/assistant/training/export", {"error": {"code": "conflict", "message": "zwei"}}, status=409)
    export.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#alerts .message")).to_have_count(2)
    first = page.locator("#alerts .message").first.locator(".dismiss")
    first.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#alerts .message")).to_have_count(1)
    expect(page.locator("#alerts .message .dismiss")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#alerts .message")).to_have_count(0)
    expect(export).to_be_focused()


def test_focus_set_by_the_page_after_an_adapter_change_is_visible(page, services: Services) -> None:
    """Repro: after a confirmed Aktivieren, the rebuilt table's heading took focus with its outline switched
    off: a keyboard user could not see where focus went."""
    open_page(page, services)
    page.keyboard.press("Tab")  # a keyboard user: what the page focuses next counts as :focus-visible
    page.evaluate("""() => { const h = document.getElementById("adapters-heading");
        h.setAttribute("tabindex", "-1"); h.focus(); }""")
    style = page.evaluate(
        """() => { const s = getComputedStyle(document.getElementById("adapters-heading"));
        return [s.outlineStyle, s.outlineWidth]; }"""
    )
    assert style[0] != "none" and style[1] != "0px", style
    border = page.evaluate("() => getComputedStyle(document.getElementById('try-prompt')).borderTopColor")
    assert border == "rgb(123, 133, 148)", border  # as every other input: 3.9:1 on white, not 1.4:1


def test_the_activate_question_says_it_replaces_a_version_only_when_one_is_active(page, services: Services) -> None:
    """Repro: after a Deaktivieren, activating a version still asked "… aktivieren? Die aktuell aktive
    Version wird ersetzt.", with no version active to replace."""
    inactive = {"active": False, "code": "adapter.inactive", "params": {}, "reason": "not active"}
    active = {"active": True, "code": "adapter.active", "params": {}, "reason": "active"}

    def table(states: list[dict]) -> dict:
        versions = [
            {"version": f"v{i}", "created": "2026-12-01T10:00:00+00:00", "metrics": {}, "state": state}
            for i, state in enumerate(states, start=1)
        ]
        return {"bases": [{"baseModel": "luna-tiny", "adapters": [{"name": "a", "aliases": {}, "versions": versions}]}]}

    for states, replaces in (([inactive, inactive], False), ([inactive, active], True)):
        page.unroute("**/assistant/training/adapters")
        answer(page, "**/assistant/training/adapters", table(states))
        open_page(page, services)
        page.locator("tr[data-version=v1]").get_by_role("button", name=re.compile("aktivieren", re.I)).click()
        question = page.locator("dialog[open]")
        expect(question).to_contain_text("a v1 aktivieren?")
        (expect(question).to_contain_text if replaces else expect(question).not_to_contain_text)("wird ersetzt")
        page.keyboard.press("Escape")


def test_activating_or_rolling_back_to_a_stale_version_asks_knowing_it(page, services: Services) -> None:
    """Forget repro: Roll back and Activate put a version trained on deleted examples back into service, the
    dialog saying no word of it ("Roll luna-adapter back from v2 to the previously active version v1?"), where
    the command line notes it. The question says so, as it says a version the gate refused."""
    inactive = {"active": False, "code": "adapter.inactive", "params": {}, "reason": "not active"}
    active = {"active": True, "code": "adapter.active", "params": {}, "reason": "active"}
    stale = {"reason": "trained on deleted content", "hashes": ["h"], "count": 1, "at": "2026-12-07T00:00:00Z"}
    versions = [
        {"version": "v1", "created": "2026-12-01T10:00:00Z", "metrics": {}, "state": inactive, "stale": stale},
        {"version": "v2", "created": "2026-12-02T10:00:00Z", "metrics": {}, "state": active},
    ]
    adapter = {"name": "a", "aliases": {"latest": "v2", "active": "v2"}, "rollbackTo": "v1", "versions": versions}
    answer(page, "**/assistant/training/adapters", {"bases": [{"baseModel": "luna-tiny", "adapters": [adapter]}]})
    open_page(page, services, "?lang=en")
    said = "a v1 was trained on examples deleted since: it serves what they said again."
    for row, button in (("v1", "^Activate"), ("v2", "^Roll")):
        page.locator(f"tr[data-version={row}]").get_by_role("button", name=re.compile(button)).click()
        question = page.locator("dialog[open]")
        expect(question).to_contain_text(said)
        page.keyboard.press("Escape")
        expect(question).to_have_count(0)


def test_a_failed_check_is_said_in_the_pages_language(page, services: Services) -> None:
    """Repro: starting a training with minCurated 100000 on the German page said "Fehler (409): Prüfung nicht
    bestanden: Not enough data: 273 approved curated examples, 100000 required …": the server's English
    sentence. The answer names its check and values (`params.check`), which the page says in German."""
    said = {
        "code": "check_failed",
        "message": "Not enough data: 273 approved curated examples, 100000 required (minCurated); curate more or lower it.",
        "params": {"check": "check.volume.too_few", "curated": 273, "minCurated": 100000},
    }
    answer(page, "**/assistant/training/lora/start", {"error": said}, status=409)
    open_page(page, services)
    page.get_by_role("button", name="Training starten").click()
    alert = page.locator("#alerts .message-text")
    expect(alert).to_contain_text("Prüfung nicht bestanden: 273 freigegebene kuratierte Beispiele, 100.000 nötig")
    expect(alert).not_to_contain_text("Not enough data")


@pytest.mark.parametrize("query", ["", "?lang=en"])
def test_every_adapter_link_and_button_is_named_from_its_visible_text(page, services: Services, query) -> None:
    """Repro (label in name, WCAG 2.5.3): the link that shows "Bericht" was named "Trainingsbericht von
    luna-adapter v1", so a speech-control user who says "Bericht" may not reach it. Every link and button of
    the adapter table now has a name that holds the words it shows."""
    version = {"version": "v1", "created": "2026-12-01T10:00:00+00:00", "metrics": {}}
    table = {"bases": [{"baseModel": "luna-tiny", "adapters": [{"name": "a", "aliases": {}, "versions": [version]}]}]}
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services, query)
    controls = page.locator("tr[data-version=v1] a, tr[data-version=v1] button")
    expect(controls.first).to_be_visible()
    named = controls.evaluate_all("(els) => els.map((el) => [el.textContent.trim(), el.getAttribute('aria-label')])")
    assert len(named) >= 3, named
    for shown, name in named:  # the shown words as words of the name ("Bericht" is no word of "Trainingsbericht")
        assert name is None or re.search(rf"(?<!\w){re.escape(shown)}(?!\w)", name, re.I), (shown, name)


def test_another_base_models_group_offers_no_activate_or_rollback(page, services: Services) -> None:
    """Review repro: in the group of a base the server does not serve, Rollback called the plain rollback,
    which rolled back the served base's adapter (the notice named a version not in that table), and Activate
    could only be refused. That group says how to change it instead; the served group keeps its buttons."""

    def version(v: str, code: str, active: bool) -> dict:
        state = {"active": active, "code": code, "reason": code, "params": {"name": "a", "version": v}}
        return {"version": v, "created": "2026-01-01T00:00:00Z", "metrics": {}, "state": state}

    def group(base: str, configured: bool) -> dict:
        versions = [version("v2", "adapter.active", True), version("v1", "adapter.deactivated", False)]
        adapter = {"name": "a", "aliases": {"latest": "v2", "active": "v2"}, "rollbackTo": "v1", "versions": versions}
        return {"baseModel": base, "configured": configured, "adapters": [adapter]}

    answer(page, "**/assistant/training/adapters", {"bases": [group("luna-tiny", True), group("org/other", False)]})
    open_page(page, services, "")
    served, other = (
        page.locator(".adapter-group[data-base='luna-tiny']"),
        page.locator(".adapter-group[data-base='org/other']"),
    )
    expect(served.locator("button", has_text=re.compile("^(Aktivieren|Rollback)$"))).to_have_count(2)
    expect(other.locator("button", has_text=re.compile("^(Aktivieren|Rollback)$"))).to_have_count(0)
    expect(other.locator("button", has_text="Deaktivieren")).to_have_count(1)  # acts wherever v2 is active
    expect(other.locator(".other-base")).to_contain_text("--baseModel org/other")
    expect(served.locator(".other-base")).to_have_count(0)
    earlier = group("luna-tiny", False) | {"anotherBuild": True, "fingerprint": "7" * 64}
    answer(page, "**/assistant/training/adapters", {"bases": [group("luna-tiny", True), earlier]})
    page.reload()
    notes = page.locator(".other-base")
    expect(notes).to_have_count(1)
    expect(notes).to_contain_text("anderen Stand von luna-tiny")
    expect(notes).to_contain_text("--force")


def test_another_base_model_typed_in_takes_its_profile_values_not_the_configured_ones(page, services: Services) -> None:
    """Explore repro: the form was filled with the configured base's values (luna-tiny's smoke-test learning
    rate 0.01, rank 8), and Start trained a base typed into the form with them, where `lunatrain luna
    --baseModel=…` takes 0.0002 and rank 16. Typing another base refills what the user has not changed."""
    open_page(page, services)
    expect(page.locator("#f-learningRate")).to_have_value("0,01")
    page.locator("#f-batchSize").fill("3")  # changed by the user: it stays
    page.locator("#f-baseModel").fill("org/other")
    with page.expect_response(re.compile(r"/lora/defaults\?.*baseModel=org%2Fother")):
        page.locator("#f-baseModel").press("Tab")
    expect(page.locator("#f-learningRate")).to_have_value("0,0002")
    expect(page.locator("#f-rank")).to_have_value("16")
    expect(page.locator("#f-batchSize")).to_have_value("3")
    answer(page, "**/assistant/training/lora/start", {"error": {"code": "x", "message": "no"}}, status=503)
    with page.expect_request("**/assistant/training/lora/start") as started:
        page.locator("#start-button").click()
    sent = json.loads(started.value.post_data or "{}")
    assert (sent["baseModel"], sent["learningRate"], sent["rank"], sent["batchSize"]) == ("org/other", 0.0002, 16, 3)


def test_start_right_after_typing_a_base_model_sends_its_values_and_keeps_what_was_typed(
    page, services: Services
) -> None:
    """Review repro: Start clicked straight after typing a base model read the form before the base's values
    arrived (the job trained org/other with luna-tiny's learning rate 0.01), and the refill replaced what the
    user had typed where it was not valid ("abc" in alpha became empty)."""
    open_page(page, services)
    page.locator("#lora-form details.advanced summary").click()
    page.locator("#f-alpha").fill("abc")  # typed, not valid: it stays, and Start says so
    page.locator("#f-baseModel").fill("org/other")
    answer(page, "**/assistant/training/lora/start", {"error": {"code": "x", "message": "no"}}, status=503)
    page.locator("#start-button").click()
    expect(page.locator("#f-alpha")).to_have_value("abc")
    expect(page.locator("#f-alpha")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-learningRate")).to_have_value("0,0002")
    page.locator("#f-alpha").fill("")
    with page.expect_request("**/assistant/training/lora/start") as started:
        page.locator("#start-button").click()
    sent = json.loads(started.value.post_data or "{}")
    assert (sent["baseModel"], sent["learningRate"], sent["rank"]) == ("org/other", 0.0002, 16), sent
    # review repro: a second click while the base's values were loading queued a second job
    starts: list[str] = []
    page.on("request", lambda r: starts.append(r.url) if "/lora/start" in r.url else None)
    page.locator("#f-baseModel").fill("org/third")
    with page.expect_request("**/assistant/training/lora/start"):
        page.locator("#start-button").dblclick()
    expect(page.locator("#start-button")).to_be_enabled()
    assert len(starts) == 1, starts


def test_the_keyboard_and_a_screen_reader_are_told_what_happens(page, services: Services) -> None:
    """Explore repros (accessibility), one page each: a base model the server refuses took the focus back
    after Tab (the next keystrokes went into it, not the field the user was in); the trainer's state changed
    unannounced; example prompts of the other language had no `lang` (read with the page's voice) and were cut
    off, their whole text only in a hover tooltip; every background refresh set the data panel aria-busy."""
    page.clock.install()
    open_page(page, services)
    base, epochs = page.locator("#f-baseModel"), page.locator("#f-epochs")
    base.fill("bad model name")
    with page.expect_response(lambda r: "/lora/defaults" in r.url and r.status == 422):
        base.press("Tab")
    expect(base).to_have_attribute("aria-invalid", "true")  # marked, as it was
    expect(epochs).to_be_focused()  # where the user put it
    page.keyboard.type("5")
    expect(epochs).to_have_value("5")
    expect(base).to_have_value("bad model name")

    expect(page.locator("#provider-label")).to_have_attribute("role", "status")

    page.locator("#try").scroll_into_view_if_needed()
    english = page.locator('#try-example-list button[data-case="identity-en"]')
    expect(english).to_have_attribute("lang", "en")
    expect(page.locator('#try-example-list button[data-case="identity-de"]')).to_have_attribute("lang", "de")
    assert english.evaluate("b => getComputedStyle(b).whiteSpace") != "nowrap"  # the whole prompt is shown

    page.evaluate(
        """() => { window.busyData = [];
        new MutationObserver(() => window.busyData.push(document.getElementById('data').getAttribute('aria-busy')))
          .observe(document.getElementById('data'), { attributes: true, attributeFilter: ['aria-busy'] }); }"""
    )
    with page.expect_response(lambda r: "/assistant/training/status" in r.url):
        page.clock.run_for(16_000)  # the background refresh
    assert "true" not in page.evaluate("window.busyData")


def test_an_adapter_with_many_versions_shows_its_newest_and_the_rest_on_request(page, services: Services) -> None:
    """Scale repro: the table drew every version of every adapter: a year of daily runs was 294 rows, and the
    active one, months old, somewhere among them. It shows the newest 10 of an adapter, the active and latest
    ones always, and a button for the rest that a refresh does not fold again."""

    def version(n: int) -> dict:
        return {"version": f"v{n}", "created": "2026-12-01T10:00:00Z", "metrics": {"valLoss": 2.0, "baseValLoss": 2.5}}

    table = {
        "bases": [
            {
                "baseModel": "luna-tiny",
                "adapters": [
                    {
                        "name": "daily",
                        "aliases": {"active": "v3", "latest": "v25"},
                        "versions": [version(n) for n in range(1, 26)],
                    },
                    {"name": "few", "aliases": {}, "versions": [version(1), version(2)]},
                    {  # an overwrite slot: every revision is "current" (review repro: it was never folded)
                        "name": "slot",
                        "aliases": {"active": "current", "latest": "current"},
                        "versions": [
                            version(0)
                            | {"version": "current", "revision": r, "created": f"2026-11-{r:02d}T10:00:00Z"}
                            | {"state": {"active": r == 15, "code": "adapter.replaced", "params": {}, "reason": "-"}}
                            for r in range(1, 16)
                        ],
                    },
                ],
            }
        ]
    }
    page.clock.install()
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services, "?lang=en")
    daily = page.locator('tr[data-adapter="daily"]')
    expect(daily).to_have_count(11)  # v25..v16 and the active v3
    expect(page.locator('tr[data-adapter="daily"][data-version="v3"]')).to_have_class(re.compile("is-active"))
    expect(page.locator('tr[data-adapter="few"]')).to_have_count(2)  # nothing folded: no button
    expect(page.get_by_role("button", name=re.compile("versions of few"))).to_have_count(0)
    slot = page.locator('tr[data-adapter="slot"]')
    expect(slot).to_have_count(10)  # the newest 10 revisions, the active newest among them
    expect(slot.first).to_have_class(re.compile("is-active"))
    expect(slot.first.locator("td").nth(1)).to_contain_text("15 Nov 2026")
    page.get_by_role("button", name="Show all 15 versions of slot").click()
    expect(slot).to_have_count(15)
    more = page.get_by_role("button", name="Show all 25 versions of daily")
    expect(more).to_have_attribute("aria-expanded", "false")
    more.click()
    expect(daily).to_have_count(25)
    fewer = page.get_by_role("button", name="Show only the newest 10 versions of daily")
    expect(fewer).to_be_focused()  # the rebuilt table keeps the keyboard on the button it pressed
    expect(fewer).to_have_attribute("aria-expanded", "true")
    table["bases"][0]["adapters"][0]["versions"].append(version(26))  # a job lands; the refresh shows it all
    page.unroute("**/assistant/training/adapters")
    answer(page, "**/assistant/training/adapters", table)
    page.clock.run_for(16_000)
    expect(daily).to_have_count(26)
    page.get_by_role("button", name="Show only the newest 10 versions of daily").click()
    expect(daily).to_have_count(11)  # v26..v17 and v3
    page.goto(f"{services.api_url}/?lang=de")
    expect(page.get_by_role("button", name="Alle 26 Versionen von daily zeigen")).to_be_visible()


@pytest.mark.parametrize("failing", ["both lists", "the model list"])
def test_an_unreadable_registry_is_one_alert_that_goes_once_the_lists_load_again(
    page, services: Services, failing: str
) -> None:
    """Repro: with the adapter registry unreadable, the Adapter and the Try-it panel each put the same sentence
    up (two alerts, one per panel label), and once `adapters repair` had rebuilt it and the lists loaded again
    at the next refresh, the alerts stayed until a reload (the Try-it panel's too, when only its list failed)."""
    from lunatrain.registry import _unreadable

    err = _unreadable(Path("reports/training/lora-adapters.json"), "not valid JSON")
    state = {"broken": True}

    def adapters(route) -> None:
        if state["broken"] and failing == "both lists":
            route.fulfill(status=503, json={"error": {"code": err.code, "message": err.message, "params": err.params}})
        else:
            route.fulfill(json=_adapters("luna-adapter"))

    def models(route) -> None:
        if state["broken"]:  # the OpenAI shape /v1 answers in, with the same code and values
            error = {"message": err.message, "type": "server_error", "param": None, "code": err.code}
            route.fulfill(status=503, json={"error": error | {"params": err.params}})
        else:
            data = [{"id": "luna-tiny", "object": "model", "owned_by": "base"}]
            data.append({"id": "luna-adapter@v1", "object": "model", "owned_by": "lunatrain"})
            route.fulfill(json={"object": "list", "data": data})

    page.clock.install()
    page.route("**/assistant/training/adapters", adapters)
    page.route("**/v1/models", models)
    open_page(page, services, "?lang=en")
    page.locator("#try").scroll_into_view_if_needed()  # the model choice loads once its panel is seen
    expect(page.locator("#try-model option")).to_have_count(0)  # its list failed too (no longer "loading")
    said = page.locator("#alerts .message").filter(has_text="adapters repair")
    expect(said).to_have_count(1)
    state["broken"] = False  # `lunatrain adapters repair` in a shell
    page.clock.run_for(16_000)  # the background refresh reads both lists again
    expect(page.locator("#adapter-groups")).to_contain_text("luna-adapter")
    expect(page.locator("#try-model option")).to_have_count(1)
    expect(said).to_have_count(0)


def test_a_late_answer_of_an_older_load_leaves_the_failed_loads_alert_to_the_next_good_one(
    page, services: Services
) -> None:
    """Review repro: the start-up load of the adapter list answered late, after a background refresh had failed
    ("adapters repair"); that late answer, shown to nobody, made the panel forget its failure, so the next good
    load left the alert standing."""
    from lunatrain.registry import _unreadable

    err = _unreadable(Path("reports/training/lora-adapters.json"), "not valid JSON")
    held: list = []
    calls = {"n": 0}

    def adapters(route) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            held.append(route)  # the start-up load answers late
        elif calls["n"] == 2:
            route.fulfill(status=503, json={"error": {"code": err.code, "message": err.message, "params": err.params}})
        else:
            route.fulfill(json=_adapters("luna-adapter"))

    page.clock.install()
    page.route("**/assistant/training/adapters", adapters)
    open_page(page, services, "?lang=en", held="#adapters")
    page.wait_for_function("() => document.getElementById('adapters').getAttribute('aria-busy') === 'true'")
    page.clock.run_for(16_000)  # the background refresh: it fails
    said = page.locator("#alerts .message").filter(has_text="adapters repair")
    expect(said).to_have_count(1)
    assert held, "the start-up load was not held"
    held[0].fulfill(json=_adapters("old"))  # the older answer, late: shown to nobody
    page.clock.run_for(16_000)  # the next refresh reads the list
    expect(page.locator("#adapter-groups")).to_contain_text("luna-adapter")
    expect(said).to_have_count(0)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "vorher abgelehnt: Val-Loss 7,9 ist das 0,93-fache des Basismodells"),
        ("?lang=en", "refused earlier: val loss 7.9 is 0.93 x the base model's"),
    ],
)
def test_a_pass_after_a_refusal_shows_why_it_was_refused(page, services: Services, query: str, said: str) -> None:
    """Review repro: the registry keeps a refusal that a later pass followed (`gate.earlierRefusal`), and
    `adapters list` says "refused earlier"; the adapter table showed only "bestanden"."""
    params = {"split": "val", "loss": 7.9, "ratio": 0.93, "baseLoss": 8.47, "allowed": 0.01, "shown": 4}
    code = {"code": "gate.loss_vs_base", "params": params}
    refusal = {"status": "failed", "passed": False, "reasons": ["val loss 7.9 is …"], "reasonCodes": [code]}
    gate = {"status": "passed", "passed": True, "reasons": [], "earlierRefusal": refusal}
    version = {"version": "v2", "created": "2026-12-01T10:00:00+00:00", "metrics": {}, "gate": gate}
    table = {"bases": [{"baseModel": "luna-tiny", "adapters": [{"name": "a", "aliases": {}, "versions": [version]}]}]}
    answer(page, "**/assistant/training/adapters", table)
    open_page(page, services, query)
    expect(page.locator("tr[data-version=v2] .gate-notes li")).to_contain_text(said)


@pytest.mark.parametrize(
    ("query", "label", "refused"),
    [
        ("", "Der Trainer konnte sein Gerät nicht prüfen ([Errno 24] Too many open files)",
         "Der Trainer konnte sein Gerät nicht prüfen ([Errno 24] Too many open files) und führt keinen Job aus"),
        ("?lang=en", "The trainer could not probe its device ([Errno 24] Too many open files)",
         "The trainer could not probe its device ([Errno 24] Too many open files) and runs no job"),
    ],
)  # fmt: skip
def test_a_trainer_that_could_not_probe_its_device_is_said_as_such(page, services: Services, query, label, refused):
    """Dashboard repro: a trainer whose device probe failed (`ulimit -n 16`) showed as "Online (CPU)" in the
    badge's normal colour with the English "device probe failed: …" as its device, and the refusal of a start
    read "Fehler (503): Trainer nicht erreichbar: …", while the trainer had answered."""
    why = "[Errno 24] Too many open files"
    health = {
        "status": "degraded",
        "cudaAvailable": False,
        "reachable": True,
        "label": "Online (CPU)",
        "device": {"type": "unknown", "name": f"device probe failed: {why}", "bf16": False, "ranks": 1},
        "canTrain": [f"The trainer could not probe its device ({why}), so it can plan and run no job; …"],
    }
    answer(page, "**/assistant/training/lora/provider-health*", health)
    message = f"The trainer could not probe its device ({why}), so it can plan and run no job; stop it and …"
    error = {"code": "service_unavailable", "message": message, "params": {"detail": "trainer.no_device", "why": why}}
    answer(page, "**/assistant/training/lora/start", {"error": error}, status=503)
    open_page(page, services, query)
    expect(page.locator("#provider-label")).to_have_attribute("data-state", "nodevice")
    expect(page.locator("#provider-device")).to_contain_text(label)
    expect(page.locator("#trainer-start")).to_be_hidden()  # it runs: starting another is not the way
    page.locator("#start-button").click()
    alert = page.locator("#alerts .message")
    expect(alert).to_have_count(1)
    expect(alert).to_contain_text(refused)
    expect(alert).not_to_contain_text("nicht erreichbar")
    expect(alert).not_to_contain_text("not reachable")


@pytest.mark.parametrize(
    ("query", "folder_said"),
    [
        ("", "; falls „models/fam“ einen Ordner unter dem Datenverzeichnis meinte: /root/data/models/fam existiert nicht"),
        ("?lang=en", "; if “models/fam” named a folder under the data root instead: /root/data/models/fam does not exist"),
    ],
)  # fmt: skip
def test_a_gone_base_model_folder_is_said_beside_the_hub_advice(page, services: Services, query, folder_said):
    """Cross-surface repro: with `ASSISTANT_BASE_MODEL=models/fam`, a folder under the data root that was moved
    away, the command line and the API said both readings (an uncached hub id; a gone folder), while the
    dashboard said only "not in the local Hugging Face cache: download it once (`hf download models/fam`)"."""
    folder = "/root/data/models/fam"
    message = f"Base model 'models/fam' is not in the local Hugging Face cache … {folder} does not exist; restore it."
    params = {"baseModel": "models/fam", "folder": folder}
    answer(page, "**/assistant/training/prepare*", {"error": {"code": "base_model.not_cached", "message": message,
                                                              "params": params}}, status=422)  # fmt: skip
    open_page(page, services, query)
    page.locator("#prepare-button").click()
    alert = page.locator("#alerts .message")
    expect(alert).to_have_count(1)
    expect(alert).to_contain_text("hf download models/fam")
    expect(alert).to_contain_text(folder_said)


@pytest.mark.parametrize(
    ("query", "button", "said"),
    [
        ("", "Exportieren", "Alle 10 Beispiele des Datensatzes „kuratiert“ fielen in Val/Test (Val-Anteil 0,99, "
         "Test-Anteil 0)"),
        ("?lang=en", "Export", "All 10 samples of the curated tier fell into val/test (val ratio 0.99, test ratio 0)"),
    ],
)  # fmt: skip
def test_an_export_that_leaves_a_tier_nothing_to_train_on_says_so(page, services: Services, query, button, said):
    """API fuzz repro: an export whose curated tier had no train sample left (a val ratio of 0.99, or a few samples
    all in val) said "Export done" in the colour of success; the run failed later, at its preflight."""
    counts = {"curated": {"total": 10, "train": 0, "val": 10, "test": 0}}
    note = {"code": "export.nothing_to_train",
            "params": {"tier": "curated", "count": 10, "valRatio": 0.99, "testRatio": 0.0}}  # fmt: skip
    answer(
        page, "**/assistant/training/export", {"counts": counts | {"merged": counts["curated"]}, "noteCodes": [note]}
    )
    open_page(page, services, query)
    page.get_by_role("button", name=button, exact=True).click()
    notice = page.locator("#notices .message")
    expect(notice).to_contain_text(said)
    expect(notice).to_have_class(re.compile(r"\bwarning\b"))


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "3 Beispiele doppeln ein anderes bis auf Groß-/Kleinschreibung, Leerraum und Satzzeichen (1 davon in "
         "einem anderen Teil als das Beispiel, das es doppelt: Val/Test misst teils Auswendiglernen)"),
        ("?lang=en", "3 samples duplicate another after folding case, whitespace and punctuation (1 of them in another "
         "split than the sample it repeats: val/test partly measure memorisation)"),
    ],
)  # fmt: skip
def test_near_duplicates_in_another_split_are_said_as_the_command_line_says_them(page, services: Services, query, said):
    """Data-check repro: the preflight table's near-duplicate sentence left out what `prepare` says of those in
    another split than their twin (its `acrossSplits`), and that whitespace is folded too."""
    check = {"id": "duplicate_normalized", "severity": "warn", "count": 3, "examples": ["ex-2", "ex-5", "ex-9"],
             "message": "server sentence", "code": "check.duplicate_normalized.found",
             "params": {"count": 3, "acrossSplits": 1}}  # fmt: skip
    answer(page, "**/assistant/training/prepare*", {"status": "warn", "checks": [check]})
    open_page(page, services, query)
    page.locator("#prepare-button").click()
    expect(page.locator("#checks-table tbody tr").nth(0)).to_contain_text(said)


def test_a_refusal_of_a_call_sent_before_the_token_was_given_does_not_ask_again(page, services: Services) -> None:
    """Flake repro, a race of the product: a call the page sent without a token (its first load) that the server
    answered 401 only after the user had given the token asked for the token again, as refused, over the page
    the given token had loaded, and took the focus from it. Only a refusal of the token in effect asks."""
    held: list = []

    def without_a_token_401(route) -> None:
        if "authorization" in route.request.headers:
            route.continue_()
        elif "/assistant/training/status" in route.request.url and not held:
            held.append(route)  # answered once the token was given
        else:
            body = {"error": {"code": "unauthorized", "message": "Missing or wrong bearer token."}}
            route.fulfill(status=401, content_type="application/json", body=json.dumps(body))

    page.route("**/assistant/training/**", without_a_token_401)
    page.goto(f"{services.api_url}/")
    expect(page.locator("#token-form")).to_be_visible()
    assert held, "the page's first status call was not held"
    page.fill("#api-token", "any-token")
    page.locator("#api-token").press("Enter")
    expect(page.locator("#token-form")).to_be_hidden()
    expect(page.locator("section[aria-busy]:not(#data)")).to_have_count(0)
    with page.expect_response(lambda r: r.status == 401 and "/assistant/training/status" in r.url):
        held[0].fulfill(status=401, content_type="application/json",
                        body=json.dumps({"error": {"code": "unauthorized", "message": "Missing."}}))  # fmt: skip
    page.evaluate("() => new Promise((done) => setTimeout(done, 300))")  # its answer is read and handled
    expect(page.locator("#token-form")).to_be_hidden()
    expect(page.locator("#api-token-error")).to_be_hidden()
    expect(page.locator("#main")).to_be_focused()


LONG_NAME = "a" + "b" * 62 + "z"  # the longest adapter name allowed, one word
LONG_BASE = (
    "/srv/modelle/Sprachmodellfeinabstimmungsexperimentierumgebung/"
    "Kundenkommunikationsqualitaetssicherungsbeauftragtenassistenzsystem-Basismodell-v3"
)


def _long_named() -> dict:
    """Two bases, the second at a long path, each with versions of a 64-character adapter: v2 active, v1 not
    (its reason names the active one)."""

    def version(v: str, active: bool) -> dict:
        state = {"active": True, "code": "adapter.active", "params": {}} if active else {
            "active": False, "code": "adapter.other_version_active", "params": {"name": LONG_NAME, "activeVersion": "v2"},
        }  # fmt: skip
        return {"version": v, "created": "2026-12-01T10:00:00Z", "metrics": {"valLoss": 2.5}, "state": state}

    adapter = {"name": LONG_NAME, "aliases": {"active": "v2", "latest": "v2"}}
    return {
        "bases": [
            {
                "baseModel": "luna-tiny",
                "adapters": [adapter | {"versions": [version("v2", True), version("v1", False)]}],
            },
            {"baseModel": LONG_BASE, "configured": False, "adapters": [adapter | {"versions": [version("v1", False)]}]},
        ]
    }


@pytest.mark.parametrize(("losses", "said"), [((0.00176, 0.00106), "0.0015"), ((1760.0, 1060.0), "1,500")])
def test_a_loss_axis_of_one_tick_says_its_value(page, services: Services, losses, said) -> None:
    """Review repro: losses whose range holds a single round tick labelled it "0.00" (0.0015) or "1,500.00"."""
    job = _job("ftjob-running", "running", "luna-adapter")
    points = [{"seq": i + 1, "type": "progress", "step": i + 1, "loss": x} for i, x in enumerate(losses)]
    answer(page, "**/assistant/training/lora/status*", job)
    answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": points, "lastSeq": 2, "hasMore": False})
    open_page(page, services, "?lang=en")
    expect(page.locator("#loss-chart .chart-train")).to_have_count(1)
    labels = page.locator("#loss-chart .chart-grid text").all_text_contents()
    assert said in labels, labels


def _fits(page, selector: str) -> list:
    """[scrollWidth, clientWidth] of each element matching `selector` that is wider than its box."""
    return page.evaluate(
        """(sel) => [...document.querySelectorAll(sel)].map((el) => [sel, el.scrollWidth, el.clientWidth])
            .filter(([, scroll, client]) => scroll > client + 1)""",
        selector,
    )


@pytest.mark.parametrize("query", ["", "?lang=en"])
def test_long_names_and_paths_wrap_instead_of_widening_the_page(browser, services: Services, query: str) -> None:
    """Repros at 360 and 1280 px: a 64-character adapter name in a version's "active is …" note pushed the
    table's actions out of its box at every width; the confirm dialog cut the question naming it; the buttons
    of queued jobs with that name widened the page at phone width, as did a base model's long path in its
    group's heading and a field error quoting such a path; and the loss axis wrote 8.04 twice for ticks 0.005
    apart."""
    running = _job("ftjob-running", "running", LONG_NAME)
    queued = [_job(f"ftjob-queued{i}", "queued", LONG_NAME) for i in range(3)]
    points = [{"seq": i + 1, "type": "progress", "step": i + 1, "loss": x} for i, x in enumerate((8.0308, 8.0429))]
    for width in (1280, 360):
        context = browser.new_context(viewport={"width": width, "height": 900})
        try:
            page = context.new_page()
            answer(page, "**/assistant/training/adapters", _long_named())
            route_job_lists(page, {"running": [running], "queued": queued})
            answer(page, "**/assistant/training/lora/status*", running)
            answer(page, "**/assistant/training/lora/jobs/*/events*", {"data": points, "lastSeq": 2, "hasMore": False})
            served = [{"id": LONG_BASE, "owned_by": "base"}, {"id": LONG_NAME, "owned_by": "lunatrain"}]
            answer(
                page,
                "**/v1/models",
                {"object": "list", "data": [m | {"object": "model", "created": 0} for m in served]},
            )
            open_page(page, services, query)
            page.locator("#try").scroll_into_view_if_needed()  # the panel asks for its models once in view
            expect(page.locator("#try-base-label")).to_contain_text("Kundenkommunikations")
            expect(page.locator("#job-others button")).to_have_count(3)
            expect(page.locator("#loss-chart .chart-train")).to_have_count(1)
            if width > 1000:  # wide enough for the table: nothing of it hides beyond its box
                assert _fits(page, ".adapter-group .table-wrap") == []
            labels = page.locator("#loss-chart .chart-grid text").all_text_contents()
            assert len(labels) == len(set(labels)), labels

            page.locator("details.advanced > summary").click()
            page.locator("#f-baseModel").fill(LONG_BASE.replace("/srv/", "./") + "9")
            page.locator("#f-baseModel").press("Tab")
            expect(page.locator("#f-baseModel-error")).to_contain_text("Kundenkommunikations")
            assert _fits(page, "#f-baseModel-error, .adapter-group h3, .badge-note, .answer figcaption") == []
            widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert widths[0] <= widths[1], f"the page scrolls sideways at {width} px: {widths}"

            page.locator(".adapter-group").first.locator("tr[data-version=v1] button").first.click()
            expect(page.locator("#confirm-text")).to_contain_text(LONG_NAME)
            assert _fits(page, "dialog[open], #confirm-text") == []
            page.keyboard.press("Escape")
        finally:
            context.close()


def test_a_message_a_refresh_clears_while_a_button_is_pressed_does_not_swallow_its_click(
    page, services: Services
) -> None:
    """Explore repro (clicks at a person's speed): one failed health poll put an alert at the top of the page, and
    the next poll cleared it; when that answer came while Export was held, the button moved up, the release
    landed beside it, and nothing was exported. Messages a refresh adds or clears wait for the release."""
    page.clock.install()
    blip = {"on": False}
    page.route("**/lora/provider-health*", lambda route: route.abort() if blip["on"] else route.fallback())
    answer(page, "**/assistant/training/export", {"counts": {"merged": {"total": 3}}, "noteCodes": []})
    open_page(page, services)
    blip["on"] = True
    page.clock.run_for(16_000)  # the next poll fails: an alert
    expect(page.locator("#alerts .message")).to_have_count(1)
    blip["on"] = False
    held = hold_first_answer(page, lambda url: "/lora/provider-health" in url)
    page.clock.run_for(16_000)  # the poll after asks, and its answer is held
    for _ in range(300):
        if held.response is not None:
            break
        page.wait_for_timeout(50)
    page.locator("#export-button").scroll_into_view_if_needed()
    box = page.locator("#export-button").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    held.route.fulfill(response=held.answer(page))  # the poll's answer comes while the button is held
    page.wait_for_timeout(100)
    with page.expect_request("**/assistant/training/export"):
        page.mouse.up()
        page.clock.run_for(10)
    page.clock.run_for(10)
    expect(page.locator("#alerts .message")).to_have_count(0)  # cleared, once released
