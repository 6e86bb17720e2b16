"""Deleting an example that an adapter was trained on marks that adapter "retrain needed" (stale), through
the CLI and through the API; deleting an example it never saw marks nothing."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_a_version_trained_after_the_delete_on_the_older_export_is_stale_at_once(
    trained_home: Path, settings: Settings
) -> None:
    """Repro: an example deleted after `lunatrain export` was still in the export; `lunatrain lora` trained
    luna-adapter@v2 on it and registered it without the stale mark, which only `adapters repair` added later,
    so the registry said different things about the same version before and after a repair."""
    from conftest import TRAINED_PARAMS

    from lunatrain.train import run_lora

    trained, ids = _trained_adapter(settings)
    victim = next(h for h in sorted(trained) if h in ids)
    assert CliRunner().invoke(app, ["examples", "delete", str(ids[victim])]).exit_code == 0
    result = run_lora(TRAINED_PARAMS, settings)  # the same export: the deleted example is in it
    assert result.ok and result.version == "v2", result.error
    assert victim in (settings.adapters_dir / "luna-adapter" / "v2" / "train-hashes.txt").read_text().split()
    stale = registry.get_version(settings, "luna-adapter", "v2").get("stale")
    assert stale and victim in stale["hashes"], stale
