"""QLoRA on luna-tiny: the base held in 4 bits (NF4, double quantization) or 8 bits trains an ordinary PEFT
adapter for the full-precision base, and merge uses the full-precision weights. On CPU here; where a GPU
is visible, `device: auto` trains there (computing in bfloat16 where it is supported), and the same tests
check that path.
Run: `pytest tests/test_qlora.py -q`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lunatrain import models, registry, train
from lunatrain.merge import merge_adapter
from lunatrain.params import parse_params

from helpers import make_records, write_export, write_small_suite

FAST = {"epochs": 3, "batchSize": 8, "rank": 8, "learningRate": 1e-2, "maxSeqLength": 128, "seed": 3}


def _spy_base_layers(monkeypatch) -> dict:
    """Record the class of the layers the LoRA wraps, as training sees them."""
    seen: dict = {}
    real = train.load_lora_model

    def spy(*args, **kwargs):
        model, chosen, loss = real(*args, **kwargs)
        q = model.get_base_model().model.layers[0].self_attn.q_proj
        seen["base_layer"] = type(q.base_layer).__name__
        seen["loss"] = loss
        return model, chosen, loss

    monkeypatch.setattr(train, "load_lora_model", spy)
    return seen


def test_4bit_trains_an_ordinary_adapter_that_merges_into_the_full_precision_base(settings, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file

    write_export(settings, make_records(48))
    seen = _spy_base_layers(monkeypatch)
    result = train.run_lora(parse_params(FAST | {"quantize": "4bit", "adapterName": "q4"}), settings)
    assert result.ok, result.error
    assert seen["base_layer"] == "Linear4bit" and seen["loss"]["path"] == "chunked"
    m = result.report["metrics"]
    assert m["valLoss"] < m["baseValLoss"] - 0.3, m  # it learned, in 4 bits
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    compute = "bfloat16" if bf16 else "float32"  # the compute dtype train.py chooses for the device
    expected = {"method": "bitsandbytes", "bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": compute}
    assert result.report["quantization"] == expected and result.report["params"]["quantize"] == "4bit"
    assert registry.get_version(settings, "q4", "v1")["quantization"] == expected

    # an ordinary PEFT adapter: float32 LoRA matrices only, loading on the unquantized base
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "luna-tiny" and config["r"] == 8
    tensors = load_file(str(result.path / "adapter_model.safetensors"))
    assert tensors and all(("lora_A" in k or "lora_B" in k) and v.dtype == torch.float32 for k, v in tensors.items())
    base = models.load_model(None, settings).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(result.path)).eval()
        assert type(tuned.get_base_model().model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
        with_adapter = tuned(input_ids=ids).logits
    assert (with_adapter - plain).abs().max() > 1e-3

    # merge: W + scale * B @ A on the float32 weights of the base, never on dequantized 4-bit ones
    merged_dir = merge_adapter(settings, "q4@v1").path
    merged = load_file(str(merged_dir / "model.safetensors"))
    original = load_file(str(models.resolve_base(None, settings).path) + "/model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    delta = (config["lora_alpha"] / config["r"]) * (b @ a)
    torch.testing.assert_close(merged[key], original[key] + delta, atol=1e-6, rtol=0)
    nf4 = _nf4_roundtrip(original[key])
    assert (nf4 - original[key]).abs().max() > 100 * 1e-6  # 4-bit weights would be far outside that tolerance
    assert torch.equal(merged["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def _nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state)


def test_a_4bit_trained_adapter_is_gated_on_the_base_loaded_in_4_bits(settings, monkeypatch):
    """The gate loaded the base in bfloat16 (or float32) whatever the run trained on: a 13B model that trains
    in 4 bits on a 16 GB card needed 26 GB before the gate evaluated anything, so `luna --quantize 4bit` could
    train there and not be gated. The gate loads it as the candidate trained (and its baseline and the base's
    losses with it, said where the baseline trained otherwise); a process that cannot quantize gates in full
    precision and says so."""
    from lunatrain import compat, evalgate

    write_export(settings, make_records(48))
    write_small_suite(settings)  # how the gate loads the models, not its cases
    for quantize in ("none", "4bit"):  # q@v1 unquantized, q@v2 in 4 bits
        run = train.run_lora(parse_params(FAST | {"quantize": quantize, "adapterName": "q", "maxSteps": 1}), settings)
        assert run.ok, run.error
    loaded = []
    real = models.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        layer = model.model.layers[0].self_attn.q_proj
        loaded.append((kwargs.get("quantize", "none"), type(layer).__name__))
        return model

    monkeypatch.setattr(models, "load_model", spy)
    plain = evalgate.eval_gate(settings, adapter="q@v1")
    assert loaded == [("none", "Linear")] and "quantize" not in plain.context  # as records have it
    registry.activate(settings, "q", "v1")  # never gated: evaluated as v2's baseline
    report = evalgate.eval_gate(settings, adapter="q@v2")
    assert loaded[1:] == [("4bit", "Linear4bit")] and report.candidate["quantize"] == "4bit"
    assert report.context["quantize"] == "4bit" and report.metrics["valLoss"] is not None
    assert report.baseline["ref"] == "q@v1" and report.baseline["source"] == "evaluated", report.baseline
    # review repro: the unquantized baseline was measured on the 4-bit base without a word
    assert (
        "the active q@v1, trained unquantized, was measured on the base loaded in 4bit as the candidate trained, "
        "not as it is served" in report.notes
    ), report.notes
    # a process that loaded PEFT without bitsandbytes cannot quantize any more: full precision, said
    monkeypatch.setattr(compat, "with_bitsandbytes", lambda: (_ for _ in ()).throw(RuntimeError("loaded")))
    fallback = evalgate.eval_gate(settings, adapter="q@v2")
    assert loaded[2:] == [("none", "Linear")] and fallback.candidate["quantize"] == "none"
    assert (
        "the base model was loaded unquantized, not in 4bit as the adapter trained (this process loaded PEFT "
        "without bitsandbytes)" in fallback.notes
    ), fallback.notes


def test_8bit_trains_an_adapter(settings, monkeypatch):
    write_export(settings, make_records(48))
    seen = _spy_base_layers(monkeypatch)
    result = train.run_lora(parse_params(FAST | {"quantize": "8bit", "adapterName": "q8"}), settings)
    assert result.ok, result.error
    assert seen["base_layer"] == "Linear8bitLt"
    m = result.report["metrics"]
    assert m["valLoss"] < m["baseValLoss"] - 0.3, m
    assert result.report["quantization"]["bits"] == 8
    # explore repro: the report's packages left bitsandbytes out, whose version decides the weights trained
    from importlib import metadata

    assert result.report["packages"]["bitsandbytes"] == metadata.version("bitsandbytes")


def test_full_precision_runs_record_no_quantization(settings):
    write_export(settings, make_records(24, val_every=6))
    result = train.run_lora(parse_params(FAST | {"epochs": 1, "maxSteps": 1, "adapterName": "fp"}), settings)
    assert result.ok and result.report["quantization"] is None and "bitsandbytes" not in result.report["packages"]
    assert registry.get_version(settings, "fp", "v1")["quantization"] is None


def test_quantization_config_is_qlora_recipe():
    config = models.quantization_config("4bit", torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert models.quantization_config("8bit", torch.float32).load_in_8bit
    with pytest.raises(Exception, match="quantize must be none, 4bit or 8bit"):
        models.quantization_config("2bit", torch.float32)


def test_an_eval_pass_leaves_4bit_gradients_intact(settings):
    """bitsandbytes repacks a 4-bit layer for a faster CPU kernel the first time it runs in eval mode
    without gradients (on CPUs with AVX512-BF16), and that kernel has no backward: training after the base
    validation loss would silently lose the gradients through every quantized layer. The loader turns the
    repacking off; the LoRA gradients after an eval pass are those before it."""
    from peft import LoraConfig, get_peft_model

    info = models.resolve_base(None, settings)
    torch.manual_seed(0)
    model = models.load_model(info, settings, "cpu", torch.float32, "4bit")
    model = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def grads():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads()
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert before[first].abs().max() > 0
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, msg=name)


# --- bitsandbytes only where something quantizes (compat.without_bitsandbytes) -----------------------------

_WITHOUT = """
import sys
from lunatrain import compat
compat.without_bitsandbytes()
import peft, transformers
from peft.import_utils import is_bnb_available
from transformers.utils import is_bitsandbytes_available
assert sys.modules["bitsandbytes"] is None and not is_bnb_available() and not is_bitsandbytes_available()
assert "torch._inductor.compile_fx" not in sys.modules  # what bitsandbytes would have imported
try:
    compat.with_bitsandbytes()
except RuntimeError as exc:
    print(exc)
"""


@pytest.mark.slow
def test_a_process_that_will_not_quantize_loads_peft_without_bitsandbytes(settings):
    out = subprocess.run([sys.executable, "-c", _WITHOUT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "quantized training needs a new process" in out.stdout


@pytest.mark.slow
def test_the_command_line_trains_quantized_although_it_starts_without_bitsandbytes(settings):
    """`lunatrain` marks bitsandbytes absent at start (cli.main); `lora --local --quantize 4bit` lifts that
    before PEFT is imported, so the adapter trains on 4-bit layers."""
    write_export(settings, make_records(24, val_every=6))
    flags = ["--local", "--quantize", "4bit", "--adapterName", "q4cli", "--epochs", "1", "--maxSteps", "1"]
    flags += ["--minCurated", "0"]  # 24 records: fewer than the luna profile asks for
    env = os.environ | {"ASSISTANT_HOME": str(settings.home)}
    out = subprocess.run(
        [sys.executable, "-m", "lunatrain", "lora", *flags, "--no-gate", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=settings.home,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert registry.get_version(settings, "q4cli", "v1")["quantization"]["bits"] == 4


@pytest.mark.slow
def test_the_luna_flow_trains_quantized_although_its_gate_step_loads_peft_first(settings):
    """`luna --quantize 4bit --local` ended in a traceback ("this process loaded PEFT without bitsandbytes"):
    its first step, the eval gate, loaded PEFT before the lora step could lift the mark. The flow lifts it
    before its first step when the run quantizes."""
    from lunatrain import evalsuite, store

    store.load_seed(settings)
    store.dispose_stores()
    # Two golden cases with short answers: the gate loads PEFT all the same, and the untrained model's
    # answers to the whole shipped suite (up to 128 tokens each, twice) would be a good part of the run.
    shipped = (evalsuite.shipped_suite_dir() / "luna-golden.jsonl").read_text("utf-8").splitlines()
    cases = [json.loads(line) | {"maxNewTokens": 8} for line in shipped[:2]]
    settings.eval_dir.mkdir(parents=True, exist_ok=True)
    (settings.eval_dir / "luna-golden.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases), "utf-8")
    flags = ["--local", "--quantize", "4bit", "--adapterName", "q4luna", "--epochs", "1", "--maxSteps", "1"]
    env = os.environ | {"ASSISTANT_HOME": str(settings.home)}
    out = subprocess.run(
        [sys.executable, "-m", "lunatrain", "luna", *flags], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: the gate may refuse a one-step adapter
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert registry.get_version(settings, "q4luna", "v1")["quantization"]["bits"] == 4


def test_with_bitsandbytes_lifts_the_mark_only_before_peft_is_imported(monkeypatch):
    import importlib.util

    from lunatrain import compat

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    peft_module = sys.modules.get("peft")
    monkeypatch.delitem(sys.modules, "peft", raising=False)
    compat.without_bitsandbytes()
    assert sys.modules["bitsandbytes"] is None and importlib.util.find_spec("bitsandbytes") is None
    compat.with_bitsandbytes()
    assert "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is not None
    compat.without_bitsandbytes()
    monkeypatch.setitem(sys.modules, "peft", peft_module)
    with pytest.raises(RuntimeError, match="quantized training needs a new process"):
        compat.with_bitsandbytes()
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    compat.without_bitsandbytes()  # PEFT loaded: no effect
    assert "bitsandbytes" not in sys.modules


def test_chat_serves_on_the_base_loaded_in_4_bits_when_asked(tmp_path, monkeypatch):
    """A QLoRA user (a 13B base trained in 4 bits on a 16 GB card) could not chat with the adapter: `serve` loaded
    the base unquantized, 26 GB, and its answers were not those of the base the gate judged. With
    ASSISTANT_CHAT_QUANTIZE=4bit the chat loads the base in 4 bits, and the base and its adapters answer."""
    from chat_helpers import random_adapter

    from lunatrain import serving
    from lunatrain.settings import load_settings

    monkeypatch.setenv("ASSISTANT_CHAT_QUANTIZE", "4bit")
    settings = load_settings(home=tmp_path)
    assert settings.chat_quantize == "4bit"
    random_adapter(settings, "luna-adapter", 1)
    registry.activate(settings, "luna-adapter", "v1")
    engine = serving.Engine(settings)
    hello = [{"role": "user", "content": "Wie heißt mein Hund?"}]
    greedy = serving.Sampling(max_tokens=4, temperature=0)
    answers = {}
    for model in ("luna-tiny", "luna-adapter"):
        gen = engine.start(engine.resolve(model), hello, greedy)
        gen.run()
        answers[model] = gen.new_ids
        assert gen.new_ids, model
    base = engine.model.get_base_model() if hasattr(engine.model, "get_base_model") else engine.model
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert answers["luna-tiny"] != answers["luna-adapter"]  # the adapter is applied on the 4-bit base
    # OpenAI's system_fingerprint changes with what answers: the quantized base is another backend
    from dataclasses import replace

    from lunatrain.api.routes.chat import _fingerprint

    target = engine.resolve("luna-adapter")
    assert target.quantize == "4bit" and _fingerprint(target) != _fingerprint(replace(target, quantize="none"))


def test_serve_refuses_a_chat_quantization_it_cannot_load(tmp_path, monkeypatch):
    """An unknown ASSISTANT_CHAT_QUANTIZE, or 4bit where bitsandbytes is not installed, is one sentence before
    anything listens (not a 500 at the first chat request)."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path))
    monkeypatch.setenv("ASSISTANT_API_PORT", "0")
    monkeypatch.setenv("ASSISTANT_CHAT_QUANTIZE", "3bit")
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2 and "ASSISTANT_CHAT_QUANTIZE" in r.output and "4bit" in r.output, r.output
    monkeypatch.setenv("ASSISTANT_CHAT_QUANTIZE", "8bit")
    monkeypatch.setattr(models, "_installed", lambda name: name != "bitsandbytes")
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2 and "quantize=8bit needs bitsandbytes" in r.output, r.output
    assert not (tmp_path / "data" / "api" / "api.url").exists()


def test_serve_lifts_the_bitsandbytes_mark_so_its_gate_judges_a_qlora_adapter_in_4_bits(
    tmp_path, monkeypatch, dead_port
):
    """Explore repro: in `serve` without ASSISTANT_CHAT_QUANTIZE, POST /eval-gate judged a 4-bit-trained adapter
    on the 4-bit base only until the first adapter chat imported PEFT, which the console script had made without
    bitsandbytes; from then on on the full-precision base ("this process loaded PEFT without bitsandbytes"). The
    server lifts the mark at start, whatever it serves: the import is paid once, at PEFT's first use."""
    from typer.testing import CliRunner

    from lunatrain import compat
    from lunatrain.cli import app

    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path))
    monkeypatch.setenv("ASSISTANT_API_PORT", str(dead_port))  # held: serve stops at its bind, after its set-up
    monkeypatch.delenv("ASSISTANT_CHAT_QUANTIZE", raising=False)
    monkeypatch.delitem(sys.modules, "peft", raising=False)
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    compat.without_bitsandbytes()  # as the console script starts every command
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2 and "in use" in r.output, r.output
    assert sys.modules.get("bitsandbytes", "lifted") is not None


def test_an_adapter_trained_in_4_bits_and_served_in_full_precision_is_said_in_the_log(tmp_path, caplog):
    """Explore repro: a QLoRA adapter was served on the full-precision base (as the README says) without a word at
    run time: the server's log says so when it loads the adapter, and how to serve it as it trained."""
    import json
    import logging

    from chat_helpers import random_adapter

    from lunatrain import serving
    from lunatrain.settings import Settings

    settings = Settings(home=tmp_path)
    random_adapter(settings, "luna-adapter", 1)
    path = registry.registry_path(settings)
    data = json.loads(path.read_text())
    data["adapters"]["luna-adapter"]["versions"][0]["quantization"] = {"bits": 4, "quantType": "nf4"}
    path.write_text(json.dumps(data))
    engine = serving.Engine(settings)
    target = engine.resolve("luna-adapter@v1")
    assert target.trained_bits == 4 and target.quantize == "none"
    with caplog.at_level(logging.WARNING, logger="lunatrain.serving"):
        gen = engine.start(
            target, [{"role": "user", "content": "Hallo"}], serving.Sampling(max_tokens=2, temperature=0)
        )
        gen.run()
    said = [r.getMessage() for r in caplog.records if r.name == "lunatrain.serving"]
    assert said == [
        "luna-adapter@v1 was trained on the base model loaded in 4 bits; chat serves it on the base in full "
        "precision (ASSISTANT_CHAT_QUANTIZE=4bit serves it as it trained)"
    ], said
