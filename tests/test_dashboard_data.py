"""The dashboard's data panel in a real headless Chromium against a real `lunatrain serve` (no training): what
an export and a preflight say when they fail and when they succeed after a failure, and a threshold the panel
cannot use. Server errors are the server's own, or one answer replaced on the way (`page.route`).

Run: `.venv/bin/python -m pytest tests/test_dashboard_data.py -q` (needs /usr/bin/chromium).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

# The dashboard tests' marks (slow, needs Chromium), its browser and page fixtures and helpers.
from test_dashboard import browser, expect, open_page, page, pytestmark, shot  # noqa: F401

from dashboard_helpers import Services, start_services, stop_services


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    svc = start_services(tmp_path_factory.mktemp("data-home"))
    try:
        yield svc
    finally:
        stop_services(svc)


def test_a_successful_export_clears_the_errors_it_made_stale(page, services: Services, output_dir: Path) -> None:
    open_page(page, services)
    alerts = page.locator("#alerts .message")
    # Preflight before any export: the server refuses (nothing to check yet).
    page.get_by_role("button", name="Preflight (prepare)").click()
    expect(alerts.filter(has_text="Preflight (prepare)")).to_have_count(1)
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
    expect(page.locator("#data-min-curated-error")).to_have_text("Erlaubt: ganze Zahl ab 0.")
    expect(threshold).to_be_focused()
    shot(page, output_dir, "1-invalid-threshold")
    # A valid value clears the mark and is what the next preflight asks with.
    threshold.fill("3")
    expect(threshold).not_to_have_attribute("aria-invalid", "true")
    with page.expect_request("**/assistant/training/prepare") as asked:
        page.get_by_role("button", name="Preflight (prepare)").click()
    assert json.loads(asked.value.post_data or "{}") == {"minCurated": 3}
    assert len(sent) == 1, sent
