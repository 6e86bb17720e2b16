"""The adapter registry: concurrent publishing, aliases, activation rules. Run: `pytest tests/test_registry.py -q`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest

from lunatrain import models, registry
from lunatrain.errors import Conflict, DamagedFile, NotFound, UsageError
from lunatrain.settings import load_settings

from helpers import adapter_work_dir


def _entry(fingerprint: str, **extra) -> dict:
    return {
        "baseModel": {"id": "luna-tiny", "fingerprint": fingerprint},
        "datasetTier": "curated",
        "datasetFingerprint": "d" * 64,
        "params": {"rank": 4},
        "metrics": {"valLoss": 1.0},
        "jobId": None,
    } | extra


def _publish(home: str, name: str, tag: str, strategy: str = "versioned") -> dict:
    settings = load_settings(home=Path(home))
    work = adapter_work_dir(settings, name, tag)
    (work / "train-hashes.txt").write_text(f"hash-{tag}\n")
    return registry.publish(settings, name, strategy, work, _entry("f" * 64, jobId=tag))


def _publish_in_child(args: tuple[str, str]) -> str:
    return _publish(args[0], "luna-adapter", args[1])["version"]


@pytest.mark.slow
def test_eight_processes_publishing_at_once_get_distinct_versions(settings):
    ctx = mp.get_context("spawn")
    with ctx.Pool(8) as pool:
        got = pool.map(_publish_in_child, [(str(settings.home), f"job{i}") for i in range(8)])
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    data = json.loads(registry.registry_path(settings).read_text())  # valid JSON
    versions = data["adapters"]["luna-adapter"]["versions"]
    assert sorted(v["version"] for v in versions) == sorted(got) and len(versions) == 8
    assert sorted(v["jobId"] for v in versions) == [f"job{i}" for i in range(8)]
    for v in versions:  # each directory holds the job that registered it
        assert (settings.home / v["path"] / "adapter_model.safetensors").read_text() == v["jobId"]
    assert data["adapters"]["luna-adapter"]["aliases"]["latest"] in got


def test_versions_are_never_reused(settings):
    _publish(str(settings.home), "a", "one")
    # a crash after the move but before registering leaves a directory: its number is skipped
    (settings.adapters_dir / "a" / "v2").mkdir()
    assert _publish(str(settings.home), "a", "two")["version"] == "v3"


def test_activate_refuses_a_foreign_base_unless_forced_and_rollback(settings):
    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two", "three"):
        work = adapter_work_dir(settings, "a", tag)
        registry.publish(settings, "a", "versioned", work, _entry(fp))
    work = adapter_work_dir(settings, "a", "foreign")
    registry.publish(
        settings, "a", "versioned", work, _entry("0" * 64) | {"baseModel": {"id": "org/other", "fingerprint": "0" * 64}}
    )

    with pytest.raises(Conflict, match="org/other.*--force"):
        registry.activate(settings, "a", "v4")
    assert "active" not in registry.list_adapters(settings)["a"]["aliases"]
    registry.activate(settings, "a", "v1")
    registry.activate(settings, "a", "v2")
    registry.activate(settings, "a", "v4", force=True)
    assert registry.get_version(settings, "a", "active")["version"] == "v4"
    assert registry.rollback(settings, "a")["version"] == "v2"
    assert registry.get_version(settings, "a")["version"] == "v2"  # no version given: the active one
    assert registry.get_version(settings, "a", "latest")["version"] == "v4"
    hist = registry.list_adapters(settings)["a"]["activations"]
    assert [(h["version"], h["previous"], h["forced"]) for h in hist] == [
        ("v1", None, False),
        ("v2", "v1", False),
        ("v4", "v2", True),
        ("v2", "v4", False),
    ]
    groups = registry.by_base(settings)
    assert (
        sorted(len(g["versions"]) for g in groups.values()) == [1, 3] and groups["0" * 64]["baseModel"] == "org/other"
    )


def test_lookups_and_annotations(settings):
    _publish(str(settings.home), "a", "one")
    with pytest.raises(NotFound):
        registry.get_version(settings, "b")
    with pytest.raises(NotFound):
        registry.get_version(settings, "a", "v9")
    with pytest.raises(UsageError):
        registry.parse_ref("../x@v1")
    assert registry.parse_ref("a@v1") == ("a", "v1") and registry.parse_ref("a") == ("a", "")
    registry.record_gate(settings, "a", "v1", {"status": "passed"})
    assert registry.get_version(settings, "a", "v1")["gate"] == {"status": "passed"}
    with pytest.raises(UsageError, match="cannot be changed"):
        registry.annotate(settings, "a", "v1", "metrics", {})
    with pytest.raises(UsageError, match="roll back"):
        registry.rollback(settings, "a")


def test_deleting_a_trained_example_marks_versions_stale(settings):
    _publish(str(settings.home), "a", "one")
    _publish(str(settings.home), "a", "two")
    assert registry.mark_stale(settings, {"hash-two", "unrelated"}) == ["a@v2"]
    assert registry.get_version(settings, "a", "v2")["stale"]["hashes"] == ["hash-two"]
    assert registry.get_version(settings, "a", "v2")["stale"]["count"] == 1
    assert "stale" not in registry.get_version(settings, "a", "v1")
    assert registry.mark_stale(settings, {"hash-two"}) == []  # already marked


def test_a_delete_names_every_version_trained_on_it_stale_before_or_not(settings):
    """Repro: deleting a second example an already stale version was trained on answered `staleAdapters: []`."""
    _publish(str(settings.home), "a", "one")
    two = _publish(str(settings.home), "a", "two")
    with open(settings.home / two["path"] / "train-hashes.txt", "a") as fh:
        fh.write("hash-three\n")
    assert registry.mark_stale(settings, {"hash-two"}, trained_on={"hash-two"}) == ["a@v2"]
    assert registry.mark_stale(settings, {"hash-two", "hash-three"}, trained_on={"hash-three"}) == ["a@v2"]
    # Forget repro: the mark named only the first delete's content ("hash-two"), and cut its list at 20 without a
    # count: which deleted content a version learned was a partial answer. It names all that is missing now.
    stale = registry.get_version(settings, "a", "v2")["stale"]
    assert stale["hashes"] == ["hash-three", "hash-two"] and stale["count"] == 2, stale
    assert registry.mark_stale(settings, {"hash-two", "hash-three"}) == []  # nothing newly marked
    many = {f"hash-{i:02d}" for i in range(25)}
    (settings.home / two["path"] / "train-hashes.txt").write_text("".join(f"{h}\n" for h in sorted(many)))
    registry.mark_stale(settings, many)
    stale = registry.get_version(settings, "a", "v2")["stale"]
    assert stale["hashes"] == sorted(many)[:20] and stale["count"] == 25, stale


def test_adapters_diff_shows_small_and_close_floats_as_different(settings):
    """Repro: `adapters diff luna-adapter@v3 luna-adapter@v4` printed "params.learningRate: 0.5000 -> 0.0000"
    for a learning rate of 1e-05 (four decimals), and two losses equal to four decimals looked unchanged."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag, lr, val in (("one", 0.5, 8.19341), ("two", 1e-05, 8.19344)):
        work = adapter_work_dir(settings, "a", tag)
        registry.publish(
            settings, "a", "versioned", work, _entry(fp, params={"learningRate": lr}, metrics={"valLoss": val})
        )
    diff = CliRunner().invoke(app, ["adapters", "diff", "a@v1", "a@v2"])
    assert diff.exit_code == 0, diff.output
    assert diff.output.splitlines() == ["metrics.valLoss: 8.19341 -> 8.19344", "params.learningRate: 0.5 -> 1e-05"]
    # CLI-text repro: a loss that differs in the fourth place read "8.4468 -> 8.422", where `adapters list`
    # says 8.4220: losses keep four decimals at least
    from lunatrain.cli.adapters import _differing

    assert _differing(8.4468, 8.422, loss=True) == "8.4468 -> 8.4220"


def test_adapters_diff_names_a_different_number_of_training_samples(settings):
    """Repro: `adapters diff` left out how many samples each version trained on (a run keeps the tier's samples
    that fit maxSeqLength in its base's tokens): of two versions differing only there it said "No differences
    in parameters, data, base model or metrics."."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag, samples in (("one", 10), ("two", 12)):
        registry.publish(
            settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp, trainSamples=samples)
        )
    diff = CliRunner().invoke(app, ["adapters", "diff", "a@v1", "a@v2"])
    assert diff.exit_code == 0, diff.output
    assert diff.output.splitlines() == ["trainSamples: 10 -> 12"]


def test_adapters_diff_says_when_two_versions_trained_the_same_and_which_one_resumed(settings):
    """Reproducibility repro: two versions trained on the same curated examples with the same parameters
    (identical weights, the same trainedKey) differed by datasetFingerprint alone, which covers the whole export:
    a memory item added between them read as a data change. And a version resumed from a checkpoint differed
    from a fresh one only by `params.resume`, which a run that started fresh under --resume has too."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag, data, resumed in (("one", "a" * 64, None), ("two", "b" * 64, 2)):
        entry = _entry(fp, datasetFingerprint=data, trainedKey="029e9da220c5d7ec", resumedFromEpoch=resumed)
        registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), entry)
    diff = CliRunner().invoke(app, ["adapters", "diff", "a@v1", "a@v2"])
    assert diff.exit_code == 0, diff.output
    assert diff.output.splitlines() == [
        f"datasetFingerprint: {'a' * 64} -> {'b' * 64}",
        "resumedFromEpoch: - -> 2",
        "Note: both trained on the same data with the same parameters and base model (trainedKey 029e9da220c5d7ec); "
        "the export around it changed (another tier, ids, tags or ratings), not what they trained on.",
    ], diff.output


def test_adapters_list_marks_a_version_whose_files_are_gone(settings):
    """Repro: with data/adapters/a/v1 deleted by hand, `adapters list` still showed "a@v1 … [active on
    luna-tiny]" with nothing saying it can no longer be served, merged or gated (those say so in one
    sentence)."""
    import shutil

    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two"):
        registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp))
    registry.activate(settings, "a", "v1")
    shutil.rmtree(settings.adapters_dir / "a" / "v1")
    out = CliRunner().invoke(app, ["adapters", "list"]).output
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["a@v1"].endswith("[active on luna-tiny] [files missing: train it again]"), out
    assert "files missing" not in lines["a@v2"], out
    # a path that leaves the data root (a hand-edited registry) is listed the same way, not a traceback
    data = json.loads(registry.registry_path(settings).read_text())
    data["adapters"]["a"]["versions"][1]["path"] = "../outside"
    registry.registry_path(settings).write_text(json.dumps(data))
    listed = CliRunner().invoke(app, ["adapters", "list"])
    assert listed.exit_code == 0 and listed.output.rstrip().endswith("[files missing: train it again]"), listed.output


def test_the_adapter_api_marks_a_version_whose_files_are_gone(settings):
    """Repro: with a version's weights deleted by hand, GET /adapters listed it like any other (the dashboard
    offered "Aktivieren", answered by a 404) and gave an inactive one's reason as "a@v1 is the active version"."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two", "three"):
        registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp))
    registry.activate(settings, "a", "v2")
    registry.activate(settings, "a", "v1")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.get("/assistant/training/adapters/a").json()["rollbackTo"] == "v2"
    (settings.adapters_dir / "a" / "v1" / "adapter_model.safetensors").unlink()
    (settings.adapters_dir / "a" / "v2" / "adapter_config.json").unlink()
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for body in (
            client.get("/assistant/training/adapters/a").json(),
            client.get("/assistant/training/adapters").json()["bases"][0]["adapters"][0],
        ):
            got = {
                v["version"]: (v["filesMissing"], v["state"]["active"], v["state"]["code"]) for v in body["versions"]
            }
            assert got == {
                "v1": (True, True, "adapter.active"),  # active all the same: it says so, and that it cannot be served
                "v2": (True, False, "adapter.files_missing"),
                "v3": (False, False, "adapter.other_version_active"),
            }, got
            # repro: rollbackTo still named v2, which the rollback then refused (404: its files are gone)
            assert body["rollbackTo"] is None, body
            v2 = next(v for v in body["versions"] if v["version"] == "v2")
            assert (
                v2["state"]["reason"]
                == "its files are missing under data/adapters (adapter_config.json); train it again"
            )
        # Status explore repro: one version asked for alone said nothing of its gone files
        for ref in ("v1", "active", "v2"):
            one = client.get(f"/assistant/training/adapters/a/versions/{ref}").json()
            assert one["filesMissing"] is True, (ref, one)
        assert client.get("/assistant/training/adapters/a/versions/v3").json()["filesMissing"] is False
    # the CLI's show says the same
    from typer.testing import CliRunner

    from lunatrain.cli import app

    shown = CliRunner().invoke(app, ["adapters", "show", "a@v2"])
    assert json.loads(shown.output)["state"]["code"] == "adapter.files_missing", shown.output
    assert json.loads(shown.output)["filesMissing"] is True


def test_rollback_refuses_a_version_whose_files_are_gone_and_changes_nothing(settings):
    """Repro: with luna-adapter/v1 deleted by hand, `adapters activate luna-adapter@v1` was refused, but
    `adapters rollback luna-adapter` made v1 active ("luna-adapter@v1 is active again."), an adapter that is
    listed as active and can never be served."""
    import shutil

    from lunatrain.errors import UsageError

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two"):
        registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp))
    registry.activate(settings, "a", "v1")
    registry.activate(settings, "a", "v2")
    shutil.rmtree(settings.adapters_dir / "a" / "v1")
    before = registry.registry_path(settings).read_bytes()
    with pytest.raises(UsageError, match=r"would return to a@v1, whose files are missing"):
        registry.rollback(settings, "a")
    assert registry.registry_path(settings).read_bytes() == before


def test_a_rollback_on_a_base_the_command_named_does_not_call_it_the_configured_one(settings, tiny_dir):
    """Lifecycle note: `adapters rollback a --baseModel X` with nothing active on X said "is not active on the
    configured base model 'X'", though X was the base the flag named, not the configured one."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "one"), _entry("f" * 64))
    shutil.copytree(tiny_dir, settings.home / "data" / "models" / "other")
    r = CliRunner().invoke(app, ["adapters", "rollback", "a", "--baseModel", "data/models/other"])
    assert r.exit_code == 2 and "is not active on base model 'data/models/other'" in r.output, r.output
    r = CliRunner().invoke(app, ["adapters", "rollback", "a"])
    assert r.exit_code == 2 and "is not active on the configured base model 'luna-tiny'" in r.output, r.output


@pytest.mark.parametrize(("strategy", "stage"), [("versioned", False), ("overwrite", False), ("overwrite", True)])
def test_a_registry_save_that_fails_leaves_the_run_in_its_work_folder(settings, monkeypatch, strategy, stage):
    """Limits repro: with the disk full when the registry was saved, the run's folder had already been moved to
    data/adapters/NAME/vN, checkpoints and all, while the error said "the previous data is intact": a folder no
    command listed, repaired or removed, and `--resume` found nothing to resume. It goes back now."""
    from lunatrain.errors import DiskFull

    first = registry.publish(settings, "a", strategy, adapter_work_dir(settings, "a", "one"), _entry("f" * 64))
    before = registry.registry_path(settings).read_bytes()
    served = (settings.home / first["path"] / "adapter_model.safetensors").read_text()
    work = adapter_work_dir(settings, "a", "two")
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "state.json").write_text("{}")
    listing = sorted(p.relative_to(settings.adapters_dir) for p in settings.adapters_dir.rglob("*"))
    moved = sorted(p.relative_to(work) for p in work.rglob("*"))

    def full(*args, **kwargs):
        raise DiskFull("The disk is full: writing the registry failed.")

    monkeypatch.setattr(registry, "_save", full)
    with pytest.raises(DiskFull):
        registry.publish(settings, "a", strategy, work, _entry("f" * 64), stage=stage)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == moved  # the resume point, where it was
    assert sorted(p.relative_to(settings.adapters_dir) for p in settings.adapters_dir.rglob("*")) == listing
    assert registry.registry_path(settings).read_bytes() == before
    assert (settings.home / first["path"] / "adapter_model.safetensors").read_text() == served


@pytest.mark.parametrize("strategy", ["versioned", "overwrite"])
def test_a_registry_save_that_failed_after_its_rename_leaves_the_registered_run_in_place(
    settings, monkeypatch, strategy
):
    """Review repro: the registry's write failed after its rename (the folder's fsync: EIO, EMFILE), so the
    registry named the new run, which publish had moved back to its work folder: a version listed with its
    files missing, or a slot said to hold revision 2 while serving revision 1. What the registry names stays."""
    import errno

    from lunatrain import fsio
    from lunatrain.errors import StorageError

    registry.publish(settings, "a", strategy, adapter_work_dir(settings, "a", "one"), _entry("f" * 64))
    work = adapter_work_dir(settings, "a", "two")
    real = fsio.fsync_dir

    def fsync_dir(path):
        if path == registry.registry_path(settings).parent:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(fsio, "fsync_dir", fsync_dir)
    with pytest.raises(StorageError):
        registry.publish(settings, "a", strategy, work, _entry("f" * 64))
    monkeypatch.setattr(fsio, "fsync_dir", real)
    newest = registry.load(settings)["adapters"]["a"]["versions"][-1]
    assert newest["version"] == ("v2" if strategy == "versioned" else "current"), newest
    assert registry.missing_files(settings, newest) == [] and not work.exists()
    assert (settings.home / newest["path"] / "adapter_model.safetensors").read_text() == "two"


def test_a_failed_save_keeps_a_slot_of_the_older_layout_serving(settings, monkeypatch):
    """Review repro: where `current` was a plain folder (an older layout), a publish whose registry save failed
    removed it and put nothing back: nothing was served, while the error said the previous data is intact."""
    from lunatrain.errors import DiskFull

    first = registry.publish(settings, "a", "overwrite", adapter_work_dir(settings, "a", "one"), _entry("f" * 64))
    link = settings.adapters_dir / "a" / "current"
    target = link.resolve()
    link.unlink()
    shutil.copytree(target, link)  # a plain folder, as an older layout had it
    shutil.rmtree(target)
    work = adapter_work_dir(settings, "a", "two")

    def full(*args, **kwargs):
        raise DiskFull("The disk is full: writing the registry failed.")

    monkeypatch.setattr(registry, "_save", full)
    with pytest.raises(DiskFull):
        registry.publish(settings, "a", "overwrite", work, _entry("f" * 64))
    assert (link / "adapter_model.safetensors").read_text() == "one" and registry.missing_files(settings, first) == []
    assert (work / "adapter_model.safetensors").read_text() == "two"


def test_activating_the_active_version_again_writes_no_history(settings):
    """Lifecycle note: `adapters activate a@v2` with a@v2 active already appended a `v2 → v2` record to the
    activation history (and its journal): a change that changed nothing."""
    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two"):
        registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp))
    registry.activate(settings, "a", "v1")
    registry.activate(settings, "a", "v2")
    before = registry.registry_path(settings).read_bytes()
    journal = (settings.adapters_dir / "a" / registry.ACTIVATIONS_FILE).read_bytes()
    assert registry.activate(settings, "a", "v2")["version"] == "v2"
    assert registry.registry_path(settings).read_bytes() == before
    assert (settings.adapters_dir / "a" / registry.ACTIVATIONS_FILE).read_bytes() == journal
    assert registry.rollback(settings, "a")["version"] == "v1"


def test_adapters_cli(settings):
    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "seven"):
        work = adapter_work_dir(settings, "a", tag)
        registry.publish(settings, "a", "versioned", work, _entry(fp, params={"rank": len(tag) + 1}))
    runner = CliRunner()
    assert runner.invoke(app, ["adapters", "activate", "a@v1"]).exit_code == 0
    assert runner.invoke(app, ["adapters", "activate", "a@v2"]).exit_code == 0
    out = runner.invoke(app, ["adapters", "list"]).output
    assert "base luna-tiny" in out and "a@v2" in out and "[latest] [active on luna-tiny]" in out
    listed = json.loads(runner.invoke(app, ["adapters", "list", "--json"]).output)
    assert [v["version"] for v in listed["adapters"]["a"]["versions"]] == ["v1", "v2"]
    assert runner.invoke(app, ["adapters", "rollback", "a"]).exit_code == 0
    shown = json.loads(runner.invoke(app, ["adapters", "show", "a"]).output)
    assert shown["version"] == "v1" and shown["state"]["active"] is True
    other = json.loads(runner.invoke(app, ["adapters", "show", "a@v2"]).output)["state"]
    assert other["active"] is False and other["reason"] == "a@v1 is the active version"
    diff = runner.invoke(app, ["adapters", "diff", "a@v1", "a@v2"]).output
    assert "params.rank: 4 -> 6" in diff and "datasetTier" not in diff
    bad = runner.invoke(app, ["adapters", "show", "a@v7"])
    assert bad.exit_code == 1 and "no version 'v7'" in bad.output
    assert runner.invoke(app, ["adapters", "activate", "../x@v1"]).exit_code == 2
    off = runner.invoke(app, ["adapters", "deactivate", "a"])
    assert off.exit_code == 0 and "a@v1 is no longer active on base model luna-tiny" in off.output
    again = runner.invoke(app, ["adapters", "deactivate", "a"])
    assert again.exit_code == 2 and "not active on the configured base model" in again.output
    assert "[active" not in runner.invoke(app, ["adapters", "list"]).output


def _publish_on(settings, name: str, base_id: str, fingerprint: str) -> dict:
    work = adapter_work_dir(
        settings, name, f"{base_id.replace('/', '_')}-{len(list(settings.adapters_dir.rglob('*')))}"
    )
    return registry.publish(
        settings,
        name,
        "versioned",
        work,
        _entry(fingerprint) | {"baseModel": {"id": base_id, "fingerprint": fingerprint}},
    )


def test_active_is_kept_per_base_model(settings):
    """A model change keeps the old base's active adapter: activating on the new base adds an entry."""
    fp = models.resolve_base(None, settings).fingerprint
    v1 = _publish_on(settings, "luna-adapter", "luna-tiny", fp)
    v2 = _publish_on(settings, "luna-adapter", "org/new", "9" * 64)
    registry.activate(settings, "luna-adapter", v1["version"])
    registry.activate(settings, "luna-adapter", v2["version"], own_base=True)  # the gate's promotion on org/new
    assert registry.active_version(settings, "luna-adapter", fp)["version"] == "v1"
    assert registry.active_version(settings, "luna-adapter", "9" * 64)["version"] == "v2"
    assert registry.get_version(settings, "luna-adapter", "active")["version"] == "v1"  # the configured base's
    assert [(a["name"], a["version"], a["baseModel"]) for a in registry.list_active(settings)] == [
        ("luna-adapter", "v1", "luna-tiny"),
        ("luna-adapter", "v2", "org/new"),
    ]
    assert [a["version"] for a in registry.list_active(settings, fp)] == ["v1"]
    # the "not active" state always says why
    state = registry.activation_state(settings, v2, fp)
    assert state["active"] is False and state["code"] == "adapter.active_on_other_base" and "org/new" in state["reason"]
    assert registry.activation_state(settings, v1, fp)["active"] is True
    v3 = _publish_on(settings, "luna-adapter", "org/other", "8" * 64)
    assert registry.activation_state(settings, v3, fp)["code"] == "adapter.other_base"
    # deactivating NAME acts on the configured base only; NAME@VERSION wherever that version is active
    assert [d["version"] for d in registry.deactivate(settings, "luna-adapter")] == ["v1"]
    assert registry.active_version(settings, "luna-adapter", "9" * 64)["version"] == "v2"
    assert registry.get_version(settings, "luna-adapter")["version"] == "v3"  # nothing active here: latest
    assert registry.deactivate(settings, "luna-adapter", "v2")[0]["baseModel"] == "org/new"
    assert registry.list_active(settings) == []
    with pytest.raises(UsageError, match="v2 is not active"):
        registry.deactivate(settings, "luna-adapter", "v2")


def test_rollback_walks_the_configured_base_history_only(settings):
    fp = models.resolve_base(None, settings).fingerprint
    for _ in range(2):
        _publish_on(settings, "a", "luna-tiny", fp)
    _publish_on(settings, "a", "org/new", "9" * 64)
    registry.activate(settings, "a", "v1")
    # The way out when there is nothing earlier; the base it speaks of by name, and how to act on another one.
    with pytest.raises(
        UsageError,
        match=r"no earlier active version on base model 'luna-tiny' .*adapters deactivate a.*--baseModel",
    ):
        registry.rollback(settings, "a")
    registry.activate(settings, "a", "v2")
    registry.activate(settings, "a", "v3", own_base=True)  # another base: not part of this base's history
    assert registry.rollback(settings, "a")["version"] == "v1"
    assert registry.active_version(settings, "a", "9" * 64)["version"] == "v3"
    registry.deactivate(settings, "a")
    with pytest.raises(UsageError, match="not active on the configured base model.*adapters activate a@VERSION"):
        registry.rollback(settings, "a")


def test_activate_rollback_and_deactivate_act_on_the_base_model_named_by_flag(settings):
    """Repro: `adapters activate|rollback|deactivate` acted on ASSISTANT_BASE_MODEL only; acting on another
    base meant changing the environment for one command, as their own refusals said. `--baseModel` names it;
    the configured base's activations stay as they are, and a base that does not resolve changes nothing."""
    import shutil

    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    twin = settings.home / "twin"
    shutil.copytree(settings.models_dir / "luna-tiny", twin)
    (twin / "config.json").write_text(json.dumps(json.loads((twin / "config.json").read_text()) | {"twin": 1}))
    twin_fp = models.resolve_base(str(twin), settings).fingerprint
    for base_id, fingerprint in (("luna-tiny", fp), ("luna-tiny", fp), (str(twin), twin_fp), (str(twin), twin_fp)):
        _publish_on(settings, "a", base_id, fingerprint)
    registry.activate(settings, "a", "v1")

    def run(*args: str):
        return CliRunner().invoke(app, ["adapters", *args])

    on_twin = ("--baseModel", str(twin))
    assert run("activate", "a@v3", *on_twin).exit_code == 0
    out = run("activate", "a@v4", *on_twin)
    assert out.exit_code == 0 and out.output == f"a@v4 is now active on base model {str(twin)!r}.\n", out.output
    assert run("activate", "a@v3", "--base-model", str(twin)).exit_code == 0  # both spellings, as for lora
    assert run("activate", "a@v4", *on_twin).exit_code == 0
    out = run("rollback", "a", *on_twin)
    assert out.exit_code == 0 and out.output == f"a@v3 is active again on base model {str(twin)!r}.\n", out.output
    assert registry.active_version(settings, "a", twin_fp)["version"] == "v3"
    assert registry.active_version(settings, "a", fp)["version"] == "v1"  # the configured base: untouched
    out = run("deactivate", "a", *on_twin)
    assert out.exit_code == 0 and out.output == f"a@v3 is no longer active on base model {twin}.\n", out.output
    assert registry.active_version(settings, "a", twin_fp) is None
    assert registry.active_version(settings, "a", fp)["version"] == "v1"
    # A base of another training run is refused as without the flag, and its refusal names the flag's base.
    # Switch repro: it said "the configured base model is <twin>" (the flag's) and suggested retraining and
    # --force without the flag, commands that act on the configured base: both name the flag's base now.
    out = run("activate", "a@v1", *on_twin)
    said = " ".join(out.output.split())
    assert out.exit_code == 1 and f"but the base model named is {str(twin)!r}" in said, said
    assert f"`lunatrain luna --adapterName a --baseModel {twin}`" in said, said
    assert f"`lunatrain adapters activate a@v1 --force --baseModel {twin}`" in said, said
    # The refusals name the flag in the commands they suggest: without it those act on the configured base.
    out = run("rollback", "a", *on_twin)
    said = " ".join(out.output.split())
    assert out.exit_code == 2 and f"`lunatrain adapters activate a@VERSION --baseModel {twin}`" in said, said
    assert "ASSISTANT_BASE_MODEL" not in said, said

    before = registry.registry_path(settings).read_bytes()
    for args in (("activate", "a@v2"), ("rollback", "a"), ("deactivate", "a")):
        out = run(*args, "--baseModel", str(settings.home / "nope"))
        assert out.exit_code == 2 and "does not exist" in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output, out.output
    assert registry.registry_path(settings).read_bytes() == before


def test_rollback_walks_back_through_the_history_never_forward(settings):
    """Each rollback goes one activation further back; the version just rolled back from is never the
    next target (no toggling between the last two), and at the first activation it stops."""
    fp = models.resolve_base(None, settings).fingerprint
    for _ in range(3):
        _publish_on(settings, "a", "luna-tiny", fp)
    for version in ("v1", "v2", "v2", "v3"):  # activating the active version again is no extra step back
        registry.activate(settings, "a", version)
    assert registry.rollback(settings, "a")["version"] == "v2"
    assert registry.rollback(settings, "a")["version"] == "v1"
    with pytest.raises(UsageError, match="no earlier active version"):
        registry.rollback(settings, "a")
    assert registry.active_version(settings, "a", fp)["version"] == "v1"
    registry.activate(settings, "a", "v3")  # a new activation starts from where the rollbacks left off
    assert registry.rollback(settings, "a")["version"] == "v1"


def test_a_registry_with_one_active_alias_is_migrated_on_the_next_write(settings):
    fp = models.resolve_base(None, settings).fingerprint
    _publish_on(settings, "a", "luna-tiny", fp)
    _publish_on(settings, "a", "org/new", "9" * 64)
    path = registry.registry_path(settings)
    old = json.loads(path.read_text())
    a = old["adapters"]["a"]
    del a["activeByBase"]
    a["aliases"]["active"] = "v2"  # the old shape: one alias across all bases
    a["activations"] = [
        {"version": "v2", "previous": None, "at": "2026-01-01T00:00:00+00:00", "forced": False, "reason": "cli"}
    ]
    path.write_text(json.dumps(old))
    assert registry.active_version(settings, "a", "9" * 64)["version"] == "v2"  # read in the new shape
    registry.activate(settings, "a", "v1")  # the first write keeps v2 on its own base
    saved = json.loads(path.read_text())["adapters"]["a"]
    assert saved["activeByBase"] == {
        "9" * 64: {"version": "v2", "baseModel": "org/new"},
        fp: {"version": "v1", "baseModel": "luna-tiny"},
    }
    assert saved["aliases"]["active"] == "v1"  # the deprecated mirror: the latest activation still standing


def _overwrite_run(home: str, tag: str, *, stage: bool) -> dict:
    settings = load_settings(home=Path(home))
    work = adapter_work_dir(settings, "ow", tag)
    return registry.publish(settings, "ow", "overwrite", work, _entry("f" * 64), stage=stage)


def _stage_and_stop(home: str, tag: str) -> None:
    """A `lora --local` run killed while its gate judged: staged, then the process is gone."""
    _overwrite_run(home, tag, stage=True)


def _stage_in_a_process_that_stops(settings, tag: str) -> dict:
    child = mp.get_context("spawn").Process(target=_stage_and_stop, args=(str(settings.home), tag))
    child.start()
    child.join()
    assert child.exitcode == 0
    return next(
        e
        for e in registry.load(settings)["adapters"]["ow"]["versions"]
        if e.get("stagedBy", {}).get("pid") == child.pid
    )


def test_a_staged_run_whose_process_stopped_is_settled_not_kept_by_repair_and_by_the_next_run(settings):
    """Killed mid-gate outside the trainer, an overwrite run would stay staged forever (never served, never
    removed). `adapters repair` and the next run of the same adapter settle it as an unjudged run: the slot keeps
    what it held, the run's files go, the entry stays, replaced. A run whose process still runs, or that was
    staged on another host, is left alone."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    slot = settings.adapters_dir / "ow" / "current"
    home = str(settings.home)
    _overwrite_run(home, "r1", stage=False)
    live = _overwrite_run(home, "r2", stage=True)  # this process judges it: it runs
    assert live["stagedBy"]["pid"] == os.getpid()
    orphan = _stage_in_a_process_that_stops(settings, "r3")
    assert orphan["revision"] == 3 and (settings.home / orphan["staged"]).is_dir()

    out = CliRunner().invoke(app, ["adapters", "repair"])
    assert (
        out.exit_code == 0 and "Settled ow@current revision 3: its process stopped before the eval gate" in out.output
    )
    third = registry.get_revision(settings, "ow", 3)
    assert third["replaced"] is True and "staged" not in third and "stagedBy" not in third
    assert not (settings.home / orphan["staged"]).exists()
    assert (slot / "adapter_model.safetensors").read_text() == "r1"
    assert registry.get_revision(settings, "ow", 2)["staged"] == live["staged"]  # alive: untouched
    assert registry.repair(settings)["settled"] == []  # settling twice changes nothing

    elsewhere = _stage_in_a_process_that_stops(settings, "r4")
    data = json.loads(registry.registry_path(settings).read_text())
    for entry in data["adapters"]["ow"]["versions"]:
        if entry.get("revision") == elsewhere["revision"]:
            entry["stagedBy"]["host"] = "another-host"  # its process may run there: unsure, so left alone
    registry.registry_path(settings).write_text(json.dumps(data))
    gone = _stage_in_a_process_that_stops(settings, "r5")

    _overwrite_run(home, "r6", stage=False)  # the next run of the adapter settles what it can be sure of
    assert registry.get_revision(settings, "ow", gone["revision"])["replaced"] is True
    assert not (settings.home / gone["staged"]).exists()
    assert registry.get_revision(settings, "ow", elsewhere["revision"])["staged"] == elsewhere["staged"]
    assert (slot / "adapter_model.safetensors").read_text() == "r6"


def test_a_run_that_passes_its_gate_after_a_newer_run_took_the_slot_does_not_take_it_back(settings):
    """Repro: revision 2 staged for its gate, revision 3 published ungated meanwhile (so 2 was marked
    replaced), then 2 passed: the slot pointed back at 2's files while every revision was marked replaced and
    `current` named 3. The newest run keeps the slot; 2's files go and its entry stays, replaced."""
    home, slot = str(settings.home), settings.adapters_dir / "ow" / "current"
    _overwrite_run(home, "r1", stage=False)
    staged = _overwrite_run(home, "r2", stage=True)
    _overwrite_run(home, "r3", stage=False)
    settled = registry.settle_slot(settings, "ow", staged["revision"], keep=True)
    assert settled["replaced"] is True and "staged" not in settled
    assert not (settings.home / staged["staged"]).exists()
    assert (slot / "adapter_model.safetensors").read_text() == "r3"
    current = registry.get_version(settings, "ow", "current")
    assert current["revision"] == 3 and not current.get("replaced")


def test_a_version_whose_files_are_gone_is_not_activated(settings):
    """It was: /v1/models then listed it, and every chat request answered that its files are missing."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two"):
        work = adapter_work_dir(settings, "a", tag)
        registry.publish(settings, "a", "versioned", work, _entry(fp, jobId=tag))
    assert CliRunner().invoke(app, ["adapters", "activate", "a@v2"]).exit_code == 0
    (settings.adapters_dir / "a" / "v1" / "adapter_model.safetensors").unlink()
    before = registry.registry_path(settings).read_bytes()
    r = CliRunner().invoke(app, ["adapters", "activate", "a@v1"])
    assert r.exit_code == 1 and r.output.strip() == (
        "error: The files of a@v1 are missing under data/adapters (adapter_model.safetensors); train it again."
    ), r.output
    assert registry.registry_path(settings).read_bytes() == before  # a@v2 stays active
    # the refusal's code names the version and the files, for the dashboard's alert in its language (review: a
    # sentence without the version read "its files are missing" under no name)
    with pytest.raises(NotFound) as gone:
        registry.activate(settings, "a", "v1")
    assert gone.value.code == "adapter.files_gone"
    assert gone.value.params == {"name": "a", "version": "v1", "missing": ["adapter_model.safetensors"]}


def test_a_version_not_named_points_at_the_command_that_lists_the_versions(settings):
    """The sentences said `lunatrain adapters show NAME` lists the versions; it shows one."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    _publish(str(settings.home), "a", "one")
    _publish(str(settings.home), "a", "two")
    with pytest.raises(NotFound) as err:
        registry.get_version(settings, "a", "v9")
    assert err.value.message.endswith("`lunatrain adapters list` shows its versions.")
    refused = CliRunner().invoke(app, ["adapters", "activate", "a"])
    assert refused.exit_code == 2 and "`lunatrain adapters list` shows its versions." in refused.output
    listed = CliRunner().invoke(app, ["adapters", "list"])
    assert listed.exit_code == 0 and "a@v1" in listed.output and "a@v2" in listed.output, listed.output


def test_each_revision_of_an_overwrite_slot_is_marked_stale_by_its_own_training_hashes(settings):
    """Repro: after deleting an example revision 1 of ow@current was trained on, revision 2, trained on the export
    made without it, was listed `[stale: retrain needed]` too, and so was a revision the gate refused: each
    revision's train-hashes.txt was read at the slot's path, which holds revision 1's while a newer one waits for
    its gate. A revision waiting there that was trained on the deleted example is marked all the same."""

    def run(tag: str, hashes: list[str], *, stage: bool) -> dict:
        work = adapter_work_dir(settings, "ow", tag)
        (work / registry.TRAIN_HASHES_FILE).write_text("".join(h + "\n" for h in hashes))
        return registry.publish(settings, "ow", "overwrite", work, _entry("f" * 64, jobId=tag), stage=stage)

    run("r1", ["hash-gone", "hash-kept"], stage=False)
    assert registry.mark_stale(settings, {"hash-gone"}) == ["ow@current"]
    assert registry.get_revision(settings, "ow", 1)["stale"]["hashes"] == ["hash-gone"]
    run("r2", ["hash-kept"], stage=True)  # trained on the export after the delete; its gate judges it
    assert registry.mark_stale(settings, {"hash-gone"}) == []
    registry.settle_slot(settings, "ow", 2, keep=True)
    assert registry.mark_stale(settings, {"hash-gone"}) == []
    current = registry.get_version(settings, "ow", "current")
    assert current["revision"] == 2 and "stale" not in current
    run("r3", ["hash-kept"], stage=True)  # refused by its gate
    assert registry.mark_stale(settings, {"hash-gone"}) == []
    registry.settle_slot(settings, "ow", 3, keep=False)
    assert "stale" not in registry.get_revision(settings, "ow", 3)
    run("r4", ["hash-gone"], stage=True)  # trained on an export from before the delete: stale while it waits
    assert registry.mark_stale(settings, {"hash-gone"}) == ["ow@current"]
    assert registry.get_revision(settings, "ow", 4)["stale"]["hashes"] == ["hash-gone"]
    assert "stale" not in registry.get_revision(settings, "ow", 2)


def test_a_base_changed_in_place_is_said_so_not_called_another_base(settings):
    """Repro: with the base model's weights replaced in its folder (same id, other fingerprint), `adapters show`
    said "active on base model 'X', not on the configured one", the configured one being X."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    base = registry.configured_base(settings)
    old = _entry("5" * 64) | {"baseModel": {"id": base.id, "fingerprint": "5" * 64}}
    registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "one"), old)
    registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "two"), old)
    registry.activate(settings, "a", "v1", own_base=True)  # active on the base as it was
    for version in ("v1", "v2"):
        state = json.loads(CliRunner().invoke(app, ["adapters", "show", f"a@{version}"]).output)["state"]
        assert state["code"] == "adapter.base_changed", state
        assert state["reason"] == (
            f"base model {base.id!r} has changed since this version was trained on it (fingerprints differ); retrain it"
        )
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        shown = client.get("/assistant/training/adapters/a").json()
    assert {v["state"]["code"] for v in shown["versions"]} == {"adapter.base_changed"}, shown
    # without the id (a view from another base) the reasons stay what they were
    v1 = registry.get_version(settings, "a", "v1")
    assert registry.activation_state(settings, v1, base.fingerprint)["code"] == "adapter.active_on_other_base"


def test_a_version_force_activated_on_a_base_since_changed_does_not_say_it_was_trained_there(settings, monkeypatch):
    """Repro: a version trained on 'org/other' and force-activated on the configured base before that base's
    weights changed in place was described as "base model X has changed since this version was trained on it",
    X being a base it was never trained on."""
    from types import SimpleNamespace

    base = registry.configured_base(settings)
    trained = _entry("6" * 64) | {"baseModel": {"id": "org/other", "fingerprint": "6" * 64}}
    registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "one"), trained)
    with monkeypatch.context() as m:  # the configured base as it was when the version was activated on it
        m.setattr(registry, "configured_base", lambda s, ref=None: SimpleNamespace(id=base.id, fingerprint="5" * 64))
        registry.activate(settings, "a", "v1", force=True)
    state = registry.activation_state(settings, registry.get_version(settings, "a", "v1"), base.fingerprint, base.id)
    assert state["code"] == "adapter.activated_base_changed", state
    assert state["params"]["activeOn"] == base.id and state["params"]["baseModel"] == "org/other", state
    assert state["reason"] == (
        f"force-activated on base model {base.id!r} before its weights changed (fingerprints differ), and trained "
        "on 'org/other'; activate it again with --force, or retrain it"
    )


@pytest.mark.parametrize(
    "raised",
    [
        KeyError("peft_type"),
        TypeError("LoraConfig.__init__() got an unexpected keyword argument 'rr'"),
        ValueError("Target modules {'nonexistent'} not found in the base model."),
        RuntimeError("Error(s) in loading state_dict for PeftModelForCausalLM: size mismatch for lora_A.weight"),
    ],
)
def test_loading_words_what_the_files_caused_as_damaged_files(settings, raised):
    path = settings.adapters_dir / "a" / "v1"
    with pytest.raises(registry.DamagedFile, match=r"^The adapter in data/adapters/a/v1 cannot be loaded \("):
        with registry.loading(settings, path):
            raise raised


@pytest.mark.parametrize(
    "raised",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        pytest.param("torch.OutOfMemoryError", id="torch-oom"),
        MemoryError(),
        OSError(28, "No space left on device"),
        KeyboardInterrupt(),
    ],
)
def test_loading_passes_on_what_the_files_did_not_cause(settings, raised):
    """Repro: a CUDA driver error while PEFT attached the adapter was worded "its files are damaged: train it
    again", sending the user to retrain for a fault of the machine."""
    if raised == "torch.OutOfMemoryError":
        import torch

        raised = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(type(raised)) as caught:
        with registry.loading(settings, settings.adapters_dir / "a" / "v1"):
            raise raised
    assert caught.value is raised


def test_a_registry_this_user_may_not_write_says_so_instead_of_check_the_disk(settings):
    """Repro: on a data root restored read-only (a backup mount) or owned by another user, `adapters activate`
    said "Writing …/lora-adapters.json.lock failed: Read-only file system, and the previous data is intact;
    check the disk and try again": nothing is wrong with the disk. A refusal of permission, or a read-only file
    system, now says what to change."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    from faults import read_only

    fp = models.resolve_base(None, settings).fingerprint
    for tag in ("one", "two"):
        registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", tag), _entry(fp))
    before = registry.registry_path(settings).read_bytes()
    with read_only(settings.reports_training_dir):
        r = CliRunner().invoke(app, ["adapters", "activate", "a@v1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "check the disk" not in r.output, r.output
    assert "Read-only file system" in r.output and "make it writable" in r.output, r.output
    assert registry.registry_path(settings).read_bytes() == before


def test_an_overwrite_run_on_another_base_is_refused_before_it_takes_the_slot(settings):
    """Repro: an overwrite run on base B replaced the slot's run on base A, files and all, and was then listed
    as active on A, where chat answered 400 model_base_mismatch: the slot holds one run, and what is active on
    each base names it by its version name. A run on another base than the slot's is refused before it
    trains; the same base (moved, or updated in place under its name) and versioned runs go on."""
    from dataclasses import replace

    from lunatrain import export, store, train
    from lunatrain.params import parse_params

    store.load_seed(settings)
    export.export(settings)
    base = models.resolve_base(None, settings)
    registry.publish(settings, "mine", "overwrite", adapter_work_dir(settings, "mine", "a"), _entry(base.fingerprint))
    registry.activate(settings, "mine", "current")
    before = registry.registry_path(settings).read_bytes()
    other = models.build_tiny_model(settings.home / "models" / "other", hidden=32, heads=2, kv_heads=2)
    for attempt in (
        lambda: registry.check_slot_base(settings, "mine", "overwrite", models.resolve_base(str(other), settings)),
        lambda: train.prepare(
            parse_params({"adapterName": "mine", "adapterStrategy": "overwrite", "baseModel": str(other)}), settings
        ),
    ):
        with pytest.raises(Conflict) as refused:
            attempt()
        assert refused.value.code == "adapter.slot_other_base", refused.value.message
        assert refused.value.params == {"name": "mine", "slotBase": "luna-tiny", "baseModel": str(other)}
        assert (
            "--adapterStrategy versioned" in refused.value.message and "another --adapterName" in refused.value.message
        )
    assert registry.registry_path(settings).read_bytes() == before
    # The slot's own base, also updated in place (same id, other weights) or named by another path (same
    # weights); a versioned run; another name: no refusal.
    registry.check_slot_base(settings, "mine", "overwrite", base)
    registry.check_slot_base(settings, "mine", "overwrite", replace(base, fingerprint="7" * 64))
    registry.check_slot_base(settings, "mine", "overwrite", replace(base, id="/elsewhere/luna-tiny"))
    registry.check_slot_base(settings, "mine", "versioned", models.resolve_base(str(other), settings))
    registry.check_slot_base(settings, "yours", "overwrite", models.resolve_base(str(other), settings))


def _lora_weights(path: Path, width: int) -> None:
    """adapter_model.safetensors with one LoRA pair on layer 0's q_proj of a model `width` wide."""
    import torch
    from safetensors.torch import save_file

    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, width), f"{layer}.lora_B.weight": torch.zeros(width, 4)}, path)


def test_force_refuses_an_adapter_whose_weights_do_not_fit_the_base(settings):
    """Repro: `adapters activate --force` (which the refusal offered) made an adapter of a 32-wide model active
    on 64-wide luna-tiny; every later gate there loaded it as its baseline and failed with "its files are
    damaged", and chat answered 400. --force is for a base that changed but still takes the weights (re-
    downloaded, updated in place); weights that cannot fit are refused, from the files' headers."""
    width = json.loads((Path(models.resolve_base(None, settings).path) / "config.json").read_text())["hidden_size"]
    other = {"baseModel": {"id": "org/narrow", "fingerprint": "0" * 64}}
    for tag, shape in (("narrow", width // 2), ("same", width)):
        work = adapter_work_dir(settings, "a", tag)
        _lora_weights(work / "adapter_model.safetensors", shape)
        registry.publish(settings, "a", "versioned", work, _entry("0" * 64) | other)
    with pytest.raises(Conflict, match="ASSISTANT_BASE_MODEL='org/narrow'"):  # the fix that serves it: its base
        registry.activate(settings, "a", "v1")
    before = registry.registry_path(settings).read_bytes()
    with pytest.raises(Conflict) as refused:
        registry.activate(settings, "a", "v1", force=True)
    assert refused.value.code == "adapter.does_not_fit", refused.value.message
    assert refused.value.params == {"name": "a", "version": "v1", "baseModel": "org/narrow", "configured": "luna-tiny"}
    assert "model.layers.0.self_attn.q_proj" in refused.value.message and "\n" not in refused.value.message
    assert registry.registry_path(settings).read_bytes() == before
    registry.activate(settings, "a", "v2", force=True)  # the same shapes: the owner's word counts
    assert registry.get_version(settings, "a", "active")["version"] == "v2"


def test_a_baseline_of_another_shape_is_said_as_such_not_as_damaged_files(settings):
    """Repro: the gate's baseline, force-activated from another base, failed to load with "its files are
    damaged" and torch's message cut off mid-line ("… copying a param with shape torch.Size([16, 32]) from);")."""
    path = settings.adapters_dir / "a" / "v2"
    said = (
        "Error(s) in loading state_dict for PeftModelForCausalLM:\n\tsize mismatch for "
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.baseline.weight: copying a param with shape "
        "torch.Size([16, 32]) from checkpoint, the shape in current model is torch.Size([16, 64]).\n\tsize mismatch "
        "for base_model.model.model.layers.0.self_attn.q_proj.lora_B.baseline.weight: copying a param with shape "
        "torch.Size([32, 16]) from checkpoint, the shape in current model is torch.Size([64, 16])."
    )
    with pytest.raises(Conflict) as refused, registry.loading(settings, path):
        raise RuntimeError(said)
    message = refused.value.message
    assert refused.value.code == "adapter.does_not_fit" and "damaged" not in message, message
    assert "data/adapters/a/v2 do not fit this base model (2 tensors differ in shape, first " in message
    assert "torch.Size([16, 64])" in message and "lunatrain adapters deactivate a" in message, message
    # Another rank than the config says (its own weights, not the base's) is the files' fault: damaged.
    rank = said.replace("[16, 32]", "[8, 64]").replace("[32, 16]", "[64, 8]")
    with pytest.raises(DamagedFile, match="its files are damaged"), registry.loading(settings, path):
        raise RuntimeError(rank)


def test_activating_or_rolling_back_to_a_stale_version_says_it_is_stale(settings):
    """Repro: `adapters rollback` and `adapters activate` onto a version trained on an example deleted since
    said only "…@v1 is active again": the user served deleted content again without a word, and only `status`
    showed "(stale: retrain needed)" later. Both commands now say it, with the reason, on a second line."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    fp = models.resolve_base(None, settings).fingerprint
    one = _publish_on(settings, "a", "luna-tiny", fp)
    (settings.home / one["path"] / "train-hashes.txt").write_text("hash-gone\n")
    _publish_on(settings, "a", "luna-tiny", fp)
    assert registry.mark_stale(settings, {"hash-gone"}) == ["a@v1"]
    registry.activate(settings, "a", "v1")
    registry.activate(settings, "a", "v2")
    note = (
        "Note: a@v1 is stale (trained on deleted content): it still serves that content; a@v2 was trained "
        "without it (`lunatrain adapters activate a@v2`).\n"
    )
    for args, said in (
        (["rollback", "a"], "a@v1 is active again on base model 'luna-tiny'.\n"),
        (["activate", "a@v2"], "a@v2 is now active on base model 'luna-tiny'.\n"),
        (["activate", "a@v1"], "a@v1 is now active on base model 'luna-tiny'.\n"),
    ):
        out = CliRunner().invoke(app, ["adapters", *args])
        expected = said + (note if args[-1] != "a@v2" else "")
        assert out.exit_code == 0 and out.output == expected, out.output
    # with no version trained without that content, the way out is a new one
    (settings.adapters_dir / "a" / "v2" / "train-hashes.txt").write_text("hash-gone\n")
    assert registry.mark_stale(settings, {"hash-gone"}) == ["a@v2"]
    out = CliRunner().invoke(app, ["adapters", "activate", "a@v1"])
    assert out.output.splitlines()[1] == (
        "Note: a@v1 is stale (trained on deleted content): it still serves that content; train a new version "
        "(`lunatrain luna`) to leave it out."
    ), out.output


def test_a_rank_the_weights_do_not_have_is_one_sentence_in_every_command_and_never_a_500(settings):
    """Repro: an adapter_config.json edited to r = 1000000000: `eval-gate` and `merge` printed a traceback
    (out of memory, exit 1) and POST /eval-gate answered 500 internal. The rank is checked against the
    weights' header before PEFT builds anything: one sentence, exit 1, and 503 from the API."""
    from chat_helpers import random_adapter
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from lunatrain.api.main import create_app
    from lunatrain.cli import app

    version = random_adapter(settings, "huge", 7)
    config = settings.adapters_dir / "huge" / version / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 1_000_000_000}))
    said = "adapter_config.json gives rank 1000000000, but its weights have rank"
    for args in (["eval-gate", "--adapter", f"huge@{version}"], ["merge", "--adapter", f"huge@{version}"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and said in r.output, (args, r.output)
        assert "Traceback" not in r.output
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:
        r = api.post("/assistant/training/eval-gate", json={"adapter": f"huge@{version}"})
    assert r.status_code == 503 and said in r.json()["error"]["message"], r.text
    # A rank_pattern does not hide it: the layers the pattern does not name are built at r.
    entry = registry.get_version(settings, "huge", version)
    config.write_text(json.dumps(json.loads(config.read_text()) | {"rank_pattern": {"q_proj": 4}}))
    with pytest.raises(DamagedFile, match=r"gives rank 1000000000, over the largest a run may ask for \(1024\)"):
        registry.readable_dir(settings, entry)
    with pytest.raises(DamagedFile, match="gives rank 64 in its rank_pattern, but its weights have rank 4 at most"):
        config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 4, "rank_pattern": {"q_proj": 64}}))
        registry.readable_dir(settings, entry)
    # r beside a pattern that names every layer builds nothing: any sound r loads (review: r 64, pattern 4)
    config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 64, "rank_pattern": {"q_proj": 4}}))
    assert registry.readable_dir(settings, entry)


def test_an_adapter_file_linked_out_of_the_data_root_is_refused_like_a_linked_folder(settings, tmp_path):
    """Repro: a version folder linked outside the data root was refused ("leaves the data root"), but an
    adapter_model.safetensors inside it linked to a file outside (or to /etc/passwd) was opened and read by
    eval-gate, merge and chat. A file of the folder that resolves outside is refused the same way."""
    from chat_helpers import random_adapter
    from typer.testing import CliRunner

    from lunatrain.cli import app

    version = random_adapter(settings, "linked", 3)
    folder = settings.adapters_dir / "linked" / version
    entry = registry.get_version(settings, "linked", version)
    assert registry.loadable(settings, entry)
    outside = tmp_path / "outside.safetensors"
    (folder / "adapter_model.safetensors").rename(outside)
    (folder / "adapter_model.safetensors").symlink_to(outside)
    assert not registry.loadable(settings, entry)
    for args in (["eval-gate", "--adapter", f"linked@{version}"], ["merge", "--adapter", f"linked@{version}"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code in (1, 2) and r.output.count("\n") == 1, (args, r.output)
        assert f"data/adapters/linked/{version}/adapter_model.safetensors' leaves the data root" in r.output, r.output
    # a link that stays inside the data root is a file like any other
    inner = settings.home / "kept.safetensors"
    outside.rename(inner)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(inner)
    assert registry.loadable(settings, entry)


def test_a_live_staged_run_is_not_settled_after_a_wall_clock_step(settings, monkeypatch):
    """Repro: the owner's start was compared as wall-clock time, which psutil derives from a boot time that
    moves with every clock step. After an NTP step of an hour, `adapters repair` took this very process for
    another one and deleted its live run's files while its gate still judged them."""
    from psutil import _pslinux

    home = str(settings.home)
    _overwrite_run(home, "r1", stage=False)
    live = _overwrite_run(home, "r2", stage=True)
    real = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, "boot_time", lambda: real - 3600)
    assert registry.repair(settings)["settled"] == []
    assert registry.get_revision(settings, "ow", 2)["staged"] == live["staged"]
    assert (settings.home / live["staged"]).is_dir()


def test_the_grouped_list_says_which_group_the_server_serves_and_where_a_version_is_active(settings):
    """Review repro: GET /adapters said "active on the configured base model" for a version active on another
    base's group (the single-adapter view said it right), and nothing told the dashboard which group was the
    configured one: its Rollback there rolled back the served base, and Activate could only be refused."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    fp = models.resolve_base(None, settings).fingerprint
    v1 = _publish_on(settings, "luna-adapter", "luna-tiny", fp)
    v2 = _publish_on(settings, "luna-adapter", "org/new", "9" * 64)
    registry.activate(settings, "luna-adapter", v1["version"])
    registry.activate(settings, "luna-adapter", v2["version"], own_base=True)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        groups = {g["baseModel"]: g for g in client.get("/assistant/training/adapters").json()["bases"]}
    assert groups["luna-tiny"]["configured"] is True and groups["org/new"]["configured"] is False
    here = groups["luna-tiny"]["adapters"][0]["versions"][0]["state"]
    there = groups["org/new"]["adapters"][0]["versions"][0]["state"]
    assert (here["active"], here["code"]) == (True, "adapter.active")
    assert (there["active"], there["code"]) == (True, "adapter.active_unserved"), there
    assert there["reason"] == "active on this base model, which is not the one configured here"
    assert groups["org/new"]["anotherBuild"] is False and groups["luna-tiny"]["anotherBuild"] is False
    # review repro: a group of the configured id with other weights (updated in place) was told to use
    # `--baseModel luna-tiny`, which names the current weights: it is marked as another build instead
    _publish_on(settings, "old", "luna-tiny", "7" * 64)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        bases = client.get("/assistant/training/adapters").json()["bases"]
    (earlier,) = [g for g in bases if g["fingerprint"] == "7" * 64]
    assert earlier["configured"] is False and earlier["anotherBuild"] is True


def test_activating_a_version_of_an_another_build_of_the_configured_base_says_so(settings):
    """Explore repro: a version trained on acme/tiny before the cache got a newer commit was refused with
    "trained on 'acme/tiny', but the configured base model is 'acme/tiny' … configure its base
    (ASSISTANT_BASE_MODEL='acme/tiny')": a contradiction, naming no revision."""
    base = models.resolve_base(None, settings)
    old = {"id": base.id, "fingerprint": "7" * 64, "revision": "a" * 40}
    registry.publish(
        settings, "a", "versioned", adapter_work_dir(settings, "a", "w"), _entry("7" * 64) | {"baseModel": old}
    )
    with pytest.raises(Conflict) as refused:
        registry.activate(settings, "a", "v1")
    assert refused.value.code == "adapter.another_build"
    assert refused.value.message == (
        f"a@v1 was trained on another build of base model {base.id!r} (revision aaaaaaaaaaaa; the weights under "
        "that name differ now): retrain it here (`lunatrain luna --adapterName a`), or, only if it is the same "
        "model, force the activation (`lunatrain adapters activate a@v1 --force`)."
    ), refused.value.message


def test_after_a_base_switch_the_commands_suggested_name_the_base_they_act_on(settings):
    """Explore repros (a base switch): the hint to activate a version of another base than the configured
    one left out `--baseModel` (typed as printed, it was refused), and so did the refusal of that command;
    the API's activate without a version took the newest version of any base and refused it as foreign
    where a version of its own base existed; `eval-gate --adapter NAME`, active only on the other base,
    said to activate one here, which every version would be refused."""
    import shutil

    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    fp = models.resolve_base(None, settings).fingerprint
    twin = settings.home / "twin"
    shutil.copytree(settings.models_dir / "luna-tiny", twin)
    (twin / "config.json").write_text(json.dumps(json.loads((twin / "config.json").read_text()) | {"twin": 1}))
    twin_fp = models.resolve_base(str(twin), settings).fingerprint
    assert registry.base_flag(settings, "luna-tiny") == "" and registry.base_flag(settings, None) == ""
    assert registry.base_flag(settings, str(twin)) == f" --baseModel {twin}"  # what every such hint appends
    on_a = _publish_on(settings, "a", "luna-tiny", fp)  # v1
    on_twin = _publish_on(settings, "a", str(twin), twin_fp)  # v2, the newest
    registry.activate(settings, "a", "v2", own_base=True)
    registry.annotate(settings, "a", "v2", "gate", {"passed": True, "status": "passed"})

    with pytest.raises(NotFound) as none_here:
        registry.get_version(settings, "a", "active")
    said = none_here.value.message
    assert f"on base model {str(twin)!r} it is v2" in said and f"`a@v2` with `--baseModel {twin}`" in said, said

    registry.deactivate(settings, "a", "v2")
    state = registry.activation_state(settings, registry.get_version(settings, "a", "v2"), twin_fp)
    assert state["code"] == "adapter.deactivated", state
    assert state["reason"].endswith(f"`lunatrain adapters activate a@v2 --baseModel {twin}`"), state["reason"]
    with pytest.raises(Conflict) as foreign:
        registry.activate(settings, "a", "v2")
    assert f"`lunatrain adapters activate a@v2 --baseModel {twin}`" in foreign.value.message, foreign.value.message

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        answer = client.post("/assistant/training/adapters/a/activate", json={})
    assert answer.status_code == 200, answer.text
    assert registry.active_version(settings, "a", fp)["version"] == on_a["version"] == "v1"
    assert on_twin["version"] == "v2"


def test_the_adapter_list_reads_the_registry_a_bounded_number_of_times(settings, monkeypatch):
    """Explore repro (scale): `GET /adapters` read and parsed the whole registry again for every version it
    described, so its time grew with the square of the versions (1.1 s at 294, about 7 s projected for a
    year of two versions a day), and an open dashboard asks every 15 s. The reads no longer grow with it."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    def reads(count: int) -> int:
        for i in range(count):
            _publish(str(settings.home), "luna-adapter", f"n{count}-{i}")
        loads = []
        real = registry.load
        monkeypatch.setattr(registry, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            answer = client.get("/assistant/training/adapters")
        monkeypatch.setattr(registry, "load", real)
        assert answer.status_code == 200, answer.text
        return len(loads)

    few = reads(2)
    assert reads(20) == few  # 22 versions read the registry as often as 2 did


def test_an_older_overwrite_revision_settled_first_leaves_a_newer_staged_one_its_gate(settings):
    """Explore repro: two overwrite runs of one adapter at once; the older revision's gate passed first and
    marked every other revision replaced, the newer one too while it waited for its own gate: its files went,
    and the run that trained longer said "not kept: revision 3 no longer exists". An older revision's settling
    replaces only older ones; the newest that passes keeps the slot."""
    home = str(settings.home)
    _overwrite_run(home, "r1", stage=False)
    older = _overwrite_run(home, "r2", stage=True)
    newer = _overwrite_run(home, "r3", stage=True)
    assert (older["revision"], newer["revision"]) == (2, 3)
    registry.settle_slot(settings, "ow", 2, keep=True)
    waiting = registry.get_revision(settings, "ow", 3)
    assert waiting.get("staged") and not waiting.get("replaced"), waiting
    assert registry.get_revision(settings, "ow", 1).get("replaced")
    kept = registry.settle_slot(settings, "ow", 3, keep=True)
    assert not kept.get("replaced") and registry.get_version(settings, "ow", "current")["revision"] == 3
    assert registry.get_revision(settings, "ow", 2).get("replaced")
    # and the other order: the newer settled first, the older one then finds the slot taken
    _overwrite_run(home, "r4", stage=True)
    _overwrite_run(home, "r5", stage=True)
    registry.settle_slot(settings, "ow", 5, keep=True)
    assert registry.settle_slot(settings, "ow", 4, keep=True).get("replaced")
    assert registry.get_version(settings, "ow", "current")["revision"] == 5
