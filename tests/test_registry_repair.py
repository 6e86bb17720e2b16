"""A registry that cannot be read is refused everywhere and never overwritten; `lunatrain adapters repair`
rebuilds it from the version folders. Run: `pytest tests/test_registry_repair.py -q`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import evalgate, registry
from lunatrain.cli import app
from lunatrain.errors import RegistryUnreadable
from lunatrain.params import parse_params
from lunatrain.train import run_lora

from helpers import adapter_work_dir, write_export, write_small_suite
from test_registry import _entry, _publish

FAST = {"epochs": 1, "batchSize": 8, "rank": 4, "learningRate": 5e-3, "maxSeqLength": 128, "seed": 7, "maxSteps": 2}


def _retyped(change):
    """The published registry with one field of adapter `a` given a value of the wrong JSON type by `change`."""

    def damage(text: str) -> str:
        data = json.loads(text)
        change(data["adapters"]["a"])
        return json.dumps(data)

    return damage


DAMAGE = {
    "cut short": lambda text: text[: len(text) // 2],
    "not JSON": lambda text: "\x00\x01garbage",
    "no adapters key": lambda text: json.dumps({"format": registry.FORMAT}),
    "adapters is a list": lambda text: json.dumps({"format": registry.FORMAT, "adapters": []}),
    "versions not a list": lambda text: json.dumps({"adapters": {"a": {"versions": {"v1": {}}}}}),
    "entry without version": lambda text: json.dumps({"adapters": {"a": {"versions": [{"path": "x"}]}}}),
    "path not a string": lambda text: json.dumps({"adapters": {"a": {"versions": [{"version": "v1", "path": 3}]}}}),
    "base model not an object": lambda text: json.dumps(
        {"adapters": {"a": {"versions": [{"version": "v1", "name": "a", "path": "x", "baseModel": 5}]}}}
    ),
    "entry without name or path": lambda text: json.dumps({"adapters": {"a": {"versions": [{"version": "v1"}]}}}),
    "entry of another adapter": lambda text: json.dumps(
        {"adapters": {"a": {"versions": [_entry("f" * 64, version="v1", name="b", path="x")]}}}
    ),
    "a JSON list": lambda text: "[]",
    # `null` is JSON too: read as "no file", it let the next publish replace every entry with its own.
    "JSON null": lambda text: "null",
    "a JSON number": lambda text: "0",
    # JSON the parser gives up on without a JSONDecodeError: each was a traceback
    "nested too deeply": lambda text: "[" * 100_000 + "]" * 100_000,
    "a number of too many digits": lambda text: '{"adapters": ' + "9" * 5000 + "}",
    "another format": lambda text: json.dumps({"format": "other/9", "adapters": {}}),
    # Fields each reader takes as they should be: a wrong type was a traceback or a 500, and repair refused.
    "activeByBase a list": _retyped(lambda a: a.update(activeByBase=[])),
    "an active version a string": _retyped(lambda a: a.update(activeByBase={"f" * 64: "v1"})),
    "metrics a string": _retyped(lambda a: a["versions"][0].update(metrics="x")),
    "val loss a string": _retyped(lambda a: a["versions"][0]["metrics"].update(valLoss="abc")),
    "gate a string": _retyped(lambda a: a["versions"][0].update(gate="passed")),
    # gc repros: each was a 500 from the API (adapters, deactivate, /v1/models) or a traceback from the CLI,
    # and `adapters repair` said "The registry is readable; nothing to repair."
    "an activation a number": _retyped(lambda a: a.update(activations=[12345])),
    "an activation's version a list": _retyped(lambda a: a.update(activations=[{"version": [], "base": "f" * 64}])),
    "an activation's base an object": _retyped(lambda a: a.update(activations=[{"version": "v1", "base": {}}])),
    "an alias a number": _retyped(lambda a: a.setdefault("aliases", {}).update(latest=12345)),
    "created a number": _retyped(lambda a: a["versions"][0].update(created=12345)),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_registry_is_refused_and_never_replaced(settings, kind):
    _publish(str(settings.home), "a", "one")
    path = registry.registry_path(settings)
    damaged = DAMAGE[kind](path.read_text())
    path.write_text(damaged)
    for attempt in (
        lambda: registry.list_adapters(settings),
        lambda: registry.get_version(settings, "a", "v1"),
        lambda: _publish(str(settings.home), "a", "two"),  # the write that used to replace it with one entry
        lambda: registry.annotate(settings, "a", "v1", "stale", True),
        lambda: registry.rollback(settings, "a"),
        lambda: registry.mark_stale(settings, {"x"}),
    ):
        with pytest.raises(RegistryUnreadable, match="adapters repair") as err:
            attempt()
        assert str(path) in err.value.message and err.value.code == "registry_unreadable"
    assert path.read_text() == damaged


def test_cli_and_api_say_one_sentence(settings):
    _publish(str(settings.home), "a", "one")
    path = registry.registry_path(settings)
    path.write_text(path.read_text()[:40])
    runner = CliRunner()
    for args in (["adapters", "list"], ["adapters", "show", "a"], ["adapters", "activate", "a@v1"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "lunatrain adapters repair" in lines[0] and "Traceback" not in r.output
    from lunatrain.api.main import create_app

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for url in ("/assistant/training/adapters", "/assistant/training/adapters/a"):
            res = client.get(url)
            assert res.status_code == 503, res.text
            assert res.json()["error"]["code"] == "registry_unreadable"
            assert "adapters repair" in res.json()["error"]["message"]
        # Status still answers, but names the damage instead of saying that nothing is active.
        status = client.get("/assistant/training/status").json()
        assert status["activeAdapters"] == [] and len(status["problems"]) == 1
        assert "adapters repair" in status["problems"][0]
    r = runner.invoke(app, ["status"])
    assert r.exit_code == 0 and "active adapter: none" not in r.output, r.output
    assert "active adapter: unknown" in r.output and "lunatrain adapters repair" in r.output


def test_repair_of_a_readable_registry_changes_nothing(settings):
    _publish(str(settings.home), "a", "one")
    before = registry.registry_path(settings).read_bytes()
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0 and "nothing to repair" in r.output
    assert registry.registry_path(settings).read_bytes() == before


def test_repair_round_trips_a_real_registry(settings):
    """Two real trained versions and an overwrite slot, a gate that promoted v2, a manual activation rolled
    back, then a gate that refused v1: the rebuilt registry equals the original in every fact, each gate
    outcome, what is active and the activation history included. Repro: repair restored only the last gate
    report's outcome, so v2's was lost, and v2 was no longer active (the last gate, v1's, promoted nothing)."""
    write_export(settings)
    write_small_suite(settings)  # the gates' records, not their cases
    v1 = run_lora(parse_params(FAST | {"adapterName": "luna"}), settings)
    v2 = run_lora(parse_params(FAST | {"adapterName": "luna", "seed": 8}), settings)
    slot = run_lora(parse_params(FAST | {"adapterName": "scratch", "adapterStrategy": "overwrite"}), settings)
    assert (v1.version, v2.version, slot.version) == ("v1", "v2", "current")
    evalgate.gate_candidate(
        settings,
        "luna",
        "v2",
        thresholds={"maxGoldenPassRateDrop": 1.0, "maxValLossRatioVsBase": 100.0, "maxLossRegression": 10.0},
    )
    registry.activate(settings, "luna", "v1", reason="cli")
    registry.rollback(settings, "luna")
    refused = evalgate.gate_candidate(settings, "luna", "v1", thresholds={"maxValLossRatioVsBase": 0.001})
    assert not refused.passed and not refused.promoted
    original = registry.load(settings)
    assert original["adapters"]["luna"]["aliases"].get("active") == "v2"
    assert [a["reason"] for a in original["adapters"]["luna"]["activations"]] == ["eval gate passed", "cli", "rollback"]

    journal = settings.adapters_dir / "luna" / registry.ACTIVATIONS_FILE
    with journal.open("a") as f:
        f.write('{"version": "v1", "ba')  # a line cut short by a crash: read past, not applied

    path = registry.registry_path(settings)
    path.write_text(json.dumps({"format": registry.FORMAT}))  # wrong shape: every version would be lost
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0, r.output
    kept = sorted(path.parent.glob("lora-adapters.json.damaged-*"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"format": registry.FORMAT}
    rebuilt = registry.load(settings)
    for name in ("luna", "scratch"):
        want, got = original["adapters"][name], rebuilt["adapters"][name]
        assert [e["version"] for e in got["versions"]] == [e["version"] for e in want["versions"]]
        for w, g in zip(want["versions"], got["versions"], strict=True):
            for key in (
                "jobId",
                "baseModel",
                "datasetTier",
                "datasetFingerprint",
                "params",
                "metrics",
                "path",
                "created",
                "tokenizerHash",
                "templateHash",
                "trainSamples",
                "strategy",
                "quantization",
            ):
                assert g.get(key) == w.get(key), (name, key)
        assert got["aliases"].get("latest") == want["aliases"].get("latest")
        assert [g.get("gate") for g in got["versions"]] == [w.get("gate") for w in want["versions"]], name
        for key in ("aliases", "activeByBase", "activations"):
            assert got[key] == want[key], (name, key)
    assert rebuilt["adapters"]["luna"]["aliases"]["active"] == "v2"
    assert [e["gate"]["passed"] for e in rebuilt["adapters"]["luna"]["versions"]] == [False, True]
    # the registry works again: a new version is v3, activation history continues
    assert run_lora(parse_params(FAST | {"adapterName": "luna"}), settings).version == "v3"
    assert registry.get_version(settings, "luna", "active")["version"] == "v2"
    registry.activate(settings, "luna", "v1", reason="cli")  # after the torn line, the journal goes on on a new line
    assert json.loads(journal.read_text().splitlines()[-1])["version"] == "v1"


def test_publish_after_repair_keeps_numbering(settings):
    for tag in ("one", "two"):
        _publish(str(settings.home), "a", tag)
    registry.registry_path(settings).write_text("{")
    # without training reports the folders cannot be described; they still block their numbers
    assert registry.repair(settings)["versions"] == 0
    work = settings.adapters_dir / "a" / ".work" / "three"
    work.mkdir(parents=True)
    assert registry.publish(settings, "a", "versioned", work, _entry("f" * 64))["version"] == "v3"


def test_deleting_an_example_works_with_a_damaged_registry_and_repair_marks_stale_later(settings):
    from lunatrain import store
    from lunatrain.formats import make_draft

    store.add_examples(settings, [make_draft(prompt="weg damit", response="ok")])
    example = store.list_examples(settings)[0]
    _publish(str(settings.home), "a", "one")
    hashes = settings.adapters_dir / "a" / "v1" / "train-hashes.txt"
    hashes.write_text(example.hash + "\n")
    report = registry.adapter_dir(settings, registry.get_version(settings, "a", "v1")) / "training-report.json"
    base = {"id": "luna-tiny", "fingerprint": "f" * 64}  # a training report always names its base model
    report.write_text(
        json.dumps({"status": "succeeded", "version": "v1", "jobId": "one", "params": {}, "baseModel": base})
    )
    registry.registry_path(settings).write_text("{")
    r = CliRunner().invoke(app, ["examples", "delete", str(example.id)])
    assert r.exit_code == 0, r.output  # the delete is not refused because of the registry
    assert registry.registry_path(settings).read_text() == "{"
    assert registry.repair(settings)["versions"] == 1
    assert registry.get_version(settings, "a", "v1")["stale"]["hashes"] == [example.hash]
    store.dispose_stores()


def test_an_entry_readers_cannot_use_is_a_damaged_registry_everywhere(settings):
    """An entry without the facts every reader takes from it (here a base model that is a number) was read as
    whole: `/v1/models` and chat answered 500, `adapters list`/`show`/`merge` ended in a traceback, and
    `adapters repair` said there was nothing to repair. It is a damaged registry like any other."""
    from lunatrain.api.main import create_app

    path = registry.registry_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DAMAGE["base model not an object"](""))
    runner = CliRunner()
    for args in (["adapters", "list"], ["adapters", "show", "a@v1"], ["merge", "--adapter", "a@v1"]):
        r = runner.invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and "lunatrain adapters repair" in lines[0], (args, r.output)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for res in (
            client.get("/v1/models"),
            client.post(
                "/v1/chat/completions", json={"model": "a@v1", "messages": [{"role": "user", "content": "Hi"}]}
            ),
        ):
            assert res.status_code == 503, res.text
            assert "adapters repair" in res.json()["error"]["message"] and res.json()["error"]["type"], res.text
    r = runner.invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0 and "Rebuilt the registry with 0 versions" in r.output, r.output
    assert registry.list_adapters(settings) == {}


def test_a_field_of_the_wrong_type_is_a_damaged_registry_that_repair_rebuilds(settings):
    """An active version written as a bare string (not {"version": ...}): `status`, `adapters list` and `merge`
    ended in a traceback, /v1/models and the dashboard's status answered 500, and `adapters repair` said the
    registry was readable and there was nothing to repair."""
    from lunatrain.api.main import create_app

    _publish(str(settings.home), "a", "one")
    path = registry.registry_path(settings)
    path.write_text(DAMAGE["an active version a string"](path.read_text()))
    runner = CliRunner()
    for args in (["adapters", "list"], ["merge", "--adapter", "a"]):
        r = runner.invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and "lunatrain adapters repair" in lines[0], (args, r.output)
    r = runner.invoke(app, ["status"])
    assert r.exit_code == 0 and "active adapter: unknown" in r.output and "adapters repair" in r.output, r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.get("/v1/models")
        assert res.status_code == 503 and "adapters repair" in res.json()["error"]["message"], res.text
        status = client.get("/assistant/training/status")
        assert status.status_code == 200 and "activeByBase" in status.json()["problems"][0], status.text
    r = runner.invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0 and "Rebuilt the registry" in r.output, r.output
    assert registry.list_adapters(settings) == {}  # readable again (this version has no training report)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"a": \n', "(not valid JSON: Expecting value at line 2 column 1)"),
        (b"\xff\xfe{}", "(not UTF-8 text)"),
    ],
)
def test_the_reason_a_registry_cannot_be_read_is_said_once(settings, content, why):
    path = registry.registry_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(RegistryUnreadable) as err:
        registry.list_adapters(settings)
    assert f"{path} cannot be read {why}; it was left untouched." in err.value.message
    assert "damaged (" not in err.value.message


def test_repair_keeps_the_quantization_a_version_was_trained_with(settings):
    """Repro: after `adapters repair` the entry of a version trained with --quantize=4bit had no
    `quantization`, though its training report has it and the README says the registry records it."""
    quantized = {"method": "bitsandbytes", "bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"}
    folder = settings.adapters_dir / "q" / "v1"
    folder.mkdir(parents=True)
    report = {
        "status": "succeeded",
        "version": "v1",
        "adapterStrategy": "versioned",
        "baseModel": {"id": "luna-tiny", "fingerprint": "f" * 64},
        "params": {"quantize": "4bit"},
        "metrics": {"valLoss": 1.0},
        "quantization": quantized,
    }
    (folder / registry.REPORT_FILE).write_text(json.dumps(report))
    registry.registry_path(settings).parent.mkdir(parents=True, exist_ok=True)
    registry.registry_path(settings).write_text("[")  # damaged: repair rebuilds it from the folders
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0 and "Rebuilt the registry with 1 version of 1 adapter;" in r.output, r.output
    assert registry.get_version(settings, "q", "v1").get("quantization") == quantized
    r = CliRunner().invoke(app, ["adapters", "repair"])  # repro: "(1 versions)", "1 versions of 1 adapters"
    assert r.output.strip() == "The registry is readable (1 version); nothing to repair.", r.output


def test_repair_gives_a_merged_model_only_to_the_revision_it_was_merged_from(settings):
    """Repro: revision 1 of an overwrite slot merged, revision 2 trained and not merged: after `adapters
    repair` revision 2 was listed as [merged], though data/models/merged/ow-current holds revision 1."""
    folder = settings.adapters_dir / "ow" / "current"
    folder.mkdir(parents=True)
    base = {"id": "luna-tiny", "fingerprint": "f" * 64}
    report = {"status": "succeeded", "version": "current", "revision": 2, "adapterStrategy": "overwrite"}
    (folder / registry.REPORT_FILE).write_text(json.dumps(report | {"baseModel": base}))
    merged = settings.models_dir / "merged" / "ow-current"
    merged.mkdir(parents=True)
    marker = {"adapter": "ow@current", "revision": 1, "baseModel": base, "created": "t"}
    (merged / "lunatrain-merge.json").write_text(json.dumps(marker))
    registry.registry_path(settings).parent.mkdir(parents=True, exist_ok=True)
    registry.registry_path(settings).write_text("[")  # damaged: repair rebuilds it from the folders
    assert CliRunner().invoke(app, ["adapters", "repair"]).exit_code == 0
    assert registry.get_version(settings, "ow", "current").get("merged") is None
    marker["revision"] = 2  # merged from the revision the slot holds: restored
    (merged / "lunatrain-merge.json").write_text(json.dumps(marker))
    registry.registry_path(settings).write_text("[")
    assert CliRunner().invoke(app, ["adapters", "repair"]).exit_code == 0
    assert registry.get_version(settings, "ow", "current")["merged"] == {
        "path": "data/models/merged/ow-current",
        "at": "t",
    }
    # explore repro: a record that is a folder made repair itself fail ("Cannot read …: Is a directory"), the
    # way back every other command names; it is skipped like a damaged one
    (merged / "lunatrain-merge.json").unlink()
    (merged / "lunatrain-merge.json").mkdir()
    registry.registry_path(settings).write_text("[")
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0, r.output
    assert registry.get_version(settings, "ow", "current").get("merged") is None


def _version_folder(settings, name: str, version: str, fingerprint: str, **extra) -> None:
    folder = settings.adapters_dir / name / version
    folder.mkdir(parents=True)
    report = {
        "status": "succeeded",
        "version": version,
        "baseModel": {"id": f"base-{fingerprint[0]}", "fingerprint": fingerprint},
    } | extra
    (folder / registry.REPORT_FILE).write_text(json.dumps(report))


def _repair_from_scratch(settings) -> dict:
    registry.registry_path(settings).parent.mkdir(parents=True, exist_ok=True)
    registry.registry_path(settings).write_text("[")  # damaged: repair rebuilds it from the folders
    assert CliRunner().invoke(app, ["adapters", "repair"]).exit_code == 0
    return registry.load(settings)


def test_repair_keeps_a_promotion_from_before_the_journal_on_a_base_the_journal_never_names(settings):
    """v1 was promoted by a gate on base A before activations.jsonl existed; v2 was then activated on base B
    (the only journal line). The journal speaks for base B only, so the last gate report still restores v1
    on base A. An overwrite slot that holds another revision than the report judged gets no outcome from it."""
    a, b = "a" * 64, "b" * 64
    _version_folder(settings, "q", "v1", a)
    _version_folder(settings, "q", "v2", b)
    line = {
        "version": "v2",
        "previous": None,
        "base": b,
        "at": "t2",
        "forced": False,
        "reason": "cli",
        "baseModel": "base-b",
    }
    (settings.adapters_dir / "q" / registry.ACTIVATIONS_FILE).write_text(json.dumps(line) + "\n")
    settings.eval_report.parent.mkdir(parents=True, exist_ok=True)
    report = {"candidate": {"ref": "q@v1"}, "passed": True, "promoted": True, "created": "t1"}
    settings.eval_report.write_text(json.dumps(report))
    adapter = _repair_from_scratch(settings)["adapters"]["q"]
    assert adapter["activeByBase"] == {
        b: {"version": "v2", "baseModel": "base-b"},
        a: {"version": "v1", "baseModel": "base-a"},
    }
    assert adapter["versions"][0]["gate"]["passed"] is True and adapter["versions"][1]["gate"] is None

    _version_folder(settings, "ow", "current", a, revision=2, adapterStrategy="overwrite")
    settings.eval_report.write_text(json.dumps({"candidate": {"ref": "ow@current", "revision": 1}, "passed": False}))
    assert _repair_from_scratch(settings)["adapters"]["ow"]["versions"][0]["gate"] is None


def test_a_missing_registry_beside_trained_versions_is_refused_and_repair_rebuilds_it(settings):
    """Repro: with lora-adapters.json deleted, `adapters list` said "No adapters yet", `adapters repair` said
    "nothing to repair", and the next run registered only itself (every earlier version unregistered, its gate
    measured against the base model). Repair also dropped a version whose report it could not read without a
    word, though it had been the active one."""
    write_export(settings)
    for _ in range(2):
        run_lora(parse_params(FAST | {"adapterName": "luna"}), settings)
    path = registry.registry_path(settings)
    path.unlink()
    for attempt in (
        lambda: registry.list_adapters(settings),
        lambda: _publish(str(settings.home), "luna", "three"),  # the save that left v1 and v2 unregistered
    ):
        with pytest.raises(RegistryUnreadable, match=r"is missing, although 2 adapter versions lie in .*repair`"):
            attempt()
    assert not path.exists()
    r = CliRunner().invoke(app, ["adapters", "list"])
    assert r.exit_code == 1 and "adapters repair" in r.output and "No adapters yet" not in r.output, r.output

    (settings.adapters_dir / "luna" / "v2" / registry.REPORT_FILE).write_text("{")
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0] == "Rebuilt the registry with 1 version of 1 adapter.", r.output
    assert lines[1].startswith(f"Left out luna/v2 (its {registry.REPORT_FILE} cannot be read: "), r.output
    assert [e["version"] for e in registry.list_adapters(settings)["luna"]["versions"]] == ["v1"]
    assert not list(path.parent.glob(f"{path.name}.damaged-*"))  # there was no file to keep


def test_a_version_whose_folder_is_gone_keeps_its_number_after_repair(settings):
    """Lifecycle repro: v1 and v2 activated in turn, v2's folder removed, the registry damaged: `adapters repair`
    left v2 out, the next run was numbered v2 again, and a rollback walked the activation history into the new,
    never-gated v2 ("luna-adapter@v2 is active again"). The history names v2: its number is never reused."""
    from lunatrain import models
    from lunatrain.fsio import remove_tree

    fp = models.resolve_base(None, settings).fingerprint
    base = {"id": "luna-tiny", "fingerprint": fp}
    for tag in ("one", "two"):
        entry = registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp))
        report = {"status": "succeeded", "version": entry["version"], "baseModel": base, "params": {}}
        (settings.home / entry["path"] / registry.REPORT_FILE).write_text(json.dumps(report))
        registry.activate(settings, "a", entry["version"])
    registry.activate(settings, "a", "v1")
    remove_tree(settings.adapters_dir / "a" / "v2")
    registry.registry_path(settings).write_text("[")
    assert registry.repair(settings)["versions"] == 1
    new = registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "three"), _entry(fp))
    assert new["version"] == "v3"
    r = CliRunner().invoke(app, ["adapters", "rollback", "a"])
    assert r.exit_code == 2 and "has no earlier active version" in r.output, r.output
    # gc repro: with every version's folder gone, repair left the adapter out of the registry altogether, and
    # the next run was numbered v1 again, a number activations.jsonl already gave a version the gate passed
    (settings.home / new["path"] / registry.REPORT_FILE).write_text(json.dumps(report | {"version": "v3"}))
    registry.activate(settings, "a", "v3")
    for version in ("v1", "v3"):
        remove_tree(settings.adapters_dir / "a" / version)
    registry.registry_path(settings).write_text("[")
    registry.repair(settings)
    assert "a" not in registry.list_adapters(settings)
    again = registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "four"), _entry(fp))
    assert again["version"] == "v4", again["version"]


def test_rollback_skips_a_version_repair_left_out(settings):
    """Repro: odd@v1, v2 and v3 activated in turn, then `adapters repair` left v2 out (its training report was
    unreadable): `adapters rollback odd` said "Adapter 'odd' has no version 'v2'" every time and never reached
    v1. It goes back to the previous version still registered; with none left, it says there is none."""
    from lunatrain import models

    fp = models.resolve_base(None, settings).fingerprint
    base = {"id": "luna-tiny", "fingerprint": fp}
    for name, activated in (("odd", ("v1", "v2", "v3")), ("gone", ("v2", "v3"))):
        for tag in ("one", "two", "three"):
            entry = registry.publish(
                settings, name, "versioned", adapter_work_dir(settings, name, tag), _entry(fp, jobId=f"{name}-{tag}")
            )
            report = {"status": "succeeded", "version": entry["version"], "baseModel": base, "params": {}}
            (settings.home / entry["path"] / registry.REPORT_FILE).write_text(json.dumps(report))
        for version in activated:
            registry.activate(settings, name, version)
        (settings.adapters_dir / name / "v2" / registry.REPORT_FILE).write_text("{")
    registry.registry_path(settings).write_text("[")
    assert registry.repair(settings)["versions"] == 4
    runner = CliRunner()
    r = runner.invoke(app, ["adapters", "rollback", "odd"])
    assert r.exit_code == 0 and r.output.strip() == "odd@v1 is active again on base model 'luna-tiny'.", r.output
    assert registry.get_version(settings, "odd", "active")["version"] == "v1"
    before = registry.registry_path(settings).read_bytes()
    for name in ("odd", "gone"):
        r = runner.invoke(app, ["adapters", "rollback", name])
        assert r.exit_code == 2 and f"Adapter '{name}' has no earlier active version" in r.output, r.output
    assert registry.registry_path(settings).read_bytes() == before
    assert registry.get_version(settings, "gone", "active")["version"] == "v3"


def test_a_reader_during_the_first_publish_never_sees_a_lost_registry(settings, monkeypatch):
    """A reader between the first version's move and the registry's first save found a version folder and no
    registry, which `load` refuses as a lost registry (the dashboard's adapter table said "run adapters repair"
    for that moment; a crash there left every command refused). Each save here first reads, as such a reader."""
    write_export(settings)
    save, seen = registry._save, []

    def reading_save(settings_, data):
        try:
            seen.append(len(registry.load(settings_)["adapters"]))
        except RegistryUnreadable as err:
            seen.append(err.message)
        save(settings_, data)

    monkeypatch.setattr(registry, "_save", reading_save)
    run_lora(parse_params(FAST | {"adapterName": "luna"}), settings)
    assert seen and all(isinstance(n, int) for n in seen), seen


def test_a_registry_from_before_the_folder_copies_gets_them_at_its_first_read(settings):
    """Repro: a data root made before versions kept gate.json and adapters activations.jsonl had neither, so
    after an upgrade `adapters repair` rebuilt from the last eval report alone: the version the user had
    rolled away from became active (and was served) again, the other versions lost their gate outcomes, and
    the activation history was gone. The first read by this version writes both copies from the registry,
    once; a repair afterwards restores every fact."""
    fp = "f" * 64
    for version in ("v1", "v2"):
        _version_folder(settings, "luna", version, fp)
    passed = {"status": "passed", "passed": True, "reasons": [], "at": "t1", "promoted": True}
    old = {"format": registry.FORMAT, "adapters": {}}
    history = [
        {"version": "v1", "previous": None, "at": "t1", "forced": False, "base": fp, "reason": "eval gate passed"},
        {"version": "v2", "previous": "v1", "at": "t2", "forced": False, "base": fp, "reason": "eval gate passed"},
        {"version": "v1", "previous": "v2", "at": "t3", "forced": False, "base": fp, "reason": "rollback"},
    ]
    entries = [
        _entry(fp, version=v, name="luna", path=f"data/adapters/luna/{v}", gate=passed | {"at": at})
        for v, at in (("v1", "t1"), ("v2", "t2"))
    ]
    for e in entries:
        e["baseModel"]["id"] = "base-f"
    old["adapters"]["luna"] = {
        "versions": entries,
        "aliases": {"latest": "v2", "active": "v1"},
        "activeByBase": {fp: {"version": "v1", "baseModel": "base-f"}},
        "activations": history,
    }
    path = registry.registry_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old))
    # the last eval report is v2's promotion: what repair alone had to go by
    settings.eval_report.parent.mkdir(parents=True, exist_ok=True)
    settings.eval_report.write_text(json.dumps({"candidate": {"ref": "luna@v2"}, "passed": True, "promoted": True}))
    journal = settings.adapters_dir / "luna" / registry.ACTIVATIONS_FILE
    assert not journal.exists()

    listed = CliRunner().invoke(app, ["adapters", "list"])  # a read, as after an upgrade
    assert listed.exit_code == 0, listed.output
    for e in entries:
        assert json.loads((settings.adapters_dir / "luna" / e["version"] / registry.GATE_FILE).read_text()) == e["gate"]
    assert [json.loads(line)["reason"] for line in journal.read_text().splitlines()] == [
        "eval gate passed",
        "eval gate passed",
        "rollback",
    ]
    first = journal.read_text()
    registry.list_adapters(settings)  # once: a second read rewrites nothing
    assert journal.read_text() == first
    want = registry.load(settings)["adapters"]["luna"]
    assert want["activations"] == history and registry.load(settings)["copies"] == registry.COPIES
    path.write_text("{broken")
    assert CliRunner().invoke(app, ["adapters", "repair"]).exit_code == 0
    got = registry.load(settings)["adapters"]["luna"]
    assert got["activeByBase"] == want["activeByBase"] == {fp: {"version": "v1", "baseModel": "base-f"}}
    assert got["activations"] == want["activations"]
    assert [e["gate"] for e in got["versions"]] == [e["gate"] for e in want["versions"]]


def test_a_folder_copy_that_cannot_be_written_never_fails_a_registry_write(settings, monkeypatch):
    """Review finding: in a registry from before the folder copies, a copy that could not be written (another
    owner's folder, EIO) made every later registry write fail; the copies are best effort, the registry is
    the record, and the marker stays unset so the next write tries them again."""
    _publish(str(settings.home), "a", "one")
    path = registry.registry_path(settings)
    old = json.loads(path.read_text())
    old.pop("copies")
    path.write_text(json.dumps(old))

    def refused(*_a, **_k):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(registry, "_write_copies", refused)
    registry.annotate(settings, "a", "v1", "stale", True)
    saved = json.loads(path.read_text())
    assert saved["adapters"]["a"]["versions"][0]["stale"] is True and "copies" not in saved
    monkeypatch.undo()
    registry.annotate(settings, "a", "v1", "stale", False)
    assert json.loads(path.read_text())["copies"] == registry.COPIES


def test_repair_of_a_readable_registry_marks_what_an_interrupted_delete_left_unmarked(settings):
    """Repro: a delete stopped after the store committed it (Ctrl-C, a kill) never marked the versions
    trained on the example stale, and `adapters repair` said "nothing to repair" on the readable registry, so
    they stayed unmarked until some later delete or training run. Repair now marks them from the store's
    tombstones and says so."""
    from lunatrain import store
    from lunatrain.cli import examples as examples_cli
    from lunatrain.formats import make_draft

    store.add_examples(settings, [make_draft(prompt="weg damit", response="ok")])
    example = store.list_examples(settings)[0]
    _publish(str(settings.home), "a", "one")
    (settings.adapters_dir / "a" / "v1" / "train-hashes.txt").write_text(example.hash + "\n")

    def killed(*_a, **_k):  # the delete is committed; the process ends before the registry hears of it
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(examples_cli.registry, "refresh_stale", killed)
        r = CliRunner().invoke(app, ["examples", "delete", str(example.id)])
    assert r.exit_code == 130 and store.list_examples(settings) == [], r.output
    assert not registry.get_version(settings, "a", "v1").get("stale")

    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "Marked a@v1 stale: it was trained on content deleted since (retrain needed).",
        "The registry is readable (1 version); nothing else to repair.",
    ], r.output
    assert registry.get_version(settings, "a", "v1")["stale"]["hashes"] == [example.hash]
    again = CliRunner().invoke(app, ["adapters", "repair"])
    assert again.output.splitlines() == ["The registry is readable (1 version); nothing to repair."], again.output
    store.dispose_stores()


def test_a_folder_in_place_of_the_registry_is_a_damaged_registry_that_repair_moves_aside(settings):
    """Repro: with a folder where lora-adapters.json belongs, `status` said "active adapter: none" (exit 0),
    as if nothing had ever been trained, and `adapters repair` failed with "Cannot read …: Is a directory."
    and no way out. It is an unreadable registry like a damaged file: status says "unknown" and why, and
    repair moves the folder aside and rebuilds the registry from the adapter folders."""
    write_export(settings)
    run_lora(parse_params(FAST | {"adapterName": "luna"}), settings)
    registry.activate(settings, "luna", "v1")
    path = registry.registry_path(settings)
    path.unlink()
    path.mkdir()
    (path / "note.txt").write_text("made by hand")
    r = CliRunner().invoke(app, ["status"])
    assert re.search(r"^active adapter: +unknown", r.output, re.M), r.output
    assert "a folder stands in its place" in r.output and "lunatrain adapters repair" in r.output, r.output
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0 and r.output.startswith("Rebuilt the registry with 1 version of 1 adapter"), r.output
    assert [e["version"] for e in registry.list_adapters(settings)["luna"]["versions"]] == ["v1"]
    [aside] = path.parent.glob(f"{path.name}.damaged-*")
    assert (aside / "note.txt").read_text() == "made by hand"


def test_gate_thresholds_recorded_before_camel_case_read_as_camel_case(settings):
    """Upgrade repro: versions gated by an older release kept `min_golden_pass_rate` … in the registry and in
    `adapters show`/`list --json`, where newer ones say `minGoldenPassRate` (and the API said both the new way):
    a script reading the new key found nothing for them."""
    import json

    from typer.testing import CliRunner

    from lunatrain import models, registry
    from lunatrain.cli import app

    from helpers import adapter_work_dir

    fp = models.resolve_base(None, settings).fingerprint
    work = adapter_work_dir(settings, "a", "old")
    (work / "train-hashes.txt").write_text("h\n")
    entry = {"baseModel": {"id": "luna-tiny", "fingerprint": fp}, "params": {"rank": 4}, "metrics": {}, "jobId": None}
    registry.publish(settings, "a", "versioned", work, entry)
    path = registry.registry_path(settings)
    data = json.loads(path.read_text())
    data["adapters"]["a"]["versions"][0]["gate"] = {
        "passed": True,
        "status": "passed",
        "thresholds": {"min_golden_pass_rate": 0.5, "max_loss_regression": 0.02},
    }
    path.write_text(json.dumps(data))
    shown = json.loads(CliRunner().invoke(app, ["adapters", "show", "a@v1"]).output)
    assert shown["gate"]["thresholds"] == {"minGoldenPassRate": 0.5, "maxLossRegression": 0.02}, shown["gate"]


def test_a_folder_named_like_a_version_with_a_newline_is_no_version(settings):
    """Review repro: `v1` followed by a newline counted as a version folder (`$` matches before a final
    newline): with the registry file gone, `adapters list` said one version lay in the adapters folder."""
    from lunatrain import registry

    report = settings.adapters_dir / "a" / "v1\n" / registry.REPORT_FILE
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    assert registry.load(settings) == {"format": registry.FORMAT, "adapters": {}}


def test_a_repair_interrupted_before_it_wrote_leaves_the_damaged_registry_in_place(settings, monkeypatch):
    """Repro: Ctrl-C (or a kill) in the moment after `adapters repair` moved the damaged registry aside left no
    registry at all; the next repair rebuilt it without naming the damaged copy it had kept. The damaged
    file now stays in place until the rebuilt one replaces it."""
    _publish(str(settings.home), "luna", "v1")
    path = registry.registry_path(settings)
    path.write_text("{broken")
    writes = registry._save

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.repair(settings)
    assert path.read_text() == "{broken"  # still where it was: the next command says it is damaged
    monkeypatch.setattr(registry, "_save", writes)
    repaired = registry.repair(settings)
    assert repaired["repaired"]
    assert registry.load(settings)["repaired"]["damagedFile"] == Path(repaired["damagedFile"]).name
    assert Path(repaired["damagedFile"]).read_text() == "{broken"


def test_repair_adds_the_versions_an_older_registry_restored_from_a_backup_lacks(settings):
    """Backup repro: an older backup restored over a root that had moved on (`tar -x` keeps the newer folders)
    brought back a registry without v2, while data/adapters/luna/v2 stayed with its training report: `adapters
    list` and `show` did not know it, and `adapters repair` said "readable (1 version); nothing to repair". Repair
    adds the versions the folders hold and the registry lacks, and says so; what is active stays as it was."""
    import shutil

    write_export(settings)
    run_lora(parse_params(FAST | {"adapterName": "luna"}), settings)
    older = registry.registry_path(settings).read_bytes()  # the backup's registry: v1 only
    run_lora(parse_params(FAST | {"adapterName": "luna", "seed": 8}), settings)
    newer = registry.get_version(settings, "luna", "v2")
    registry.registry_path(settings).write_bytes(older)
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines() == [
        "Added luna@v2: its folder holds a finished run that the registry lacked (a registry restored from an "
        "older backup?)."
    ], r.output
    versions = registry.list_adapters(settings)["luna"]["versions"]
    assert [v["version"] for v in versions] == ["v1", "v2"]
    for key in ("baseModel", "datasetFingerprint", "params", "metrics", "path", "runKey", "trainedKey"):
        assert versions[1].get(key) == newer.get(key), key
    assert registry.load(settings)["adapters"]["luna"]["aliases"]["latest"] == "v2"
    again = CliRunner().invoke(app, ["adapters", "repair"])
    assert again.exit_code == 0 and "nothing to repair" in again.output, again.output
    # Review repro: a version folder copied under another number was added, the same run registered twice
    shutil.copytree(settings.adapters_dir / "luna" / "v1", settings.adapters_dir / "luna" / "v3")
    copied = CliRunner().invoke(app, ["adapters", "repair"])
    assert "Left out luna/v3 (its training-report.json is of version 'v1')" in copied.output, copied.output
    assert [v["version"] for v in registry.list_adapters(settings)["luna"]["versions"]] == ["v1", "v2"]


def test_repair_adds_the_overwrite_slots_run_and_names_the_folders_it_leaves_out(settings):
    """Review repro: repair of a readable registry skipped the overwrite slot: an older registry restored beside a
    `current` folder holding a later run left that revision unregistered, and the next overwrite run took its
    number again. And a newer folder whose report cannot be read, or a version folder copied under another
    adapter's name, was passed over in silence ("nothing to repair"), where a rebuild names it."""
    import shutil

    write_export(settings)
    slot = FAST | {"adapterName": "scratch", "adapterStrategy": "overwrite"}
    assert run_lora(parse_params(slot), settings).report["revision"] == 1
    older = registry.registry_path(settings).read_bytes()
    assert run_lora(parse_params(slot | {"seed": 8}), settings).report["revision"] == 2
    registry.registry_path(settings).write_bytes(older)
    shutil.copytree(settings.adapters_dir / "scratch" / "current", settings.adapters_dir / "nova" / "v1")
    (settings.adapters_dir / "scratch" / "v9").mkdir()
    (settings.adapters_dir / "scratch" / "v9" / registry.REPORT_FILE).write_text("{")
    r = CliRunner().invoke(app, ["adapters", "repair"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("Added scratch@current revision 2: its folder holds a finished run"), lines
    left = "\n".join(lines[1:])
    assert "Left out nova/v1 (its training-report.json is of adapter 'scratch')" in left, left
    assert "Left out scratch/v9 (its training-report.json cannot be read" in left, left
    versions = registry.list_adapters(settings)["scratch"]["versions"]
    assert [(v["version"], v.get("revision"), bool(v.get("replaced"))) for v in versions] == [
        ("current", 1, True),
        ("current", 2, False),
    ]
    assert "nova" not in registry.list_adapters(settings)
    assert run_lora(parse_params(slot | {"seed": 9}), settings).report["revision"] == 3
