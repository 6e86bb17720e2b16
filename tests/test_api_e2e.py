"""End to end against real processes: `lunatrain serve` as a subprocess on a port it binds itself (`--port 0`,
read back from data/api/api.url), its trainer started on demand by the API itself on a port of its own, a real
LoRA job on the tiny model.

Run: `.venv/bin/python -m pytest tests/test_api_e2e.py -q` (slow: a real training job; minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lunatrain.service.jobs import TERMINAL
from lunatrain.service.lock import pid_path
from lunatrain.settings import load_settings

from trainer_helpers import ON_DEMAND_ENV, recorded_url

pytestmark = pytest.mark.slow
LUNATRAIN = str(Path(sys.executable).parent / "lunatrain")


class Api:
    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.record = load_settings(home=home).api_url_file
        self.env = (
            {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
            | {
                "ASSISTANT_HOME": str(home),
                # any free port: the trainer the API starts binds one itself and records it under `home`
                "ASSISTANT_LORA_TRAINER_URL": "http://127.0.0.1:0",
            }
            | ON_DEMAND_ENV
            | env
        )
        self.log = home / "serve.log"

    def __enter__(self) -> Api:
        self.record.unlink(missing_ok=True)  # an earlier server's address is not this one's
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [LUNATRAIN, "serve", "--port", "0"],
                env=self.env,
                cwd=self.home,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 180
        url = recorded_url(self.record, self.proc, 180)
        if not url:
            self.proc.kill()
            raise RuntimeError(f"serve did not record its address:\n{self.log.read_text()}")
        self.client = httpx.Client(base_url=url, timeout=120, trust_env=False)
        while True:
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/openapi.json").status_code == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not come up:\n{self.log.read_text()}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stop_trainer()

    def _stop_trainer(self) -> None:
        # The trainer was started detached (its own session) by the API's ensure; end that process group.
        pid_file = pid_path(load_settings(home=self.home))
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            pid = int(pid_file.read_text().strip())
            os.killpg(pid, signal.SIGTERM)
            for _ in range(300):  # up to 30 s for a graceful stop, then force
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)

    def wait_job(self, job_id: str, limit_s: float = 900) -> dict:
        deadline = time.monotonic() + limit_s
        seen_states = set()
        while True:
            r = self.client.get("/assistant/training/lora/status", params={"jobId": job_id})
            assert r.status_code == 200, r.text
            job = r.json()
            seen_states.add(job["status"])
            if job["status"] in TERMINAL:
                job["seenStates"] = sorted(seen_states)
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {limit_s}s")
            time.sleep(1.0)


@pytest.fixture
def api(home: Path) -> Iterator[Api]:
    with Api(home) as a:
        yield a


def test_example_adapter_trains_through_an_on_demand_trainer(api: Api) -> None:
    health = api.client.get("/assistant/training/lora/provider-health").json()
    assert health["label"] == "Offline" and health["reachable"] is False  # nothing started it yet

    r = api.client.post("/assistant/training/lora/example-adapter", json={"requestId": "e2e-example-1"})
    assert r.status_code == 202, r.text
    accepted = r.json()
    job_id = accepted["jobId"]
    assert accepted["job"]["status"] in {"validating", "queued", "running"}
    assert accepted["seeded"]["examplesAdded"] > 0 and accepted["export"]["counts"]["curated"]["total"] > 0

    # The same requestId again is the same job, not a second one, and exports nothing: a retry re-exported,
    # replacing the tier the job trains from
    exported = api.client.get("/assistant/training/status").json()["lastExport"]
    again = api.client.post("/assistant/training/lora/example-adapter", json={"requestId": "e2e-example-1"})
    assert again.status_code == 202 and again.json()["jobId"] == job_id
    assert again.json()["export"] is None and again.json()["seeded"] is None, again.json()
    assert api.client.get("/assistant/training/status").json()["lastExport"] == exported

    job = api.wait_job(job_id)
    assert job["status"] == "succeeded", job
    assert job["adapter"]["name"] == "example-adapter" and job["adapter"]["version"] == "v1"
    assert job["error"] is None and job["progress"]["percent"] == pytest.approx(100.0)
    assert job["progress"]["totalSteps"] and job["progress"]["step"] == job["progress"]["totalSteps"]

    health = api.client.get("/assistant/training/lora/provider-health").json()
    assert health["reachable"] is True
    assert health["label"] == ("Aktiv (CUDA)" if health["cudaAvailable"] else "Online (CPU)")
    assert health["label"] == "Online (CPU)"  # these machines train on CPU
    # Explore repro: the trainer named its stack in a Server header and took the scheme from X-Forwarded-Proto,
    # which the API had turned off for itself. Both are started alike now (web/listen.py).
    trainer_url = load_settings(home=api.home).trainer_url_file.read_text().strip()
    for said in (api.client.get("/assistant/training/status"), httpx.get(f"{trainer_url}/health", trust_env=False)):
        assert said.status_code == 200 and "server" not in said.headers, said.headers

    latest = api.client.get("/assistant/training/lora/status").json()
    assert latest["id"] == job_id
    events = api.client.get(f"/assistant/training/lora/jobs/{job_id}/events", params={"after": 0, "limit": 1000}).json()
    assert any(e["type"] == "progress" for e in events["data"]) and events["lastSeq"] >= len(events["data"])
    more = api.client.get(f"/assistant/training/lora/jobs/{job_id}/events", params={"after": events["lastSeq"]}).json()
    assert more["data"] == [] or more["data"][0]["seq"] > events["lastSeq"]

    jobs = api.client.get("/assistant/training/lora/jobs").json()["data"]
    assert [j["id"] for j in jobs] == [job_id]
    adapter = api.client.get("/assistant/training/adapters/example-adapter").json()
    assert [v["version"] for v in adapter["versions"]] == ["v1"]
    groups = api.client.get("/assistant/training/adapters").json()["bases"]
    assert any(a["name"] == "example-adapter" for g in groups for a in g["adapters"])
    status = api.client.get("/assistant/training/status", params={"minCurated": 1}).json()
    assert status["ready"] is True

    # Refused starts change nothing: no export, no seeding, no job.
    before = status["lastExport"]
    for path, body, code in (
        ("quick-start", {"requestId": "e2e-example-1"}, 409),  # that requestId names a job of other parameters
        ("quick-start", {"baseModel": "nonexistent-org/model"}, 422),  # not in the local cache
        ("example-adapter", {"requestId": "e2e-example-1", "adapterName": "other-adapter"}, 409),
        ("start", {"chatTemplate": "nonexistent", "maxSteps": 1}, 422),  # refused now, not a failed job later
    ):
        r = api.client.post(f"/assistant/training/lora/{path}", json=body)
        assert r.status_code == code, (path, body, r.text)
        now = api.client.get("/assistant/training/status", params={"minCurated": 1}).json()["lastExport"]
        assert now == before, (path, body)
    assert [j["id"] for j in api.client.get("/assistant/training/lora/jobs").json()["data"]] == [job_id]

    # A finished job cannot be cancelled; an unknown one is a 404.
    assert api.client.post(f"/assistant/training/lora/jobs/{job_id}/cancel").status_code == 409
    assert api.client.get("/assistant/training/lora/status", params={"jobId": "ftjob-doesnotexist"}).status_code == 404


def test_one_click_starts_on_a_tier_without_samples_are_refused_and_a_retry_gets_its_job(home: Path) -> None:
    """Review repros: a quick start on a store without an approved sample of its tier (a profile with minCurated
    0), and an example adapter on a store of memory items only (not seeded: the user's own data), queued a job
    that failed with "add examples and export again", an export they make themselves. Both are refused before
    anything is exported or queued, naming where samples come from; a retry of an accepted quick start still
    gets its job when the tier has emptied since."""
    (home / "profiles").mkdir()
    (home / "profiles" / "q.toml").write_text(
        "[lora]\nminCurated = 0\nmaxSeqLength = 128\nrank = 4\n[quickStart]\nepochs = 1\nmaxSteps = 1\n"
    )
    with Api(home, ASSISTANT_LORA_WARM_WORKER="false") as api:
        T = "/assistant/training"
        r = api.client.post(f"{T}/lora/quick-start", json={"profile": "q", "datasetTier": "memory"})
        error = r.json()["error"]
        assert r.status_code == 409 and error["params"] == {"check": "tier.no_samples", "tier": "memory"}, r.text
        assert "`lunatrain memory add`" in error["message"], error
        assert api.client.post(f"{T}/memory", json={"question": "Wer?", "answer": "Luna."}).status_code == 201
        r = api.client.post(f"{T}/lora/example-adapter", json={})
        assert r.status_code == 409 and r.json()["error"]["params"]["tier"] == "curated", r.text
        assert api.client.get(f"{T}/examples").json()["count"] == 0  # not seeded into the user's data
        assert api.client.get(f"{T}/status").json()["lastExport"] is None  # nothing exported
        assert api.client.get(f"{T}/lora/jobs").json()["data"] == []
        example = api.client.post(f"{T}/examples", json={"prompt": "Wie heißt du?", "response": "Luna."}).json()
        body = {"profile": "q", "requestId": "q-1"}
        first = api.client.post(f"{T}/lora/quick-start", json=body)
        assert first.status_code == 202, first.text
        assert api.client.post(f"{T}/examples/{example['id']}/reject").status_code == 200
        again = api.client.post(f"{T}/lora/quick-start", json=body)
        assert again.status_code == 202 and again.json()["jobId"] == first.json()["jobId"], again.text
        api.client.post(f"{T}/lora/jobs/{first.json()['jobId']}/cancel")
        api.wait_job(first.json()["jobId"])


def test_with_ensure_off_and_no_trainer_start_is_503_and_health_offline(home: Path) -> None:
    with Api(home, ASSISTANT_LORA_ENSURE_ON_DEMAND="false") as api:
        for path, body in (
            ("/assistant/training/lora/start", {"epochs": 1, "maxSteps": 2}),
            ("/assistant/training/lora/quick-start", {}),
            ("/assistant/training/lora/example-adapter", {}),
        ):
            r = api.client.post(path, json=body)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "service_unavailable" and "ASSISTANT_LORA_ENSURE_ON_DEMAND" in err["message"]
        health = api.client.get("/assistant/training/lora/provider-health")
        assert health.status_code == 200 and health.json()["label"] == "Offline"
        # A refused start changed nothing: the store was not seeded.
        examples = api.client.get("/assistant/training/examples").json()
        assert examples["count"] == 0
        assert not pid_path(load_settings(home=home)).exists()
    # Repro: the API's request log lines carried no time at all (`INFO:     127.0.0.1:… - "GET …" 200`); they
    # are stamped in UTC with Z as the trainer's log and every record are.
    requests = [line for line in api.log.read_text().splitlines() if '"GET /assistant/training/examples' in line]
    assert requests, api.log.read_text()
    for line in requests:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO ", line), line
