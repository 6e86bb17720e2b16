"""Deleting an example that an adapter was trained on marks that adapter "retrain needed" (stale), through
the CLI and through the API; deleting an example it never saw marks nothing."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lunatrain import export, registry, store
from lunatrain.cli import app
from lunatrain.settings import Settings
from lunatrain.train import run_lora


def _trained_adapter(settings: Settings) -> tuple[set[str], dict]:
    store.load_seed(settings)
    export.export(settings)
    result = run_lora(
        {"epochs": 1, "maxSteps": 2, "batchSize": 4, "rank": 4, "maxSeqLength": 128, "adapterName": "st"}, settings
    )
    assert result.ok, result.error
    trained = set((result.path / "train-hashes.txt").read_text().split())
    return trained, {e.hash: e.id for e in store.list_examples(settings, limit=10_000)}


def test_delete_marks_the_adapters_trained_on_it(settings: Settings, home: Path) -> None:
    trained, ids = _trained_adapter(settings)
    untrained = next(h for h in ids if h not in trained)
    result = CliRunner().invoke(app, ["examples", "delete", str(ids[untrained])])
    assert result.exit_code == 0 and "Retrain needed" not in result.output
    assert not registry.get_version(settings, "st", "v1").get("stale")

    victim = next(h for h in sorted(trained) if h in ids)
    result = CliRunner().invoke(app, ["examples", "delete", str(ids[victim])])
    assert result.exit_code == 0 and "Retrain needed: st@v1" in result.output
    stale = registry.get_version(settings, "st", "v1")["stale"]
    assert victim in stale["hashes"]
    listed = CliRunner().invoke(app, ["adapters", "list", "--json"])
    assert "stale" in listed.output


def test_api_delete_reports_stale_adapters(settings: Settings, home: Path) -> None:
    from lunatrain.api.main import create_app

    trained, ids = _trained_adapter(settings)
    victim = next(h for h in sorted(trained) if h in ids)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        response = client.delete(f"/assistant/training/examples/{ids[victim]}")
    assert response.status_code == 200, response.text
    assert response.json()["staleAdapters"] == ["st@v1"]
    assert json.loads(registry.registry_path(settings).read_text())["adapters"]["st"]["versions"][0]["stale"]
