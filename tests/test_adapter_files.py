"""The adapter file routes the dashboard links to: a version's training-report.json and loss-curve.png, found
through the registry by name and version only.

Run: `.venv/bin/python -m pytest tests/test_adapter_files.py -q`
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lunatrain import registry
from lunatrain.api.main import create_app
from lunatrain.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
BASE = "/assistant/training/adapters"


@pytest.fixture
def client(settings: Settings) -> TestClient:
    # The guard allows loopback Host names only, so talk to the app as 127.0.0.1.
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c


def publish(settings: Settings, name: str, files: dict[str, bytes]) -> str:
    work = settings.home / f"work-{name}-{len(files)}"
    work.mkdir(parents=True)
    for fname, data in files.items():
        (work / fname).write_bytes(data)
    entry = registry.publish(
        settings,
        name,
        "versioned",
        work,
        {"metrics": {"valLoss": 1.0}, "baseModel": {"id": "luna-tiny", "fingerprint": "f" * 64}},
    )
    return entry["version"]


def test_report_and_curve_of_a_version(client: TestClient, settings: Settings) -> None:
    report = {"format": "lunatrain-training-report/1", "metrics": {"valLoss": 1.5}}
    v1 = publish(settings, "luna-adapter", {"training-report.json": json.dumps(report).encode(), "loss-curve.png": PNG})

    r = client.get(f"{BASE}/luna-adapter/versions/{v1}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == report
    r = client.get(f"{BASE}/luna-adapter/versions/{v1}/loss-curve.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == PNG
    # Aliases resolve like everywhere else in the registry.
    assert client.get(f"{BASE}/luna-adapter/versions/latest/report").json() == report


@pytest.mark.parametrize(
    "path, statuses",
    [
        ("/nobody/versions/v1/report", {404}),  # no such adapter
        ("/luna-adapter/versions/v9/report", {404}),  # no such version
        ("/luna-adapter/versions/v1/loss-curve.png", {404}),  # version without the file
        # Names are ids, never paths: an encoded separator either matches no route or fails the name rule.
        ("/..%2F..%2Fetc/versions/v1/report", {404, 422}),
        ("/luna-adapter/versions/..%2Fv1/report", {404, 422}),
        ("/luna-adapter/versions/.hidden/report", {422}),
        ("/luna-adapter/versions/v1..x/report", {404, 422}),  # looked up as an id, never joined to a path
    ],
)
def test_bad_requests_get_a_clear_4xx(client: TestClient, settings: Settings, path: str, statuses: set[int]) -> None:
    publish(settings, "luna-adapter", {"training-report.json": b"{}"})
    r = client.get(BASE + path)
    assert r.status_code in statuses, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("filename", "content", "said"),
    [
        ("training-report.json", b"[1,", "not valid JSON"),
        ("training-report.json", b"[1, 2]", "a JSON list, not an object"),
        ("loss-curve.png", b"notpng", "not a PNG image"),
    ],
)
def test_a_damaged_file_is_503_as_the_cli_says_not_served_as_it_is(
    client: TestClient, settings: Settings, filename: str, content: bytes, said: str
) -> None:
    """Repro: a training-report.json holding `[1,` was served as 200 application/json (and a loss-curve.png
    holding text as 200 image/png), while `adapters show` called the same report damaged (exit 1)."""
    v1 = publish(settings, "luna-adapter", {filename: content})
    kind = "report" if filename.endswith(".json") else "loss-curve.png"
    r = client.get(f"{BASE}/luna-adapter/versions/{v1}/{kind}")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "storage_error" and filename in err["message"] and said in err["message"], err


def test_a_symlink_out_of_the_data_root_is_not_followed(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "x"}')
    v1 = publish(settings, "luna-adapter", {})
    (
        registry.adapter_dir(settings, registry.get_version(settings, "luna-adapter", v1)) / "training-report.json"
    ).symlink_to(secret)
    r = client.get(f"{BASE}/luna-adapter/versions/{v1}/report")
    assert r.status_code in (404, 422) and "token" not in r.text
