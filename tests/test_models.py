"""Base model loading and the built-in luna-tiny model. Run: `pytest tests/test_models.py -q`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from lunatrain import models
from lunatrain.errors import DamagedFile, UsageError
from lunatrain.settings import load_settings


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_luna_tiny_is_built_with_identical_bytes(settings, tmp_path, monkeypatch):
    # two real builds: each with an empty machine cache of its own
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-1"))
    first = models.resolve_base(None, settings)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-2"))
    other = load_settings(home=tmp_path / "other")
    second = models.resolve_base("luna-tiny", other)
    assert first.path != second.path
    files = _digest(Path(first.path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert files == _digest(Path(second.path))
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64
    # a second resolve reuses the model instead of rebuilding it
    mtime = Path(first.path, "model.safetensors").stat().st_mtime_ns
    assert models.resolve_base(None, settings).fingerprint == first.fingerprint
    assert Path(first.path, "model.safetensors").stat().st_mtime_ns == mtime


def test_another_data_root_copies_luna_tiny_from_the_machine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = models.resolve_base("luna-tiny", load_settings(home=tmp_path / "a"))
    cached = list((tmp_path / "cache" / "lunatrain").iterdir())
    assert [p.name for p in cached] == [f"luna-tiny-{models._tiny_recipe()[:16]}"]

    def no_build(*_a, **_k):
        raise AssertionError("built again although the machine cache holds this recipe")

    monkeypatch.setattr(models, "build_tiny_model", no_build)
    copied = models.resolve_base("luna-tiny", load_settings(home=tmp_path / "b"))
    assert copied.path != built.path and copied.fingerprint == built.fingerprint
    assert _digest(Path(copied.path)) == _digest(Path(built.path))


def test_luna_tiny_is_built_where_no_home_directory_can_be_found(tmp_path, monkeypatch):
    """Repro: with HOME unset and a user without a passwd entry (a container run with a random uid, `env -i`),
    the first command needing luna-tiny died with a traceback (`Could not determine home directory`): the
    machine cache's place was looked up outside what makes that cache optional. It is built without it."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    built = models.resolve_base("luna-tiny", load_settings(home=tmp_path / "a"))
    assert (Path(built.path) / "model.safetensors").is_file()


def test_a_relative_cache_home_is_ignored_as_the_xdg_spec_asks(tmp_path, monkeypatch):
    """Packaging explore repro: `XDG_CACHE_HOME=.cache` put a `.cache/lunatrain/luna-tiny-…` into whatever
    directory a command ran in (not the data root); the XDG spec says a relative path is to be ignored."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", ".cache")
    monkeypatch.chdir(tmp_path)
    assert models._tiny_cache() == tmp_path / "home" / ".cache" / "lunatrain"
    monkeypatch.setenv("HOME", "relative-home")  # no absolute place at all: no machine cache
    assert models._tiny_cache() is None


def test_luna_tiny_loads_as_a_chat_model(settings):
    tok = models.load_tokenizer(None, settings)
    model = models.load_model(None, settings, "cpu")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    msgs = [{"role": "user", "content": "Hallo Luna"}, {"role": "assistant", "content": "Hallo!"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nHallo Luna<|im_end|>\n<|im_start|>assistant\nHallo!<|im_end|>\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert model.config.vocab_size >= len(tok)


def test_builder_sizes_and_changes_fingerprint(tmp_path):
    corpus = ["Luna hilft gern. Luna helps.\n"] * 50
    small = models.build_tiny_model(tmp_path / "a", hidden=32, layers=1, heads=2, kv_heads=1, corpus=corpus)
    wider = models.build_tiny_model(tmp_path / "b", hidden=64, layers=1, heads=2, kv_heads=1, corpus=corpus)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(small).hidden_size == 32
    assert AutoConfig.from_pretrained(wider).hidden_size == 64
    s = load_settings(home=tmp_path)
    assert models.resolve_base(str(small), s).fingerprint != models.resolve_base(str(wider), s).fingerprint


def test_bad_base_models_are_refused(settings, tmp_path):
    with pytest.raises(UsageError, match="neither"):
        models.resolve_base("no such model", settings)
    # repro: a path that does not exist said "neither 'luna-tiny', a local model directory, nor a hub id"
    for path in (str(tmp_path / "gone"), "~/no-such-model", "./gone", "../gone", "~no-such-user-lunatrain/x"):
        with pytest.raises(UsageError) as err:
            models.resolve_base(path, settings)
        assert err.value.message == f"Base model directory {path!r} does not exist.", err.value.message
    # Config repro: ASSISTANT_BASE_MODEL=/etc/passwd said "does not exist": it does, as a file
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"x")
    with pytest.raises(UsageError) as err:
        models.resolve_base(str(afile), settings)
    assert err.value.message == (
        f"Base model {str(afile)!r} is a file: name the model's folder (the one holding config.json)."
    ), err.value.message
    assert err.value.code == "base_model.a_file"


def test_a_base_recorded_relative_to_the_data_root_is_found_from_any_directory(settings, tmp_path, monkeypatch):
    """Repro: a job submitted with baseModel "models/other" (relative: the trainer works in the data root)
    recorded that name; `eval-gate` and `merge` run from another directory then took it for a hub id ("not
    in the local Hugging Face cache")."""
    models.build_tiny_model(settings.home / "models" / "other", seed=3)
    monkeypatch.chdir(tmp_path)
    found = models.resolve_base("models/other", settings)
    assert found.path == str((settings.home / "models" / "other").resolve())
    assert found.fingerprint == models.resolve_base(str(settings.home / "models" / "other"), settings).fingerprint
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="config.json"):
        models.resolve_base(str(empty), settings)
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="safetensors"):
        models.resolve_base(str(empty), settings)


def test_weights_a_safetensors_index_names_in_another_format_are_refused_before_loading(settings, tmp_path):
    """Repro: a model directory whose model.safetensors.index.json mapped its weights to pytorch_model.bin
    (beside a dummy .safetensors file) passed the "safetensors only" check, and training, the gate, merge and
    chat unpickled the .bin through torch.load. Every file the index names must be safetensors in the
    directory itself; else one sentence, before anything is loaded."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tiny = Path(models.resolve_base(None, settings).path)
    for i, (weight_map, said) in enumerate(
        (
            ("pytorch_model.bin", "names weights in another format than safetensors (pytorch_model.bin)"),
            ("../elsewhere/model.safetensors", "names weights outside its directory (../elsewhere/model.safetensors)"),
            ("missing.safetensors", "names weights that are not there (missing.safetensors)"),
        )
    ):
        path = tmp_path / f"idx-{i}"
        shutil.copytree(tiny, path)
        state = load_file(str(path / "model.safetensors"))
        (path / "model.safetensors").unlink()
        torch.save(state, path / "pytorch_model.bin")
        save_file({"dummy": torch.zeros(1)}, str(path / "dummy.safetensors"))
        index = {"metadata": {}, "weight_map": dict.fromkeys(state, weight_map)}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(UsageError) as err:
            models.resolve_base(str(path), settings)
        assert err.value.code == "base_model.unsafe_index", err.value.message
        assert err.value.message == f"Base model {str(path)!r}: its model.safetensors.index.json {said}.", (
            err.value.message
        )
    (path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(UsageError, match=r"model\.safetensors\.index\.json cannot be read"):
        models.resolve_base(str(path), settings)


def test_a_base_model_that_needs_custom_code_is_refused_in_one_sentence(settings, tmp_path):
    """Repro: a config.json with `auto_map` and a model_type transformers does not know passed prepare, and
    training failed with transformers' lines asking for `trust_remote_code=True` (and a broken hub link):
    advice lunatrain never follows. resolve_base refuses it in one sentence; a known model_type with an
    `auto_map` loads as that type, and no code of the directory runs."""
    import json
    import shutil

    tiny = Path(models.resolve_base(None, settings).path)
    path = tmp_path / "custom"
    shutil.copytree(tiny, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps(config | {"model_type": "luna_custom", "auto_map": {"AutoModelForCausalLM": "modeling_x.Luna"}})
    )
    with pytest.raises(UsageError) as err:
        models.resolve_base(str(path), settings)
    assert err.value.code == "base_model.custom_code", err.value.message
    assert err.value.message == (
        f"Base model {str(path)!r} needs its own code (model_type 'luna_custom', auto_map in config.json), "
        "which lunatrain never runs; use a model of an architecture transformers ships."
    )
    (path / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "modeling_x.Luna"}}))
    assert models.resolve_base(str(path), settings).path == str(path)


def _tiny_copy(settings, tmp_path: Path) -> Path:
    import shutil

    path = tmp_path / "base"
    shutil.copytree(models.resolve_base(None, settings).path, path)
    return path


@pytest.mark.parametrize("left", ["tokenizer_config.json", "a Qwen2 tokenizer_config.json", None])
def test_a_base_without_tokenizer_files_is_refused_before_any_work(settings, tmp_path, left):
    """Repro: without tokenizer.json (tokenizer_config.json beside it) transformers built a tokenizer of the
    special tokens only; prepare said OK, the run trained the template's markers alone, the gate passed and
    the server answered "" to everything. Without any tokenizer file the refusal blamed the chat template,
    and the server answered 500."""
    path = _tiny_copy(settings, tmp_path)
    (path / "tokenizer.json").unlink()
    if left is None:
        (path / "tokenizer_config.json").unlink()
    elif left.startswith("a Qwen2"):  # a class transformers builds without files: special tokens only
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(str(path), settings)
    assert err.value.code == "base_model.no_vocabulary", err.value.message
    assert err.value.message == (
        f"Base model {str(path)!r} has no tokenizer vocabulary in {path} (its tokenizer knows only special tokens): "
        "every text would be tokenized to nothing; copy the model's tokenizer files (tokenizer.json, or vocab.json "
        "with merges.txt) there."
    )


def test_a_tokenizer_of_another_script_or_of_slow_files_is_no_empty_vocabulary(settings, tmp_path):
    """Review repros: a character-level tokenizer.json of Chinese was refused as "no tokenizer vocabulary"
    (a German probe came out as unknown tokens only); and a tokenizer_config.json cut short beside vocab.json and
    merges.txt was said as "no tokenizer.json, nor vocab.json with merges.txt", hiding the JSON error."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    path = _tiny_copy(settings, tmp_path)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 200)]
    vocab = {"<unk>": 0, "<|im_end|>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    chinese = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    chinese.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    chinese.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"unk_token": "<unk>", "pad_token": "<unk>"}))
    tok = models.load_tokenizer(str(path), settings)
    assert tok("一丁", add_special_tokens=False)["input_ids"] == [2, 3]

    slow = _tiny_copy(settings, tmp_path / "slow")
    (slow / "tokenizer.json").unlink()
    (slow / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (slow / "merges.txt").write_text("#version: 0.2\n")
    (slow / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer", ')
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(str(slow), settings)
    assert err.value.message.startswith(f"The tokenizer of base model {str(slow)!r} could not be loaded: Expecting")
    assert "\n" not in err.value.message


def test_a_base_with_only_a_sentencepiece_model_is_told_how_to_get_tokenizer_json(settings, tmp_path):
    """Repro: a tokenizer.model without tokenizer.json (older Llama and Mistral folders), where the
    sentencepiece package is missing, was refused with transformers' "Install it with `pip install tiktoken`"."""
    path = _tiny_copy(settings, tmp_path)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.model").write_bytes(b"\x0a\x0b not a sentencepiece model")
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(str(path), settings)
    assert err.value.code == "base_model.no_fast_tokenizer", err.value.message
    assert "(it has only a SentencePiece tokenizer.model)" in err.value.message
    assert "save_pretrained(folder)" in err.value.message and "tiktoken" not in err.value.message


def test_shards_without_their_index_are_refused_when_the_base_is_resolved(settings, tmp_path):
    """Repro: shards without model.safetensors.index.json passed prepare; the run failed at loading."""
    path = _tiny_copy(settings, tmp_path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    with pytest.raises(UsageError) as err:
        models.resolve_base(str(path), settings)
    assert err.value.code == "base_model.no_index", err.value.message
    assert err.value.message == (
        f"Base model {str(path)!r} has neither model.safetensors nor the model.safetensors.index.json that names "
        f"its shards in {path} (it holds model-00001-of-00001.safetensors); copy the index that came with the shards."
    )


def test_a_model_type_transformers_cannot_load_as_a_causal_lm_is_refused_in_one_sentence(settings, tmp_path):
    """Explore repro: a Mistral-Small-3.1 folder (model_type mistral3, a vision model around Mistral) passed
    prepare; every step of the run then failed with transformers' list of some 230 model classes, printed three
    times by `lora`. prepare refuses it in one sentence, as the run does; a multimodal family transformers does
    load as a causal LM (gemma3) still passes."""
    import json

    from typer.testing import CliRunner

    from lunatrain.cli import app

    from helpers import make_records, write_export

    path = _tiny_copy(settings, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "mistral3"}))
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(str(path), settings)
    assert err.value.code == "base_model.not_causal_lm", err.value.message
    assert err.value.message == (
        f"Base model {str(path)!r} is of model_type 'mistral3', which transformers cannot load as a causal language "
        "model (AutoModelForCausalLM); use the text-only model of that family or another base."
    )
    write_export(settings, make_records(12))
    r = CliRunner().invoke(app, ["prepare", "--baseModel", str(path)])
    assert r.exit_code != 0 and r.output.count("\n") == 1 and "'mistral3'" in r.output, r.output
    # review repro: an auto_map (a processor's, or a causal LM class of the folder's own) let it pass; its own
    # code never runs
    for auto_map in ({"AutoProcessor": "p.P"}, {"AutoModelForCausalLM": "m.M"}):
        (path / "config.json").write_text(json.dumps(config | {"model_type": "mistral3", "auto_map": auto_map}))
        with pytest.raises(UsageError, match="cannot load as a causal language model"):
            models.load_tokenizer(str(path), settings)
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gemma3"}))
    models._refuse_unknown_type(models.resolve_base(str(path), settings))  # known as a causal LM: no refusal


def test_the_expert_dropout_refusal_names_the_attention_layers_the_model_has(tmp_path):
    """Review repro: the refusal's way out named q_proj,k_proj,v_proj,o_proj, which a DeepSeek-style mixture
    (multi-head latent attention) does not have: following it was refused next."""
    import types

    from lunatrain.params import parse_params

    from family_templates import tiny_config

    config = tiny_config(
        "DeepseekV3Config",
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=0,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    )
    config.save_pretrained(tmp_path)
    info = types.SimpleNamespace(id="deepseek", path=str(tmp_path))
    layout = models.lora_layout(info, "all-linear")
    assert layout is not None and layout.parameters and "k_proj" not in layout.attention, layout
    # each a layer of the model (review repro: PEFT's own `default` sub-layers were named too)
    built = {n.rsplit(".", 1)[-1] for n, _ in models.meta_model(info).named_modules()}
    assert layout.attention and set(layout.attention) <= built, layout.attention
    with pytest.raises(UsageError) as err:
        models.check_expert_dropout(parse_params({"dropout": 0.05}), info)
    assert f"(--targetModules {','.join(layout.attention)})" in err.value.message, err.value.message
    assert err.value.params["attention"] == ",".join(layout.attention)
    assert next(iter(err.value.params)) == "dropout"  # the field the dashboard marks: the one to change (review)


def test_a_base_stored_quantized_trains_only_as_stored_and_is_never_merged_into(settings, tmp_path):
    """Explore repros: a downloaded `…-bnb-4bit` folder (quantization_config in its config.json) passed prepare
    with quantize none and a full-precision memory plan, then every run failed advising to install bitsandbytes
    (installed); --quantize 8bit on it trained the stored 4 bits and recorded 8; GPTQ, AWQ and
    compressed-tensors folders passed prepare and failed the run with their packages' install hints; a merge
    into a 4-bit base ended in a traceback. Runs take the stored quantization or are refused in one sentence,
    and a merge is refused before any work; an fp8 folder, which transformers dequantizes, is a plain base."""
    import json

    from chat_helpers import random_adapter
    from typer.testing import CliRunner

    from lunatrain.cli import app
    from lunatrain.merge import merge_adapter

    from helpers import write_export

    path = _tiny_copy(settings, tmp_path)
    write_export(settings)
    version = random_adapter(load_settings(home=settings.home, base_model=str(path)), "on-stored", 3)
    config = json.loads((path / "config.json").read_text())
    stored = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": stored}))
    info = models.resolve_base(str(path), settings)
    assert models.stored_quantization(info) == ("bitsandbytes", "4bit")
    for quantize in ("none", "8bit"):
        r = CliRunner().invoke(app, ["prepare", "--baseModel", str(path), "--quantize", quantize])
        said = f"Base model {str(path)!r} is stored quantized (bitsandbytes 4bit, in its config.json): train it with"
        assert r.exit_code != 0 and r.output.count("\n") == 1 and said in r.output, r.output
    models.check_stored_quantization("4bit", info)  # as stored: a QLoRA run on it
    # chat loads it as stored whatever ASSISTANT_CHAT_QUANTIZE says, and says so (its log claimed full precision,
    # and a setting that changed nothing changed the answers' system_fingerprint)
    from lunatrain import serving

    engine = serving.Engine(load_settings(home=settings.home, base_model=str(path)))
    assert engine.served_quantize() == "4bit"
    (path / "config.json").write_text(json.dumps(config))  # an edit is no reload: what it serves stays said so
    assert engine.served_quantize() == "4bit"
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": stored}))
    asked = load_settings(home=settings.home, base_model=str(path), chat_quantize="8bit")
    assert serving.Engine(asked).served_quantize() == "4bit"
    # review repros: transformers takes a method spelled otherwise, or none beside load_in_4bit, for bitsandbytes
    for other in ({"quant_method": "BitsAndBytes", "load_in_4bit": True}, {"load_in_4bit": True}):
        (path / "config.json").write_text(json.dumps(config | {"quantization_config": other}))
        assert models.stored_quantization(models.resolve_base(str(path), settings)) == ("bitsandbytes", "4bit")
    with pytest.raises(UsageError) as err:
        merge_adapter(settings, f"on-stored@{version}")
    assert err.value.code == "merge.quantized_base" and "a merge needs full-precision weights" in err.value.message
    assert not (settings.merged_dir).exists() or not any(settings.merged_dir.iterdir())
    for method in ("gptq", "awq", "compressed-tensors", "fbgemm_fp8"):  # fbgemm's fp8 needs a GPU: never undone
        (path / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": method}}))
        with pytest.raises(UsageError) as err:
            models.check_stored_quantization("4bit", models.resolve_base(str(path), settings))
        assert err.value.code == "base_model.quantized_method" and f"with {method}, which" in err.value.message
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "fp8"}}))
    models.check_stored_quantization("none", models.resolve_base(str(path), settings))


def test_a_model_type_transformers_does_not_know_is_refused_in_one_sentence(settings, tmp_path):
    """Repro: a config.json of an unknown model_type without auto_map passed prepare; the run failed with
    transformers' lines advising to upgrade it from git."""
    import json

    import transformers

    path = _tiny_copy(settings, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "lunafancy"}))
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(str(path), settings)
    assert err.value.code == "base_model.unknown_type", err.value.message
    assert err.value.message == (
        f"Base model {str(path)!r} is of model_type 'lunafancy', which transformers {transformers.__version__} "
        "does not know; use a model of an architecture it ships."
    )


def test_models_loaded_at_once_in_one_process_take_turns_and_leave_later_loads_working(settings, monkeypatch):
    """Repro (`serve`: a first chat request beside an eval gate; a notebook's two threads): two models built
    at once put back each other's replacements of torch's init functions, which then stayed; both loads and
    every later one of the process failed with "Cannot copy out of meta tensor". Here the first build waits
    inside until the second one has entered too, or for two seconds: they must never be inside at once."""
    import threading

    import transformers

    models.resolve_base(None, settings)
    originals = (torch.nn.init.normal_, torch.nn.init.zeros_, torch.linspace)
    post_init = transformers.PreTrainedModel.post_init
    inside, most, waited, second = [0], [0], [False], threading.Event()
    lock = threading.Lock()

    def watched(self, *args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            first, waited[0] = not waited[0], True
        if first:  # once: a model calls post_init for its inner model too
            second.wait(2.0)
        else:
            second.set()
        try:
            return post_init(self, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(transformers.PreTrainedModel, "post_init", watched)
    loaded: list[object] = []
    threads = [threading.Thread(target=lambda: loaded.append(models.load_model(None, settings))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(loaded) == 2
    assert (torch.nn.init.normal_, torch.nn.init.zeros_, torch.linspace) == originals
    models.load_model(None, settings)  # and the next one loads


def test_hashes_follow_tokenizer_and_template(settings):
    tok = models.load_tokenizer(None, settings)
    th, tmh = models.tokenizer_hash(tok), models.template_hash(tok)
    assert th == models.tokenizer_hash(models.load_tokenizer(None, settings))
    tok.chat_template = tok.chat_template + "{# changed #}"
    assert models.template_hash(tok) != tmh and models.tokenizer_hash(tok) == th


def test_device_info_reports_cpu_or_cuda():
    info = models.device_info()
    assert info["type"] in {"cpu", "cuda"} and info["cudaAvailable"] == (info["type"] == "cuda")
    assert info["memoryTotal"] > 0 and isinstance(info["bf16"], bool) and info["name"]
    assert models.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert models.resolve_device("auto") == "cpu"
        with pytest.raises(UsageError, match="cuda"):
            models.resolve_device("cuda")


@pytest.fixture(scope="module")
def arch_bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny model of each family's architecture (family_templates), and GPT-2, whose layers are Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from family_templates import ARCHITECTURES, build_arch_model, save_vocab

    root = tmp_path_factory.mktemp("arch-bases")
    vocab = save_vocab(root / "vocab")
    bases = {arch: build_arch_model(root / arch, vocab, arch) for arch in ARCHITECTURES}
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    return bases | {"gpt2": root / "gpt2"}


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gemma3", "mistral", "phi3", "gpt2"])
def test_lora_weights_fit_their_own_base_and_no_other_shape(settings, arch_bases, tmp_path, arch):
    """`adapters activate --force` refuses weights the base's layers cannot take, from the safetensors header
    and the model built on the meta device: an adapter of every family's shape (Phi-3's fused qkv_proj,
    GPT-2's Conv1D, which stores its weight transposed) fits its own base, and not luna-tiny, twice as wide."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models.resolve_base(str(arch_bases[arch]), settings)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    lora = LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert models.lora_misfits(weights, base) == []
    misfits = models.lora_misfits(weights, models.resolve_base(None, settings))
    assert misfits and all(": " in line for line in misfits), misfits


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gemma3", "mistral", "phi3"])
def test_a_pad_token_without_an_embedding_row_pads_with_the_eos(settings, arch_bases, tmp_path, arch):
    """Added-tokens repro: a pad added to the tokenizer without resizing the model (`add_special_tokens` alone,
    or a vocabulary that fills the matrix) has no embedding row: prepare passed, then every padded batch and
    the gate's generation failed with "index out of range in self". On each family's shape the pad is the eos
    then, for the base and for an adapter saved with that tokenizer; a pad with a row stays as it is."""
    from transformers import AutoTokenizer

    path = tmp_path / arch
    shutil.copytree(arch_bases[arch], path)
    rows = json.loads((path / "config.json").read_text("utf-8"))["vocab_size"]
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_tokens([f"<filler{i}>" for i in range(rows - len(tok))])  # the vocabulary fills the matrix
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.pad_token_id == rows
    tok.save_pretrained(str(path))
    (path / "adapter").mkdir()
    tok.save_pretrained(str(path / "adapter"))

    base = models.resolve_base(str(path), settings)
    for loaded in (
        models.load_tokenizer(base, settings),
        models.load_adapter_tokenizer(path / "adapter", base, settings),
    ):
        assert loaded.pad_token_id == loaded.eos_token_id < rows, (loaded.pad_token, loaded.pad_token_id)
    own = models.load_tokenizer(models.resolve_base(str(arch_bases[arch]), settings), settings)
    assert own.pad_token_id == AutoTokenizer.from_pretrained(str(arch_bases[arch])).pad_token_id


def test_a_base_model_with_damaged_weights_is_a_storage_error_not_a_bad_request(settings):
    """Repro: a base model whose model.safetensors was cut short (a copy interrupted, a full disk) failed the
    job with code invalid_request, though nothing in the request was wrong and the same request trains on an
    intact copy. It is a damaged file (storage_error: 503 from the API, exit 1) naming the file."""
    import shutil

    from lunatrain.errors import DamagedFile

    copy = settings.models_dir / "cut-base"
    shutil.copytree(models.resolve_base(None, settings).path, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DamagedFile) as damaged:
        models.load_model(str(copy), settings)
    assert damaged.value.code == "storage_error", damaged.value.code
    message = damaged.value.message
    assert message.startswith("Base model ") and "model.safetensors" in message and "damaged" in message, message


def test_prepare_on_a_base_model_with_damaged_weights_is_one_sentence(settings):
    """Repro: `prepare` on a base whose model.safetensors was cut short ended in a raw SafetensorError
    traceback (POST /prepare: 500 internal): its time estimate reads the weights' headers itself. It says the
    sentence a run says (storage_error)."""
    import shutil

    from lunatrain import prepare
    from lunatrain.errors import DamagedFile
    from lunatrain.params import parse_params

    from helpers import write_export

    write_export(settings)
    copy = settings.models_dir / "cut-base"
    shutil.copytree(models.resolve_base(None, settings).path, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DamagedFile, match=r"^Base model .*model\.safetensors in .* is damaged"):
        prepare.prepare(settings, parse_params({"baseModel": str(copy), "maxSeqLength": 128}))


@pytest.mark.parametrize(
    ("cuda", "native", "expected"), [(True, True, "bfloat16"), (True, False, "float32"), (False, False, "float32")]
)
def test_bfloat16_only_where_the_gpu_has_it(monkeypatch, cuda, native, expected):
    """Review repro: `torch.cuda.is_bf16_supported()` also says yes where bfloat16 is only emulated (a T4,
    a V100), so training ran there in bfloat16 without its hardware, and `health` said the card had it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert models.native_bf16() is native
    assert models.compute_dtype("cuda" if cuda else "cpu") == getattr(torch, expected)
    assert models.compute_dtype("cpu") == torch.float32


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("where", ["eval gate", "chat"])
def test_the_gate_and_chat_load_the_base_in_the_dtype_training_computes_in(settings, monkeypatch, where):
    """Review repro: the eval gate and the chat server loaded the base in float32 on a GPU, where training
    loads it in bfloat16: an 8B model that trains on a 24 GB card needs 32 GB to be gated or served there."""
    from lunatrain import evalgate, serving

    monkeypatch.setattr(models, "resolve_device", lambda _device="auto": "cuda")
    monkeypatch.setattr(models, "compute_dtype", lambda device: f"dtype on {device}")
    asked = []

    def load_model(_ref, _settings, device="cpu", dtype=None, quantize="none"):
        asked.append((device, dtype))
        raise _Loaded

    monkeypatch.setattr(models, "load_model", load_model)
    models.ensure_tiny(settings)
    with pytest.raises(_Loaded):
        if where == "eval gate":
            evalgate._Evaluator(settings, models.resolve_base(None, settings), {})
        else:
            serving.Engine(settings)._ensure_base()
    assert asked == [("cuda", "dtype on cuda")]


def _hub_cache(tmp_path: Path, settings, monkeypatch, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face hub cache holding acme/tiny (luna-tiny's files) at `commit`, as `hf download` leaves it."""
    import shutil

    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(models.ensure_tiny(settings), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # as a user's machine with internet has it
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses at once: no real request
    return repo


def test_a_hub_id_is_read_from_the_cache_and_never_fetched_unasked(settings, tmp_path, monkeypatch):
    """Explore repro: without HF_HUB_OFFLINE (which the README never names) any command that resolves the base,
    even `lunatrain status`, asked the hub for its newest commit, downloaded all of its weights and moved
    refs/main: the active adapter stopped being served because upstream pushed a commit. The README's
    promise holds now: the model is read from the local cache, and a hub id missing from it is fetched only
    where ASSISTANT_HUB_DOWNLOAD allows it."""
    import huggingface_hub

    repo = _hub_cache(tmp_path, settings, monkeypatch)
    real, asked = huggingface_hub.snapshot_download, []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    info = models.resolve_base("acme/tiny", settings)
    assert info.revision == (repo / "refs" / "main").read_text() and asked == [True]
    with pytest.raises(UsageError) as missing:
        models.resolve_base("acme/absent", settings)
    assert missing.value.code == "base_model.not_cached" and asked[-1] is True
    assert missing.value.message == (
        "Base model 'acme/absent' is not in the local Hugging Face cache: download it once (`hf download "
        "acme/absent`), or set ASSISTANT_HUB_DOWNLOAD=true to let lunatrain fetch it."
    )
    allowed = settings.model_copy(update={"hub_download": True})
    with pytest.raises(UsageError, match="could not be fetched"):  # no network here: it tried
        models.resolve_base("acme/absent", allowed)
    assert asked[-2:] == [True, False]
    models.resolve_base("acme/tiny", allowed)  # in the cache: read there even so, never a newer commit
    assert asked[-1] is True


def test_a_folder_under_the_data_root_that_is_gone_is_not_only_an_uncached_hub_id(settings, tmp_path, monkeypatch):
    """Days repro: ASSISTANT_BASE_MODEL=models/fam named a folder under the data root; once it was moved away,
    every command said only that the hub id 'models/fam' was not in the Hugging Face cache, suggesting `hf
    download models/fam`, a repository that does not exist. The folder it may have named is said to be gone."""
    _hub_cache(tmp_path, settings, monkeypatch)
    (settings.home / "models").mkdir()
    with pytest.raises(UsageError) as gone:
        models.resolve_base("models/fam", settings)
    # Review: a folder of an org's name may hold other models of it (`Qwen/…`): both readings are said.
    assert gone.value.code == "base_model.not_cached", gone.value
    assert gone.value.message.endswith(
        f"If 'models/fam' named a folder under the data root instead: {settings.home / 'models' / 'fam'} does not "
        "exist; restore it."
    ), gone.value.message
    assert gone.value.message.startswith("Base model 'models/fam' is not in the local Hugging Face cache")
    with pytest.raises(UsageError) as absent:  # no such folder above it: a hub id, as before
        models.resolve_base("acme/absent", settings)
    assert absent.value.code == "base_model.not_cached"


def test_a_weights_file_whose_download_was_cut_is_one_sentence(settings, tmp_path, monkeypatch):
    """Explore repro: a snapshot whose model.safetensors links to a blob that is not there (a download cut
    short, a cache copied without its blobs) ended prepare, lora and eval-gate in a traceback and the API in
    500s."""
    repo = _hub_cache(tmp_path, settings, monkeypatch)
    (snapshot,) = (repo / "snapshots").iterdir()
    weights = snapshot / "model.safetensors"
    blob = repo / "blobs" / "abc"
    blob.parent.mkdir()
    weights.rename(blob)
    weights.symlink_to(Path("../../blobs/abc"))
    blob.unlink()
    with pytest.raises(DamagedFile) as cut:
        models.resolve_base("acme/tiny", settings)
    assert cut.value.message == (
        f"Base model 'acme/tiny' cannot be read: {weights} is missing or cannot be opened (No such file or "
        "directory), as after a download cut short; download or copy the model again."
    )


def test_a_cached_hub_id_without_its_ref_or_whole_snapshot_is_never_fetched_over(settings, tmp_path, monkeypatch):
    """Review repro: a snapshot downloaded pinned to a commit (no refs/main) was "not in the local Hugging Face
    cache", and an incomplete one too; with ASSISTANT_HUB_DOWNLOAD=true both fetched main's newest commit,
    which updated a cached model unasked. The one snapshot of a pinned download is used; an interrupted
    download is completed at its own commit where downloads are allowed, else said with the command."""
    import huggingface_hub

    repo = _hub_cache(tmp_path, settings, monkeypatch)
    (snapshot,) = (repo / "snapshots").iterdir()
    (repo / "refs" / "main").unlink()
    allowed = settings.model_copy(update={"hub_download": True})
    info = models.resolve_base("acme/tiny", allowed)
    assert info.path == str(snapshot) and info.revision == snapshot.name
    (repo / "refs" / "main").write_text("f" * 40)  # an interrupted download: the commit's snapshot is not there
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: fetched.append(k) or _raise(k))
    with pytest.raises(UsageError) as refused:
        models.resolve_base("acme/tiny", settings)
    assert refused.value.message == (
        "Base model 'acme/tiny' is in the local Hugging Face cache but not whole (an interrupted download): complete "
        f"it (`hf download acme/tiny --revision {'f' * 40}`), or set ASSISTANT_HUB_DOWNLOAD=true to let lunatrain "
        "complete it."
    )
    assert [k["local_files_only"] for k in fetched] == [True]
    with pytest.raises(UsageError, match="could not be completed in the cache"):
        models.resolve_base("acme/tiny", allowed)  # completes the commit refs/main names, no other
    assert [(k["local_files_only"], k.get("revision")) for k in fetched[1:]] == [(True, None), (False, "f" * 40)]


def _raise(kwargs):
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError("not whole")


@pytest.mark.slow  # a fresh interpreter: transformers' first import is what is tested
def test_the_first_use_of_transformers_from_several_threads_at_once_works_in_each(tiny_dir, tmp_path):
    """Explore repro: a freshly started `lunatrain serve` answered two of three concurrent POST /prepare with
    500: transformers' first import from several threads at once fails in all but one ("cannot import name
    'AutoTokenizer' from 'transformers'"), and the API runs each request in a thread of its pool."""
    import subprocess
    import sys

    script = f"""
import sys, threading
from lunatrain import models
from lunatrain.settings import load_settings
settings = load_settings(home={str(tmp_path / "home")!r})
info = models.BaseModelInfo(id="tiny", path={str(tiny_dir)!r}, revision=None, config_sha256="", fingerprint="")
failed, start = [], threading.Barrier(8)
def use():
    start.wait()
    try:
        models.load_tokenizer(info, settings)  # its first line imports transformers
    except Exception as exc:
        failed.append(repr(exc))
threads = [threading.Thread(target=use) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
assert "transformers" in sys.modules and not failed, failed
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_model_whose_path_is_not_utf8_is_one_sentence_naming_the_cause(tiny_dir, tmp_path):
    """Explore repro: a data root named in Latin-1 (`j\\xfcrgen`, a Latin-1 locale's way to write "jürgen")
    failed in prepare and lora with "The tokenizer of base model 'luna-tiny' could not be loaded: No such file
    or directory", a file that is there: the tokenizer library opens files by their names in UTF-8. The same
    for a name in UTF-8 under a locale that is not (`LC_ALL=C PYTHONUTF8=0`). The sentence names the cause and
    what to do."""
    import os
    import shutil

    root = tmp_path / os.fsdecode(b"j\xfcrgen")
    shutil.copytree(tiny_dir, root)
    home = load_settings(home=tmp_path / "home")
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(models.resolve_base(str(root), home), home)
    assert "0xFC" in err.value.message and "not UTF-8" in err.value.message, err.value.message
    assert "rename" in err.value.message, err.value.message
    # UTF-8 bytes a locale read as something else (ASCII without UTF-8 mode: each byte escaped): the name is
    # fine, the locale is not
    shutil.copytree(tiny_dir, tmp_path / "grüße")
    escaped = str(tmp_path / "gr\udcc3\udcbc\udcc3\udc9fe")
    with pytest.raises(UsageError) as err:
        models.load_tokenizer(models.resolve_base(escaped, home), home)
    assert "UTF-8 locale" in err.value.message and "PYTHONUTF8=1" in err.value.message, err.value.message


def test_an_adapter_folder_whose_name_is_not_utf8_is_one_sentence_when_served(tiny_dir, tmp_path):
    """The base model's folder was checked (above), the adapter's own tokenizer, which `serve` loads from the
    adapter's folder in the data root, was not: a data root named in Latin-1 beside a base model elsewhere
    answered "The tokenizer in ... could not be loaded: No such file or directory"."""
    import os
    import shutil

    from lunatrain import serving

    folder = tmp_path / os.fsdecode(b"j\xfcrgen") / "v1"
    shutil.copytree(tiny_dir, folder)  # a tokenizer saved beside the adapter, as a run saves it
    with pytest.raises(UsageError) as err:
        serving._adapter_tokenizer(folder, None)
    assert "0xFC" in err.value.message and "not UTF-8" in err.value.message, err.value.message


def test_weights_changed_in_place_where_the_samples_do_not_look_are_another_base(settings, tmp_path, monkeypatch):
    """Reproducibility repro: a base model's weights over 8 MiB were fingerprinted by their header, size and three
    1 MiB samples. One tensor changed in place outside them (a LoRA merged into the attention layers only, saved
    over the same files) kept the fingerprint: `luna` said "trained on this data with these parameters; not
    trained again", and a version trained on the old weights was served on the new. The first full hash a data
    root sees for a sampled fingerprint is kept; other content under the same samples is another base, and
    the original content again is the original base."""
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    tensors = {f"t{i}": torch.zeros(1 << 20, dtype=torch.float32) for i in range(4)}  # 4 MiB each, 16 MiB
    save_file(tensors, str(model / "model.safetensors"))
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    first = models.resolve_base(str(model), settings).fingerprint
    assert models.resolve_base(str(model), settings).fingerprint == first  # the same files, the same base

    original = weights.read_bytes()
    changed = bytearray(original)
    at = size // 4  # inside t0/t1, away from the start, middle and end samples
    changed[at : at + 4] = b"\x01\x02\x03\x04"
    weights.write_bytes(bytes(changed))
    assert weights.stat().st_size == size
    other = models.resolve_base(str(model), settings).fingerprint
    assert other != first
    weights.write_bytes(original)  # put back: the base the versions trained on, again
    assert models.resolve_base(str(model), settings).fingerprint == first

    # Review repro: in a data root that cannot be written (a backup mounted read-only) the whole weights were
    # read on every command and the hash thrown away: there, the sampled fingerprint, read as before.
    monkeypatch.setattr(models, "_can_keep", lambda folder: False)
    monkeypatch.setattr(models, "_content_hash", lambda *a: pytest.fail("read in full for nothing"))
    weights.write_bytes(bytes(changed))
    assert models.resolve_base(str(model), settings).fingerprint == first


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gemma3", "mistral", "phi3", "gpt2"])
def test_the_context_is_read_from_each_familys_config_as_the_model_states_it(settings, arch_bases, arch):
    """prepare and the run weigh samples against the base model's context (`over_context`) without loading it:
    the config's own key for each family (GPT-2's n_positions), as the model built from it states it."""
    from transformers import AutoConfig

    base = models.resolve_base(str(arch_bases[arch]), settings)
    assert models.context_length(base) == AutoConfig.from_pretrained(base.path).max_position_embeddings > 0
