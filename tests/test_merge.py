"""Merging an adapter into its base. Run: `pytest tests/test_merge.py -q`."""

from __future__ import annotations

import json
import shutil
import stat
import warnings

import pytest
import torch

from lunatrain import evalgate, fsio, models, registry
from lunatrain.errors import Conflict, LunaError, NotFound
from lunatrain.merge import merge_adapter


def test_merged_model_gives_the_logits_of_base_plus_adapter(trained_home, settings):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = settings.adapters_dir / "luna-adapter" / "v1"  # trained by the session's fixture
    with warnings.catch_warnings(record=True) as caught:  # repro: PEFT's FutureWarning reached the user
        warnings.simplefilter("always")
        result = merge_adapter(settings, "luna-adapter@v1")
        evalgate._Evaluator(settings, models.resolve_base(None, settings), {"candidate": adapter})
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert result.path == settings.models_dir / "merged" / "luna-adapter-v1"
    merged = AutoModelForCausalLM.from_pretrained(result.path, use_safetensors=True, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(result.path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = torch.tensor(
        [
            tok.apply_chat_template(
                [{"role": "user", "content": "Was ist 2 + 3?"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        ]
    )
    base = models.load_model(None, settings).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        from_merged = merged(input_ids=ids).logits
    assert (with_adapter - plain).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(from_merged, with_adapter, atol=1e-4, rtol=1e-4)
    assert not list(result.path.glob("*.bin")) and list(result.path.glob("*.safetensors"))
    # Repro: the merged folder had no model card: uploaded or copied, it said neither what it was made of nor
    # how it scored. Its card names the adapter, the base, the gate, the training and how to load it.
    card = (result.path / "README.md").read_text()
    front = card.split("---\n")[1]
    assert 'base_model: "luna-tiny"' in front and "library_name: transformers" in front, card
    assert "`luna-adapter@v1`" in card and "merged into `luna-tiny`" in card, card
    assert "eval gate: not run" in card and "val loss" in card and "tier curated" in card, card
    assert "AutoModelForCausalLM.from_pretrained(THIS_FOLDER)" in card and "lunatrain-merge.json" in card, card
    assert "README.md" in json.loads((result.path / "lunatrain-merge.json").read_text())["files"]
    assert (
        registry.get_version(settings, "luna-adapter", "v1")["merged"]["path"] == "data/models/merged/luna-adapter-v1"
    )
    assert merge_adapter(settings, "luna-adapter@latest").replaced
    # repro: the merged folder was 0700 and its files 0600 (temp-name modes), so a server running as another
    # user could not read the model a umask of 022 should have made readable to it
    umask = fsio.current_umask()
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o777 & ~umask
    for written in ("config.json", "lunatrain-merge.json", "generation_config.json", "model.safetensors"):
        assert stat.S_IMODE((result.path / written).stat().st_mode) == 0o666 & ~umask, written


def test_merge_refuses_when_the_base_changed(settings):
    work = settings.adapters_dir / "a" / ".work" / "x"
    work.mkdir(parents=True)
    registry.publish(settings, "a", "versioned", work, {"baseModel": {"id": "luna-tiny", "fingerprint": "0" * 64}})
    with pytest.raises(Conflict, match="changed"):
        merge_adapter(settings, "a@v1")
    assert not (settings.models_dir / "merged" / "a-v1").exists()


def test_a_forced_merge_records_the_base_it_merged_into(trained_home, settings):
    """Repro: `merge --force` onto a base changed since training wrote the old base's fingerprint into
    lunatrain-merge.json, a record wrong for the weights it sits beside."""
    config = settings.models_dir / "luna-tiny" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"_variant": "four"}))
    now = registry.configured_base(settings)
    trained = registry.get_version(settings, "luna-adapter", "v1")["baseModel"]
    assert now.fingerprint != trained["fingerprint"]
    result = merge_adapter(settings, "luna-adapter@v1", force=True)
    marker = json.loads((result.path / "lunatrain-merge.json").read_text())
    assert marker["baseModel"] == now.record() and marker["baseModel"]["fingerprint"] != trained["fingerprint"]
    assert marker["trainedOn"] == trained and marker["forced"] is True
    card = " ".join((result.path / "README.md").read_text().split())
    assert "--force" in card and "another build of `luna-tiny` than the one it was trained on" in card, card
    assert registry.get_version(settings, "luna-adapter", "v1")["merged"]["forced"] is True
    registry.registry_path(settings).unlink()  # and repair restores it so
    registry.repair(settings)
    assert registry.get_version(settings, "luna-adapter", "v1")["merged"]["forced"] is True


@pytest.mark.parametrize("gone", ["adapter_model.safetensors", "adapter_config.json", "the folder"])
def test_a_version_whose_files_are_gone_is_one_sentence_for_merge_and_the_gate(trained_home, settings, gone):
    """Files deleted by hand (or a disk restored in part): `merge` and `eval-gate` name the version and the
    missing file in one sentence, exit 1, instead of PEFT's traceback (a repo-id error, a missing config), and
    merge writes nothing."""
    import shutil

    from typer.testing import CliRunner

    from lunatrain.cli import app

    folder = settings.adapters_dir / "luna-adapter" / "v1"
    if gone == "the folder":
        shutil.rmtree(folder)
    else:
        (folder / gone).unlink()
    missing = "adapter_config.json, adapter_model.safetensors" if gone == "the folder" else gone
    says = f"error: The files of luna-adapter@v1 are missing under data/adapters ({missing}); train it again."
    for args in (["merge", "--adapter", "luna-adapter@v1"], ["eval-gate", "--adapter", "luna-adapter@v1"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and r.output.strip().splitlines() == [says], (args, r.output)
    assert not (settings.models_dir / "merged").exists()


DAMAGE = {  # file -> (new content, what the sentence says of it)
    "adapter_model.safetensors": (lambda b: b[:1000], "adapter_model.safetensors is cut short"),
    "adapter_config.json": (lambda b: b[:-20], "adapter_config.json: "),
    "tokenizer.json": (None, "the tokenizer's vocabulary, tokenizer.json, is missing"),
    "tokenizer_config.json": (lambda b: b"[]", "tokenizer_config.json: a JSON list, not an object"),
}


@pytest.mark.parametrize("damaged", DAMAGE)
def test_a_version_whose_files_are_damaged_is_one_sentence_for_merge_and_the_gate(trained_home, settings, damaged):
    """Repro: a weights file cut short, an adapter_config.json edited into bad JSON or a deleted tokenizer.json
    made `eval-gate`, `merge` and `luna` print a traceback (SafetensorError, JSONDecodeError, "Couldn't
    instantiate the backend tokenizer"). Now one sentence naming the version and the file, exit 1."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    path = settings.adapters_dir / "luna-adapter" / "v1" / damaged
    change, said = DAMAGE[damaged]
    if change is None:
        path.unlink()
    else:
        path.write_bytes(change(path.read_bytes()))
    for args in (["merge", "--adapter", "luna-adapter@v1"], ["eval-gate", "--adapter", "luna-adapter@v1"]):
        r = CliRunner().invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, (args, r.output)
        assert lines[0].startswith("error: The files of luna-adapter@v1 under data/adapters are damaged (")
        assert said in lines[0] and lines[0].endswith("; train it again, or roll back to another version."), lines
    assert not (settings.models_dir / "merged").exists()


@pytest.mark.parametrize("content", ["{}", '{"version": "1.0", "added_tokens": []}'])
def test_a_tokenizer_file_that_is_json_but_no_tokenizer_is_one_sentence(trained_home, settings, content):
    """Repro: a tokenizer.json edited into JSON that is no tokenizer (`{}`) made `merge` print a traceback
    (KeyError: 'added_tokens', or the tokenizers library's "Model missing"), after merging the weights."""

    (settings.adapters_dir / "luna-adapter" / "v1" / "tokenizer.json").write_text(content)
    _merge_and_gate_say_damaged("The tokenizer")
    merged = settings.models_dir / "merged"
    assert not merged.exists() or list(merged.iterdir()) == []


@pytest.mark.parametrize("there", ["kept", "gone"])
def test_merging_again_into_a_merge_moved_elsewhere_and_linked_replaces_the_link(
    trained_home, settings, tmp_path, there
):
    """Repro: a merged model moved to a bigger disk and linked back in its place: the next merge left a hidden
    `.luna-adapter-v1.old` link (rmtree cannot remove a link, and the error was ignored), and every merge of
    that version after it failed with "Not a directory … check the disk"; so did a merge over the link once
    the other disk's folder was gone (a directory cannot be renamed over a dangling link). Now the link is
    replaced and removed; the folder it pointed to is the user's and stays."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    target = settings.models_dir / "merged" / "luna-adapter-v1"
    assert CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"]).exit_code == 0
    moved = tmp_path / "big-disk" / "luna-adapter-v1"
    moved.parent.mkdir()
    target.rename(moved)
    target.symlink_to(moved, target_is_directory=True)
    if there == "gone":
        shutil.rmtree(moved)
    for _ in range(2):
        r = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
        assert r.exit_code == 0, r.output
    assert [p.name for p in target.parent.iterdir()] == ["luna-adapter-v1"] and not target.is_symlink()
    assert (target / "model.safetensors").is_file()
    assert there == "gone" or (moved / "model.safetensors").is_file()


def _merge_and_gate_say(sentence: str) -> None:
    """`merge` and `eval-gate` of luna-adapter@v1 each end in exactly `sentence`, exit 1."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    for args in (["merge", "--adapter", "luna-adapter@v1"], ["eval-gate", "--adapter", "luna-adapter@v1"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and r.output.strip().splitlines() == [sentence], (args, r.output)


def _merge_and_gate_say_damaged(what: str) -> None:
    """`merge` and `eval-gate` of luna-adapter@v1 each end in one sentence: `what` in its folder cannot be
    loaded, its files are damaged."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    start = f"error: {what} in data/adapters/luna-adapter/v1 cannot be loaded ("
    for args in (["merge", "--adapter", "luna-adapter@v1"], ["eval-gate", "--adapter", "luna-adapter@v1"]):
        r = CliRunner().invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(start), (args, r.output)
        assert lines[0].endswith("; its files are damaged: train it again, or roll back to another version.")


CONFIG_DAMAGE = {  # an adapter_config.json that is JSON, but not what PEFT can load these weights with
    "no peft_type": lambda c: {k: v for k, v in c.items() if k != "peft_type"},
    "another rank": lambda c: c | {"r": c["r"] * 2},
    "modules the model lacks": lambda c: c | {"target_modules": ["nonexistent"]},
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_config_peft_cannot_load_is_one_sentence_for_merge_the_gate_and_the_api(trained_home, settings, damage):
    """Repro: an adapter_config.json edited into valid JSON PEFT cannot use made `merge` and `eval-gate` print
    PEFT's traceback (KeyError: 'peft_type', a size mismatch, NoMatchingPeftModuleError) and `POST /eval-gate`
    answer 500."""
    from fastapi.testclient import TestClient

    from lunatrain.api.main import create_app

    path = settings.adapters_dir / "luna-adapter" / "v1" / "adapter_config.json"
    path.write_text(json.dumps(CONFIG_DAMAGE[damage](json.loads(path.read_text()))))
    if damage == "another rank":  # read from the weights' header before PEFT builds anything
        _merge_and_gate_say(
            "error: The files of luna-adapter@v1 under data/adapters are damaged (adapter_config.json gives rank 8, "
            "but its weights have rank 4); train it again, or roll back to another version."
        )
    else:
        _merge_and_gate_say_damaged("The adapter")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        res = client.post("/assistant/training/eval-gate", json={"adapter": "luna-adapter@v1"})
    assert res.status_code == 503 and res.json()["error"]["code"] == "storage_error", res.text
    merged = settings.models_dir / "merged"
    assert not merged.exists() or list(merged.iterdir()) == []  # its staging folder gone too


def test_a_bare_name_merges_the_active_version_and_refuses_when_none_is_active(settings):
    """Repro: `merge --adapter a` merged the latest version, which may be one the gate refused, when none was
    active. A bare name is the active version; without one the command names the versions to choose from."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    from helpers import adapter_work_dir

    work = adapter_work_dir(settings, "a", "x")
    registry.publish(settings, "a", "versioned", work, {"baseModel": {"id": "luna-tiny", "fingerprint": "0" * 64}})
    r = CliRunner().invoke(app, ["merge", "--adapter", "a"])
    # docs repro: exit 1 where `adapters deactivate` and `rollback` say the same state with 2 (README's rule)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        "error: Adapter 'a' has no active version on base model 'luna-tiny' to merge; "
        "name the version: `lunatrain merge --adapter a@VERSION` (`lunatrain adapters list` shows its versions)."
    ]
    assert not (settings.models_dir / "merged").exists()
    # Active on another base only: the sentence names that version.
    other = {"baseModel": {"id": "org/other", "fingerprint": "9" * 64}}
    registry.publish(settings, "a", "versioned", adapter_work_dir(settings, "a", "y"), other)
    registry.activate(settings, "a", "v2", own_base=True)
    r = CliRunner().invoke(app, ["merge", "--adapter", "a"])
    assert r.exit_code == 2 and "(on base model 'org/other' it is v2: `lunatrain merge --adapter a@v2`)" in (
        " ".join(r.output.split())
    ), r.output
    registry.deactivate(settings, "a", "v2")
    # Explore repro: active on an earlier build of the configured base (changed in place since): the sentence
    # named the same base on both sides and offered a command that then failed without --force.
    registry.activate(settings, "a", "v1", own_base=True)
    r = CliRunner().invoke(app, ["merge", "--adapter", "a"])
    said = " ".join(r.output.split())
    assert (
        r.exit_code == 2
        and (
            "(on an earlier build of base model 'luna-tiny', changed since, it is v1: `lunatrain merge --adapter a@v1 "
            "--force` merges it into the base as it is now, or retrain it)"
        )
        in said
    ), r.output
    registry.deactivate(settings, "a", "v1")
    registry.activate(settings, "a", "v1", force=True)
    with pytest.raises(Conflict, match="a@v1 was trained"):  # the active version it found, refused on the base
        merge_adapter(settings, "a")


def test_a_full_disk_during_the_merge_is_one_sentence_and_keeps_the_previous_merge(trained_home, settings):
    """Repro: a disk filling up while the merged weights were written ended `lunatrain merge` in a traceback
    (safetensors' SafetensorError "… No space left on device (os error 28)", no OSError). Now: exit 1, the
    disk-full sentence, the earlier merge of the version and its registry record as they were."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    import faults

    merged = settings.models_dir / "merged"
    with faults.small_disk(merged, "2m"):  # room for one merge of luna-tiny (1.4 MB), not for a second beside it
        first = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
        assert first.exit_code == 0, first.output
        before = {p.name: p.read_bytes() for p in (merged / "luna-adapter-v1").iterdir()}
        record = registry.get_version(settings, "luna-adapter", "v1")["merged"]
        again = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
        assert again.exit_code == 1, again.output
        lines = again.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: The disk is full: writing the merged model"), lines
        assert "previous data is intact" in lines[0] and "lunatrain gc" in lines[0]
        assert {p.name: p.read_bytes() for p in (merged / "luna-adapter-v1").iterdir()} == before
        assert [p.name for p in merged.iterdir()] == ["luna-adapter-v1"]  # no staging folder left behind
        assert registry.get_version(settings, "luna-adapter", "v1")["merged"] == record


def test_a_merge_the_registry_cannot_record_leaves_no_merged_folder(trained_home, settings, monkeypatch):
    """Explore repro: with the registry file not replaceable (immutable, another user's in a sticky folder) the
    whole merged model was written, then the record failed with "... and the previous data is intact" and a
    merged folder stayed that no listing knew of. A first merge the registry cannot record is taken away."""
    from lunatrain.errors import StorageError

    def refuse(*args, **kwargs):
        raise StorageError("Writing reports/training/lora-adapters.json failed: Operation not permitted.")

    recorded = registry.annotate
    monkeypatch.setattr(registry, "annotate", refuse)
    with pytest.raises(StorageError, match="Operation not permitted"):
        merge_adapter(settings, "luna-adapter@v1")
    merged = settings.models_dir / "merged"
    assert not merged.exists() or list(merged.iterdir()) == [], list(merged.iterdir())
    assert "merged" not in registry.get_version(settings, "luna-adapter", "v1")
    # Review repro: a merge that replaced an earlier one kept the new folder under the earlier record, which
    # then described another model (another revision of an overwrite slot, or one merged without --force).
    # The earlier merge goes back in place, as its record says it is.
    monkeypatch.setattr(registry, "annotate", recorded)
    merge_adapter(settings, "luna-adapter@v1")
    folder = merged / "luna-adapter-v1"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    record = registry.get_version(settings, "luna-adapter", "v1")["merged"]
    monkeypatch.setattr(registry, "annotate", refuse)
    with pytest.raises(StorageError, match="Operation not permitted"):
        merge_adapter(settings, "luna-adapter@v1")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in merged.iterdir()) == ["luna-adapter-v1"]  # nothing left aside
    assert registry.get_version(settings, "luna-adapter", "v1")["merged"] == record


def test_merging_a_newer_overwrite_revision_takes_the_merged_record_off_the_one_it_replaced(trained_home, settings):
    """Repro: `lunatrain merge --adapter ow` after a second overwrite run rewrote data/models/merged/ow-current
    with revision 2, but `adapters list` still showed revision 1 as [merged] at that path, which no longer
    holds it."""
    import shutil

    trained = registry.get_version(settings, "luna-adapter", "v1")
    source = settings.adapters_dir / "luna-adapter" / "v1"
    for tag in ("r1", "r2"):
        work = settings.adapters_dir / "ow" / ".work" / tag
        shutil.copytree(source, work)
        registry.publish(settings, "ow", "overwrite", work, {"baseModel": trained["baseModel"]})
        merge_adapter(settings, "ow@latest")
    merged = {e["revision"]: e.get("merged") for e in registry.list_adapters(settings)["ow"]["versions"]}
    assert merged[2]["path"] == "data/models/merged/ow-current", merged
    assert merged[1] is None, merged  # its merged model was replaced by revision 2's


def test_a_base_model_that_is_gone_is_named_with_the_adapter_and_the_way_on(settings):
    """Repro: merging an adapter whose base model directory was moved away said only "Base model directory
    '…/tiny2' does not exist." with exit 2 (a usage error), though the command was right: nothing named the
    adapter or what to do."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    from helpers import adapter_work_dir

    gone = str(settings.home / "models" / "tiny2")
    work = adapter_work_dir(settings, "a", "x")
    registry.publish(settings, "a", "versioned", work, {"baseModel": {"id": gone, "fingerprint": "0" * 64}})
    r = CliRunner().invoke(app, ["merge", "--adapter", "a@v1"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        f"error: a@v1 was trained on base model {gone!r}, which cannot be used now (Base model directory "
        f"{gone!r} does not exist); put that base model back to merge it."
    ]
    assert not (settings.models_dir / "merged").exists()
    # Explore repros: a merge of a named version resolved the configured base too: with the adapter's own base
    # configured (the usual case) the bare sentence came back, exit 2; with the default configured, luna-tiny
    # was copied into data/models by a merge of a version trained on another base (and one that failed).
    assert not (settings.models_dir / "luna-tiny").exists()
    from lunatrain.settings import load_settings

    with pytest.raises(LunaError) as configured_gone:
        merge_adapter(load_settings(home=settings.home, base_model=gone), "a@v1")
    assert configured_gone.value.exit_code == 1 and configured_gone.value.message == (
        f"a@v1 was trained on base model {gone!r}, which cannot be used now (Base model directory {gone!r} does "
        "not exist); put that base model back to merge it."
    )
    r = CliRunner().invoke(app, ["eval-gate", "--adapter", "a@v1"])  # the gate said the same bare sentence
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"error: a@v1 was trained on base model {gone!r}, which cannot be used now (Base model directory "
        f"{gone!r} does not exist); put that base model back to gate it."
    ], r.output


def test_a_base_folder_moved_and_configured_at_its_new_place_is_the_trained_base(settings, tmp_path):
    """Switch repro: trained on /tmp/m2/llama, the folder moved to llama2 and ASSISTANT_BASE_MODEL set to it:
    status and chat took it (the same fingerprint), but the daily flow's gate, `eval-gate` and `merge` refused
    with "put that base model back". The configured base with the recorded weights is the base trained on."""
    from pathlib import Path

    from lunatrain.settings import load_settings

    from helpers import adapter_work_dir

    before, after = tmp_path / "llama", tmp_path / "llama2"
    shutil.copytree(models.resolve_base(None, settings).path, before)
    fingerprint = models.resolve_base(str(before), settings).fingerprint
    work = adapter_work_dir(settings, "a", "x")
    registry.publish(settings, "a", "versioned", work, {"baseModel": {"id": str(before), "fingerprint": fingerprint}})
    entry = registry.get_version(settings, "a", "v1")
    before.rename(after)
    moved = load_settings(home=settings.home, base_model=str(after))
    assert Path(registry.trained_base(moved, entry, "gate it").path) == after
    # other weights configured: still the recorded base, missing
    shutil.copytree(after, before)
    (after / "config.json").write_text((after / "config.json").read_text().replace("}", ', "x_other": 1}', 1))
    shutil.rmtree(before)
    with pytest.raises(LunaError, match="put that base model back to gate it"):
        registry.trained_base(moved, entry, "gate it")


def test_merge_says_when_it_replaces_an_earlier_merge_and_when_the_gate_refused_the_version(trained_home, settings):
    """Repro: merging a version twice, or merging one the eval gate refused, said the same plain "Merged …" as
    a first merge of a promoted version; the code knew both facts and said neither."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    target = settings.models_dir / "merged" / "luna-adapter-v1"
    first = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert first.exit_code == 0, first.output
    assert first.output.strip().splitlines() == [f"Merged luna-adapter@v1 into luna-tiny: {target}."]
    refused = {"status": "failed", "passed": False, "reasons": ["val loss 8.4 is 1.0 x the base model's"]}
    registry.annotate(settings, "luna-adapter", "v1", "gate", refused)
    again = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert again.exit_code == 0, again.output
    assert again.output.strip().splitlines() == [
        f"Merged luna-adapter@v1 into luna-tiny: {target} (it replaces the earlier merge of this version).",
        "Note: the eval gate refused this version (val loss 8.4 is 1.0 x the base model's).",
    ]
    # the card says the same to whoever gets the folder without lunatrain's output
    card = " ".join((target / "README.md").read_text().split())
    assert "The version's eval gate: failed (val loss 8.4 is 1.0 x the base model's)." in card, card
    # Merge repro: a version trained on content deleted since merged without a word (`adapters activate` says
    # it): the standalone model holds that content too, outside lunatrain's marks.
    registry.annotate(settings, "luna-adapter", "v1", "gate", None)
    registry.annotate(settings, "luna-adapter", "v1", "stale", {"reason": "trained on deleted content"})
    stale = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert stale.exit_code == 0, stale.output
    assert stale.output.strip().splitlines()[1:] == [
        "Note: luna-adapter@v1 is stale (trained on deleted content): the merged model holds that content too; "
        "train a new version (`lunatrain luna`) and merge it to leave it out."
    ], stale.output
    card = " ".join((target / "README.md").read_text().split())
    assert "stale (trained on deleted content): this model holds that content too" in card, card


def test_a_merge_keeps_the_dtype_of_its_base(settings, monkeypatch):
    """Repro: a bf16 base merged into a float32 model, twice its size on disk and in memory, with
    `"dtype": "float32"` in its config. The merge computes in float32 and writes the base's dtype."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lunatrain.params import parse_params
    from lunatrain.train import run_lora

    from helpers import make_records, write_export

    tiny = models.resolve_base(None, settings).path
    bf16 = settings.models_dir / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(bf16)
    monkeypatch.setenv("ASSISTANT_BASE_MODEL", str(bf16))
    from lunatrain.settings import load_settings

    here = load_settings(home=settings.home)
    write_export(here, make_records(16, val_every=6))
    trained = run_lora(parse_params({"maxSteps": 2, "rank": 4, "maxSeqLength": 128}), here)
    assert trained.ok, trained.error
    # Explore repro: a named version is merged into the base it was trained on whatever is configured now (a
    # new base not downloaded yet refused it, exit 2, in a sentence about the new base).
    switched = load_settings(home=settings.home, base_model="org/not-downloaded-yet")
    result = merge_adapter(switched, f"luna-adapter@{trained.version}")
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(result.path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((result.path / "lunatrain-merge.json").read_text())["dtype"] == "bfloat16"
    # Explore repro: a base whose config.json names no dtype (older checkpoints) was merged into float32, twice
    # its size; the weights' own header says how they are stored.
    config = json.loads((bf16 / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (bf16 / "config.json").write_text(json.dumps(config))
    # review repro: with one tensor kept in float32 (a norm, as some bfloat16 checkpoints keep them), the
    # bfloat16 that holds most of the bytes is the stored dtype
    from safetensors.torch import load_file, save_file

    weights = load_file(bf16 / "model.safetensors")
    norm = next(k for k in weights if "norm" in k)
    weights[norm] = weights[norm].float()
    save_file(weights, bf16 / "model.safetensors", metadata={"format": "pt"})
    result = merge_adapter(here, f"luna-adapter@{trained.version}", force=True)  # the config changed: force
    with safe_open(str(result.path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((result.path / "lunatrain-merge.json").read_text())["dtype"] == "bfloat16"


def test_a_merge_never_deletes_files_it_did_not_write(trained_home, settings):
    """Repro: merging a version again replaced its whole folder: a user's notes and a .gguf converted into it
    (llama.cpp's default place) were deleted, and a folder that had never been a merge was called "the
    earlier merge of this version". Such a folder is refused now, naming the files, and nothing changes."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    target = settings.models_dir / "merged" / "luna-adapter-v1"
    target.mkdir(parents=True, exist_ok=True)
    for leftover in target.iterdir():  # a merge an earlier test left
        leftover.unlink()
    (target / "NOTES.txt").write_text("mine")
    record = registry.get_version(settings, "luna-adapter", "v1").get("merged")
    r = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        "error: data/models/merged/luna-adapter-v1 is not a merge of lunatrain (no lunatrain-merge.json); "
        "move it away or delete it, then merge again."
    ]
    assert [p.name for p in target.iterdir()] == ["NOTES.txt"]
    (target / "NOTES.txt").unlink()
    first = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert first.exit_code == 0 and "replaces" not in first.output, first.output
    (target / "luna-adapter-v1-F16.gguf").write_text("gguf")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    record = registry.get_version(settings, "luna-adapter", "v1")["merged"]
    r = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        "error: data/models/merged/luna-adapter-v1 holds files a merge did not write (luna-adapter-v1-F16.gguf), "
        "and merging again replaces the whole folder; move them away first."
    ]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert registry.get_version(settings, "luna-adapter", "v1")["merged"] == record
    (target / "luna-adapter-v1-F16.gguf").unlink()
    again = CliRunner().invoke(app, ["merge", "--adapter", "luna-adapter@v1"])
    assert again.exit_code == 0 and "(it replaces the earlier merge of this version)" in again.output, again.output


def test_a_merge_after_a_killed_one_removes_what_it_left_and_fits_on_the_same_disk(trained_home, settings):
    """Repro: a merge killed while writing left its staging folder, a whole model's size, in
    data/models/merged; the next merge wrote beside it and could fill the disk. A merge now removes what
    ended processes left there first (and `gc` does too: test_retention.py)."""
    import subprocess
    import sys

    import faults

    merged = settings.models_dir / "merged"
    code = (
        "import sys; from pathlib import Path; from lunatrain.fsio import staging_dir;"
        "p = staging_dir(Path(sys.argv[1]), 'luna-adapter-v1'); (p / 'model.safetensors').write_bytes(b'x' * 1_300_000)"
    )
    with faults.small_disk(merged, "2m"):  # room for one merge of luna-tiny (1.4 MB), not for a second beside it
        subprocess.run([sys.executable, "-c", code, str(merged)], check=True)
        (leftover,) = [p for p in merged.iterdir() if p.name.startswith(".luna-adapter-v1.")]
        merge_adapter(settings, "luna-adapter@v1")
        assert sorted(p.name for p in merged.iterdir()) == ["luna-adapter-v1"], list(merged.iterdir())


@pytest.mark.slow
def test_a_merge_killed_before_its_record_leaves_nothing_gc_cannot_find(trained_home, settings):
    """Review repro: a merge killed between moving its model in and the registry's record (the OOM killer, a
    power cut) left the earlier merge aside as `.luna-adapter-v1.old`, a whole model that `gc` never removed.
    Aside it is named as a staging folder of the merging process, which `gc` removes once that process ended."""
    import subprocess
    import sys
    import time

    merge_adapter(settings, "luna-adapter@v1")
    killed = (
        "import os, sys; from pathlib import Path; from lunatrain import registry; "
        "from lunatrain.merge import merge_adapter; from lunatrain.settings import load_settings; "
        "registry.annotate = lambda *a, **k: os._exit(9); merge_adapter(load_settings(home=Path(sys.argv[1])), "
        "'luna-adapter@v1')"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(settings.home)], check=False)
    assert done.returncode == 9
    merged = settings.models_dir / "merged"
    [aside] = [p for p in merged.iterdir() if p.name.startswith(".luna-adapter-v1.old.")]
    from lunatrain import retention

    # review repro: a data root on storage two machines share: the other one's gc judges a staging folder by
    # its age, and the earlier model's files are old; moved aside, the folder is changed now
    assert time.time() - aside.lstat().st_mtime < 600
    report = retention.collect(settings)
    assert [i.path for i in report.items if i.kind == "staging"] == [str(settings.shown(aside))], report.items
    assert sorted(p.name for p in merged.iterdir()) == ["luna-adapter-v1"]
    # review repro: a merge target that is a link moves aside as a link: one a killed merge left is found too
    elsewhere = settings.home / "elsewhere"
    (merged / "luna-adapter-v1").rename(elsewhere)
    (merged / "luna-adapter-v1").symlink_to(elsewhere)
    subprocess.run([sys.executable, "-c", killed, str(settings.home)], check=False)
    [link] = [p for p in merged.iterdir() if p.name.startswith(".luna-adapter-v1.old.")]
    assert link.is_symlink()
    report = retention.collect(settings)
    assert [i.path for i in report.items if i.kind == "staging"] == [str(settings.shown(link))], report.items
    assert not link.is_symlink() and elsewhere.is_dir()  # the link went, never what it names


def test_a_base_inside_a_moved_or_copied_data_root_is_found_there(settings, monkeypatch):
    """Repro: an adapter trained on a base model kept inside the data root (the merged model the README
    suggests as a next base) records the base by its absolute path. After `mv ~/luna ~/luna2`, `merge` and
    `eval-gate` refused with "put that base model back", the model right there under the new root; after a
    `cp -a`, `merge` read the base out of the other data root without a word. The same relative place under
    this data root, with the same weights, is the base now."""
    import shutil

    from lunatrain.params import parse_params
    from lunatrain.settings import load_settings
    from lunatrain.train import run_lora

    from helpers import make_records, write_export

    mine = settings.models_dir / "mybase"
    shutil.copytree(models.resolve_base(None, settings).path, mine)
    write_export(settings, make_records(16, val_every=6))
    trained = run_lora(parse_params({"maxSteps": 2, "rank": 4, "maxSeqLength": 128, "baseModel": str(mine)}), settings)
    assert trained.ok, trained.error
    ref = f"luna-adapter@{trained.version}"

    moved = settings.home.with_name("moved")
    settings.home.rename(moved)
    monkeypatch.setenv("ASSISTANT_HOME", str(moved))
    monkeypatch.chdir(moved)
    here = load_settings()
    result = merge_adapter(here, ref)
    merged_from = json.loads((result.path / "lunatrain-merge.json").read_text())["baseModel"]
    assert merged_from["id"] == str(moved / "data" / "models" / "mybase"), merged_from
    report = evalgate.eval_gate(here, adapter=ref)
    assert report.candidate["baseModel"] == str(moved / "data" / "models" / "mybase"), report.candidate

    copy = settings.home.with_name("copy")  # `cp -a`: the moved root is still there, with its own base
    shutil.copytree(moved, copy, symlinks=True)
    monkeypatch.setenv("ASSISTANT_HOME", str(copy))
    monkeypatch.chdir(copy)
    result = merge_adapter(load_settings(), ref)
    merged_from = json.loads((result.path / "lunatrain-merge.json").read_text())["baseModel"]
    assert merged_from["id"] == str(copy / "data" / "models" / "mybase"), merged_from

    # In the copy its base is changed: that is refused as a changed base, never merged into the other root's.
    config = copy / "data" / "models" / "mybase" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"changed": True}))
    with pytest.raises(Conflict, match="changed"):
        merge_adapter(load_settings(), ref)

    # Repro: a copy of the root the adapter was trained in, its base deleted in the copy, merged into the
    # original root's base without a word. It is refused, naming both places.
    moved.rename(settings.home)  # the original root, at the path the registry recorded
    second = settings.home.with_name("second")
    shutil.copytree(settings.home, second, symlinks=True)
    shutil.rmtree(second / "data" / "models" / "mybase")
    monkeypatch.setenv("ASSISTANT_HOME", str(second))
    monkeypatch.chdir(second)
    with pytest.raises(NotFound, match=r"^luna-adapter@v1 was trained on base model .*/home/data/models/mybase'"):
        merge_adapter(load_settings(), ref)
    with pytest.raises(
        NotFound,
        match=r"is gone from this data root \(data/models/mybase\), a copy of .*/home'; put that base model back to gate it",
    ):
        evalgate.eval_gate(load_settings(), adapter=ref)


def test_a_merge_whose_folder_is_gone_is_not_listed_as_merged(trained_home, settings):
    """Repro: after `rm -rf data/models/merged/luna-adapter-v1`, `adapters list` still said `[merged]` and
    `adapters show` gave the merged path as if it were there; a version's own missing files were said."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    folder = settings.models_dir / "merged" / "luna-adapter-v1"
    registry.annotate(settings, "luna-adapter", "v1", "merged", {"path": str(folder.relative_to(settings.home))})
    listed = CliRunner().invoke(app, ["adapters", "list"])
    assert "[merged into a model: its folder is gone]" in listed.output, listed.output
    shown = json.loads(CliRunner().invoke(app, ["adapters", "show", "luna-adapter@v1"]).output)
    assert shown["merged"]["folderMissing"] is True, shown["merged"]
    folder.mkdir(parents=True)
    listed = CliRunner().invoke(app, ["adapters", "list"])
    # CLI-text repro: "[merged]" beside the dataset tier read as the tier of that name; both say what they are
    assert "[merged into a model]" in listed.output and "gone" not in listed.output, listed.output
    assert "luna-adapter@v1  tier curated  val " in listed.output, listed.output
    shown = json.loads(CliRunner().invoke(app, ["adapters", "show", "luna-adapter@v1"]).output)
    assert "folderMissing" not in shown["merged"], shown["merged"]


def test_a_base_of_another_data_root_is_read_there_when_this_root_is_no_copy(settings, tmp_path):
    """An adapter trained on another data root's merged model, still intact there, while this root holds a
    different model at the same relative place: the recorded base is used, not refused as changed (only a
    copy of the recorded root, with the same adapter weights, has its own changed base refused)."""
    tiny = models.resolve_base(None, settings)
    outside = tmp_path / "rootA" / "data" / "models" / "merged" / "luna-adapter-v1"
    shutil.copytree(tiny.path, outside)
    fp = models.resolve_base(str(outside), settings).fingerprint
    mine = settings.models_dir / "merged" / "luna-adapter-v1"
    shutil.copytree(tiny.path, mine)
    (mine / "config.json").write_text(json.dumps(json.loads((mine / "config.json").read_text()) | {"mine": 1}))
    entry = {
        "name": "x",
        "version": "v1",
        "path": "data/adapters/x/v1",
        "baseModel": {"id": str(outside), "fingerprint": fp},
    }
    assert registry.trained_base(settings, entry, "gate it").fingerprint == fp


def test_a_merge_killed_as_it_swaps_its_folder_in_leaves_a_whole_model_in_place(tmp_path):
    """Repro: a kill between the two renames that put a new merged model in place (the earlier one aside,
    then the new one in) left no model at the target, only two hidden folders that gc then removed. The
    swap is one exchange of the two folders where the file system has it (Linux: renameat2), so the target
    always holds a whole model; the earlier one is then moved aside as before."""
    import subprocess
    import sys

    target, finished = tmp_path / "luna-adapter-v1", tmp_path / "built"
    for folder, said in ((target, "earlier"), (finished, "new")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(said)
    killed = (
        "import os, signal, sys; from pathlib import Path; from lunatrain import fsio\n"
        "real = os.replace\n"
        "def replace(a, b, *args, **kw):\n"
        "    real(a, b, *args, **kw)\n"
        "    if '.old.' in os.path.basename(str(b)): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        "with fsio.swapped_dir(Path(sys.argv[1]), Path(sys.argv[2])): pass\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(finished), str(target)], check=False)
    assert done.returncode == -9
    assert (target / "model.safetensors").read_text() == "new"


def test_weights_overwritten_in_place_with_nan_are_damaged_for_merge_and_the_gate(trained_home, settings):
    """Explore repro: weights whose data (not their header) was overwritten made `merge` exit 0 and replace the
    earlier merge with a model of NaN tensors, and chat sampled from NaN logits (500, or an empty answer at
    temperature 0). They are damaged files now, said before anything loads or is written."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    path = settings.adapters_dir / "luna-adapter" / "v1" / "adapter_model.safetensors"
    data = path.read_bytes()
    head = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:head] + b"\xff" * (len(data) - head))  # 0xffffffff is a float32 NaN
    for args in (["merge", "--adapter", "luna-adapter@v1"], ["eval-gate", "--adapter", "luna-adapter@v1"]):
        r = CliRunner().invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, (args, r.output)
        assert lines[0].startswith(
            "error: The files of luna-adapter@v1 under data/adapters are damaged (adapter_model.safetensors holds "
            "values that are not finite (NaN or inf) in "
        ) and lines[0].endswith("; train it again, or roll back to another version."), lines
    assert not (settings.models_dir / "merged").exists()


def test_merging_again_refuses_to_change_a_merged_model_other_versions_are_trained_on(trained_home, settings):
    """Stacking explore repro: an adapter trained on data/models/merged/ow-current as its base, and `merge --adapter
    ow@current` after a second overwrite run replaced that folder's weights without a word (exit 0, "it
    replaces the earlier merge"): the adapter could no longer be served, activated or merged, and the weights it
    was trained on were gone. Merging the same revision again writes the same weights and goes on."""
    import hashlib
    import shutil

    trained = registry.get_version(settings, "luna-adapter", "v1")
    source = settings.adapters_dir / "luna-adapter" / "v1"

    def run(name: str, strategy: str, tag: str, base: dict) -> None:
        work = settings.adapters_dir / name / ".work" / tag
        shutil.copytree(source, work)
        registry.publish(settings, name, strategy, work, {"baseModel": base})

    run("ow", "overwrite", "r1", trained["baseModel"])
    target = merge_adapter(settings, "ow@latest").path
    on_merge = models.resolve_base(str(target), settings)
    run("kid", "versioned", "k1", on_merge.record())  # trained on the merged folder, recorded by its path
    # second review: one trained on an earlier build of the folder cannot be served anyway; it blocks nothing
    run("old", "versioned", "o1", on_merge.record() | {"fingerprint": "0" * 64})
    merge_adapter(settings, "ow@latest")  # the same revision into the same base: the same weights, no refusal
    weights = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
    run("ow", "overwrite", "r2", trained["baseModel"])
    with pytest.raises(Conflict) as info:
        merge_adapter(settings, "ow@latest")
    assert info.value.code == "merge.base_of_others" and info.value.params["adapters"] == ["kid@v1"], info.value
    assert "data/models/merged/ow-current is the base model of kid@v1" in info.value.message, info.value.message
    assert hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest() == weights  # nothing replaced
    assert merge_adapter(settings, "ow@latest", force=True).replaced  # the owner's word


def test_a_merged_base_written_relative_or_absolute_is_one_base(trained_home, settings):
    """Stacking explore repro: `--baseModel data/models/merged/x` is recorded absolute and `ASSISTANT_BASE_MODEL`
    keeps it relative; compared as text, a version whose merged base changed since was said to be "trained on
    base model '/…/merged/x', but the configured base model is 'data/models/merged/x'", with the failed command
    as the advice, instead of "another build" of it."""
    import shutil

    from lunatrain.settings import load_settings

    target = merge_adapter(settings, "luna-adapter@v1").path
    relative = str(target.relative_to(settings.home))
    assert registry.same_base_id(settings, relative, str(target))
    assert not registry.same_base_id(settings, relative, "luna-tiny") and registry.same_base_id(settings, "a/b", "a/b")
    work = settings.adapters_dir / "kid" / ".work" / "k1"
    shutil.copytree(settings.adapters_dir / "luna-adapter" / "v1", work)
    built_then = {"id": str(target), "fingerprint": "0" * 64}  # the folder's weights have changed since
    registry.publish(settings, "kid", "versioned", work, {"baseModel": built_then})
    configured = load_settings(home=settings.home, base_model=relative)
    with pytest.raises(Conflict) as info:
        registry.activate(configured, "kid", "v1")
    assert info.value.code == "adapter.another_build", info.value.message
