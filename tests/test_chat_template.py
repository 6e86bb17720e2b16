"""Adapters and merged models stop where training taught them, and base models without a chat template
take one by `chatTemplate`. Run: `pytest tests/test_chat_template.py -q`.

The base here is luna-tiny made to look like a Qwen base model: ChatML template (turns end with
`<|im_end|>`) but eos `<|endoftext|>` in its tokenizer and generation_config.json, so plain `generate()`
with the base model's settings would not stop at the end of a turn.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_records, write_export

from lunatrain import models, registry
from lunatrain.errors import UsageError
from lunatrain.merge import merge_adapter
from lunatrain.params import parse_params
from lunatrain.prepare import prepare
from lunatrain.train import run_lora


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lunatrain.settings import load_settings

    return models.ensure_tiny(load_settings(home=tmp_path_factory.mktemp("tiny-home")))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text("utf-8"))
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data), "utf-8")


NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hannes", "Ida", "Jonas"]
CITIES = ["Berlin", "Hamburg", "München", "Köln", "Leipzig", "Dresden", "Bremen", "Wien", "Zürich", "Graz"]


def short_answers() -> list[dict]:
    """20 short question/answer pairs in the export's record format, all in the train split."""
    pairs = [(f"Wo wohnt {n}?", f"{n} wohnt in {c}.") for n, c in zip(NAMES, CITIES, strict=True)]
    pairs += [(f"Was ist {a} + {a + 3}?", f"{a} + {a + 3} = {2 * a + 3}.") for a in range(2, 12)]
    out = []
    for i, (q, a) in enumerate(pairs):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        digest = hashlib.sha256(json.dumps(msgs, ensure_ascii=False).encode()).hexdigest()
        out.append({"messages": msgs, "id": i + 1, "hash": digest, "source": "curated", "split": "train"})
    return out


@pytest.fixture
def qwen_like_base(settings) -> Path:
    """A luna-tiny build with eos <|endoftext|> (id 0) while its template ends turns with <|im_end|>.
    Wider embeddings than luna-tiny's (std 0.3): its output layer can then express confident answers, so a
    few hundred LoRA steps memorise them."""
    base = models.build_tiny_model(settings.models_dir / "tiny-base-eos", embed_std=0.3)
    _edit_json(base / "tokenizer_config.json", eos_token="<|endoftext|>")
    _edit_json(base / "generation_config.json", eos_token_id=0)
    _edit_json(base / "config.json", eos_token_id=0)
    return base


def _greedy(model, tok, messages, generation_config=None) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             generation_config=generation_config)
    return out[0, ids.shape[1]:].tolist()


def test_adapter_and_merged_model_reproduce_answers_and_stop_at_the_terminator(settings, qwen_like_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    records = short_answers()
    write_export(settings, records)
    params = parse_params({"baseModel": str(qwen_like_base), "epochs": 30, "batchSize": 2, "rank": 16,
                           "learningRate": 5e-3, "warmupRatio": 0.0, "dropout": 0.0, "maxSeqLength": 64,
                           "seed": 3})
    result = run_lora(params, settings)
    assert result.ok, result.error
    adapter = result.path
    report = json.loads((adapter / "training-report.json").read_text("utf-8"))
    assert report["template"]["terminator"]["text"] == "<|im_end|>"
    assert report["template"]["terminator"]["inGenerationConfig"] is False  # the base stops on <|endoftext|> only
    im_end = 2
    shipped = json.loads((adapter / "generation_config.json").read_text("utf-8"))
    assert im_end in shipped["eos_token_id"] and 0 in shipped["eos_token_id"]
    tok = AutoTokenizer.from_pretrained(str(adapter))
    assert tok.chat_template == models.CHAT_TEMPLATE and tok.convert_tokens_to_ids("<|im_end|>") == im_end

    def reproduced(model, generation_config=None) -> int:
        exact = 0
        for rec in records:
            new = _greedy(model, tok, rec["messages"][:-1], generation_config)
            assert new and new[-1] == im_end, tok.decode(new)  # generation ended on the terminator
            exact += tok.decode(new[:-1]) == rec["messages"][-1]["content"]
        return exact

    base = AutoModelForCausalLM.from_pretrained(str(qwen_like_base))
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    via_adapter = reproduced(peft_model, GenerationConfig.from_pretrained(str(adapter)))
    print("reproduced via adapter", via_adapter)
    assert via_adapter >= 1

    merged = merge_adapter(settings, f"{result.adapter_name}@{result.version}")
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged.path)).eval()
    assert im_end in merged_model.generation_config.eos_token_id  # plain generate() stops on it by default
    assert AutoTokenizer.from_pretrained(str(merged.path)).chat_template == models.CHAT_TEMPLATE
    assert reproduced(merged_model) == via_adapter


# --- chatTemplate for base models without one ---------------------------------------------------


@pytest.fixture
def bare_base(settings, monkeypatch, tmp_path) -> Path:
    """A base model without a chat template whose vocabulary lacks the ChatML markers, with spare
    embedding rows beyond its tokenizer (as real models have)."""
    monkeypatch.setattr(models, "SPECIAL_TOKENS", [models.ENDOFTEXT])
    path = settings.models_dir / "bare-base"
    models.build_tiny_model(path, hidden=32, layers=1, heads=2, kv_heads=1, vocab=1024, model_vocab=1152)
    tok = json.loads((path / "tokenizer.json").read_text("utf-8"))
    size = len(tok["model"]["vocab"])
    assert size < 1152 and "<|im_end|>" not in tok["model"]["vocab"]
    _edit_json(path / "tokenizer_config.json", chat_template=None, eos_token=models.ENDOFTEXT)
    _edit_json(path / "config.json", eos_token_id=0)
    _edit_json(path / "generation_config.json", eos_token_id=0)
    return path


def test_a_base_without_template_needs_chat_template_and_learns_the_added_markers(settings, bare_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_export(settings, make_records(24))
    with pytest.raises(UsageError, match="has no chat template; choose one with --chatTemplate"):
        prepare(settings, parse_params({"baseModel": str(bare_base)}))
    with pytest.raises(UsageError, match="Unknown chatTemplate 'nope'"):
        prepare(settings, parse_params({"baseModel": str(bare_base), "chatTemplate": "nope"}))
    over = {"baseModel": str(bare_base), "chatTemplate": "chatml", "maxSeqLength": 128}
    report = prepare(settings, parse_params(over))
    assert report.template["addedTokens"] == ["<|im_end|>", "<|im_start|>"]
    assert report.template["terminator"]["text"] == "<|im_end|>" and report.check("eot_not_trained").count == 0

    result = run_lora(parse_params(over | {"epochs": 1, "batchSize": 8, "rank": 4}), settings)
    assert result.ok, result.error
    cfg = json.loads((result.path / "adapter_config.json").read_text("utf-8"))
    tok = AutoTokenizer.from_pretrained(str(result.path))
    new_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")]
    assert sorted(cfg["trainable_token_indices"]["embed_tokens"]) == sorted(new_ids)
    # the adapter loads on the unmodified base and changes exactly the added rows of the embedding
    base = AutoModelForCausalLM.from_pretrained(str(bare_base))
    before = base.get_input_embeddings().weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(result.path)).merge_and_unload()
    changed = (merged.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(new_ids)
    assert 2 in json.loads((result.path / "generation_config.json").read_text("utf-8"))["eos_token_id"] or (
        new_ids[0] in json.loads((result.path / "generation_config.json").read_text("utf-8"))["eos_token_id"])


def test_no_spare_embedding_rows_is_refused_in_one_sentence(settings, monkeypatch):
    monkeypatch.setattr(models, "SPECIAL_TOKENS", [models.ENDOFTEXT])
    path = settings.models_dir / "full-base"
    models.build_tiny_model(path, hidden=32, layers=1, heads=2, kv_heads=1, vocab=1024)
    tok = json.loads((path / "tokenizer.json").read_text("utf-8"))
    rows = json.loads((path / "config.json").read_text("utf-8"))["vocab_size"]
    if rows - len(tok["model"]["vocab"]) >= 2:
        pytest.skip("this vocabulary happens to leave spare rows")
    _edit_json(path / "tokenizer_config.json", chat_template=None)
    write_export(settings, make_records(24))
    params = parse_params({"baseModel": str(path), "chatTemplate": "chatml", "epochs": 1})
    with pytest.raises(UsageError, match="no spare embedding rows"):
        run_lora(params, settings)
    assert not registry.list_adapters(settings)


# --- what the user sees, and what a request may name ---------------------------------------------


def test_prepare_show_marks_the_trained_tokens_and_takes_a_template_file(settings, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from lunatrain.cli import app

    shutil.copytree(tiny_dir, settings.models_dir / models.TINY_ID)
    write_export(settings, make_records(24))
    runner = CliRunner()
    r = runner.invoke(app, ["prepare", "--show", "2"])
    assert r.exit_code == 0, r.output
    assert "terminator '<|im_end|>'" in r.output
    blocks = r.output.split("--- sample ")[1:]
    assert len(blocks) == 2
    for block in blocks:  # answers are marked and end with the terminator; headers stay outside the marks
        marked = re.findall(r"\[\[(.*?)\]\]", block, re.S)
        assert marked and all(m.endswith("<|im_end|>") and "<|im_start|>" not in m for m in marked), block
        assert "<|im_start|>user" in re.sub(r"\[\[.*?\]\]", "", block, flags=re.S)

    # a .jinja file is stored under the data root and travels by name
    template = tmp_path / "my chat.jinja"
    template.write_text(models.CHAT_TEMPLATE.replace("<|im_end|>", "<|endoftext|>"), "utf-8")
    r = runner.invoke(app, ["prepare", "--json", "--chatTemplate", str(template)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    name = report["template"]["name"]
    assert name.startswith("my-chat-") and (settings.data_dir / "templates" / f"{name}.jinja").is_file()
    assert report["template"]["terminator"]["text"] == "<|endoftext|>"
    r = runner.invoke(app, ["prepare", "--chatTemplate", str(tmp_path / "missing.jinja")])
    assert r.exit_code == 2 and "is not a readable .jinja file" in r.output
    r = runner.invoke(app, ["prepare", "--chatTemplate", "nope"])
    assert r.exit_code == 2 and "Unknown chatTemplate 'nope'" in r.output


def test_api_names_templates_never_paths_and_shows_a_marked_sample(settings, tiny_dir):
    from fastapi.testclient import TestClient

    from lunatrain import store
    from lunatrain.api.main import create_app
    from lunatrain.settings import load_settings

    shutil.copytree(tiny_dir, settings.models_dir / models.TINY_ID)
    write_export(settings, make_records(24))
    app_settings = load_settings(lora_ensure_on_demand=False, lora_trainer_url="http://127.0.0.1:9")
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as client:
        for bad in ("/etc/passwd.jinja", "../templates/x", "a/b"):
            r = client.post("/assistant/training/lora/start", json={"chatTemplate": bad})
            assert r.status_code == 422 and "chatTemplate" in r.json()["error"]["message"], (bad, r.text)
        r = client.post("/assistant/training/prepare", json={"minCurated": 0})
        assert r.status_code == 200, r.text
        body = r.json()
    store.dispose_stores()
    assert body["template"]["terminator"]["text"] == "<|im_end|>" and len(body["template"]["hash"]) == 64
    (sample,) = body["samples"]
    trained = [p["text"] for p in sample["pieces"] if p["trained"]]
    assert trained and all(t.endswith("<|im_end|>") for t in trained)
    assert sum(len(p["text"]) for p in sample["pieces"]) > sum(len(t) for t in trained)  # context is shown too
