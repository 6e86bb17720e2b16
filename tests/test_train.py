"""The LoRA loop on luna-tiny (CPU, float32). Run: `pytest tests/test_train.py -q`."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from lunatrain import models, registry
from lunatrain import train as train_mod
from lunatrain.errors import LunaError, UsageError
from lunatrain.params import parse_params
from lunatrain.tokens import IGNORE, encode_chat, make_batch, shifted_targets
from lunatrain.train import Status, forward_supervised, run_lora

from helpers import make_records, write_export

FAST = {"epochs": 2, "batchSize": 4, "rank": 4, "learningRate": 5e-3, "maxSeqLength": 128, "seed": 7}


def _params(**over):
    return parse_params(FAST | over)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- packing ----------------------------------------------------------------------------------------


def _samples(tok, n=5):
    return [encode_chat(tok, r["messages"], 128) for r in make_records(n, multi_turn_every=2)]


@pytest.mark.parametrize("capacity", [1024, 70])  # one row holding all; several rows with a pad block
def test_packed_logits_and_loss_equal_one_by_one(settings, capacity):
    tok = models.load_tokenizer(None, settings)
    model = models.load_model(None, settings).eval()
    samples = _samples(tok)
    batch = make_batch(samples, capacity, tok.pad_token_id)
    assert (batch.input_ids.shape[0] == 1) == (capacity == 1024)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        packed_sum = torch.nn.functional.cross_entropy(*forward_supervised(model, batch, "cpu"), reduction="sum")
        solo_sum, solo_n = 0.0, 0
        for s, (row, a, b) in zip(samples, batch.segments, strict=True):
            alone = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[row, a:b], alone, atol=1e-4, rtol=1e-4)
            tgt = torch.tensor(shifted_targets(s))
            solo_sum += float(torch.nn.functional.cross_entropy(alone, tgt, ignore_index=IGNORE, reduction="sum"))
            solo_n += int((tgt != IGNORE).sum())
    assert batch.n_supervised == solo_n
    assert abs(float(packed_sum) / batch.n_supervised - solo_sum / solo_n) < 1e-4


def test_without_restarting_positions_samples_would_leak(settings):
    """The control for the test above: plain concatenation (positions running on) lets samples see each
    other, so equality there is a real finding and not an accident of the model."""
    tok = models.load_tokenizer(None, settings)
    model = models.load_model(None, settings).eval()
    a, b = _samples(tok, 2)
    ids = torch.tensor([a.input_ids + b.input_ids])
    with torch.no_grad():
        joined = model(input_ids=ids, use_cache=False).logits[0, len(a) :]
        alone = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
    assert (joined - alone).abs().max() > 1e-2


def test_boundaries_are_never_targets(settings):
    tok = models.load_tokenizer(None, settings)
    samples = _samples(tok, 4)
    batch = make_batch(samples, 1024, tok.pad_token_id)
    for _row, _a, b in batch.segments:
        assert batch.targets[0, b - 1] == IGNORE  # a sample's last token predicts nothing (not the next sample)
    assert batch.n_tokens == sum(len(s) for s in samples)


# --- training runs ----------------------------------------------------------------------------------


def test_training_beats_the_base_model_and_writes_artifacts(settings):
    write_export(settings)
    events = []
    result = run_lora(
        parse_params(
            {
                "epochs": 3,
                "batchSize": 8,
                "rank": 8,
                "learningRate": 1e-2,
                "maxSeqLength": 128,
                "adapterName": "luna-adapter",
            }
        ),
        settings,
        on_event=events.append,
        job_id="job-1",
    )
    assert result.status is Status.SUCCEEDED, result.error
    assert result.version == "v1" and result.path == settings.adapters_dir / "luna-adapter" / "v1"
    names = {p.name for p in result.path.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training-report.json",
        "loss-curve.png",
        "train-hashes.txt",
    } <= names and "checkpoints" not in names
    # Repro: target_modules went out in Python's set order, which follows the process's hash seed: the same
    # run wrote another adapter_config.json (weights identical), so a folder's checksum did not repeat.
    targets = json.loads((result.path / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 3 and targets == sorted(targets), targets
    report = json.loads((result.path / "training-report.json").read_text())
    m = report["metrics"]
    assert m["valLoss"] < m["baseValLoss"] - 0.5, m  # clearly learned something about the data
    assert report["status"] == "succeeded" and report["version"] == "v1" and report["jobId"] == "job-1"
    assert report["baseModel"]["fingerprint"] == models.resolve_base(None, settings).fingerprint
    assert report["dataset"]["fingerprint"] and len(report["epochs"]) == 3 and len(report["lossCurve"]) == m["steps"]
    # The curve's lr is the rate each step ran at: the warmup's first step at 0, the peak right after the
    # warmup, and the cosine's last step above 0 (the rate after it would be 0).
    curve, warmup = report["lossCurve"], math.ceil(0.05 * m["steps"])
    assert curve[0]["lr"] == 0.0 and curve[warmup]["lr"] == pytest.approx(report["params"]["learningRate"])
    assert curve[-1]["lr"] > 0.0
    # Repro: an epoch's trainLoss was the mean of its steps' losses, so a token of the epoch's short last
    # step counted for more than one of a full step; it is the loss per supervised token, as each step's is.
    run = train_mod.prepare(parse_params(report["params"]), settings)
    for epoch in report["epochs"]:
        tokens = [sum(x.n_supervised for mb in st for x in mb) for st in train_mod.epoch_steps(run, epoch["epoch"] - 1)]
        losses = [c["loss"] for c in curve if c["epoch"] == epoch["epoch"]]
        assert len(set(tokens)) > 1 and len(losses) == len(tokens), (tokens, losses)
        weighted = sum(x * n for x, n in zip(losses, tokens, strict=True)) / sum(tokens)
        assert epoch["trainLoss"] == pytest.approx(weighted, rel=1e-9), (epoch, weighted)
        assert epoch["trainLoss"] != pytest.approx(sum(losses) / len(losses), rel=1e-9)
    assert set(report["packages"]) >= {"torch", "transformers", "peft", "lunatrain"}
    # device auto: a GPU where there is one, with its flash kernel and torch's dropout (seen on an H200)
    on_gpu = {"attention": "varlen-flash", "dropout": "torch"}
    assert report["kernels"] == (
        on_gpu if torch.cuda.is_available() else {"attention": "varlen-sdpa", "dropout": "fast16"}
    )
    # Repro: README.md was PEFT's empty model card ("[More Information Needed]" in every section); it is
    # the version's own card now: what it is, what it was trained on, how it scored, how to load it.
    card = (result.path / "README.md").read_text()
    assert "[More Information Needed]" not in card, card
    assert card.startswith('---\nbase_model: "luna-tiny"\nlibrary_name: peft\n'), card
    # Explore repros: the card's PEFT line gave a generate() that ran past the answer (PEFT keeps the base's
    # generation config, whose end token may be another), and named luna-tiny as BASE, which no tool finds.
    assert "generation_config=GenerationConfig.from_pretrained(THIS_FOLDER)" in card, card
    assert "(BASE: lunatrain's built-in model, in `data/models/luna-tiny` under the data root)" in card, card
    assert "# luna-adapter@v1" in card and report["dataset"]["fingerprint"][:12] in card, card
    assert f"{m['valLoss']:.4f}" in card and f"{m['baseValLoss']:.4f}" in card, card
    hashes = (result.path / "train-hashes.txt").read_text().split()
    assert len(hashes) == report["dataset"]["trainSamples"]
    assert json.loads(settings.lora_latest_report.read_text())["version"] == "v1"
    entry = registry.get_version(settings, "luna-adapter", "latest")
    assert entry["version"] == "v1" and entry["metrics"]["valLoss"] == m["valLoss"] and entry["jobId"] == "job-1"
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == progress[-1]["totalSteps"] == m["steps"] and progress[-1]["percent"] == 100
    assert {"loss", "tokensPerSec", "etaSeconds", "epoch"} <= set(progress[0])
    assert [e["epoch"] for e in events if e["type"] == "eval"] == [0, 1, 2, 3]
    epochs_done = [e["message"] for e in events if e.get("code") == "log.epoch_done"]
    assert len(epochs_done) == 3 and all(
        re.fullmatch(r"epoch \d done: val loss \d+\.\d{4}, checkpoint saved", m) for m in epochs_done
    ), epochs_done

    from peft import PeftModel

    base = models.load_model(None, settings).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(result.path)).eval()(input_ids=ids).logits
    assert (tuned - before).abs().max() > 1e-3


def test_packing_changes_speed_not_the_result(settings):
    """Packed (one flat row, per-sample attention) and unpacked (a padded row per sample) training reach
    the same adapter: batchSize counts samples either way and the loss is normalized per token."""
    from safetensors.torch import load_file

    write_export(settings, make_records(24, val_every=6))
    packed = run_lora(_params(dropout=0.0, adapterName="packed"), settings)
    unpacked = run_lora(_params(dropout=0.0, adapterName="unpacked", packing=False), settings)
    a = load_file(str(packed.path / "adapter_model.safetensors"))
    b = load_file(str(unpacked.path / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # On CPU both run in float32: the same adapter. On a GPU (device auto) both run under bf16 autocast, whose
    # rounding differs between one flat row and padded rows: the same up to that. On an H200, over four seeds
    # (7, 11, 23, 42): weights within 8e-6 to 4.7e-3 of each other, the largest 0.13; val losses 3e-5 to
    # 2.6e-4 apart, at 8.26 (bench/results/train_gpu.md). The tolerances leave a factor of 4 over the worst.
    atol, rtol, loss_tol = (2e-2, 0.0, 1e-3) if torch.cuda.is_available() else (1e-4, 1e-3, 1e-4)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol)
    assert abs(packed.report["metrics"]["valLoss"] - unpacked.report["metrics"]["valLoss"]) < loss_tol
    assert max(x.abs().max() for x in a.values() if x.ndim) > 1e-3  # it did train


def test_gradient_checkpointing_changes_memory_not_the_result(settings, monkeypatch):
    """Recomputing activations in the backward pass replays the same dropout masks: same adapter."""
    from safetensors.torch import load_file
    from transformers import modeling_utils

    write_export(settings, make_records(16, val_every=6))
    plain = run_lora(_params(adapterName="plain"), settings)
    calls = []
    real = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ckpt = run_lora(_params(adapterName="ckpt", gradientCheckpointing=True), settings)
    assert calls  # the decoder layers really were checkpointed
    assert ckpt.report["params"]["gradientCheckpointing"] == "true"
    a = load_file(str(plain.path / "adapter_model.safetensors"))
    b = load_file(str(ckpt.path / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_on_a_model_without_it_is_a_usage_error(settings, monkeypatch):
    from transformers import LlamaForCausalLM

    write_export(settings, make_records(16, val_every=6))
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(UsageError, match="does not support gradientCheckpointing"):
        run_lora(_params(adapterName="no-ckpt", gradientCheckpointing=True), settings)
    assert not (settings.adapters_dir / "no-ckpt").exists()


def test_same_seed_same_bytes_and_resume_matches(settings):
    write_export(settings, make_records(40, val_every=5))
    full = run_lora(_params(), settings)
    again = run_lora(_params(), settings)
    weights = (full.path / "adapter_model.safetensors").read_bytes()
    assert (again.path / "adapter_model.safetensors").read_bytes() == weights

    seen = []

    def stop_after_first_epoch():
        return any(e["type"] == "eval" and e["epoch"] == 1 for e in seen)

    cut = run_lora(_params(), settings, on_event=seen.append, should_stop=stop_after_first_epoch)
    assert cut.status is Status.CANCELLED and cut.error["code"] == "cancelled" and cut.version is None
    assert json.loads(settings.lora_latest_report.read_text())["status"] == "cancelled"
    resumed = run_lora(_params(resume=True), settings)
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1
    assert (resumed.path / "adapter_model.safetensors").read_bytes() == weights
    # Reproducibility repro: only training-report.json said the run resumed; `adapters show` and `diff` (the
    # registry's entry) and the model card did not, so a resumed version and a fresh one read alike.
    assert registry.get_version(settings, "luna-adapter", resumed.version)["resumedFromEpoch"] == 1
    assert registry.get_version(settings, "luna-adapter", full.version)["resumedFromEpoch"] is None
    assert ", resumed after epoch 1 |" in (resumed.path / registry.CARD_FILE).read_text()
    assert "resumed" not in (full.path / registry.CARD_FILE).read_text()
    assert resumed.report["metrics"]["valLoss"] == full.report["metrics"]["valLoss"]
    assert [v["version"] for v in registry.list_adapters(settings)["luna-adapter"]["versions"]] == ["v1", "v2", "v3"]
    other = run_lora(_params(seed=8), settings)
    assert (other.path / "adapter_model.safetensors").read_bytes() != weights


def test_runs_from_a_caller_without_gradients_another_default_dtype_or_two_threads_train_the_same_bytes(
    settings, tmp_path
):
    """Repros of in-process use (a notebook): `run_lora` inside `torch.no_grad()` or `torch.inference_mode()`
    failed at its first backward ("element 0 of tensors does not require grad"), recorded as a failed run;
    after `torch.set_default_dtype(torch.float64)` it trained other LoRA weights than the command line, under
    the same report; two runs in two threads broke every later model load of the process ("Cannot copy out
    of meta tensor"), or trained other weights than a lone run (both drew from torch's one generator)."""
    import shutil
    import threading

    from lunatrain.settings import load_settings

    write_export(settings, make_records(24, val_every=5))
    flags = {"maxSteps": 2, "epochs": 1}
    lone = run_lora(_params(**flags), settings)
    weights = (lone.path / "adapter_model.safetensors").read_bytes()
    roots = {}
    for name in ("inference_mode", "no_grad"):
        shutil.copytree(settings.home, tmp_path / name, symlinks=True)
        roots[name] = load_settings(home=tmp_path / name)
    results: dict[str, object] = {}

    def train(name: str) -> None:
        with getattr(torch, name)():
            try:
                results[name] = run_lora(_params(**flags), roots[name])
            except Exception as exc:  # said below, with the other thread's outcome
                results[name] = exc

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        threads = [threading.Thread(target=train, args=(name,)) for name in roots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_default_dtype(before)
    for name, result in results.items():
        assert isinstance(result, train_mod.TrainResult) and result.ok, (name, result)
        assert (result.path / "adapter_model.safetensors").read_bytes() == weights, name
    assert sorted(results) == sorted(roots)


def test_a_run_started_from_a_callback_of_a_run_is_refused_instead_of_waiting_for_itself(settings):
    """Review repro: `run_lora` called from its own run's `on_event` hung for good (one run at a time)."""
    write_export(settings, make_records(24, val_every=5))
    refused: list[Exception] = []

    def again(event) -> None:
        if not refused:
            try:
                run_lora(_params(maxSteps=1, epochs=1), settings)
            except UsageError as exc:
                refused.append(exc)

    result = run_lora(_params(maxSteps=1, epochs=1), settings, on_event=again)
    assert result.ok and len(refused) == 1
    assert refused[0].message == "run_lora was called from within a run (its on_event or should_stop); start it after."


def test_a_cancel_during_the_last_step_is_honoured_before_the_run_publishes(settings):
    """Repro: a job cancelled while its last step ran was answered "cancelling", then finished the step,
    registered its version, skipped its gate and ended `succeeded`: the stop request was read only before
    each step. It is read once more after the loop: the run ends cancelled and registers nothing."""
    write_export(settings, make_records(40, val_every=5))
    seen = []

    def cancelled_during_the_last_step():
        return any(e["type"] == "progress" and e["step"] == e["totalSteps"] for e in seen)

    cut = run_lora(
        _params(epochs=1, maxSteps=3), settings, on_event=seen.append, should_stop=cancelled_during_the_last_step
    )
    assert cut.status is Status.CANCELLED and cut.version is None, (cut.status, cut.error)
    assert cut.error["message"] == "cancelled at step 3 of 3", cut.error
    assert registry.list_adapters(settings) == {}
    # A trainer gone after the last step is no cancel: the finished run publishes (recovery settles the job).
    seen.clear()

    def trainer_gone_after_the_last_step():
        return cancelled_during_the_last_step() and "the trainer process is gone"

    done = run_lora(
        _params(epochs=1, maxSteps=3), settings, on_event=seen.append, should_stop=trainer_gone_after_the_last_step
    )
    assert done.ok and done.version == "v1", done.error


def test_a_run_stopped_because_its_trainer_is_gone_says_interrupted_not_cancelled(settings):
    """Repro: a worker whose trainer was killed stopped its run as if the user had cancelled it: "training
    cancelled: cancelled at step 201 of 930" in the job's log and lora-latest.json, while the restarted
    trainer settled the job as failed (interrupted). A stop that gives its reason (the worker's: its
    trainer is gone) ends the run failed, code interrupted, naming the step and how to continue."""
    write_export(settings, make_records(16, val_every=5))
    seen: list[dict] = []

    def trainer_gone():
        return any(e["type"] == "progress" for e in seen) and "the trainer process is gone"

    cut = run_lora(_params(), settings, on_event=seen.append, should_stop=trainer_gone)
    assert cut.status is Status.FAILED and cut.version is None, cut
    assert cut.error["code"] == "interrupted", cut.error
    assert cut.error["message"].startswith("Stopped at step 1 of "), cut.error
    assert "the trainer process is gone" in cut.error["message"]
    report = json.loads(settings.lora_latest_report.read_text())
    assert (report["status"], report["error"]["code"]) == ("failed", "interrupted"), report
    said = [e["message"] for e in seen if e.get("code") == "log.training_ended"]
    assert said and said[-1].startswith("training failed: Stopped at step 1"), said


def test_a_run_quit_at_once_is_recorded_before_the_interrupt_goes_on(settings):
    """Repro: a second Ctrl-C ("quit at once") during `lora --local` left no trace of the run: lora-latest.json
    and `status` still described an older one, though its epoch checkpoints stayed for --resume. The run is
    recorded as cancelled (with where it stopped) before the interrupt ends the command."""
    write_export(settings, make_records(16, val_every=5))
    seen: list[dict] = []

    def quit_at_once():
        if any(e["type"] == "progress" for e in seen):
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        run_lora(_params(), settings, on_event=seen.append, should_stop=quit_at_once)
    report = json.loads(settings.lora_latest_report.read_text())
    assert report["status"] == "cancelled" and report["error"]["code"] == "cancelled", report
    assert report["error"]["message"].startswith("interrupted at step 1 of "), report["error"]
    assert not registry.list_adapters(settings)


def test_train_hashes_name_only_the_samples_the_steps_took(settings):
    """Repro: a run cut short by maxSteps listed every train sample in train-hashes.txt, so deleting an
    example it never saw marked it "retrain needed"."""
    write_export(settings, make_records(40, val_every=5))
    result = run_lora(_params(maxSteps=1), settings)
    assert result.ok, result.error
    hashes = (result.path / "train-hashes.txt").read_text().split()
    assert len(hashes) == FAST["batchSize"] < result.report["dataset"]["trainSamples"]
    # Repro: a one-step run (a small store's example adapter) took its step at the warmup's learning rate 0,
    # so the adapter was the base model (LoRA's B starts at zero) and passed the gate as "no worse".
    from safetensors.torch import load_file

    weights = load_file(str(result.path / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k), "the one step changed nothing"


def test_the_adapter_folder_names_its_base_as_the_user_did_and_pins_its_hub_revision(settings, monkeypatch, tmp_path):
    """Repro: an adapter trained on a hub model said `revision: null` in adapter_config.json, so PEFT's
    AutoPeftModelForCausalLM loaded whatever commit the hub had later under it; and its model card (README.md)
    named this machine's cache snapshot path as `base_model`, where adapter_config.json names the hub id."""
    import shutil

    import huggingface_hub.constants as hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(models.resolve_base(None, settings).path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    write_export(settings, make_records(16, val_every=6))
    for base, revision in (("acme/tiny", commit), (None, None)):  # a hub id, then the built-in luna-tiny
        result = run_lora(_params(baseModel=base, maxSteps=1), settings)
        assert result.ok, result.error
        config = json.loads((result.path / "adapter_config.json").read_text())
        card = (result.path / "README.md").read_text()
        name = base or "luna-tiny"
        assert config["base_model_name_or_path"] == name and config["revision"] == revision, config
        assert f'base_model: "{name}"\n' in card and str(settings.home) not in card and str(tmp_path) not in card, card
        assert ("(BASE: lunatrain's built-in model" in card) == (base is None), card


def test_training_gating_and_merging_ask_no_hub_and_leave_the_offline_flag_alone(settings, monkeypatch, tmp_path):
    """Explore repro: saving an adapter asked the hub whether its base's config.json exists (PEFT's check for a
    resized vocabulary names the base by its hub id) on every run of a hub base on a machine with internet,
    and so luna-tiny set HF_HUB_OFFLINE=1 in the process, which every trainer and rank it started inherited:
    there ASSISTANT_HUB_DOWNLOAD=true could not fetch a base and said to unset a variable the user never set.
    Now no step of a run looks anything up on the network, and the environment stays as the user set it."""
    import shutil
    import socket

    import huggingface_hub.constants as hub

    from lunatrain import evalgate, merge

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(models.ensure_tiny(settings), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # a machine with internet
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    def no_lookup(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    write_export(settings, make_records(16, val_every=6))
    for base in ("acme/tiny", None):  # a hub id, then the built-in luna-tiny
        result = run_lora(_params(baseModel=base, maxSteps=1, adapterName=f"net-{base is None}"), settings)
        assert result.ok, result.error
        ref = f"{result.report['adapterName']}@{result.report['version']}"
        assert evalgate.eval_gate(settings, adapter=ref, base_model=base).decision in ("pass", "fail")
        merge.merge_adapter(settings, ref)
    assert asked == []
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize(
    ("targets", "saved"), [("all-linear", False), (["q_proj", "lm_head"], True), (["embed_tokens"], True)]
)
def test_an_adapter_saves_the_embedding_layers_exactly_where_it_trains_one(settings, targets, saved):
    """What PEFT's "auto" decided from the targets, now decided without its hub lookup (see above)."""
    from peft import LoraConfig, get_peft_model

    from lunatrain.compat import saves_embeddings

    model = get_peft_model(models.load_model(None, settings), LoraConfig(r=2, target_modules=targets))
    assert saves_embeddings(model) is saved


def _cut_after_first_epoch(settings, job_id=None, **over):
    seen = []
    cut = run_lora(
        _params(**over),
        settings,
        on_event=seen.append,
        should_stop=lambda: any(e["type"] == "eval" and e["epoch"] == 1 for e in seen),
        job_id=job_id,
    )
    assert cut.status is Status.CANCELLED, cut.error


def test_an_unreadable_registry_is_said_before_the_run_trains(settings, monkeypatch):
    """SPEC audit repro: with the registry damaged, `lora --local` trained the whole run and only then refused
    to publish it (nothing lost, but the time of a whole run spent before the one sentence with its fix)."""
    from lunatrain.errors import RegistryUnreadable

    write_export(settings, make_records(8, val_every=4))
    path = registry.registry_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{broken")
    monkeypatch.setattr(train_mod, "prepare", lambda *a, **k: pytest.fail("the run prepared its model"))
    with pytest.raises(RegistryUnreadable, match="adapters repair"):
        run_lora(_params(), settings)
    assert path.read_text() == "{broken"


def test_a_second_resume_of_a_run_being_resumed_is_refused_and_changes_nothing(settings, monkeypatch):
    """Explore repro: two `lora --local --resume` of one checkpoint at once trained in the same work folder
    (each deleting the other's older checkpoints), and each registered a version: v1 and v2 of one run. The
    second is refused now while the first trains from the checkpoint (here: the folder held as a run holds it)."""
    from lunatrain.errors import Conflict
    from lunatrain.fsio import holding

    write_export(settings, make_records(16, val_every=6))
    _cut_after_first_epoch(settings)
    (work,) = [p for p in registry.work_root(settings, "luna-adapter").iterdir() if p.is_dir()]
    before = _files(work)
    monkeypatch.setattr(train_mod, "RESUME_PATIENCE_S", 0.0)
    with holding(work), pytest.raises(Conflict, match=r"Another process is training this run from its checkpoint"):
        run_lora(_params(resume=True), settings)
    assert _files(work) == before and registry.list_adapters(settings) == {}
    # Review repro: anything that held the folder for an instant (gc's look at it, an orphan of a stopped
    # trainer on its way out) refused the resume at once; it waits a little first.
    import threading

    monkeypatch.setattr(train_mod, "RESUME_PATIENCE_S", 600.0)  # far longer than the holder below needs
    held, release = threading.Event(), threading.Event()

    def briefly() -> None:
        with holding(work):
            held.set()
            release.wait(60)

    def taking(folder, **kw):  # the holder lets go shortly after the resume began to take the folder
        threading.Timer(0.3, release.set).start()
        return holding(folder, **kw)

    holder = threading.Thread(target=briefly)
    holder.start()
    held.wait(60)
    monkeypatch.setattr(train_mod, "holding", taking)
    resumed = run_lora(_params(resume=True), settings)
    holder.join()
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1, resumed.error
    # Resume repro: a second resume that got the folder once the first had finished (or a `jobs resume` queued
    # behind it) found no checkpoint, trained the run again from scratch and registered v2, the same weights.
    # The run is finished: said, naming its version, and nothing is trained or registered. A request the data
    # root's state refuses, exit 2 (as `jobs resume` of a succeeded job says it; it exited 1 here).
    with pytest.raises(UsageError, match=r"Nothing to resume: this run already finished as luna-adapter@v1") as done:
        run_lora(_params(resume=True), settings)
    assert done.value.code == "train.already_finished" and done.value.params["version"] == "v1"
    assert done.value.exit_code == 2
    assert [v["version"] for v in registry.list_adapters(settings)["luna-adapter"]["versions"]] == ["v1"]


def test_resume_follows_the_trained_tier_and_says_why_a_checkpoint_of_another_run_does_not_apply(settings):
    """Repro: a checkpoint matched its run by the fingerprint of the whole export, so approving an example of
    another tier or adding a memory item (the curated tier byte for byte the same) made `--resume` start over
    with "no checkpoint to resume from", a checkpoint beside it. Now the trained tier's own file counts, and a
    resume that cannot use the checkpoint there says what differs."""
    records = make_records(40, val_every=5)
    memory = [r for r in records if r["source"] == "memory"]
    curated_train = [r for r in records if r["source"] == "curated" and r["split"] == "train"]
    assert memory and curated_train
    write_export(settings, records)
    _cut_after_first_epoch(settings)
    write_export(settings, [r for r in records if r is not memory[0]])  # another tier changed, not curated
    resumed = run_lora(_params(resume=True), settings)
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1, resumed.error

    _cut_after_first_epoch(settings)
    write_export(settings, [r for r in records if r is not curated_train[0]])  # the trained tier changed
    logs = []
    fresh = run_lora(_params(resume=True), settings, on_event=logs.append)
    assert fresh.ok and fresh.report["resumedFromEpoch"] is None, fresh.error
    said = [e for e in logs if e.get("code") == "log.resume_other_run"]
    assert len(said) == 1, logs
    assert re.fullmatch(
        r"the checkpoint of epoch 1 in data/adapters/luna-adapter/\.work/[0-9a-f]{16}-[0-9a-f]{8} is of another "
        r"run \(other training data: the curated tier changed\); starting fresh",
        said[0]["message"],
    ), said[0]["message"]
    assert said[0]["params"]["differs"] == ["data"], said[0]


def test_a_checkpoint_of_another_number_of_processes_is_another_run(settings):
    """Review repro: a checkpoint saved by 2 data-parallel processes was resumed by 1 (or the other way): the
    step and the schedule it restored belong to the other number of steps per epoch, so epoch 2 trained one
    step of 31, or the run ended at step 47 of 62 with the learning rate never decayed, each published as a
    full run. N processes with batchSize b are one process with N·b: another run, which starts fresh in a
    work dir of its own (its checkpoints must not replace that one's) and says how to continue it."""
    write_export(settings, make_records(40, val_every=5))
    _cut_after_first_epoch(settings)
    (state,) = (settings.adapters_dir / "luna-adapter" / ".work").glob("*/checkpoints/epoch-001/state.json")
    saved = json.loads(state.read_text())
    assert saved["ranks"] == 1
    state.write_text(json.dumps(saved | {"ranks": 2}))  # as two processes under torchrun save it
    logs = []
    fresh = run_lora(_params(resume=True), settings, on_event=logs.append)
    assert fresh.ok and fresh.report["resumedFromEpoch"] is None, fresh.error
    (said,) = [e for e in logs if e.get("code") == "log.resume_other_run"]
    assert said["params"]["differs"] == ["ranks"], said
    assert re.fullmatch(
        r"the checkpoint of epoch 1 in data/adapters/luna-adapter/\.work/[0-9a-f]{16}-[0-9a-f]{8} is of another "
        r"run \(saved by 2 training processes, this run has 1: resume with 2 to continue it\); starting fresh",
        said["message"],
    ), said["message"]
    assert json.loads(state.read_text())["ranks"] == 2  # still there to be resumed by two


def test_a_checkpoint_saved_before_checkpoints_recorded_their_processes_is_one_processes(settings):
    """A checkpoint of an earlier release records no number of processes: it counts as one process's (nearly
    every run). Review repro: judging it by its step refused a one-process checkpoint whose epoch maxSteps had
    cut short, and said it was saved by another number of processes."""
    from lunatrain import checkpoints

    write_export(settings, make_records(40, val_every=5))
    _cut_after_first_epoch(settings)
    (state,) = (settings.adapters_dir / "luna-adapter" / ".work").glob("*/checkpoints/epoch-001/state.json")
    saved = json.loads(state.read_text())
    del saved["ranks"]
    state.write_text(json.dumps(saved | {"step": 3}))  # an epoch maxSteps cut short
    assert checkpoints.same_world(state, 1) and not checkpoints.same_world(state, 2)
    state.write_text(json.dumps(saved))
    resumed = run_lora(_params(resume=True), settings)
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1, resumed.error


def test_resume_continues_a_checkpoint_saved_before_checkpoints_recorded_their_run(settings):
    """Repro: after an upgrade, `--resume` of the very same run started fresh ("made before checkpoints
    recorded their run"): its checkpoint lay under the key of the old identity, which the new one never
    looked for."""
    import shutil

    from lunatrain.export import read_tier
    from lunatrain.train import legacy_run_key

    records = make_records(40, val_every=5)
    write_export(settings, records)
    _cut_after_first_epoch(settings)
    (state,) = (settings.adapters_dir / "luna-adapter" / ".work").glob("*/checkpoints/epoch-001/state.json")
    old = json.loads(state.read_text())
    del old["run"]  # as the old version wrote it
    state.write_text(json.dumps(old))
    key = legacy_run_key(_params(), models.resolve_base(None, settings), read_tier(settings, "curated"))
    work = state.parents[2]
    shutil.move(work, work.with_name(f"{key}-0000aaaa"))
    resumed = run_lora(_params(resume=True), settings)
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1, resumed.error


def test_resume_finds_its_checkpoint_when_the_same_base_weights_lie_at_another_path(settings):
    """Repro: after the data root was moved (`mv ~/luna ~/luna2`), `lora --local --resume` with a base model
    kept inside it started fresh: "the checkpoint of epoch 1 … is of another run (other parameters:
    baseModel)". The base's path was part of the run's identity beside its weights' fingerprint, so the same
    weights at a new path made another run. The weights count, not where they lie."""
    import shutil

    write_export(settings, make_records(40, val_every=5))
    tiny = models.resolve_base(None, settings)
    here, there = settings.models_dir / "mybase", settings.models_dir / "moved" / "mybase"
    shutil.copytree(tiny.path, here)
    _cut_after_first_epoch(settings, baseModel=str(here))
    shutil.copytree(here, there)
    logs: list = []
    resumed = run_lora(_params(baseModel=str(there), resume=True), settings, on_event=logs.append)
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1, (
        [e for e in logs if "resume" in str(e)],
        resumed.error,
    )


def test_resume_continues_a_checkpoint_saved_while_the_identity_held_the_base_models_name(settings):
    """The upgrade of the test above: checkpoints saved by the release whose run identity held the base
    model's name lie under that identity's key, which a resume still looks for."""
    import shutil

    from lunatrain.train import run_key

    write_export(settings, make_records(40, val_every=5))
    _cut_after_first_epoch(settings, job_id="ftjob-cut")
    (state,) = (settings.adapters_dir / "luna-adapter" / ".work").glob("*/checkpoints/epoch-001/state.json")
    old = json.loads(state.read_text())
    assert old["jobId"] == "ftjob-cut"  # recovery knows its job's checkpoint by it, not by clocks
    old["run"]["params"]["base_model"] = _params().base_model  # as that release recorded it
    state.write_text(json.dumps(old))
    work = state.parents[2]
    key = run_key(old["run"])  # that release's key: a hash of the identity it recorded
    moved = work.with_name(f"{key}-0000aaaa")
    shutil.move(work, moved)
    # review repro: one cut short there was passed over (the new run started fresh and said nothing), where one
    # under this release's key is refused as damaged
    saved = (moved / "checkpoints" / "epoch-001" / "state.json").read_text()
    (moved / "checkpoints" / "epoch-001" / "state.json").write_text(saved[:15])
    with pytest.raises(LunaError) as refused:
        run_lora(_params(resume=True), settings)
    assert refused.value.code == "checkpoint.damaged", refused.value.message
    (moved / "checkpoints" / "epoch-001" / "state.json").write_text(saved)
    resumed = run_lora(_params(resume=True), settings)
    assert resumed.ok and resumed.report["resumedFromEpoch"] == 1, resumed.error


def test_a_run_is_another_run_with_another_tokenizer_or_chat_template(settings):
    """Repro: the identity a checkpoint was matched by left out the tokenizer and the chat template, so a
    resume after the base model's template changed mixed two templates in one adapter, and the report named
    only the second."""
    import copy
    from types import SimpleNamespace

    from lunatrain import models
    from lunatrain.checkpoints import differences
    from lunatrain.train import run_identity

    data = write_export(settings, make_records(16, val_every=6))
    base = SimpleNamespace(fingerprint="b" * 64)
    tok = models.load_tokenizer(None, settings)
    ident = run_identity(_params(), base, data, tok)
    other_template = copy.deepcopy(tok)
    other_template.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    other_tokenizer = copy.deepcopy(tok)
    other_tokenizer.add_tokens(["<|tool|>"], special_tokens=True)
    cases = [
        (run_identity(_params(), base, data, other_template), ["template"], "another chat template"),
        (run_identity(_params(), base, data, other_tokenizer), ["tokenizer"], "another tokenizer"),
        (run_identity(_params(epochs=3), base, data, tok), ["params"], "other parameters: epochs"),
        (
            run_identity(_params(), SimpleNamespace(fingerprint="c" * 64), data, tok),
            ["base"],
            "other base model weights",
        ),
    ]
    for theirs, differs, said in cases:
        assert theirs != ident
        assert differences(ident, theirs) == (differs, said), differs
    assert differences(ident, {}) == ([], "made before checkpoints recorded their run")


def test_resume_continues_the_try_that_got_furthest(settings):
    """Repro: with checkpoints of several tries of one run, resume took whichever work dir's random suffix
    sorted last (epoch 1 over epoch 2), and the publish then deleted the better checkpoint."""

    from lunatrain.train import _work_dir, run_key

    params = _params(resume=True)
    identity = {"params": {}, "data": "d" * 64, "base": "b" * 64}
    root = settings.adapters_dir / params.adapter_name / ".work"
    key = run_key(identity)
    for suffix, epoch in (("0000aaaa", 2), ("ffffffff", 1), ("77777777", 1)):  # the furthest sorts first
        ckpt = root / f"{key}-{suffix}" / "checkpoints" / f"epoch-{epoch:03d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text("{}")
    assert _work_dir(params, settings, identity) == root / f"{key}-0000aaaa"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"rank": 0}, "rank"),
        ({"epochs": -1}, "epochs"),
        ({"datasetTier": "gold"}, "datasetTier"),
        ({"adapterName": "../x"}, "adapterName"),
        ({"learningRate": 0}, "learningRate"),
        ({"noSuchParam": 1}, "unknown parameter"),
    ],
)
def test_bad_parameters_give_one_clear_error_and_write_nothing(settings, bad, match):
    write_export(settings)
    before = _files(settings.home)
    with pytest.raises(UsageError, match=match) as err:
        run_lora(FAST | bad, settings)
    assert str(err.value).count("\n") == 0
    assert _files(settings.home) == before


def test_missing_export_and_missing_device_are_reported_together(settings, no_gpu):
    with pytest.raises(UsageError) as err:
        run_lora(_params(device="cuda"), settings)
    assert "export" in str(err.value) and "cuda" in str(err.value)
    assert _files(settings.home) == []


def test_nan_loss_fails_the_run_as_data(settings, monkeypatch):
    write_export(settings, make_records(24))
    real = train_mod.loss_sum
    calls = []

    def poisoned(run, batch):
        calls.append(1)
        loss = real(run, batch)
        return loss * float("nan") if run.model.training and len(calls) > 3 else loss

    monkeypatch.setattr(train_mod, "loss_sum", poisoned)
    result = run_lora(_params(), settings)
    assert result.status is Status.FAILED and result.error["code"] == "nan_loss"
    assert "luna-adapter" not in registry.list_adapters(settings)
    assert json.loads(settings.lora_latest_report.read_text())["error"]["code"] == "nan_loss"
    assert not (settings.adapters_dir / "luna-adapter" / "v1").exists()


def test_overwrite_replaces_one_slot_only_on_success(settings):
    write_export(settings, make_records(24))
    first = run_lora(_params(adapterStrategy="overwrite", epochs=1), settings)
    second = run_lora(_params(adapterStrategy="overwrite", epochs=1, seed=9), settings)
    assert first.version == second.version == "current"
    slot = settings.adapters_dir / "luna-adapter" / "current"
    assert slot.is_symlink() and (slot / "adapter_model.safetensors").is_file()
    assert len(list((settings.adapters_dir / "luna-adapter" / ".slots").iterdir())) == 1
    versions = registry.list_adapters(settings)["luna-adapter"]["versions"]
    assert [(v["version"], v["revision"], v.get("replaced", False)) for v in versions] == [
        ("current", 1, True),
        ("current", 2, False),
    ]
    assert registry.get_version(settings, "luna-adapter", "current")["revision"] == 2


@pytest.mark.slow
def test_on_the_bundled_dataset_the_adapter_beats_the_base(settings):
    """The whole data path: bundled seed → store → export → LoRA on the curated tier."""
    from lunatrain import store
    from lunatrain.export import export

    store.load_seed(settings)
    summary = export(settings)
    result = run_lora({"epochs": 3, "batchSize": 8, "rank": 8, "learningRate": 1e-2, "maxSeqLength": 512}, settings)
    assert result.ok, result.error
    m = result.report["metrics"]
    assert result.report["dataset"]["fingerprint"] == summary.fingerprint
    assert result.report["dataset"]["valSamples"] > 0
    assert m["valLoss"] < m["baseValLoss"] - 0.5, m
    # and better than a uniform guess over the vocabulary: it learned the data, not just undid the init
    vocab = models.load_model(None, settings).config.vocab_size
    assert m["valLoss"] < math.log(vocab), (m, vocab)


def test_plain_progress_lines_for_logs():
    import io

    from lunatrain.progress import ProgressDisplay

    out = io.StringIO()
    with ProgressDisplay(tty=False, stream=out, every=0) as display:
        display.on_event({"type": "eval", "epoch": 0, "valLoss": None, "baseValLoss": 8.0})
        display.on_event(
            {
                "type": "progress",
                "step": 2,
                "totalSteps": 4,
                "epoch": 1,
                "epochs": 2,
                "percent": 50.0,
                "loss": 7.5,
                "tokensPerSec": 1234.5,
                "etaSeconds": 75,
            }
        )
        display.on_event({"type": "log", "message": "done"})
    assert out.getvalue().splitlines() == [
        "epoch 0: base val loss 8.0000",
        "step 2/4 (50%) epoch 1 loss 7.5000 1,234 tok/s ETA 1:15",
        "done",
    ]


def test_the_progress_bar_on_a_terminal_draws_before_the_first_step():
    """Repro: `lora --local` and `luna --local` on a real terminal crashed at once (TypeError: unsupported
    format string passed to NoneType.__format__): the bar's `step {completed}/{total}` column was drawn while
    the total was still unknown (None, until the first step). It draws `step 0/?` until then."""
    import io

    from lunatrain.progress import ProgressDisplay

    out = io.StringIO()
    with ProgressDisplay(tty=True, stream=out) as display:
        display._progress.refresh()  # what rich's refresh thread does on a terminal within its first 0.1 s
        display.on_event({"type": "log", "message": "training 40 samples, 2 steps on cpu"})
        display.on_event(
            {"type": "progress", "step": 1, "totalSteps": 2, "epoch": 1, "epochs": 1, "percent": 50.0, "loss": 7.5}
        )
        display._progress.refresh()
    shown = out.getvalue()
    assert "step 1/2" in shown and "loss 7.5000" in shown, shown


def test_a_job_followed_from_the_trainer_reads_like_a_local_run():
    """Repro: `lunatrain lora` (following the trainer's job) printed "tok/s 1.155e+04", "log epoch 1 done: val
    loss 8.418889999389648, …" and "trained adapter={'name': 't1', …} metrics={…}" (Python reprs), where a
    local run says "11,550 tok/s" and "val loss 8.4189". One wording now serves both."""
    from lunatrain.cli.trainer import describe_event
    from lunatrain.service.jobs import Event

    def ev(kind: str, **data) -> Event:
        return Event.model_validate({"seq": 1, "createdAt": "2026-01-01T00:00:00Z", "type": kind, **data})

    step = {"step": 3, "totalSteps": 3, "epoch": 1, "percent": 100.0, "loss": 8.369, "tokensPerSec": 11549.7}
    assert describe_event(ev("progress", **step, etaSeconds=0)) == (
        "progress step 3/3 (100%) epoch 1 loss 8.3690 11,550 tok/s ETA 0:00"
    )
    assert describe_event(ev("eval", epoch=1, valLoss=8.418889, baseValLoss=8.466328)) == (
        "eval epoch 1: val loss 8.4189 base val loss 8.4663"
    )
    trained = ev(
        "trained",
        adapter={"name": "t1", "version": "v1", "path": "data/adapters/t1/v1"},
        metrics={"valLoss": 8.418889, "trainLoss": 8.453877, "steps": 3},
    )
    assert describe_event(trained) == (
        "trained adapter t1@v1 registered (data/adapters/t1/v1): val loss 8.4189, train loss 8.4539"
    )
    assert describe_event(ev("progress", step=1, totalSteps=None)) == "progress step 1/?"  # fields it lacks: left out
    # explore repro: a cancel read "status cancelled - cancelled"
    assert describe_event(ev("status", status="cancelled", message="cancelled")) == "status cancelled"
    assert describe_event(ev("status", status="failed", message="why")) == "status failed - why"


def test_an_epoch_without_a_validation_split_says_so_in_its_log(settings):
    """Repro: an export without val samples logged "epoch 1 done: val loss None, checkpoint saved"."""
    write_export(settings, make_records(24, val_every=10**6))
    events = []
    result = run_lora(_params(epochs=1, maxSteps=2), settings, on_event=events.append)
    assert result.status is Status.SUCCEEDED, result.error
    [said] = [e for e in events if e.get("code", "").startswith("log.epoch_done")]
    assert said["message"] == "epoch 1 done, checkpoint saved" and said["code"] == "log.epoch_done_no_val", said
    assert said["params"] == {"epoch": 1}


def test_older_transformers_without_masked_logits_give_the_same_loss(settings, monkeypatch):
    """Releases whose logits_to_keep takes no boolean mask get full logits, masked afterwards: same numbers."""
    from lunatrain import models, train
    from lunatrain.tokens import encode_chat, make_batch

    tok = models.load_tokenizer("luna-tiny", settings)
    model = models.load_model("luna-tiny", settings, "cpu")
    samples = [
        encode_chat(tok, m, 128)
        for m in (
            [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hallo, ich bin Luna."}],
            [{"role": "user", "content": "Wer bist du?"}, {"role": "assistant", "content": "Luna, deine Assistentin."}],
        )
    ]
    batch = make_batch(samples, 128, tok.pad_token_id, packing=True)
    with_mask, targets = train.forward_supervised(model, batch, "cpu")
    monkeypatch.setattr(train, "masked_logits_supported", lambda: False)
    full, targets2 = train.forward_supervised(model, batch, "cpu")
    assert with_mask.shape == full.shape and (targets == targets2).all()
    assert (with_mask - full).abs().max().item() < 1e-5


def test_the_training_report_names_every_field_in_camel_case(trained_root) -> None:
    """Repro: the report's dataset.export was the export summary as stored (exported_at, store_revision),
    while every other field, and POST /export, say exportedAt and storeRevision."""
    import re

    from lunatrain.settings import load_settings

    settings = load_settings(home=trained_root, db_url=None)
    report = json.loads(settings.lora_latest_report.read_text())
    snake = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")

    def snake_keys(obj: object, at: str = "") -> list[str]:
        if isinstance(obj, dict):
            return [f"{at}.{k}" for k in obj if snake.match(str(k))] + [
                x for k, v in obj.items() for x in snake_keys(v, f"{at}.{k}")
            ]
        return [x for v in obj for x in snake_keys(v, at)] if isinstance(obj, list) else []

    assert snake_keys(report) == []
    assert report["dataset"]["export"]["exportedAt"] and report["dataset"]["export"]["storeRevision"]


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EIO"])
def test_a_checkpoint_folder_that_cannot_be_put_in_place_is_named_in_the_storage_sentence(
    settings, monkeypatch, errno_name
):
    """Repro: when renaming the finished checkpoint folder into place failed (a full disk, an I/O error) the
    run failed with "OSError: [Errno 28] No space left on device": no path, none of the storage sentence that
    every file inside the checkpoint gets. It names the checkpoint, and no half-made folder stays."""
    import errno
    import pathlib

    write_export(settings, make_records(40, val_every=5))
    real = pathlib.Path.rename

    def rename(self, target):
        if pathlib.Path(target).name.startswith("epoch-"):
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
        return real(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    result = run_lora(_params(epochs=1, maxSteps=2), settings)
    monkeypatch.undo()
    assert result.status is Status.FAILED, result.error
    message = result.error["message"]
    start = "The disk is full: writing the checkpoint " if errno_name == "ENOSPC" else "Writing the checkpoint "
    assert message.startswith(start) and "checkpoints/epoch-001" in message, message
    assert result.error["code"] == ("disk_full" if errno_name == "ENOSPC" else "storage_error"), result.error
    assert not list(settings.adapters_dir.glob("luna-adapter/.work/*/checkpoints/.epoch-*"))


def test_a_latest_report_that_cannot_be_written_after_publishing_does_not_fail_the_run(settings, monkeypatch):
    """Repro: when lora-latest.json could not be written (a full disk) right after the new version was
    registered, the run failed with "… and the previous data is intact" while the version stood registered
    and was never gated (a rerun made the next one). The registry holds the run: it succeeds, and its events
    say that the latest report was not written."""
    import errno

    from lunatrain import fsio

    write_export(settings, make_records(40, val_every=5))

    def full(*_a, **_k):
        raise fsio.storage_error(OSError(errno.ENOSPC, "No space left on device"), settings.lora_latest_report)

    monkeypatch.setattr(registry, "write_latest", full)
    seen = []
    result = run_lora(_params(epochs=1, maxSteps=2), settings, on_event=seen.append)
    assert result.ok and result.version == "v1", result.error
    said = [e for e in seen if e.get("code") == "log.latest_report_unwritten"]
    assert len(said) == 1 and "The disk is full: writing " in said[0]["message"], seen[-3:]
    assert (result.path / registry.REPORT_FILE).is_file()  # the version's own report is there


def test_a_disk_filling_up_fails_the_run_as_disk_full_and_the_checkpoint_resumes_it(settings):
    """Repro: a disk that filled up while the adapter was saved ended the run `save_failed` with safetensors'
    "SafetensorError: … (os error 28)", and its half-written files then kept the failure report from being
    written (a DiskFull traceback out of run_lora); one that filled up at a checkpoint was code `error`.
    Now both are `disk_full` with the storage sentence, the partial save is gone, the checkpoint stays, and
    a resume once there is room publishes the run."""
    import subprocess

    import faults

    write_export(settings, make_records(40, val_every=5))
    params = {"epochs": 1, "maxSteps": 2}
    # 64k: not even the epoch checkpoint fits; 256k: the checkpoint and report fit, the saved adapter
    # (weights, then the 190 KB tokenizer) does not
    with faults.small_disk(settings.adapters_dir, "64k"):
        at_checkpoint = run_lora(_params(**params), settings)
    assert at_checkpoint.status is Status.FAILED and at_checkpoint.error["code"] == "disk_full", at_checkpoint.error
    assert "--resume" not in at_checkpoint.error["message"]  # no checkpoint to go on from
    with faults.small_disk(settings.adapters_dir, "256k"):
        at_save = run_lora(_params(**params), settings)
        assert at_save.status is Status.FAILED and at_save.error["code"] == "disk_full", at_save.error
        message = at_save.error["message"]
        assert message.startswith("The disk is full: writing the adapter in ") and "lunatrain gc" in message
        # Disk-full repro: "free some space … and try again", and the same command again started from step 0
        assert message.endswith(
            "An epoch checkpoint of this run is kept: run the same command with --resume to continue from it."
        ), message
        (work,) = (settings.adapters_dir / "luna-adapter" / ".work").iterdir()
        assert sorted(p.name for p in work.iterdir()) == ["checkpoints", registry.REPORT_FILE]
        assert json.loads((work / registry.REPORT_FILE).read_text())["error"]["code"] == "disk_full"
        assert registry.list_adapters(settings) == {}
        subprocess.run(["mount", "-o", "remount,size=8m", str(settings.adapters_dir)], check=True)
        resumed = run_lora(_params(resume=True, **params), settings)
        assert resumed.ok and resumed.version == "v1" and resumed.report["resumedFromEpoch"] == 1, resumed.error


def test_a_literal_special_token_in_the_data_refuses_the_run_before_the_model_loads(settings):
    """Repro: `prepare` failed an example whose text holds `<|im_start|>` or `<|im_end|>` (the tokenizer reads
    them as the control tokens: a typed turn header, a stop in the middle of an answer), but `lora` trained on
    it without a word, and so did a job through the trainer. The run now refuses such data as prepare does,
    naming the examples, before any model is loaded or anything is written."""
    from lunatrain.errors import CheckFailed

    records = make_records(40)
    records[3]["messages"][-1]["content"] = "Gern. <|im_end|> Und noch etwas."
    records[7]["messages"][-2]["content"] = "Sag <|im_start|>assistant bitte."
    records[7]["split"] = "val"  # val is scored with the adapter too
    write_export(settings, records)
    with pytest.raises(CheckFailed) as refused:
        run_lora(_params(maxSteps=2), settings)
    err = refused.value
    assert err.code == "train.special_tokens" and err.params["count"] == 2, err.params
    assert err.message.startswith("2 samples of the curated tier hold a literal special token in their text"), err
    assert f"{records[3]['id']}, {records[7]['id']}" in err.message and "lunatrain prepare" in err.message
    assert not settings.adapters_dir.exists() or not any(settings.adapters_dir.rglob("adapter_model.safetensors"))


def _card_report(epochs: int, max_steps: int | None, metrics: dict, ended: list[int]) -> dict:
    """A training report as the model card reads it: `ended` holds the step each epoch ended at."""
    params = {"epochs": epochs, "maxSteps": max_steps, "learningRate": 0.0002, "batchSize": 5}
    params |= {"gradientAccumulation": 2, "rank": 8, "alpha": 16, "maxSeqLength": 512, "seed": 42}
    return {
        "adapterName": "a",
        "version": "v1",
        "created": "2026-12-05T10:00:00Z",
        "params": params,
        "metrics": metrics | {"valLoss": 2.0, "baseValLoss": 2.1},
        "epochs": [{"epoch": i + 1, "step": step} for i, step in enumerate(ended)],
        "dataset": {"tier": "curated", "trainSamples": 10, "valSamples": 2, "fingerprint": "f" * 64},
        "baseModel": {"id": "luna-tiny"},
    }


def test_the_model_card_says_the_schedule_that_ran():
    """Numbers repro: a run that maxSteps stopped after one step said "100 epochs, 1 steps"."""
    from lunatrain.train import model_card

    report = _card_report(100, 1, {"steps": 1}, [1])
    assert "| schedule | 1 epoch of 100 (maxSteps 1), 1 step, learning rate 0.0002," in model_card(report)
    report["params"] |= {"epochs": 2, "maxSteps": None}
    report["metrics"]["steps"], report["epochs"] = 6, [{"epoch": 1, "step": 3}, {"epoch": 2, "step": 6}]
    assert "| schedule | 2 epochs, 6 steps, learning rate" in model_card(report)


def test_the_model_card_counts_a_last_epoch_maxsteps_cut_short_as_part_of_one():
    """Explore repro: maxSteps 40 at 25 steps an epoch stopped the run 1.6 epochs in; the card said "2 epochs,
    40 steps" (epochs begun, and as many as asked, so not even the maxSteps note)."""
    from lunatrain.train import model_card

    report = _card_report(2, 40, {"steps": 40, "totalSteps": 40, "stepsPerEpoch": 25}, [25, 40])
    assert "| schedule | 1.6 of 2 epochs (maxSteps 40), 40 steps, learning rate" in model_card(report)
    report["metrics"] |= {"steps": 1, "totalSteps": 1}
    report["params"] |= {"epochs": 100, "maxSteps": 1}
    report["epochs"] = [{"epoch": 1, "step": 1}]
    assert "| schedule | 0.04 of 100 epochs (maxSteps 1), 1 step, learning rate" in model_card(report)
    # review repro: 29 of 100 steps read "0.28" (29 / 100 * 100 is 28.999… in floating point)
    report["metrics"] |= {"steps": 29, "totalSteps": 29, "stepsPerEpoch": 100}
    report["params"] |= {"epochs": 3, "maxSteps": 29}
    assert "| schedule | 0.29 of 3 epochs (maxSteps 29), 29 steps" in model_card(report)
    report["metrics"]["stepsPerEpoch"] = 25
    report["metrics"] |= {"steps": 50, "totalSteps": 50}
    report["params"] |= {"epochs": 2, "maxSteps": 60}  # maxSteps beyond the schedule: the whole of it ran
    report["epochs"] = [{"epoch": 1, "step": 25}, {"epoch": 2, "step": 50}]
    assert "| schedule | 2 epochs, 50 steps, learning rate" in model_card(report)


def test_samples_a_short_max_seq_length_leaves_out_are_said(settings):
    """Numbers repro: `lora --maxSeqLength 16` said only "training 51 samples" (of 241): samples whose answer
    starts beyond the limit have nothing to train and were left out without a word (prepare, which says it,
    may not run before `lora` or an API job)."""
    records = make_records(40, val_every=5)
    for record in records[::3]:  # a third asks at length: their answers start beyond 128 tokens
        record["messages"][1]["content"] += " Bitte genau erklären." * 40
    write_export(settings, records)
    events: list[dict] = []
    result = run_lora(_params(maxSteps=1), settings, on_event=events.append)
    assert result.ok, result.error
    [said] = [e for e in events if e.get("code") == "log.samples_left_out"]
    stats = result.report["dataset"]["tokenStats"]
    p = said["params"]
    assert 0 < p["train"] == stats["train"]["noSupervised"] < p["trainTotal"] == stats["train"]["count"], said
    assert p["val"] == stats["val"]["noSupervised"] and p["maxSeqLength"] == 128, said
    assert said["message"].startswith(f"{p['train']} of {p['trainTotal']} train and {p['val']} of ")
    events.clear()
    assert run_lora(_params(maxSteps=1, maxSeqLength=1024), settings, on_event=events.append).ok  # all fit
    assert not [e for e in events if e.get("code") == "log.samples_left_out"]


def test_a_wall_clock_step_during_a_run_leaves_its_duration_as_long_as_it_took(settings, monkeypatch):
    """Repro: the clock stepped back an hour (an NTP correction, `date -s`) during a 15 s run, and its report
    said durationSeconds -3585 (status and `adapters show` too); a step forward made it an hour too long.
    A duration is measured on a clock that never steps."""
    import time

    write_export(settings, make_records(16, val_every=5))
    wall = time.time
    seen = []

    def stepped_back_at_the_first_step(event):
        seen.append(event)
        if event["type"] == "progress":
            monkeypatch.setattr(time, "time", lambda: wall() - 3600)

    cut = run_lora(
        _params(epochs=1, maxSteps=2),
        settings,
        on_event=stepped_back_at_the_first_step,
        should_stop=lambda: any(e["type"] == "progress" for e in seen),
    )
    assert cut.status is Status.CANCELLED, cut.error
    assert 0 < cut.report["durationSeconds"] < 600, cut.report["durationSeconds"]


def test_the_model_card_of_a_data_parallel_run_says_the_batch_a_step_took():
    """Explore repro: two processes with batchSize 4 took 8 samples a step, and the card said "batch 4 x 1";
    only the training report named the second process."""
    from lunatrain.train import model_card

    report = _card_report(2, None, {"steps": 6}, [3, 6])
    assert "batch 5 x 2, rank" in model_card(report)  # one process: as before
    report["dataParallel"] = {"ranks": 2, "backend": "nccl"}
    assert "batch 5 x 2 on each of 2 processes (20 samples a step), rank" in model_card(report)
    report["dataParallel"] = {"ranks": 1, "backend": None}
    assert "batch 5 x 2, rank" in model_card(report)


def test_running_out_of_memory_is_said_as_such_with_what_lowers_the_peak(settings, monkeypatch):
    """Review repro: a CUDA out-of-memory inside the loop ended `lora --local` with code `error` and torch's
    page-long text (the trainer path called the same failure `out_of_memory`), and neither said what lowers
    the peak."""
    import torch

    write_export(settings, make_records(24, val_every=6))
    real, calls = train_mod.loss_sum, [0]

    def out_of_memory(run, batch):
        if run.model.training:
            calls[0] += 1
            if calls[0] == 2:
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 3.91 GiB. GPU 0 has a total capacity of 23.68 GiB of which "
                    "1.02 GiB is free.\nIncluding non-PyTorch memory, this process has 22.64 GiB memory in use."
                )
        return real(run, batch)

    monkeypatch.setattr(train_mod, "loss_sum", out_of_memory)
    result = run_lora(_params(epochs=1), settings)
    assert result.status is Status.FAILED and result.error["code"] == "out_of_memory", result.error
    message = result.error["message"]
    assert "CUDA out of memory. Tried to allocate 3.91 GiB" in message and "non-PyTorch" not in message, message
    assert "--gradientCheckpointing=true" in message and "--quantize=4bit" in message, message
    latest = json.loads(settings.lora_latest_report.read_text())
    assert latest["error"]["code"] == "out_of_memory"


def test_validation_runs_micro_batches_no_larger_than_the_planned_ones(settings, monkeypatch):
    """Review repro: validation ran max(batchSize, 8) samples a forward pass, which the memory plan never
    counts: a user who lowered --batchSize to fit (as the plan advises) could still run out of memory in the
    base model's validation, the first thing a run does."""
    write_export(settings, make_records(40, val_every=3))
    real, sizes = train_mod.batch_of, []

    def recording(run, samples):
        if not run.model.training:
            sizes.append(len(samples))
        return real(run, samples)

    monkeypatch.setattr(train_mod, "batch_of", recording)
    result = run_lora(_params(epochs=1, batchSize=2, maxSteps=1), settings)
    assert result.ok, result.error
    assert sizes and max(sizes) == 2, sizes


def test_out_of_memory_is_told_by_its_kind_not_by_any_text_that_mentions_it():
    """Review repro: torch's CPU allocator failing was code `error`; a message that merely quoted "out of
    memory" got the memory advice; MemoryError() read "(MemoryError:)"; the advice named options the run
    already used."""
    import torch

    from lunatrain.params import LoraParams
    from lunatrain.train import failure

    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried"
    )
    assert failure(cpu, "error")["code"] == "out_of_memory"
    assert failure(RuntimeError("the answer says: I ran out of memory yesterday"), "error")["code"] == "error"
    bare = failure(MemoryError(), "error")
    assert bare["code"] == "out_of_memory" and bare["message"].startswith("The device ran out of memory (MemoryError);")
    tight = LoraParams(gradient_checkpointing="true", quantize="4bit", batch_size=1)
    said = failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"), "error", params=tight)[
        "message"
    ]
    assert "--gradientCheckpointing" not in said and "--quantize" not in said and "--batchSize" not in said, said
    assert said.endswith("lower the run's peak with a smaller --maxSeqLength."), said


def test_a_max_steps_beyond_the_schedule_is_said(settings):
    """Explore repro: `--maxSteps=500` on a schedule of 6 steps ran 6 without a word; users of other trainers
    expect max_steps to override the epochs. It is a cap: the run says so."""
    write_export(settings, make_records(24, val_every=6))
    logs = []
    result = run_lora(_params(epochs=1, maxSteps=500), settings, on_event=logs.append)
    assert result.ok, result.error
    (said,) = [e for e in logs if e.get("code") == "log.max_steps_beyond"]
    steps = result.report["metrics"]["steps"]
    assert said["message"] == (
        f"maxSteps 500 is beyond the {steps} steps the schedule holds (1 epoch): the run ends after them"
    )
    logs.clear()
    assert run_lora(_params(epochs=1, maxSteps=2), settings, on_event=logs.append).ok
    assert not [e for e in logs if e.get("code") == "log.max_steps_beyond"]


@pytest.mark.parametrize(
    ("kind", "message", "oom"),
    [
        ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB", True),
        ("AcceleratorError", "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
        ("RuntimeError", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
        ("RuntimeError", "MPS backend out of memory (MPS allocated: 8 GB)", True),
        (
            "RuntimeError",
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried",
            True,
        ),
        ("OSError", "[Errno 12] Cannot allocate memory", True),
        ("MemoryError", "", True),
        ("RuntimeError", "the model said: CUDA out of memory is a common error", False),
        ("ValueError", "I ran out of memory yesterday", False),
    ],
)
def test_the_loop_and_the_trainer_tell_out_of_memory_alike(kind, message, oom):
    """Review repro: the loop's and the trainer's detectors disagreed (ENOMEM, a message that quotes the
    words), and torch's "CUDA error: out of memory" and cuBLAS's allocation failure were no longer said as
    out of memory."""
    from lunatrain.service.worker import _is_oom
    from lunatrain.train import out_of_memory

    exc = type(kind, (RuntimeError,), {})(message)
    assert out_of_memory(exc) is oom
    assert _is_oom(f"{kind}: {message}" if message else kind) is oom


@pytest.mark.parametrize("when", ["epoch", "last step"])
def test_a_run_whose_data_root_moves_writes_nothing_at_the_old_path(tmp_path, when):
    """Move-root repro: a folder above the data root renamed while a run trained (`mv ~/work ~/work-old`): the run
    went on writing at the old path, making a whole new data root there (its checkpoints, the adapter, a
    registry with it active, the reports), and `luna` said the new version was active while the moved root got
    nothing. The run stops before it writes there, with a sentence saying why; the moved root is as it was."""
    from lunatrain.settings import load_settings

    settings = load_settings(home=tmp_path / "work" / "root")
    write_export(settings, make_records(24))
    params = parse_params(FAST | {"epochs": 2, "adapterName": "moved"})
    moved = []

    def on_event(event):
        # at the first epoch's end (before its checkpoint), or at the last step (before the adapter is published)
        now = (
            event.get("type") == "eval"
            if when == "epoch"
            else event.get("type") == "progress" and event["step"] == event["totalSteps"]
        )
        if now and not moved:
            (tmp_path / "work").rename(tmp_path / "work-old")
            moved.append(True)

    result = run_lora(params, settings, on_event=on_event)
    assert moved and not result.ok and result.error["code"] == "storage.root_moved", result.error
    assert "was moved or replaced while this run trained" in result.error["message"]
    assert not (tmp_path / "work").exists(), sorted(p for p in (tmp_path / "work").rglob("*"))
    old = load_settings(home=tmp_path / "work-old" / "root")
    assert registry.load(old)["adapters"].get("moved") is None


@pytest.mark.parametrize("where", ["loss", "gradient norm"])
def test_a_run_that_diverges_fails_and_says_what_to_change_whichever_check_sees_it(settings, monkeypatch, where):
    """Explore repro: a divergence that the gradient-norm check caught first (the loss still finite; the tiny
    Llama, Qwen2, Phi-3 and Mistral shapes at a high learning rate) said only "gradient norm became nan at step
    3.", where the loss check says what to do."""
    write_export(settings, make_records(40, val_every=5))
    if where == "loss":
        monkeypatch.setattr(train_mod, "loss_sum", lambda run, batch: torch.tensor(float("nan"), requires_grad=True))
    else:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, limit: torch.tensor(float("nan")))
    failed = run_lora(_params(epochs=1, maxSteps=2), settings)
    assert failed.status is Status.FAILED and failed.version is None and failed.error["code"] == "nan_loss"
    assert failed.error["message"] == f"{where} became nan at step 1; lower the learning rate or check the data."


def _cut_after_epoch_1(settings) -> Path:
    """A run cancelled after its first epoch's checkpoint: that checkpoint's state.json."""
    write_export(settings, make_records(40, val_every=5))
    seen = []
    cut = run_lora(
        _params(),
        settings,
        on_event=seen.append,
        should_stop=lambda: any(e["type"] == "eval" and e["epoch"] == 1 for e in seen),
    )
    assert cut.status is Status.CANCELLED
    [state] = list(settings.adapters_dir.glob("luna-adapter/.work/*/checkpoints/epoch-*/state.json"))
    return state


@pytest.mark.parametrize("fault", ["out of memory", "state unreadable"])
def test_a_sound_checkpoint_the_machine_cannot_load_is_not_called_damaged(settings, monkeypatch, fault):
    """Review repro: an out-of-memory while the checkpoint loaded, or a state.json this user may not read, was
    said as a damaged checkpoint, with the advice to remove a sound one. Each is said as what it is."""
    import peft

    from lunatrain.errors import LunaError

    state = _cut_after_epoch_1(settings)
    if fault == "out of memory":

        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

        monkeypatch.setattr(peft, "set_peft_model_state_dict", oom)
    else:
        real = Path.read_text

        def denied(self, *args, **kwargs):
            if self == state:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", denied)
    try:
        result = run_lora(_params(resume=True), settings)
        code, message = result.error["code"], result.error["message"]
    except LunaError as err:
        code, message = err.code, err.message
    assert code == ("out_of_memory" if fault == "out of memory" else "storage_error"), (code, message)
    assert "remove that folder" not in message and state.is_file(), message


@pytest.mark.parametrize(
    "damage",
    [
        "adapter cut short",
        "optimizer missing",
        "epoch a string",
        "paramGroups a string",
        "scheduler a string",
        "state cut short",
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_way_out_not_a_raw_exception(settings, damage):
    """Corruption repro: a cut-short adapter.safetensors, a missing optimizer.safetensors or a state.json with a
    wrong type made every `--resume` (and `jobs resume`) fail with a raw SafetensorError, FileNotFoundError or
    TypeError naming no file; a cut-short state.json was passed over and the run started fresh, saying nothing."""
    from lunatrain.errors import LunaError

    state = _cut_after_epoch_1(settings)
    ckpt = state.parent
    file = {"adapter cut short": "adapter.safetensors", "optimizer missing": "optimizer.safetensors"}.get(
        damage, "state.json"
    )
    if damage == "adapter cut short":
        data = (ckpt / file).read_bytes()
        (ckpt / file).write_bytes(data[: len(data) // 2])
    elif damage == "optimizer missing":
        (ckpt / file).unlink()
    elif damage == "state cut short":
        state.write_text(state.read_text()[:15])
    else:
        key = damage.split()[0]
        state.write_text(json.dumps(json.loads(state.read_text()) | {key: "two"}))
    try:
        result = run_lora(_params(resume=True), settings)
        assert result.status is Status.FAILED, result.status
        code, message = result.error["code"], result.error["message"]
    except LunaError as err:
        code, message = err.code, err.message
    assert code == "checkpoint.damaged", (code, message)
    where = settings.shown(ckpt)
    assert message.startswith(f"The checkpoint {where} is damaged ({file}"), message
    assert "without --resume" in message and "Traceback" not in message, message
    assert state.parent.is_dir()  # it stays: the user decides


@pytest.mark.parametrize(
    "base", ["models/llama: v2 #1", "Qwen/Qwen2.5-0.5B-Instruct", "bases/llama", "models/a\x7fb\x85c\u2028d\ufffe é"]
)
def test_the_model_cards_front_matter_reads_back_the_base_and_says_where_a_local_one_is(base):
    """Explore repros: a base folder named `llama: v2 #1` (which lunatrain takes) broke the card's YAML front
    matter (`huggingface_hub.ModelCard.load` raised; with ` #` alone the name was cut there); and a base
    given by a folder was named as BASE with nothing saying where that folder is."""
    import yaml

    from lunatrain.train import model_card

    report = _card_report(1, None, {"steps": 3}, [3])
    report["baseModel"] = {"id": base, "revision": "0" * 40 if base.startswith("Qwen/") else None}
    card = model_card(report)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == base and front["library_name"] == "peft", front
    local = "(BASE: the base model's folder; a relative one is under the data root)"
    assert (local in card) == (not base.startswith("Qwen/")), card
