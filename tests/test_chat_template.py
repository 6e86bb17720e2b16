"""Adapters and merged models stop where training taught them, and base models without a chat template
take one by `chatTemplate`. Run: `pytest tests/test_chat_template.py -q`.

The base here is luna-tiny made to look like a Qwen base model: ChatML template (turns end with
`<|im_end|>`) but eos `<|endoftext|>` in its tokenizer and generation_config.json, so plain `generate()`
with the base model's settings would not stop at the end of a turn.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lunatrain import models, registry
from lunatrain.errors import UsageError
from lunatrain.merge import merge_adapter
from lunatrain.params import parse_params
from lunatrain.prepare import prepare
from lunatrain.train import run_lora

from helpers import make_records, write_export


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


NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Felix",
    "Greta",
    "Hannes",
    "Ida",
    "Jonas",
    "Lena",
    "Max",
    "Mia",
    "Paul",
    "Lea",
    "Tom",
    "Nina",
    "Jan",
    "Eva",
    "Tim",
]
# Four answers, each one token after a space in luna-tiny's vocabulary, shared by five names: whatever the tiny
# model makes of a name, its answer is a whole trained one or a plain error. With 20 multi-token cities it was
# unsure between them and which one won, or whether two were spliced ("In B" + "resden"), was left to the CPU's
# float32 rounding. With these four and 50 epochs, seeds 1-8 all pass (with 30 epochs, two of them failed).
WORDS = ["Garten", "Kaffee", "Musik", "Urlaub"]


def short_answers() -> list[dict]:
    """20 question/answer pairs (whose word is which) in the export's record format, all in the train split."""
    out = []
    for i, (name, word) in enumerate(zip(NAMES, WORDS * 5, strict=True)):
        msgs = [
            {"role": "user", "content": f"Welches Wort merkt sich {name}?"},
            {"role": "assistant", "content": f"Das Wort ist {word}."},
        ]
        digest = hashlib.sha256(json.dumps(msgs, ensure_ascii=False).encode()).hexdigest()
        out.append({"messages": msgs, "id": i + 1, "hash": digest, "source": "curated", "split": "train"})
    return out


@pytest.fixture
def qwen_like_base(settings, tiny_dir) -> Path:
    """A luna-tiny build with eos <|endoftext|> (id 0) while its template ends turns with <|im_end|>, and an
    output layer of its own (untied): LoRA on it lets a few hundred steps memorise short answers, which the
    small tied embeddings of a random model cannot express confidently enough."""
    from safetensors.torch import load_file, save_file

    base = settings.models_dir / "tiny-base-eos"
    shutil.copytree(tiny_dir, base)
    weights = load_file(str(base / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    _edit_json(base / "config.json", eos_token_id=0, tie_word_embeddings=False)
    _edit_json(base / "tokenizer_config.json", eos_token="<|endoftext|>")
    _edit_json(base / "generation_config.json", eos_token_id=0)
    return base


def _greedy(model, tok, messages, generation_config) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    config = copy.deepcopy(generation_config)
    config.update(max_new_tokens=16, do_sample=False)
    # one thread, as the endpoint generates on a small CPU model: tiny matmuls lose more to thread sync
    # than they gain
    with torch.no_grad(), models.cpu_threads_for(model, "cpu"):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.slow
def test_adapter_and_merged_model_reproduce_answers_and_stop_at_the_terminator(settings, qwen_like_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    records = short_answers()
    write_export(settings, records)
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    params = parse_params(
        {
            "baseModel": str(qwen_like_base),
            "epochs": 50,
            "batchSize": 2,
            "rank": 32,
            "learningRate": 5e-3,
            "warmupRatio": 0.0,
            "dropout": 0.0,
            "maxSeqLength": 64,
            "targetModules": linear,
            "seed": 3,
        }
    )
    result = run_lora(params, settings)
    assert result.ok, result.error
    adapter = result.path
    report = json.loads((adapter / "training-report.json").read_text("utf-8"))
    assert report["template"]["terminator"]["text"] == "<|im_end|>"
    assert report["template"]["terminator"]["inGenerationConfig"] is False  # the base stops on <|endoftext|> only
    im_end = 2
    shipped = GenerationConfig.from_pretrained(str(adapter))
    assert im_end in shipped.eos_token_id and 0 in shipped.eos_token_id
    tok = AutoTokenizer.from_pretrained(str(adapter))
    assert tok.chat_template == models.CHAT_TEMPLATE and tok.convert_tokens_to_ids("<|im_end|>") == im_end

    def answers(model, generation_config, among: range | list[int]) -> list[list[int]]:
        return [_greedy(model, tok, records[i]["messages"][:-1], generation_config) for i in among]

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    assert all(len(ids(f" {word}")) == 1 for word in WORDS)  # what WORDS promises
    base = AutoModelForCausalLM.from_pretrained(str(qwen_like_base))
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    outputs = answers(peft_model, shipped, range(len(records)))
    trained_answers = [ids(r["messages"][-1]["content"]) + [im_end] for r in records]
    # every generation is one of the trained answers and ends right at the terminator ...
    assert all(out in trained_answers for out in outputs), [tok.decode(o) for o in outputs]
    # ... and some reproduce their own answer exactly (a random 2-layer model learns the format and the
    # stop within these steps; which word goes with which name needs attention it barely has)
    hits = [i for i, out in enumerate(outputs) if out == trained_answers[i]]
    assert hits, [tok.decode(o) for o in outputs]
    # control: with the base model's own generation config generation runs on past the end of the turn
    base_config = GenerationConfig.from_pretrained(str(qwen_like_base))
    assert base_config.eos_token_id == 0
    assert all(
        len(out) > len(trained_answers[i]) for i, out in zip(hits, answers(peft_model, base_config, hits), strict=True)
    )

    merged = merge_adapter(settings, f"{result.adapter_name}@{result.version}")
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged.path)).eval()
    assert im_end in merged_model.generation_config.eos_token_id  # plain generate() stops on it by default
    assert AutoTokenizer.from_pretrained(str(merged.path)).chat_template == models.CHAT_TEMPLATE
    assert answers(merged_model, merged_model.generation_config, hits) == [trained_answers[i] for i in hits]


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
    assert sorted(cfg["trainable_token_indices"]) == sorted(new_ids)
    # the adapter loads on the unmodified base and changes exactly the added rows of the embedding
    base = AutoModelForCausalLM.from_pretrained(str(bare_base))
    before = base.get_input_embeddings().weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(result.path)).merge_and_unload()
    changed = (merged.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(new_ids)
    assert new_ids[0] in json.loads((result.path / "generation_config.json").read_text("utf-8"))["eos_token_id"]
    # merge keeps the learned rows, the tokenizer with the added markers and a config stopping on <|im_end|>
    out = merge_adapter(settings, f"{result.adapter_name}@{result.version}")
    merged_model = AutoModelForCausalLM.from_pretrained(str(out.path))
    torch.testing.assert_close(merged_model.get_input_embeddings().weight, merged.get_input_embeddings().weight)
    merged_tok = AutoTokenizer.from_pretrained(str(out.path))
    assert merged_tok.convert_tokens_to_ids("<|im_end|>") == new_ids[0] and merged_tok.chat_template
    assert new_ids[0] in merged_model.generation_config.eos_token_id
    # Served with that base configured: the adapter answers with the template it ships (repro: every chat
    # request, the adapter's too, was 503 "has no chat template; choose one with --chatTemplate", an option
    # `serve` does not have); the bare base, which cannot chat, is refused in a sentence that says what helps.
    from lunatrain import serving
    from lunatrain.errors import ServiceUnavailable
    from lunatrain.settings import load_settings

    engine = serving.Engine(load_settings(home=settings.home, base_model=str(bare_base)))
    hello = [{"role": "user", "content": "Hallo"}]
    version = f"{result.adapter_name}@{result.version}"
    gen = engine.start(engine.resolve(version), hello, serving.Sampling(max_tokens=4, temperature=0))
    assert gen.run() is not None and new_ids[0] in gen.loaded.stop_ids
    with pytest.raises(ServiceUnavailable) as refused:
        engine.start(engine.resolve(engine.base_info().id), hello, serving.Sampling(max_tokens=4))
    said = refused.value.message
    assert "has no chat template, so it answers no chat itself" in said and "choose one with" not in said, said
    assert result.adapter_name in said and refused.value.details["code"] == "base_model_unavailable"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gemma3", "mistral", "phi3"])
def test_added_markers_train_the_output_rows_of_an_untied_model_too(arch, tied):
    """Added-tokens explore: on a model whose output layer is a weight of its own (untied: Mistral, Llama 3
    8B, Qwen2.5 7B) only the input rows of added markers were trained; the output row of an added end-of-turn
    token stayed the base's, so the adapter could hardly learn to stop. Each family's shape names its own
    modules, and PEFT puts a token adapter on each row set it is given."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from transformers import AutoModelForCausalLM

    from lunatrain.train import _token_rows

    from family_templates import ARCHITECTURES, tiny_config

    cls_name, _family, extra = ARCHITECTURES[arch]
    model = AutoModelForCausalLM.from_config(tiny_config(cls_name, tie_word_embeddings=tied, pad_token_id=0, **extra))
    rows = _token_rows(model, [250, 251])
    if tied:
        assert rows == [250, 251]
    else:
        assert rows == {"embed_tokens": [250, 251], "lm_head": [250, 251]}, rows
    config = LoraConfig(r=2, target_modules="all-linear", trainable_token_indices=rows)
    peft_model = get_peft_model(model, config)
    wrapped = {n.split(".")[-2] for n, m in peft_model.named_modules() if isinstance(m, TrainableTokensLayer)}
    assert wrapped == {"embed_tokens", "lm_head"}, wrapped  # tied: PEFT puts the input's adapter on both
    trained = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad and "tokens_delta" in n}
    assert trained == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"}), trained
    assert _token_rows(model, []) is None


@pytest.mark.slow
def test_an_untied_model_learns_to_stop_on_an_added_end_of_turn_token(settings, tmp_path):
    """The same end to end on an untied Qwen2-shaped model with DeepSeek's full-width markers added: the adapter
    holds both row sets, the gate finds it stopping on the added terminator, and the merged model answers as
    the adapter does (measured on this model: the gate's stopped rate was 0.06 with the input rows alone, 1.0
    with both)."""
    from safetensors import safe_open
    from test_prepare import R1_STYLE
    from transformers import AutoModelForCausalLM

    from lunatrain import evalgate, export, store
    from lunatrain.templates import store_template

    import family_templates as ft

    vocab = ft.save_vocab(tmp_path / "vocab")
    tiny = ft.tiny_config

    def untied(cls_name, **fields):  # spare rows for the markers, and an output layer of its own
        return tiny(cls_name, **(fields | {"tie_word_embeddings": False, "vocab_size": fields["vocab_size"] + 64}))

    ft.tiny_config = untied
    try:
        path = ft.build_arch_model(settings.models_dir / "untied", vocab, "qwen2")
    finally:
        ft.tiny_config = tiny
    (tmp_path / "r1.jinja").write_text(R1_STYLE, "utf-8")
    store.load_seed(settings)
    export.export(settings)
    template = store_template(tmp_path / "r1.jinja", settings)
    flags = {"baseModel": str(path), "chatTemplate": template, "maxSteps": 20, "batchSize": 4, "learningRate": 0.01}
    result = run_lora(parse_params(flags), settings)
    assert result.ok, result.error
    with safe_open(str(result.path / "adapter_model.safetensors"), "pt") as weights:
        deltas = sorted(k for k in weights.keys() if "trainable_tokens_delta" in k)
    assert [k.split(".")[-3] for k in deltas] == ["lm_head", "embed_tokens"], deltas
    lenient = {"maxValLossRatioVsBase": 10, "minGoldenPassRate": 0, "maxGoldenPassRateDrop": 1, "maxLossRegression": 10}
    gate = evalgate.gate_candidate(settings, result.adapter_name, result.version, thresholds=lenient)
    assert gate.metrics["stoppedRate"] == 1.0, gate.metrics
    merged = merge_adapter(settings, f"{result.adapter_name}@{result.version}")
    base, joined = (
        AutoModelForCausalLM.from_pretrained(str(path)),
        AutoModelForCausalLM.from_pretrained(str(merged.path)),
    )
    assert not torch.equal(joined.lm_head.weight[3072:3075], base.lm_head.weight[3072:3075])


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
    # Added-tokens repro: the preflight passed it (exit 0), and only the run refused it.
    from lunatrain import prepare

    with pytest.raises(UsageError, match="no spare embedding rows"):
        prepare.prepare(settings, params)


# --- what the user sees, and what a request may name ---------------------------------------------


def test_prepare_show_marks_the_trained_tokens_and_takes_a_template_file(settings, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from lunatrain.cli import app

    shutil.copytree(tiny_dir, settings.models_dir / models.TINY_ID)
    write_export(settings, make_records(24))
    runner = CliRunner()
    r = runner.invoke(app, ["prepare", "--show", "2", "--minCurated=0"])
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
    r = runner.invoke(app, ["prepare", "--json", "--minCurated=0", "--chatTemplate", str(template)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{") :])
    name = report["template"]["name"]
    assert name.startswith("my-chat-") and (settings.data_dir / "templates" / f"{name}.jinja").is_file()
    assert report["template"]["terminator"]["text"] == "<|endoftext|>"
    r = runner.invoke(app, ["prepare", "--chatTemplate", str(tmp_path / "missing.jinja")])
    assert r.exit_code == 2 and "is not a readable .jinja file" in r.output
    r = runner.invoke(app, ["prepare", "--chatTemplate", "nope"])
    assert r.exit_code == 2 and "Unknown chatTemplate 'nope'" in r.output
    # a file that is no template is refused in one sentence that ends, and says what to do (it said only
    # "…: unexpected 'end of template'")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}", "utf-8")
    r = runner.invoke(app, ["prepare", "--chatTemplate", str(broken)])
    assert r.exit_code == 2, r.output
    said = r.output.strip()
    assert said.startswith("error: The chat template cannot render a simple conversation: Unexpected end of"), said
    assert said.endswith("; fix it, or choose another (--chatTemplate: chatml, or a .jinja file).") and "\n" not in said


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", "error: chatTemplate file '{path}' is empty."),
        (b"  \n", "error: chatTemplate file '{path}' is empty."),
        (
            b"\xff{{ x }}",
            "error: chatTemplate file '{path}' is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8.",
        ),
        (
            b"{% for m in messages %}{{ m.content }}",
            "error: The chat template cannot render a simple conversation: Unexpected end of template. Jinja was looking "
            "for the following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for' (line 1); "
            "fix it, or choose another (--chatTemplate: chatml, or a .jinja file).",
        ),
    ],
)
def test_a_template_file_that_is_refused_is_said_so_and_not_stored(settings, tmp_path, content, said):
    """CLI repro: an empty .jinja file was refused with "Base model 'luna-tiny' has no chat template; choose one with
    --chatTemplate" (one was chosen: it is empty), a file that is not UTF-8 with Python's decode error, and every
    refused file was copied into data/templates all the same."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    from helpers import make_records, write_export

    write_export(settings, make_records(4))
    path = tmp_path / "mine.jinja"
    path.write_bytes(content)
    r = CliRunner().invoke(app, ["prepare", "--chatTemplate", str(path)])
    assert r.exit_code == 2 and r.output.strip() == said.format(path=path), r.output
    assert not (settings.data_dir / "templates").exists()
    # the file itself, as the flows store it, is refused alike (a `{% generation %}` block is transformers' own tag)
    path.write_text("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}", "utf-8")
    from lunatrain.templates import store_template

    assert store_template(path, settings).startswith("mine-")


def test_a_template_file_saved_with_a_bom_renders_without_it(settings, tmp_path):
    """Repro: a .jinja file saved "UTF-8 with BOM" (Windows editors) kept the byte-order mark as the first
    character of the template, so every training prompt and every served one began with an invisible
    U+FEFF the base model never saw there. It is read as an editor means it, and stored without it."""
    from lunatrain.templates import load_template, store_template

    plain, marked = tmp_path / "plain.jinja", tmp_path / "marked.jinja"
    plain.write_text(models.CHAT_TEMPLATE, "utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + models.CHAT_TEMPLATE.encode())
    name = store_template(marked, settings)
    assert not load_template(name, settings).startswith("\ufeff")
    assert name.removeprefix("marked-") == store_template(plain, settings).removeprefix("plain-")  # same content


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


def test_eval_gate_on_a_base_without_template_takes_chat_template(settings, bare_base):
    from typer.testing import CliRunner

    from lunatrain.cli import app

    write_export(settings, make_records(24))
    runner = CliRunner()
    r = runner.invoke(app, ["eval-gate", "--baseModel", str(bare_base)])
    assert r.exit_code == 2 and "has no chat template; choose one with --chatTemplate" in r.output, r.output
    r = runner.invoke(app, ["eval-gate", "--baseModel", str(bare_base), "--chatTemplate", "chatml", "--json"])
    assert r.exit_code in (0, 1), r.output  # a decision either way: the base model was evaluated
    report = json.loads(r.output[r.output.index("{") :])
    assert report["candidate"]["kind"] == "base" and report["metrics"]["goldenTotal"] > 0


def test_every_family_template_as_a_file_passes_the_check_before_it_is_stored(settings, tmp_path):
    """A .jinja file is parsed before it is stored (a file that is no template is refused): each family's shape
    (ChatML, Llama 3, Gemma, [INST], Llama 2, Phi-3, Zephyr, thinking, Gemma 2's refusing one) and the bundled
    templates pass, stored byte for byte."""
    from lunatrain.templates import bundled_names, load_template, store_template

    from family_templates import FAMILIES, REFUSING

    shapes = {name: spec[0] for name, spec in (FAMILIES | REFUSING).items()}
    shapes |= {f"bundled-{name}": load_template(name, settings) for name in bundled_names()}
    for name, template in shapes.items():
        path = tmp_path / f"{name}.jinja"
        path.write_text(template, "utf-8")
        assert load_template(store_template(path, settings), settings) == template, name
