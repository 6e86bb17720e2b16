"""The assistant API in-process (no trainer running): shapes, error bodies, and that bad input changes nothing.

Run: `.venv/bin/python -m pytest tests/test_api.py -q`
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lunatrain import export, store
from lunatrain.api.deps import check_base_model
from lunatrain.api.main import create_app
from lunatrain.errors import UsageError
from lunatrain.settings import load_settings

from helpers import adapter_work_dir

T = "/assistant/training"


@pytest.fixture
def client(home: Path, dead_port: int) -> Iterator[TestClient]:
    settings = load_settings(lora_ensure_on_demand=False, lora_trainer_url=f"http://127.0.0.1:{dead_port}")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c
    store.dispose_stores()


def _bodyless_routes() -> list[tuple[str, str]]:
    """(method, path) of every route that changes something and takes no body."""
    from lunatrain.api import routes

    found = []
    for router in routes.ROUTERS:
        for route in router.routes:
            methods = getattr(route, "methods", set()) & {"POST", "PUT", "PATCH", "DELETE"}
            if methods and getattr(route, "body_field", None) is None:
                found += [(m, route.path) for m in methods]
    return sorted(found)


def test_a_route_that_takes_no_body_refuses_one_and_changes_nothing(client: TestClient) -> None:
    """Repro: `POST /examples/4/approve` with `{"status": "rejected"}` approved, and `DELETE` with a body
    deleted: the body was ignored, so a client that thought it sent options got a success it did not mean.
    Every such route refuses a body with content (nothing, `{}` and `null` are none: the dashboard posts `{}`)."""
    made = client.post(f"{T}/examples", json={"prompt": "p", "response": "r"}).json()
    item = client.post(f"{T}/memory", json={"question": "Was trinke ich?", "answer": "Tee."}).json()
    ids = {"{id:int}": str(made["id"]), "{jobId}": "ftjob-nothing", "{name}": "luna-adapter"}
    bodyless = _bodyless_routes()
    assert len(bodyless) >= 7, bodyless
    before = (client.get(f"{T}/examples").json(), client.get(f"{T}/memory").json())
    for method, path in bodyless:
        url = path
        for key, value in ids.items():
            url = url.replace(key, str(item["id"]) if key == "{id:int}" and "/memory" in path else value)
        res = client.request(method, url, json={"status": "rejected"})
        assert res.status_code == 422, (method, url, res.text)
        assert (
            res.json()["error"]["message"] == "This request takes no body; send none (what it acts on is in its path)."
        )
    assert (client.get(f"{T}/examples").json(), client.get(f"{T}/memory").json()) == before
    # nothing, {} and null are no body: the request goes through
    assert client.post(f"{T}/examples/{made['id']}/reject", json={}).json()["status"] == "rejected"
    assert client.post(f"{T}/examples/{made['id']}/approve", content=b"null").json()["status"] == "approved"
    assert client.post(f"{T}/examples/{made['id']}/reject").json()["status"] == "rejected"
    assert client.post(f"{T}/examples/{made['id']}/approve", content=b"{ \n}").json()["status"] == "approved"


def test_examples_add_curate_delete_roundtrip(client: TestClient) -> None:
    r = client.post(f"{T}/examples", json={"prompt": "Wie heißt du?", "response": "Ich bin Luna.", "tags": ["persona"]})
    assert r.status_code == 201
    ex = r.json()
    assert ex["status"] == "approved" and ex["source"] == "curated" and ex["tags"] == ["persona"]
    assert {"conversationId", "createdAt", "updatedAt"} <= set(ex)  # camelCase on the wire
    # Repro: examples and memory items said `2026-12-05T17:01:23.067703+00:00`, every job, event and report
    # `2026-12-05T17:02:12.540Z`: one format everywhere (UTC, milliseconds, Z), so stamps compare as text.
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp, ex["createdAt"]) and re.fullmatch(stamp, ex["updatedAt"]), ex
    item = client.post(f"{T}/memory", json={"question": "Wie heißt mein Hund?", "answer": "Bruno."}).json()
    assert re.fullmatch(stamp, item["createdAt"]), item

    dup = client.post(f"{T}/examples", json={"prompt": "Wie heißt du?", "response": "Ich bin Luna."})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"

    assert client.post(f"{T}/examples/{ex['id']}/reject").json()["status"] == "rejected"
    listed = client.get(f"{T}/examples", params={"status": "rejected"}).json()
    assert [e["id"] for e in listed["examples"]] == [ex["id"]] and listed["count"] == 1
    # search (store's test: every field, case and Unicode forms); a blank one is a 422, not every example
    found = client.get(f"{T}/examples", params={"search": "LUNA"}).json()
    assert [e["id"] for e in found["examples"]] == [ex["id"]], found
    assert client.get(f"{T}/examples", params={"search": "Bruno"}).json()["examples"] == []
    assert [m["id"] for m in client.get(f"{T}/memory", params={"search": "bruno"}).json()["items"]] == [item["id"]]
    for blank in ("", " "):
        refused = client.get(f"{T}/examples", params={"search": blank})
        assert refused.status_code == 422 and "search" in refused.text, refused.text
    assert client.post(f"{T}/examples/{ex['id']}/approve").json()["status"] == "approved"
    assert client.delete(f"{T}/examples/{ex['id']}").json() == {
        "deleted": ex["id"],
        "staleAdapters": [],
        "stillHeldAs": [],
    }
    gone = client.delete(f"{T}/examples/{ex['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_an_example_turn_with_weight_0_is_context_only_and_said_so(client: TestClient, settings) -> None:
    """A prior assistant turn may be context only (`weight: 0`, OpenAI's key): stored, answered back and
    listed with it; weight 0 on a user turn, which is never trained, is a 422 that adds nothing."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hallo", "weight": 0}]
    r = client.post(f"{T}/examples", json={"prompt": "Und?", "response": "Gut", "turns": turns})
    assert r.status_code == 201, r.text
    assert r.json()["turns"] == [{"role": "user", "content": "Hi"}, turns[1]]
    assert client.get(f"{T}/examples").json()["examples"][0]["turns"][1] == turns[1]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hallo"}]
    assert client.post(f"{T}/examples", json={"prompt": "Und?", "response": "Gut", "turns": plain}).status_code == 201

    bad = [{"role": "user", "content": "Hi", "weight": 0}, {"role": "assistant", "content": "Hallo"}]
    r = client.post(f"{T}/examples", json={"prompt": "Und?", "response": "Anders", "turns": bad})
    assert r.status_code == 422 and "turns[0].weight" in r.json()["error"]["message"], r.text
    for weight in (2, True, False, 0.0):  # as a file import: 0 or 1, nothing that only equals them
        turn = plain[1] | {"weight": weight}
        assert client.post(f"{T}/examples", json={"prompt": "a", "response": "b", "turns": [turn]}).status_code == 422
    assert store.counts(settings)["totals"]["examples"] == 2


def test_import_is_all_or_nothing_and_names_the_bad_record(client: TestClient, settings) -> None:
    good = {"messages": [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hallo!"}]}
    bad = {"instruction": "Sag etwas", "output": ""}
    r = client.post(f"{T}/examples/import", json={"records": [good, bad]})
    assert r.status_code == 422
    assert "records[1]" in r.json()["error"]["message"] and "output" in r.json()["error"]["message"]
    assert store.counts(settings)["totals"]["examples"] == 0

    alpaca = {"instruction": "Sag etwas", "output": "Etwas."}
    r = client.post(f"{T}/examples/import", json={"records": [good, alpaca, good]})
    assert r.status_code == 200
    assert r.json() == {
        "records": 3,
        "added": 2,
        "duplicates": 1,
        "formats": {"openai": 2, "alpaca": 1},
        "keptBeside": [],
    }
    again = client.post(f"{T}/examples/import", json={"records": [good]}).json()
    assert again["added"] == 0 and again["duplicates"] == 1


def test_import_takes_records_never_a_path(client: TestClient) -> None:
    r = client.post(f"{T}/examples/import", json={"path": "/etc/passwd"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_memory_items(client: TestClient) -> None:
    r = client.post(f"{T}/memory", json={"question": "Lieblingsfarbe?", "answer": "Blau.", "topic": "prefs"})
    assert r.status_code == 201 and r.json()["topic"] == "prefs"
    items = client.get(f"{T}/memory").json()
    assert items["count"] == 1 and items["items"][0]["answer"] == "Blau."
    assert client.delete(f"{T}/memory/{r.json()['id']}").status_code == 200
    assert client.get(f"{T}/memory").json()["count"] == 0


def test_short_fields_count_their_length_as_stored_as_the_import_and_the_cli_do(client: TestClient) -> None:
    """Memory-workflow repro: a tag of 40 "Ä" typed decomposed (80 code points, 40 as stored) and a topic of 200
    characters with spaces around it were refused by POST /memory and POST /examples, while `memory add`, the
    file import and POST /examples/import stored them: the API counted the text as sent."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "Ä" * 40)
    topic = " " + "t" * 200 + " "
    r = client.post(f"{T}/memory", json={"question": "F1", "answer": "A1", "tags": [decomposed], "topic": topic})
    assert r.status_code == 201, r.text
    assert r.json()["tags"] == ["Ä" * 40] and r.json()["topic"] == "t" * 200
    r = client.post(
        f"{T}/examples", json={"prompt": "F2", "response": "A2", "tags": [decomposed], "conversationId": topic}
    )
    assert r.status_code == 201 and r.json()["conversationId"] == "t" * 200, r.text
    for path, body, field in (
        ("memory", {"question": "F3", "answer": "A3", "topic": "t" * 201}, "topic"),
        ("memory", {"question": "F3", "answer": "A3", "tags": ["x" * 65]}, "tags.0"),
        ("examples", {"prompt": "F3", "response": "A3", "conversationId": "c" * 201}, "conversationId"),
    ):
        r = client.post(f"{T}/{path}", json=body)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert message.startswith(f"Invalid request: {field}: ") and "characters as stored" in message, message


def test_export_returns_the_summary_in_camel_case(client: TestClient, settings) -> None:
    client.post(f"{T}/examples", json={"prompt": "a", "response": "b"})
    r = client.post(f"{T}/export", json={"valRatio": 0.0})
    assert r.status_code == 200
    summary = r.json()
    assert summary["counts"]["curated"]["total"] == 1 and "exportedAt" in summary and "storeRevision" in summary
    assert "assistant-sft-curated.jsonl" in summary["files"]  # file names are keys, not camelCased
    assert (settings.training_dir / "assistant-sft-summary.json").is_file()
    bad = client.post(f"{T}/export", json={"valRatio": 0.6, "testRatio": 0.6})
    assert bad.status_code == 422


def test_training_status_and_readiness(client: TestClient) -> None:
    for i in range(3):
        client.post(f"{T}/examples", json={"prompt": f"q{i}", "response": f"a{i}"})
    ready = client.get(f"{T}/status", params={"minCurated": 3}).json()
    not_ready = client.get(f"{T}/status", params={"minCurated": 4}).json()
    assert ready["ready"] is True and not_ready["ready"] is False
    assert client.get(f"{T}/status", params={"minCurated": -1}).status_code == 422


def test_provider_health_is_offline_not_an_error(client: TestClient) -> None:
    r = client.get(f"{T}/lora/provider-health")
    assert r.status_code == 200
    body = r.json()
    assert body["label"] == "Offline" and body["status"] == "offline" and body["cudaAvailable"] is False
    assert "not reachable" in body["error"]


def test_job_routes_without_trainer_are_503_and_change_nothing(client: TestClient, settings) -> None:
    r = client.post(f"{T}/lora/start", json={"epochs": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
    # Guide repro: the German dashboard said "Trainer nicht erreichbar: The trainer for … is not reachable and
    # starting it on demand is off …": the sentence came without a code for the case, so only the label was German.
    assert r.json()["error"]["params"] == {"detail": "trainer.on_demand_off"}, r.json()
    # Guide repro: `start` without a body was a 422 ("the body is missing") where the other two starts (and `{}`)
    # go through: the guide names the three together and shows no body.
    for path in ("start", "quick-start", "example-adapter"):
        r = client.post(f"{T}/lora/{path}")
        assert r.status_code == 503 and r.json()["error"]["params"] == {"detail": "trainer.on_demand_off"}, r.text
    assert store.counts(settings)["totals"]["examples"] == 0  # example-adapter did not seed
    assert not (settings.training_dir / "assistant-sft-summary.json").exists()  # quick-start did not export
    for path in ("status", "jobs"):
        r = client.get(f"{T}/lora/{path}")
        assert r.status_code == 503 and r.json()["error"]["params"]["detail"] == "trainer.unreachable", r.text


def test_the_configured_base_model_outside_the_data_root_is_the_operators_to_choose(
    home: Path, dead_port: int, tmp_path: Path
) -> None:
    """Repro: with ASSISTANT_BASE_MODEL a model directory outside the data root (as the README sets it), `POST
    /lora/start` without a baseModel, the dashboard's Start button, answered 422 `base_model.outside_root`: the
    rule for a path a request sends was applied to the server's own setting. (quick-start took it.) Odd-paths
    repro: naming that very base (as the status shows it, with a trailing slash) was refused too; another path
    outside the data root still is."""
    outside = tmp_path / "models" / "qwen2"
    outside.mkdir(parents=True)
    settings = load_settings(
        base_model=str(outside), lora_ensure_on_demand=False, lora_trainer_url=f"http://127.0.0.1:{dead_port}"
    )
    store.load_seed(settings)
    export.export(settings)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for body in ({"maxSteps": 3}, {"maxSteps": 3, "profile": "luna"}):
            r = client.post(f"{T}/lora/start", json=body)
            # past the base model's check: on to the trainer, which is not running here
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
        for named in (str(outside), f"{outside}/"):
            r = client.post(f"{T}/lora/start", json={"baseModel": named})
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
        # review repro: the request's own spelling was forwarded (a link to the base when checked could point
        # elsewhere when the trainer loads it); the configured path is
        from lunatrain.api.deps import _base_model

        link = tmp_path / "link-to-base"
        link.symlink_to(outside)
        assert _base_model(str(link), settings) == _base_model(f"{outside}/", settings) == str(outside)
        other = tmp_path / "models" / "other"
        other.mkdir()
        r = client.post(f"{T}/lora/start", json={"baseModel": str(other)})
        assert r.status_code == 422 and r.json()["error"]["code"] == "base_model.outside_root", r.text
    store.dispose_stores()


def test_bad_parameters_are_422_naming_the_field(client: TestClient) -> None:
    r = client.post(f"{T}/lora/start", json={"epochs": 0, "learningRate": "fast"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and "epochs" in err["message"]
    assert {tuple(d["loc"][-1:]) for d in err["details"]} >= {("epochs",), ("learningRate",)}
    assert client.post(f"{T}/lora/quick-start", json={"profile": "nope"}).status_code == 404


def test_an_unknown_query_parameter_is_refused_naming_the_ones_the_route_takes(client: TestClient) -> None:
    """Memory-workflow repro: `GET /memory?stauts=pending` (a typo) answered 200 with every item, and
    `?source=` (a filter only /examples has) the unfiltered list, where the CLI refuses the same typo and
    bodies refuse unknown keys. A query parameter the route does not take is a 422 now."""
    client.post(f"{T}/memory", json={"question": "Q1", "answer": "A1", "status": "pending"})
    client.post(f"{T}/memory", json={"question": "Q2", "answer": "A2"})
    assert client.get(f"{T}/memory", params={"status": "pending"}).json()["count"] == 1
    for url, params, takes in (
        (f"{T}/memory", {"stauts": "pending"}, "limit, offset, search, status"),
        (f"{T}/examples", {"status": "approved", "sorce": "memory", "q": "x"}, "limit, offset, search, source, status"),
        (f"{T}/status", {"mincurated": "3"}, "minCurated"),
        (f"{T}/adapters", {"limit": "5"}, "none"),
    ):
        r = client.get(url, params=params)
        assert r.status_code == 422, (url, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request", err
        unknown = sorted(set(params) - set(takes.split(", ")))
        assert (
            err["message"]
            == "Invalid request: "
            + "; ".join(f"{name}: unknown query parameter (this route takes {takes})" for name in unknown)
            + "."
        ), err["message"]
        assert [d["loc"] for d in err["details"]] == [["query", name] for name in unknown]
    # The OpenAI-compatible routes keep OpenAI's conventions (clients may add their own parameters).
    assert client.get("/v1/models", params={"extra": "1"}).status_code == 200
    assert client.head(f"{T}/memory", params={"status": "pending"}).status_code == 200


def test_malformed_json_and_unknown_routes_keep_the_error_shape(client: TestClient) -> None:
    r = client.post(f"{T}/examples", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.get("/assistant/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put(f"{T}/examples")
    # HEAD too: every GET route answers it (handlers.HeadAsGet); the header left it out
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    assert r.json()["error"]["message"] == "Method PUT not allowed here; use GET, HEAD or POST."
    head = client.head(f"{T}/examples")
    assert head.status_code == 200 and head.content == b""
    # inside a static mount no route of ours matches: its files take GET and HEAD (was an empty Allow)
    for path in ("/docs-assets/swagger-ui.css", "/static/app.js"):
        r = client.post(path)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", (path, r.headers)
        assert r.json()["error"]["message"] == "Method POST not allowed here; use GET or HEAD."


def test_profile_defaults(client: TestClient) -> None:
    body = client.get(f"{T}/lora/defaults").json()
    assert body["profile"] == "luna" and body["params"]["adapterName"] == "luna-adapter"
    assert body["quickStart"]["epochs"] == 1 and body["quickStart"]["maxSteps"]


def test_adapters_empty_and_unknown(client: TestClient) -> None:
    assert client.get(f"{T}/adapters").json() == {"bases": []}
    assert client.get(f"{T}/adapters/luna-adapter").status_code == 404
    assert client.post(f"{T}/adapters/luna-adapter/activate", json={"version": "v1"}).status_code == 404
    assert client.post(f"{T}/adapters/luna-adapter/rollback").status_code == 404


def test_api_and_trainer_share_one_job_model(client: TestClient) -> None:
    """One vocabulary across the trainer boundary: the API's job schema is the trainer's, field for field."""
    from lunatrain.service.app import create_app as trainer_app

    api = client.get("/openapi.json").json()["components"]["schemas"]
    trainer = trainer_app(load_settings()).openapi()["components"]["schemas"]
    for name in ("Job", "Progress", "JobError", "EventPage", "JobList"):
        assert api[name]["properties"].keys() == trainer[name]["properties"].keys(), name
    assert api["JobAccepted"]["properties"]["job"] == {"$ref": "#/components/schemas/Job"}
    assert "jobId" in api["JobAccepted"]["properties"]  # the guide's name for the 202's id


def test_base_model_must_be_tiny_a_hub_id_or_inside_the_data_root(settings) -> None:
    (settings.home / "models" / "mine").mkdir(parents=True)
    (settings.home / "models" / "mine" / "config.json").write_text("{}")
    assert check_base_model("luna-tiny", settings) == "luna-tiny"
    assert check_base_model("Qwen/Qwen2.5-0.5B", settings) == "Qwen/Qwen2.5-0.5B"
    assert check_base_model("models/mine", settings) == str(settings.home / "models" / "mine")
    assert check_base_model(str(settings.home / "models" / "mine"), settings) == str(settings.home / "models" / "mine")
    for bad in (
        "/etc",
        "../x",
        "models/../../x",
        "/tmp",
        "./models/missing",
        "a" * 400,
        # a root, never a model directory: the data root itself by any spelling, or a plain folder
        "org/..",
        ".",
        "./",
        str(settings.home),
        "models/mine/..",
        "models",
    ):
        with pytest.raises(UsageError) as refused:
            check_base_model(bad, settings)
        # about the field, first word first: the dashboard shows it next to the base model input
        assert refused.value.message.startswith(f"baseModel {bad[:80]!r}"), refused.value.message
    outside = settings.home.parent / "elsewhere"
    outside.mkdir()
    (settings.home / "models" / "link").symlink_to(outside)
    with pytest.raises(UsageError):
        check_base_model("models/link", settings)


def test_status_reads_are_coalesced_but_never_stale_after_own_writes(client: TestClient) -> None:
    before = client.get(f"{T}/status").json()["counts"]["curated"]["approved"]
    client.post(f"{T}/examples", json={"prompt": "neu", "response": "frisch"})
    after = client.get(f"{T}/status").json()["counts"]["curated"]["approved"]
    assert after == before + 1


def test_coalescer_shares_one_call_and_keeps_no_errors() -> None:
    import asyncio
    import threading

    from lunatrain.api.cache import Coalescer

    calls = []
    gate = threading.Event()

    def slow() -> int:
        calls.append(1)
        gate.wait(30)
        return len(calls)

    def boom() -> int:
        calls.append(1)
        raise ValueError("upstream down")

    async def main() -> None:
        reads = Coalescer(ttl=60)
        waiting = [asyncio.ensure_future(reads.get("k", slow)) for _ in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(*waiting) == [1] * 20 and len(calls) == 1
        assert await reads.get("k", slow) == 1 and len(calls) == 1  # still fresh: no new call
        reads.clear()
        assert await reads.get("k", slow) == 2
        for _ in range(2):  # a failure is not remembered: the next read tries again
            with pytest.raises(ValueError):
                await reads.get("e", boom)
        assert len(calls) == 4

    asyncio.run(main())


def test_adapters_are_active_per_base_and_deactivate_names_the_route(client: TestClient, settings) -> None:
    from lunatrain import models, registry

    fp = models.resolve_base(None, settings).fingerprint
    for base_id, fingerprint in (("luna-tiny", fp), ("org/new", "9" * 64)):
        work = adapter_work_dir(settings, "a", base_id.replace("/", "_"))
        entry = registry.publish(
            settings,
            "a",
            "versioned",
            work,
            {"baseModel": {"id": base_id, "fingerprint": fingerprint}, "params": {}, "metrics": {}},
        )
        registry.activate(settings, "a", entry["version"], own_base=True)
    groups = {g["baseModel"]: g["adapters"][0] for g in client.get(f"{T}/adapters").json()["bases"]}
    assert groups["luna-tiny"]["aliases"]["active"] == "v1" and groups["org/new"]["aliases"]["active"] == "v2"
    one = client.get(f"{T}/adapters/a").json()
    assert one["aliases"]["active"] == "v1"  # on the configured base
    states = {v["version"]: v["state"] for v in one["versions"]}
    assert states["v1"]["active"] is True
    assert states["v2"] == {
        "active": False,
        "code": "adapter.active_on_other_base",
        "reason": states["v2"]["reason"],
        "params": {"name": "a", "version": "v2", "baseModel": "org/new", "activeOn": "org/new"},
    }
    r = client.post(f"{T}/adapters/a/deactivate", json={})
    assert r.status_code == 200 and r.json()["aliases"] == {"latest": "v2", "active": None}
    again = client.post(f"{T}/adapters/a/deactivate")
    assert again.status_code == 422 and "not active on the configured base model" in again.json()["error"]["message"]
    assert client.post(f"{T}/adapters/a/deactivate", json={"version": "v2"}).status_code == 200
    assert registry.list_active(settings) == []
    assert client.post(f"{T}/adapters/a/deactivate", json={"version": "../x"}).status_code == 422
    assert client.post(f"{T}/adapters/zzz/deactivate").status_code == 404
    unknown = client.post(f"{T}/adapters/a/deactivate", json={"version": "v99"})  # as activate: no such version
    assert unknown.status_code == 404 and "no version 'v99'" in unknown.json()["error"]["message"]
    inactive = client.post(f"{T}/adapters/a/deactivate", json={"version": "v1"})  # exists, inactive
    # Repro: coded adapter.not_active, whose dashboard text "{name} is not active here." dropped the version
    assert inactive.status_code == 422 and inactive.json()["error"]["code"] == "adapter.version_not_active"
    assert inactive.json()["error"]["params"] == {"name": "a", "version": "v1"}
    assert again.json()["error"]["code"] == "adapter.not_active"


def test_deactivate_on_the_configured_base_only_leaves_the_version_active_elsewhere(
    client: TestClient, settings
) -> None:
    """Switch repro: v1 active on two bases (one by --force); the dashboard's "deactivate on this base model"
    sent `{version}`, which deactivates that version on every base: the other base lost its adapter too. With
    `configuredBaseOnly` the version the page shows stops on the configured base only, and a version not active
    there is a 422 that says so (not "on no base")."""
    from lunatrain import models, registry

    fp = models.resolve_base(None, settings).fingerprint
    work = adapter_work_dir(settings, "a", "one")
    base = {"id": "luna-tiny", "fingerprint": fp}
    registry.publish(settings, "a", "versioned", work, {"baseModel": base, "params": {}, "metrics": {}})
    registry.activate(settings, "a", "v1")
    with registry._lock(settings):  # as `adapters activate a@v1 --force` with org/new configured leaves it
        data = registry.load(settings)
        data["adapters"]["a"]["activeByBase"]["9" * 64] = {"version": "v1", "baseModel": "org/new"}
        registry._save(settings, data)
    body = {"version": "v1", "configuredBaseOnly": True}
    r = client.post(f"{T}/adapters/a/deactivate", json=body)
    assert r.status_code == 200, r.text
    assert [(a["version"], a["baseModel"]) for a in registry.list_active(settings)] == [("v1", "org/new")]
    again = client.post(f"{T}/adapters/a/deactivate", json=body)
    assert again.status_code == 422 and again.json()["error"]["code"] == "adapter.version_not_active_here", again.text
    assert "a@v1 is not active on the configured base model" in again.json()["error"]["message"]
    assert [(a["version"], a["baseModel"]) for a in registry.list_active(settings)] == [("v1", "org/new")]
    assert client.post(f"{T}/adapters/a/deactivate", json={"configuredBaseOnly": "yes"}).status_code == 422


def test_a_model_directory_named_relative_to_the_data_root_is_taken_from_anywhere(settings, tmp_path, monkeypatch):
    """Repro: `lunatrain serve` started outside its data root took baseModel "models/mine" for a hub id (no such
    path from its working directory); the trainer, working in the data root, trained on the directory and
    the registry recorded "models/mine", so eval-gate and merge from any other directory failed ("not in the
    local Hugging Face cache")."""
    (settings.home / "models" / "mine").mkdir(parents=True)
    (settings.home / "models" / "mine" / "config.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert check_base_model("models/mine", settings) == str(settings.home / "models" / "mine")
    assert check_base_model("Qwen/Qwen2.5-0.5B", settings) == "Qwen/Qwen2.5-0.5B"  # no such directory: a hub id


def test_an_adapter_directory_as_base_model_is_refused_at_submit_time(
    client: TestClient, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: an adapter directory as `baseModel` was accepted (202) and failed later with "has no config.json"."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    adapter = settings.adapters_dir / "luna-adapter" / "v1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    for ref in ("data/adapters/luna-adapter/v1", str(adapter)):
        with pytest.raises(UsageError, match="is a LoRA adapter.*not supported") as err:
            check_base_model(ref, settings)
        assert err.value.code == "base_model.is_adapter"
    r = client.post(f"{T}/lora/start", json={"baseModel": "data/adapters/luna-adapter/v1"})
    assert r.status_code == 422, r.text
    assert (
        r.json()["error"]["code"] == "base_model.is_adapter" and "adapter on an adapter" in r.json()["error"]["message"]
    )
    assert r.json()["error"]["params"] == {"baseModel": "data/adapters/luna-adapter/v1"}
    cli = CliRunner().invoke(app, ["prepare", "--baseModel", "data/adapters/luna-adapter/v1"])
    assert cli.exit_code == 2 and "is a LoRA adapter" in cli.output
    # Repro: from a working directory outside the data root, `luna` started its flow and failed inside its
    # eval-gate step (a step table, a line naming reports it never wrote): the name is found under the data
    # root there, as the steps find it, and refused before anything runs.
    elsewhere = settings.home.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli = CliRunner().invoke(app, ["luna", "--baseModel", "data/adapters/luna-adapter/v1", "--maxSteps", "3"])
    assert cli.exit_code == 2 and cli.output.strip().splitlines() == [
        "error: baseModel 'data/adapters/luna-adapter/v1' is a LoRA adapter (it has adapter_config.json), not a base "
        "model: an adapter on an adapter is not supported. Train on the base model it was made for, or merge it "
        "first (`lunatrain merge --adapter NAME@VERSION`) and use the merged model under data/models/merged/."
    ], cli.output


def test_api_messages_speak_of_api_fields_and_carry_codes(client: TestClient, settings) -> None:
    """Repro: activating an adapter of another base answered 409 "… pass --force" (the API field is `force`)."""
    from lunatrain import registry

    work = adapter_work_dir(settings, "a", "x")
    registry.publish(settings, "a", "versioned", work, {"baseModel": {"id": "org/other", "fingerprint": "0" * 64}})
    r = client.post(f"{T}/adapters/a/activate", json={"version": "v1"})
    assert r.status_code == 409
    error = r.json()["error"]
    assert "force: true" in error["message"] and "pass --force" not in error["message"]
    assert error["code"] == "adapter.foreign_base"
    assert error["params"] == {"name": "a", "version": "v1", "baseModel": "org/other", "configured": "luna-tiny"}
    assert client.post(f"{T}/adapters/a/activate", json={"version": "v1", "force": True}).status_code == 200
    rolled = client.post(f"{T}/adapters/a/rollback").json()["error"]
    assert (
        rolled["code"] == "adapter.no_earlier_version"
        and "POST /assistant/training/adapters/a/deactivate" in rolled["message"]
    )
    # Repro: it said only "for another base model, name it with `--baseModel`", a switch the route has not
    assert "(the API acts on its server's, ASSISTANT_BASE_MODEL)" in rolled["message"], rolled["message"]


def test_a_rollback_sent_from_a_page_out_of_date_is_refused_and_changes_nothing(client: TestClient, settings) -> None:
    """Explore repro: two dashboard tabs showed a@v3 active; one rolled back to v2, then the other's Rollback
    (sent without a version) went on to v1, a version no tab had offered, without a word. The page sends the
    version it shows and the one its dialog named as the target: refused (409) once either changed; without
    them a rollback acts as before. Review repro: with only the version checked, v4 then v3 activated
    elsewhere made the same request return to v4."""
    from lunatrain import models, registry

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two", "three", "four"):
        work = adapter_work_dir(settings, "a", tag)
        registry.publish(settings, "a", "versioned", work, {"baseModel": {"id": "luna-tiny", "fingerprint": fp}})
    for version in ("v1", "v2", "v3"):
        registry.activate(settings, "a", version)

    def refused(code: str, params: dict) -> str:
        """The page's request (v3 shown active, v2 as its target) refused with `code`, changing nothing."""
        before = registry.list_adapters(settings)["a"]
        answer = client.post(f"{T}/adapters/a/rollback", json={"version": "v3", "to": "v2"})
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert error["code"] == code and error["params"] == params, error
        assert registry.list_adapters(settings)["a"] == before  # nothing rolled back, no history written
        return error["message"]

    first = client.post(f"{T}/adapters/a/rollback", json={"version": "v3", "to": "v2"})
    assert first.status_code == 200 and first.json()["aliases"]["active"] == "v2", first.text
    said = refused("adapter.rollback_moved", {"name": "a", "version": "v3", "active": "v2"})
    assert said.startswith("a@v3 is no longer active on base model 'luna-tiny': a@v2 is"), said
    registry.activate(settings, "a", "v4")
    registry.activate(settings, "a", "v3")  # v3 active again, but a rollback now returns to v4
    refused("adapter.rollback_target_moved", {"name": "a", "to": "v2", "target": "v4"})
    assert client.post(f"{T}/adapters/a/rollback", json={"version": "v9!"}).status_code == 422
    assert client.post(f"{T}/adapters/a/rollback", json={"status": "rejected"}).status_code == 422  # no such field
    assert client.post(f"{T}/adapters/a/rollback").json()["aliases"]["active"] == "v4"


def test_a_rollback_to_a_version_never_registered_or_whose_files_are_gone_says_so(client: TestClient, settings) -> None:
    """Lifecycle repros: a rollback naming a version that never existed (`version` or `to`) was refused with 409
    "a@v99 is no longer active … since another change"; one whose target had lost its files answered 404
    not_found (CLI exit 1) and did not say what to do instead, while GET said `rollbackTo: null`."""
    from typer.testing import CliRunner

    from lunatrain import models, registry
    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two"):
        work = adapter_work_dir(settings, "a", tag)
        entry = registry.publish(
            settings, "a", "versioned", work, {"baseModel": {"id": "luna-tiny", "fingerprint": fp}}
        )
        registry.activate(settings, "a", entry["version"])  # v1, then v2
    before = registry.registry_path(settings).read_bytes()
    for body in ({"version": "v99"}, {"to": "v99"}):
        answer = client.post(f"{T}/adapters/a/rollback", json=body)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["message"].startswith("Adapter 'a' has no version 'v99'"), answer.text
    (settings.adapters_dir / "a" / "v1" / "adapter_model.safetensors").unlink()
    answer = client.post(f"{T}/adapters/a/rollback", json={})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "adapter.rollback_files_missing", error
    assert error["params"] == {"name": "a", "version": "v1", "files": "adapter_model.safetensors"}, error
    assert "adapters activate a@VERSION" in error["message"] and "adapters deactivate a" in error["message"]
    r = CliRunner().invoke(app, ["adapters", "rollback", "a"])
    assert r.exit_code == 2 and "whose files are missing" in r.output, r.output
    assert registry.registry_path(settings).read_bytes() == before  # nothing rolled back, no history written


def test_memory_items_approve_and_reject(client: TestClient, settings) -> None:
    """Repro: memory items had no approve/reject route, so a pending item could only be deleted."""
    r = client.post(f"{T}/memory", json={"question": "Lieblingsfarbe?", "answer": "Blau.", "status": "pending"})
    item = r.json()
    ok = client.post(f"{T}/memory/{item['id']}/approve")
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "approved" and ok.json()["id"] == item["id"] and "updatedAt" in ok.json()
    assert [m["id"] for m in client.get(f"{T}/memory", params={"status": "approved"}).json()["items"]] == [item["id"]]
    rejected = client.post(f"{T}/memory/{item['id']}/reject")
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected", rejected.text

    before = (store.revision(settings), [m.to_dict() for m in store.list_memory(settings)])
    for action in ("approve", "reject"):
        unknown = client.post(f"{T}/memory/999/{action}")
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["code"] == "not_found"
        assert unknown.json()["error"]["message"] == "No memory item with id 999; nothing was changed."
        for bad in ("0", "99999999999999999999999"):  # below 1, beyond a 64-bit id
            refused = client.post(f"{T}/memory/{bad}/{action}")
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request", refused.text
    assert (store.revision(settings), [m.to_dict() for m in store.list_memory(settings)]) == before


def test_a_step_without_an_export_is_a_coded_404_naming_the_folder(client: TestClient, home: Path) -> None:
    """The dashboard says it in the reader's language from the code and its parameters (it showed the English
    sentence on the German page)."""
    r = client.post(f"{T}/prepare", json={})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    folder = str(load_settings().training_dir)
    assert error["code"] == "export.missing" and error["params"] == {"dir": folder}
    assert error["message"] == f"No export found in {folder}; run `lunatrain export` first."


def test_import_takes_a_records_own_status_unless_the_request_sets_one(client: TestClient) -> None:
    records = [
        {"prompt": "a", "response": "r", "status": "rejected"},
        {"prompt": "b", "response": "r", "status": "done"},
    ]
    refused = client.post(f"{T}/examples/import", json={"records": records})
    assert refused.status_code == 422 and "records[1]: field 'status'" in refused.json()["error"]["message"]
    assert client.get(f"{T}/examples").json()["count"] == 0
    assert client.post(f"{T}/examples/import", json={"records": records[:1]}).json()["added"] == 1
    assert client.post(f"{T}/examples/import", json={"records": records, "status": "pending"}).json()["added"] == 1
    got = {e["prompt"]: e["status"] for e in client.get(f"{T}/examples").json()["examples"]}
    assert got == {"a": "rejected", "b": "pending"}


def test_a_data_root_moved_while_the_api_runs_is_one_sentence_and_never_written_again(
    home: Path, dead_port: int
) -> None:
    """Repro: `mv ~/luna ~/luna2` while `lunatrain serve` ran: the API went on answering from a split data
    root. /status said 0 examples with no problem, chat said the model "luna-adapter" does not exist, a new
    example went into the moved database (its open connection), and an export re-created the old path and
    wrote there. Once the folder it serves is gone or replaced, every request but the dashboard's own files
    answers 503 with what happened and what to do, and nothing is written."""
    settings = load_settings(lora_ensure_on_demand=False, lora_trainer_url=f"http://127.0.0.1:{dead_port}")
    moved = home.with_name(home.name + "-moved")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert (
            client.post("/assistant/training/examples", json={"prompt": "Wo?", "response": "Hier."}).status_code == 201
        )
        home.rename(moved)
        for method, path, body in (
            ("GET", "/assistant/training/status", None),
            ("POST", "/assistant/training/examples", {"prompt": "Und jetzt?", "response": "Dort."}),
            ("POST", "/assistant/training/export", {}),
            ("POST", "/v1/chat/completions", {"model": "luna-tiny", "messages": [{"role": "user", "content": "Hi"}]}),
        ):
            r = client.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "data_root_gone", error
            # under /v1 in OpenAI's shape, which its clients read (API fuzz review)
            assert ("type" in error) == path.startswith("/v1/"), error
            assert error["message"] == (
                f"The data root {home} was moved or deleted while this API ran; nothing was changed. Start "
                "`lunatrain serve` again with ASSISTANT_HOME set to where it is now."
            ), error
        assert client.get("/").status_code == 200  # the dashboard still loads, to show that sentence
        assert not home.exists()  # never re-created
        home.mkdir()  # a new, empty folder at the old path is not the data root the API opened either
        assert client.get("/assistant/training/status").status_code == 503
    store.dispose_stores()
    rows = sqlite3.connect(moved / "data" / "assistant.db").execute("SELECT prompt FROM examples").fetchall()
    assert rows == [("Wo?",)]


def test_a_refusal_of_the_trainer_keeps_its_code_and_params(home: Path, dead_port: int, monkeypatch) -> None:
    """Repro: `POST /lora/start` refused by the trainer (no CUDA for `device: cuda`, the overwrite slot on another
    base) answered the generic `invalid_request`/`conflict` without params: the trainer client rebuilt the error
    from its sentence alone, so the dashboard showed the trainer's English sentence (with CLI flags in it)
    instead of its own text for the code. The trainer's code and params now come through, with its status."""
    import httpx

    from lunatrain.service import client as trainer_client
    from lunatrain.service.jobs import Health, data_root_id

    settings = load_settings(lora_ensure_on_demand=False, lora_trainer_url=f"http://127.0.0.1:{dead_port}")
    refusals = {
        "cuda": (422, "device.no_cuda", {"device": "cuda"}),
        "overwrite": (409, "adapter.slot_other_base", {"name": "luna-adapter", "slotBase": "a", "baseModel": "b"}),
        "gone": (404, "base_model.not_found", {"baseModel": "org/gone"}),
    }

    def refusal(body: dict) -> str:
        if body.get("device") == "cuda":
            return "cuda"
        return "overwrite" if body.get("adapterStrategy") == "overwrite" else "gone"

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            root = {"id": data_root_id(settings.home), "path": str(settings.home)}
            return httpx.Response(200, json=Health(data_root=root).wire())
        if request.method == "GET" and request.url.path == "/jobs":  # a start asks for a job training the same
            return httpx.Response(200, json={"object": "list", "data": [], "hasMore": False})
        status, code, params = refusals[refusal(json.loads(request.content))]
        return httpx.Response(status, json={"error": {"code": code, "message": f"refused ({code}).", "params": params}})

    monkeypatch.setattr(trainer_client, "_shared", httpx.Client(transport=httpx.MockTransport(answer)))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for body, (status, code, params) in (
            ({"device": "cuda"}, refusals["cuda"]),
            ({"adapterStrategy": "overwrite"}, refusals["overwrite"]),
            ({"adapterName": "x"}, refusals["gone"]),
        ):
            r = client.post(f"{T}/lora/start", json=body)
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert (error["code"], error.get("params"), error["message"]) == (code, params, f"refused ({code})."), error
    store.dispose_stores()


def test_a_training_path_without_the_assistant_prefix_names_the_one_that_exists(client: TestClient, settings) -> None:
    """Guide repro: the guide's §5 writes `POST /training/lora/start` (and quick-start, example-adapter), its §9
    `/assistant/training/lora/...`; the first answered 404 "No such endpoint." and nothing said where it is.
    Nothing is started or written either way."""
    for method, path in (
        ("POST", "/training/lora/start"),
        ("POST", "/training/lora/quick-start"),
        ("GET", "/training/lora/status"),
        ("GET", "/training/status"),
    ):
        r = client.request(method, path)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == (
            f"No such endpoint; the training API is under /assistant: {method} /assistant{path}."
        ), r.text
    assert client.post("/nothing/here").json()["error"]["message"] == "No such endpoint."
    assert client.post("/training/nothing").json()["error"]["message"] == "No such endpoint."
    assert not (settings.home / "data" / "training").exists()


def test_an_item_is_named_by_its_id_or_the_form_exports_and_the_command_line_use(client: TestClient, settings) -> None:
    """Repro: `POST /examples/ex-3/reject` and `DELETE /memory/mem-2` answered 404 "No such endpoint.": the
    routes took digits only, while the export's records, prepare's report and the command line name items
    `ex-3`/`mem-2`. Both forms are accepted; any other id is a 422 naming the id, and changes nothing."""
    ex = store.add_example(settings, prompt="Frage?", response="Antwort.")
    mem = store.add_memory(settings, question="Wie heißt mein Hund?", answer="Bruno.")
    r = client.post(f"{T}/examples/ex-{ex.id}/reject")
    assert r.status_code == 200 and r.json()["status"] == "rejected", r.text
    assert client.post(f"{T}/examples/{ex.id}/approve").json()["status"] == "approved"
    r = client.post(f"{T}/memory/mem-{mem.id}/reject")
    assert r.status_code == 200 and r.json()["status"] == "rejected", r.text
    revision = store.revision(settings)
    # as the command line, no other form: not another kind's prefix, nor what an int would take (1.0, +1, " 1")
    for path in (
        f"/examples/mem-{ex.id}/reject",
        f"/memory/ex-{mem.id}/reject",
        "/examples/abc/approve",
        f"/examples/{ex.id}.0/reject",
        f"/examples/+{ex.id}/reject",
        f"/examples/ex-%20{ex.id}/reject",
    ):
        r = client.post(f"{T}{path}")
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("Invalid request: id: "), r.text
    said = client.post(f"{T}/examples/+1/reject").json()["error"]["message"]
    assert said == "Invalid request: id: should be a number such as 12 or ex-12.", said
    # Memory repro: another kind's id got the same advice ("a number such as 12"), and `12` names an example
    other = client.post(f"{T}/examples/mem-{mem.id}/reject").json()["error"]["message"]
    assert other == (
        f"Invalid request: id: should be a number such as 12 or ex-12 (mem-{mem.id} is a memory item's id: "
        f"the /memory routes take it)."
    ), other
    # past any id: the same sentence, not int()'s advice to raise Python's digit limit
    r = client.post(f"{T}/examples/{'1' * 5000}/reject")
    assert r.status_code == 422 and r.json()["error"]["message"] == said, r.text
    assert client.delete(f"{T}/examples/ex-x").status_code == 422
    assert store.revision(settings) == revision
    assert client.delete(f"{T}/memory/mem-{mem.id}").json()["deleted"] == mem.id


def test_prepare_checks_the_job_the_run_would_start_with_every_run_parameter(client: TestClient) -> None:
    """Explore repro: POST /prepare took only profile, datasetTier, baseModel, maxSeqLength and minCurated and
    refused the schedule (`epochs: unknown field`), so the dashboard's preflight estimated and planned the
    profile's job, not the one its form would start (a model that fits only in 4 bits failed a check nobody
    could make pass there). It takes every run parameter that /lora/start takes, over the profile's values."""
    from lunatrain.params import parse_params
    from lunatrain.prepare import optimizer_steps

    from helpers import make_records, write_export

    settings = load_settings()
    write_export(settings, make_records(40, val_every=5))
    body = {"minCurated": 0, "epochs": 2, "batchSize": 3, "gradientAccumulation": 2, "quantize": "8bit"}
    r = client.post(f"{T}/prepare", json=body)
    assert r.status_code == 200, r.text
    n_train = len(export.read_tier(settings, "curated").train)
    want = optimizer_steps(n_train, parse_params({k: v for k, v in body.items() if k != "minCurated"}))
    assert r.json()["estimate"]["optimizerSteps"] == want, r.json()["estimate"]
    assert r.json()["memoryPlan"]["quantize"] == "8bit"  # not the profile's none
    # Review repro: a field the body clears (null) kept the profile's value, which the job then did not use.
    profiles = settings.home / "profiles"
    profiles.mkdir()
    (profiles / "luna.toml").write_text('[lora]\nmaxSteps = 5\ntargetModules = ["q_proj", "v_proj"]\n')
    cleared = client.post(f"{T}/prepare", json={"minCurated": 0, "maxSteps": None})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["estimate"]["optimizerSteps"] > 5  # no cap
    kept = client.post(f"{T}/prepare", json={"minCurated": 0})
    assert kept.json()["estimate"]["optimizerSteps"] == 5  # the profile's cap
    # the flow's own option and unknown names are still refused, and a bad value by its field
    for bad in ({"gate": True}, {"epochs": 0}, {"epochs": "2"}, {"rankk": 4}):
        refused = client.post(f"{T}/prepare", json=bad)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request", (bad, refused.text)


def test_profile_defaults_for_another_base_model_take_its_table(client: TestClient) -> None:
    """Explore repro: the dashboard's form was filled with the configured base's values (luna-tiny's smoke-test
    learning rate 0.01, rank 8), and Start trained another base typed into the form with them; the CLI's
    `luna --baseModel=…` takes the profile's [lora] values and that base's own table. The defaults now say
    what a base model's run resolves to; a base the API refuses is a 422."""
    tiny = client.get(f"{T}/lora/defaults").json()["params"]
    other = client.get(f"{T}/lora/defaults", params={"baseModel": "org/other"}).json()["params"]
    assert tiny["learningRate"] == 0.01 and tiny["rank"] == 8, tiny  # the luna profile's [bases."luna-tiny"]
    assert other["learningRate"] == 0.0002 and other["rank"] == 16 and other["baseModel"] == "org/other", other
    r = client.get(f"{T}/lora/defaults", params={"baseModel": "/etc"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "base_model.outside_root", r.text
    # API fuzz repro: an empty baseModel answered 200 with the configured base's values, where POST /lora/start
    # refuses `"baseModel": ""` and every other empty query value is a 422
    r = client.get(f"{T}/lora/defaults?baseModel=")
    assert r.status_code == 422 and "baseModel" in r.json()["error"]["message"], r.text


def test_the_text_limit_is_that_of_the_stored_text_by_every_route(client: TestClient, settings) -> None:
    """Explore repro: `POST /examples` refused a text of 100,010 characters whose stored form (trailing spaces
    trimmed, CRLF as LF) has 99,990, with pydantic's "String should have at most 100000 characters", while the
    import and the command line stored it. The limit is the stored text's, said alike by every route."""
    long = {"prompt": "trail", "response": "x" * 99_990 + " " * 20}
    assert client.post(f"{T}/examples", json=long).status_code == 201
    crlf = {"prompt": "crlf", "response": "ab\r\n" * 25_001}
    assert client.post(f"{T}/examples/import", json={"records": [crlf]}).json()["added"] == 1
    over = {"prompt": "over", "response": "x" * 100_001}
    for path, body in (("/examples", over), ("/examples/import", {"records": [over]})):
        r = client.post(f"{T}{path}", json=body)
        assert r.status_code == 422, r.text
        assert "field 'response': longer than 100000 characters" in r.json()["error"]["message"], r.text
    question = client.post(f"{T}/memory", json={"question": "q " + " " * 100_000, "answer": "a"})
    assert question.status_code == 201, question.text


def test_an_import_record_that_is_no_object_is_named_as_every_bad_record(client: TestClient, settings) -> None:
    """Explore repro: `[1, 2]` among the records got pydantic's "records.2: Input should be a valid dictionary",
    where every other bad record is "records[2]: …" (and the command line's "line 3: expected a JSON object")."""
    good = {"prompt": "a", "response": "b"}
    r = client.post(f"{T}/examples/import", json={"records": [good, good, [1, 2]]})
    assert r.status_code == 422, r.text
    assert "records[2]: expected a JSON object, got list" in r.json()["error"]["message"], r.text
    assert store.counts(settings)["totals"]["examples"] == 0


def test_json_answers_carry_an_etag_and_an_unchanged_one_is_a_304_without_a_body(client: TestClient) -> None:
    """Dashboard-scale repro: the page asks for the registry every 15 s, and with a year of daily versions
    each answer was 1.5 MB, sent whole again while nothing had changed (340 MB an hour for one open tab). A JSON
    answer has an ETag and `Cache-Control: no-cache`; the browser asks with If-None-Match and gets a 304."""
    first = client.get(f"{T}/adapters")
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache", first.headers
    tag = first.headers["etag"]
    again = client.get(f"{T}/adapters", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag, again.headers
    assert "content-length" not in again.headers or again.headers["content-length"] == "0"
    assert client.get(f"{T}/adapters", headers={"If-None-Match": '"other", ' + tag}).status_code == 304
    assert client.get(f"{T}/adapters", headers={"If-None-Match": f"W/{tag}"}).status_code == 304  # via a proxy
    # a HEAD answers the headers its GET would (RFC 9110 9.3.2): a cache revalidates with either
    head = client.head(f"{T}/adapters")
    assert head.status_code == 200 and head.headers["etag"] == tag and head.content == b"", head.headers
    assert client.head(f"{T}/adapters", headers={"If-None-Match": tag}).status_code == 304
    client.post(f"{T}/examples", json={"prompt": "Neu?", "response": "Ja."})
    listed = client.get(f"{T}/examples", headers={"If-None-Match": client.get(f"{T}/examples").headers["etag"]})
    assert listed.status_code == 304
    client.post(f"{T}/examples", json={"prompt": "Noch eins?", "response": "Ja."})
    changed = client.get(f"{T}/examples", headers={"If-None-Match": listed.headers["etag"]})
    assert changed.status_code == 200 and len(changed.json()["examples"]) == 2
    assert changed.headers["etag"] != listed.headers["etag"]
    # errors and other kinds of answer pass as they are
    missing = client.get(f"{T}/adapters/nope")
    assert missing.status_code == 404 and "etag" not in missing.headers
