"""The trainer service's own HTTP API, in process (its device probed in this process, no job run): what a client
that calls it directly gets for input the submitting clients (`lunatrain lora`, the assistant API) refuse
before they submit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lunatrain.evalgate import GateThresholds
from lunatrain.settings import Settings

from helpers import make_records, write_export


@pytest.fixture
def trainer(settings: Settings, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from lunatrain.models import device_info
    from lunatrain.service import warm
    from lunatrain.service.app import create_app

    monkeypatch.setattr(warm.WarmWorker, "start", lambda self: device_info())  # no warm child to start
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


def _jobs(client: TestClient) -> list:
    return client.get("/jobs").json()["data"]


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ('{"hidden_size": 1e300}', "hidden_size is 1e+300, not a whole number from 1 to"),
        ('{"hidden_size": Infinity}', "hidden_size is Infinity"),
        ('{"hidden_size": NaN}', "hidden_size is NaN"),
        ('{"hidden_size": "x"}', 'hidden_size is "x"'),
        ('{"hidden_size": 64.5}', "hidden_size is 64.5"),
        ('{"num_attention_heads": 0}', "num_attention_heads is 0"),  # set, not missing (it said "missing 'n_head'")
        ('{"num_hidden_layers": -2}', "num_hidden_layers is -2"),  # passed the check, the job could only fail
        ('{"vocab_size": true}', "vocab_size is true"),
        ('{"text_config": [1]}', "text_config is list, not an object"),
        ('{"hidden_size": null, "n_embd": null}', "it sets none of hidden_size, n_embd, d_model"),
    ],
)
def test_a_base_models_config_with_impossible_dimensions_is_a_422_naming_the_key(
    trainer: TestClient, tmp_path: Path, config: str, said: str
) -> None:
    """Trainer API repro: a config.json with `hidden_size` 1e300, Infinity or a list as `text_config` answered
    500 on both routes (the assistant API said "The trainer failed to answer (500)", as if it were down); a
    negative layer count passed `/jobs/check` and queued a job that could only fail; "x" was said as
    "(missing invalid literal for int() with base 10: 'x')"."""
    model = tmp_path / "odd-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"junk")
    shape = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    shape |= {"intermediate_size": 128, "vocab_size": 1000}
    written = json.dumps(shape)[:-1] + ", " + config[1:]  # later keys win, as json.loads reads them
    (model / "config.json").write_text(written)
    for path in ("/jobs/check", "/jobs"):
        r = trainer.post(path, json={"baseModel": str(model), "adapterName": "odd"})
        assert r.status_code == 422, (path, r.text)
        message = r.json()["error"]["message"]
        assert "does not describe a decoder the memory plan knows: " in message and said in message, message
    assert _jobs(trainer) == []


def test_an_adapter_named_as_its_base_model_is_refused_before_a_job_is_queued(trainer: TestClient) -> None:
    """Trainer API repro: `adapterName` "luna-tiny" on base luna-tiny passed `/jobs/check` and was queued (202),
    then the job failed; the assistant API refuses the same body with 422."""
    for path in ("/jobs/check", "/jobs"):
        r = trainer.post(path, json={"baseModel": "luna-tiny", "adapterName": "luna-tiny", "requestId": "same"})
        assert r.status_code == 422, (path, r.text)
        assert "is the name of the base model it would be trained on" in r.json()["error"]["message"], r.text
    assert _jobs(trainer) == []


def test_a_job_asking_more_curated_examples_than_the_export_holds_is_not_queued(
    trainer: TestClient, settings: Settings
) -> None:
    """Trainer API repro: `options.minCurated` 5000 on an export of 40 examples was queued, trained and
    registered an adapter whose job record still said minCurated 5000; the assistant API answers 409. The
    check before an export (`/jobs/check`, what one-click starts ask first) does not read the export."""
    records = make_records(40)
    curated = sum(r["source"] == "curated" for r in records)
    write_export(settings, records)
    body = {"baseModel": "luna-tiny", "adapterName": "mc", "options": {"minCurated": 5000, "gate": False}}
    assert trainer.post("/jobs/check", json=body).json() == {"job": None}
    r = trainer.post("/jobs", json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "check_failed", r.text
    assert f"{curated} approved curated examples, 5000 required (minCurated)" in r.json()["error"]["message"], r.text
    assert _jobs(trainer) == []


def test_get_on_the_check_route_is_a_405_naming_post_not_a_job_lookup(trainer: TestClient) -> None:
    """Trainer API repro: `GET /jobs/check` answered 404 "No job 'check'"."""
    r = trainer.get("/jobs/check")
    assert r.status_code == 405 and r.headers["allow"] == "POST", (r.headers, r.text)
    assert r.json()["error"]["message"] == "Method GET not allowed here; use POST.", r.text
    missing = trainer.get("/jobs/ftjob-" + "0" * 24)
    assert missing.status_code == 404 and "No job" in missing.json()["error"]["message"], missing.text
    assert trainer.get("/jobs/checks").status_code == 404  # only the route's own name is taken


@pytest.mark.parametrize("spelled", [{}, GateThresholds().model_dump(by_alias=True), None])
def test_default_gate_thresholds_however_spelled_are_the_request_without_them(spelled: dict | None) -> None:
    """Trainer API repro: a retry adding `"gateThresholds": {}` (the defaults) got 409 "requestId … was already
    used … with other parameters", where default LoRA parameters spelled out are the same request."""
    from lunatrain.service.app import JobCreate

    body = {"baseModel": "luna-tiny", "requestId": "r1"}
    assert JobCreate.model_validate(body | {"gateThresholds": spelled}).thresholds() is None
    stricter = JobCreate.model_validate(body | {"gateThresholds": {"maxValLossRatioVsBase": 1.01}}).thresholds()
    assert stricter is not None and stricter["maxValLossRatioVsBase"] == 1.01
