"""Deleting an example that an adapter was trained on marks that adapter "retrain needed" (stale), through
the CLI and through the API; deleting an example it never saw marks nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import registry, store
from lunatrain.cli import app
from lunatrain.settings import Settings


def _trained_adapter(settings: Settings) -> tuple[set[str], dict]:
    """The examples luna-adapter@v1 of `trained_home` was trained on, and every example's id by hash."""
    trained = set((settings.adapters_dir / "luna-adapter" / "v1" / "train-hashes.txt").read_text().split())
    return trained, {e.hash: e.id for e in store.list_examples(settings, limit=10_000)}


def test_delete_marks_the_adapters_trained_on_it(trained_home: Path, settings: Settings) -> None:
    trained, ids = _trained_adapter(settings)
    untrained = next(h for h in ids if h not in trained)
    result = CliRunner().invoke(app, ["examples", "delete", str(ids[untrained])])
    assert result.exit_code == 0 and "Retrain needed" not in result.output
    assert not registry.get_version(settings, "luna-adapter", "v1").get("stale")

    victim = next(h for h in sorted(trained) if h in ids)
    result = CliRunner().invoke(app, ["examples", "delete", str(ids[victim])])
    assert result.exit_code == 0 and "Retrain needed: luna-adapter@v1" in result.output
    stale = registry.get_version(settings, "luna-adapter", "v1")["stale"]
    assert victim in stale["hashes"]
    listed = CliRunner().invoke(app, ["adapters", "list", "--json"])
    assert "stale" in listed.output


def test_api_delete_reports_stale_adapters(trained_home: Path, settings: Settings) -> None:
    from lunatrain.api.main import create_app

    trained, ids = _trained_adapter(settings)
    victim, second = [h for h in sorted(trained) if h in ids][:2]
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        response = client.delete(f"/assistant/training/examples/{ids[victim]}")
        # A second example it was trained on names it again: stale already, and trained on this one too.
        again = client.delete(f"/assistant/training/examples/{ids[second]}")
    assert response.status_code == 200, response.text
    assert response.json()["staleAdapters"] == ["luna-adapter@v1"]
    assert again.json()["staleAdapters"] == ["luna-adapter@v1"], again.text
    assert json.loads(registry.registry_path(settings).read_text())["adapters"]["luna-adapter"]["versions"][0]["stale"]


def test_lora_refuses_an_export_that_holds_deleted_examples_and_prepare_fails_on_it(
    trained_home: Path, settings: Settings
) -> None:
    """Repro: an example deleted after `lunatrain export` was still in the export, and `lunatrain lora` trained
    luna-adapter@v2 on it without a word (and the gate made it active, stale from birth). Content the user
    deleted is not trained on: the run is refused before anything is loaded or written, and the preflight
    fails on it, both saying to export again; after an export it trains."""
    from conftest import TRAINED_PARAMS

    from lunatrain import prepare
    from lunatrain.errors import CheckFailed
    from lunatrain.params import parse_params
    from lunatrain.train import run_lora

    trained, ids = _trained_adapter(settings)
    victim = next(h for h in sorted(trained) if h in ids)
    assert CliRunner().invoke(app, ["examples", "delete", str(ids[victim])]).exit_code == 0
    with pytest.raises(CheckFailed) as refused:
        run_lora(TRAINED_PARAMS, settings)  # the same export: the deleted example is in it
    assert refused.value.message == (
        "The export holds 1 sample deleted since it was written; run `lunatrain export` first, "
        "so that deleted content is not trained on."
    )
    # German-page explore repro: said in English on the dashboard; prepare's check, for its own words
    assert refused.value.params == {"check": "check.export_stale.deleted", "count": 1, "deleted": 1, "rejected": 0}
    assert [e["version"] for e in registry.list_adapters(settings)["luna-adapter"]["versions"]] == ["v1"]  # nothing new
    report = prepare.prepare(settings, parse_params(TRAINED_PARAMS))
    [check] = [c for c in report.checks if c.id == "export_stale"]
    assert (report.status, check.severity, check.count, check.code) == ("fail", "fail", 1, "check.export_stale.deleted")
    assert check.message == "1 sample in the export was deleted since; run `lunatrain export`"
    assert check.examples == [f"ex-{ids[victim]}"]  # the export's id, as the other checks name records
    assert CliRunner().invoke(app, ["export"]).exit_code == 0
    result = run_lora(TRAINED_PARAMS, settings)
    assert result.ok and result.version == "v2", result.error
    assert victim not in (settings.adapters_dir / "luna-adapter" / "v2" / "train-hashes.txt").read_text().split()


def test_lora_refuses_an_export_that_holds_examples_rejected_since_and_prepare_names_them(
    trained_home: Path, settings: Settings
) -> None:
    """Repro: examples rejected after `lunatrain export` stayed in the tier a standalone `lunatrain lora`
    trained, and prepare only warned that the database changed, while a deleted example is refused by name.
    Rejecting says "do not train this" as deleting does: the run is refused, prepare fails naming them, and
    after an export it trains without them."""
    from conftest import TRAINED_PARAMS

    from lunatrain import prepare
    from lunatrain.errors import CheckFailed
    from lunatrain.params import parse_params
    from lunatrain.train import run_lora

    trained, ids = _trained_adapter(settings)
    victims = [h for h in sorted(trained) if h in ids][:2]
    r = CliRunner().invoke(app, ["examples", "reject", *[str(ids[h]) for h in victims]])
    assert r.exit_code == 0, r.output
    with pytest.raises(CheckFailed) as refused:
        run_lora(TRAINED_PARAMS, settings)
    assert refused.value.message == (
        "The export holds 2 samples rejected since it was written; run `lunatrain export` first, "
        "so that rejected content is not trained on."
    )
    assert [e["version"] for e in registry.list_adapters(settings)["luna-adapter"]["versions"]] == ["v1"]
    report = prepare.prepare(settings, parse_params(TRAINED_PARAMS))
    [check] = [c for c in report.checks if c.id == "export_stale"]
    assert (report.status, check.severity, check.count, check.code) == (
        "fail",
        "fail",
        2,
        "check.export_stale.rejected",
    )
    assert check.message == "2 samples in the export were rejected since; run `lunatrain export`"
    assert check.examples == sorted(f"ex-{ids[h]}" for h in victims)
    # approved again: the export holds what the database approves, and trains
    assert CliRunner().invoke(app, ["examples", "approve", *[str(ids[h]) for h in victims]]).exit_code == 0
    report = prepare.prepare(settings, parse_params(TRAINED_PARAMS))
    [check] = [c for c in report.checks if c.id == "export_stale"]
    assert check.severity == "warn", check
    assert CliRunner().invoke(app, ["examples", "reject", str(ids[victims[0]])]).exit_code == 0
    assert CliRunner().invoke(app, ["export"]).exit_code == 0
    result = run_lora(TRAINED_PARAMS, settings)
    assert result.ok and result.version == "v2", result.error
    assert victims[0] not in (settings.adapters_dir / "luna-adapter" / "v2" / "train-hashes.txt").read_text().split()


def test_a_version_whose_example_is_deleted_while_it_trains_is_stale_at_once(
    trained_home: Path, settings: Settings
) -> None:
    """An example deleted while a run trains on it marked only the versions that existed then: the new one
    is marked as it is registered, not only by a later `adapters repair` (the registry would say two things
    about the same version before and after a repair)."""
    from conftest import TRAINED_PARAMS

    from lunatrain.train import run_lora

    trained, ids = _trained_adapter(settings)
    victim = next(h for h in sorted(trained) if h in ids)
    deleted: list[int] = []

    def delete_once(event: dict) -> None:  # the first step is done: the data is loaded, the run is training
        if event.get("type") == "progress" and not deleted:
            assert CliRunner().invoke(app, ["examples", "delete", str(ids[victim])]).exit_code == 0
            deleted.append(ids[victim])

    result = run_lora(TRAINED_PARAMS, settings, on_event=delete_once)
    assert deleted and result.ok and result.version == "v2", result.error
    assert victim in (settings.adapters_dir / "luna-adapter" / "v2" / "train-hashes.txt").read_text().split()
    stale = registry.get_version(settings, "luna-adapter", "v2").get("stale")
    assert stale and victim in stale["hashes"], stale


def test_a_store_that_cannot_be_read_does_not_stop_a_run_on_its_export(settings: Settings, tiny: Path) -> None:
    """A run needs only the export: when the database does not answer, whether the export holds deleted
    content cannot be known, and the run trains (as it registers even when marking stale versions fails)."""
    from conftest import TRAINED_PARAMS

    from lunatrain.settings import load_settings
    from lunatrain.train import run_lora

    from helpers import make_records, write_export

    write_export(settings, make_records(40))
    away = load_settings(home=settings.home, db_url="postgresql+psycopg://nobody:x@127.0.0.1:1/none")
    result = run_lora(TRAINED_PARAMS, away)
    assert result.ok and result.version == "v1", result.error


def test_a_job_on_an_export_that_holds_deleted_examples_is_refused_before_it_is_queued(
    trained_home: Path, settings: Settings
) -> None:
    """As minCurated is: the answer to the request (409), not a job that fails once a trainer runs it. No
    trainer is reachable here, so any other path would be a 503."""
    from lunatrain.api.main import create_app
    from lunatrain.settings import load_settings

    trained, ids = _trained_adapter(settings)
    victim = next(h for h in sorted(trained) if h in ids)
    assert CliRunner().invoke(app, ["examples", "delete", str(ids[victim])]).exit_code == 0
    offline = load_settings(home=settings.home, lora_ensure_on_demand=False, lora_trainer_url="http://127.0.0.1:9")
    with TestClient(create_app(offline), base_url="http://127.0.0.1") as client:
        refused = client.post("/assistant/training/lora/start", json={"maxSteps": 2})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["message"].startswith("The export holds 1 sample deleted since it was written")
        assert CliRunner().invoke(app, ["export"]).exit_code == 0  # now the trainer's absence is what is said
        assert client.post("/assistant/training/lora/start", json={"maxSteps": 2}).status_code == 503


def test_a_deleted_memory_item_is_called_content_or_a_sample_not_an_example(settings: Settings) -> None:
    """Repro: deleting a memory item that an export held refused the run with "The export holds 1 example
    deleted since", and prepare said "1 example in the export was deleted": the user had deleted no example.
    The export's records are samples (of either kind), and what an adapter trained on is content."""
    from lunatrain import export, prepare
    from lunatrain.errors import CheckFailed

    for i in range(4):
        store.add_memory(settings, question=f"Wie heißt mein {i}. Hund?", answer=f"Bruno {i}.")
    export.export(settings)
    data = export.read_tier(settings, "memory")
    gone = store.list_memory(settings)[0]
    store.delete_memory(settings, [gone.id])
    with pytest.raises(CheckFailed) as refused:
        export.refuse_withdrawn(settings, "memory")
    assert refused.value.message.startswith("The export holds 1 sample deleted since it was written"), refused.value
    check = prepare.stale_check(settings, data.summary, data.train + data.val + data.test)
    assert check.message == "1 sample in the export was deleted since; run `lunatrain export`"


def test_content_added_back_clears_the_stale_mark_once_nothing_it_was_trained_on_is_missing(
    trained_home: Path, settings: Settings
) -> None:
    """Repro: an example deleted by mistake and added back (the same content) left the version trained on it
    "retrain needed" for good, although the data it was trained on was whole again. The mark now names what
    is still missing, and goes once nothing is: through the API and through the command line."""
    from lunatrain.api.main import create_app

    trained, ids = _trained_adapter(settings)
    first, second = (store.get_example(settings, ids[h]) for h in [h for h in sorted(trained) if h in ids][:2])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for example in (first, second):
            assert client.delete(f"/assistant/training/examples/{example.id}").json()["staleAdapters"] == [
                "luna-adapter@v1"
            ]
        back = client.post(
            "/assistant/training/examples",
            json={"prompt": first.prompt, "response": first.response, "system": first.system, "turns": first.turns},
        )
        assert back.status_code == 201 and back.json()["hash"] == first.hash, back.text
        stale = registry.get_version(settings, "luna-adapter", "v1").get("stale")
        assert stale and stale["hashes"] == [second.hash], stale  # the second is still gone
        assert client.get("/assistant/training/adapters/luna-adapter").json()["versions"][0]["stale"]

    assert not second.turns
    args = ["examples", "add", "--prompt", second.prompt, "--response", second.response]
    result = CliRunner().invoke(app, args + (["--system", second.system] if second.system else []))
    assert result.exit_code == 0, result.output
    assert not registry.get_version(settings, "luna-adapter", "v1").get("stale")
    assert "stale" not in CliRunner().invoke(app, ["adapters", "list", "--json"]).output


def test_a_memory_item_added_back_clears_the_stale_mark(trained_home: Path, settings: Settings) -> None:
    """The same for a memory item: deleted, the version trained on it is stale; added back, it is not."""
    from conftest import TRAINED_PARAMS

    from lunatrain.params import parse_params
    from lunatrain.train import run_lora

    result = run_lora(parse_params(TRAINED_PARAMS | {"datasetTier": "merged"}), settings)
    assert result.ok, result.error
    trained = set((result.path / "train-hashes.txt").read_text().split())
    item = next(m for m in store.list_memory(settings, limit=1000) if m.hash in trained)
    assert CliRunner().invoke(app, ["memory", "delete", str(item.id)]).exit_code == 0
    assert registry.get_version(settings, "luna-adapter", result.version).get("stale")
    added = CliRunner().invoke(app, ["memory", "add", "--question", item.question, "--answer", item.answer])
    assert added.exit_code == 0, added.output
    assert not registry.get_version(settings, "luna-adapter", result.version).get("stale")


def test_only_content_back_in_the_approved_data_lifts_the_mark(trained_home: Path, settings: Settings) -> None:
    """Review repro: added back as pending (in no export), the content lifted the mark; a pending copy that
    was approved later never did. As a delete counts content held only pending as gone, so does this."""
    trained, ids = _trained_adapter(settings)
    example = next(e for e in (store.get_example(settings, ids[h]) for h in sorted(trained) if h in ids) if not e.turns)
    assert CliRunner().invoke(app, ["examples", "delete", str(example.id)]).exit_code == 0
    args = ["examples", "add", "--prompt", example.prompt, "--response", example.response, "--status", "pending"]
    added = CliRunner().invoke(app, args + (["--system", example.system] if example.system else []))
    assert added.exit_code == 0, added.output
    assert registry.get_version(settings, "luna-adapter", "v1").get("stale")  # pending: in no export
    back = next(e for e in store.list_examples(settings, limit=10_000) if e.hash == example.hash)
    assert CliRunner().invoke(app, ["examples", "approve", str(back.id)]).exit_code == 0
    assert not registry.get_version(settings, "luna-adapter", "v1").get("stale")


def test_a_delete_while_content_comes_back_keeps_its_mark(
    trained_home: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review repro: the add-back read the tombstones, then a delete of another example the version was
    trained on committed and marked it; the add-back, going on, cleared that mark from its older reading."""
    import threading

    trained, ids = _trained_adapter(settings)
    first, second = [
        e for e in (store.get_example(settings, ids[h]) for h in sorted(trained) if h in ids) if not e.turns
    ][:2]
    store.delete_examples(settings, [first.id])
    registry.refresh_stale(settings, [first.hash])
    real, paused, go = registry.mark_stale, threading.Event(), threading.Event()

    def held_up(*args, **kwargs):  # the add-back's marking, before it takes the registry's lock
        if threading.current_thread().name == "add-back":
            paused.set()
            go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "mark_stale", held_up)
    back = threading.Thread(
        name="add-back",
        target=lambda: store.add_example(settings, prompt=first.prompt, response=first.response, system=first.system),
    )
    back.start()
    assert paused.wait(10)
    store.delete_examples(settings, [second.id])
    assert registry.refresh_stale(settings, [second.hash]) == ["luna-adapter@v1"]
    go.set()
    back.join(10)
    stale = registry.get_version(settings, "luna-adapter", "v1").get("stale")
    assert stale and stale["hashes"] == [second.hash], stale


def test_a_delete_of_content_still_held_approved_as_the_other_kind_says_so(settings: Settings) -> None:
    """Forget repro: deleting a memory item (a private fact) whose same question and answer is also held as an
    approved example said only "Deleted 1 memory item." (`staleAdapters: []`): the text stayed in the next export
    and in the adapters trained on it, and the user believed it gone. The delete names where it is still held."""
    example = store.add_example(settings, prompt="Was trinke ich morgens?", response="Hafermilch-Cappuccino.")
    item = store.add_memory(settings, question="Was trinke ich morgens?", answer="Hafermilch-Cappuccino.")
    other = store.add_memory(settings, question="Wo wohne ich?", answer="In Köln.")
    assert store.delete_memory(settings, [item.id, other.id]).still_held == [f"ex-{example.id}"]
    from lunatrain.api.main import create_app

    again = store.add_memory(settings, question="Was trinke ich morgens?", answer="Hafermilch-Cappuccino.")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        answer = api.delete(f"/assistant/training/memory/{again.id}").json()
    assert answer == {"deleted": again.id, "staleAdapters": [], "stillHeldAs": [f"ex-{example.id}"]}, answer
    last = store.add_memory(settings, question="Was trinke ich morgens?", answer="Hafermilch-Cappuccino.")
    said = CliRunner().invoke(app, ["examples", "delete", str(example.id)])
    assert said.exit_code == 0, said.output
    # Memory repro: "it stays in the exports" read as every tier's, the tier of what was deleted too (a memory
    # item deleted beside its example twin leaves the memory tier): the tiers of what holds it keep it.
    assert said.output.split("\n")[0] == (
        f"Deleted 1 example. Its content is still held, approved, as mem-{last.id}: the tiers that export it keep "
        "it, and so do the adapters trained on it; delete that too to forget it."
    ), said.output
    store.dispose_stores()


def test_a_rollback_to_a_stale_version_names_the_newer_version_trained_without_that_content(
    trained_home: Path, settings: Settings
) -> None:
    """Forget repro: after a delete, `luna` trained v2 without the example and a rollback made the stale v1 active
    again, saying "train a new version (`lunatrain luna`) to leave it out"; `luna` then said v2 "was trained on this
    data; not trained again" and v1 went on serving the deleted content. The note names the way out that works:
    activating v2; `luna` only where no version trained without it is there."""
    import shutil

    trained, ids = _trained_adapter(settings)
    victim = next(h for h in sorted(trained) if h in ids)
    v1 = registry.get_version(settings, "luna-adapter", "v1")
    work = settings.adapters_dir / "luna-adapter" / ".work" / "without"
    shutil.copytree(registry.adapter_dir(settings, v1), work)
    (work / "train-hashes.txt").write_text("".join(f"{h}\n" for h in sorted(trained - {victim})))
    keep = {k: v for k, v in v1.items() if k not in ("name", "version", "path", "created", "revision", "stale")}
    v2 = registry.publish(settings, "luna-adapter", "versioned", work, keep | {"jobId": "without"})
    runner = CliRunner()
    assert runner.invoke(app, ["adapters", "activate", "luna-adapter@v1"]).exit_code == 0
    assert runner.invoke(app, ["adapters", "activate", f"luna-adapter@{v2['version']}"]).exit_code == 0
    assert "Retrain needed: luna-adapter@v1" in runner.invoke(app, ["examples", "delete", str(ids[victim])]).output
    back = runner.invoke(app, ["adapters", "rollback", "luna-adapter"])
    assert back.exit_code == 0, back.output
    assert back.output.splitlines()[1] == (
        "Note: luna-adapter@v1 is stale (trained on deleted content): it still serves that "
        f"content; luna-adapter@{v2['version']} was trained without it (`lunatrain adapters activate "
        f"luna-adapter@{v2['version']}`)."
    ), back.output
    store.dispose_stores()
