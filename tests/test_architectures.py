"""Architectures end to end: train (`run_lora`, what `lora --local` runs), gate and merge on tiny random-weight
Qwen2, Llama, Gemma2, Gemma3, Mistral and Phi3 models, each with its family's chat template.

Each model is 2 layers at hidden size 32, so a run takes a few seconds on CPU. Run:
`pytest tests/test_architectures.py -q`.
"""

from __future__ import annotations

import json

import pytest

from lunatrain.errors import UsageError
from lunatrain.evalgate import gate_candidate
from lunatrain.merge import merge_adapter
from lunatrain.params import parse_params
from lunatrain.prepare import prepare
from lunatrain.train import run_lora

from family_templates import (
    ARCHITECTURES,
    EXPERTS_WRAPPED,
    FAMILIES,
    build_arch_model,
    build_gemma3_multimodal,
    save_vocab,
)
from helpers import make_records, write_export

# Six whole flows (prepare, train, gate, merge, generate): the end-to-end tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return save_vocab(tmp_path_factory.mktemp("vocab"))


# Each architecture with its family's template, and the templates no architecture above brings: Llama 2's
# ([INST] … [/INST] answer </s>, a system prompt inside the first user turn) and Zephyr's (</s> closing every turn).
RUNS = [(arch, ARCHITECTURES[arch][1]) for arch in ARCHITECTURES] + [("llama", "llama-2"), ("mistral", "zephyr")]


@pytest.mark.parametrize(("arch", "family"), RUNS, ids=[f"{a}-{f}" for a, f in RUNS])
def test_train_gate_and_merge(settings, vocab_dir, arch, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_arch_model(settings.models_dir / f"tiny-{arch}", vocab_dir, arch, family=family)
    terminator = FAMILIES[family][4]
    write_export(settings, make_records(24, multi_turn_every=4))
    params = parse_params(
        {
            "baseModel": str(base),
            "epochs": 2,
            "batchSize": 4,
            "rank": 4,
            "learningRate": 5e-3,
            "maxSeqLength": 128,
            "seed": 1,
        }
    )

    report = prepare(settings, params)
    assert report.template["terminator"]["text"] == terminator
    assert report.check("eot_not_trained").count == 0 and report.status != "fail", report.problems

    result = run_lora(params, settings)
    assert result.ok, result.error
    rep = result.report
    assert rep["template"]["terminator"]["text"] == terminator
    assert rep["metrics"]["trainLoss"] < rep["lossCurve"][0]["loss"]  # it learned something
    if arch == "gemma2":  # attention softcapping: the per-sample kernel does not apply, the block mask does
        assert rep["kernels"]["attention"] == "sdpa-block-mask"
    term_id = AutoTokenizer.from_pretrained(str(result.path)).convert_tokens_to_ids(terminator)
    assert term_id in json.loads((result.path / "generation_config.json").read_text("utf-8"))["eos_token_id"]

    gate = gate_candidate(settings, result.adapter_name, result.version)
    assert gate.metrics["goldenTotal"] > 0 and gate.metrics["valLoss"] is not None, gate.metrics

    merged = merge_adapter(settings, f"{result.adapter_name}@{result.version}")
    model = AutoModelForCausalLM.from_pretrained(str(merged.path)).eval()
    tok = AutoTokenizer.from_pretrained(str(merged.path))
    assert term_id in model.generation_config.eos_token_id and tok.chat_template == FAMILIES[family][0]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hallo?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]

    # `serve` answers with the adapter on the base as the merged model answers alone, in the family's template
    from lunatrain import registry, serving
    from lunatrain.settings import load_settings

    registry.activate(settings, result.adapter_name, result.version, own_base=True)  # whatever the gate said
    engine = serving.Engine(load_settings(home=settings.home, base_model=str(base)))
    gen = engine.start(
        engine.resolve(result.adapter_name),
        [{"role": "user", "content": "Hallo?"}],
        serving.Sampling(max_tokens=4, temperature=0),
    )
    gen.run()
    assert gen.prompt_tokens == ids.shape[1] and gen.new_ids == out[0, ids.shape[1] :].tolist()[: len(gen.new_ids)]
    assert gen.new_ids, (arch, family)


def _trained_planned_gated_and_merged(settings, base, **given) -> tuple[dict, list[str]]:
    """Prepare, train (`run_lora`), gate and merge on `base`; the plan's LoRA bytes are those of the parameters
    PEFT made, and the merged model answers as base + adapter. The adapter's config and its tensors' names."""
    import math

    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    params = parse_params(
        {"baseModel": str(base), "epochs": 1, "batchSize": 4, "rank": 4, "learningRate": 5e-3, "seed": 1}
        | {"maxSeqLength": 128, "dropout": 0.0}
        | given
    )
    report = prepare(settings, params)
    result = run_lora(params, settings)
    assert result.ok, result.error
    with safe_open(str(result.path / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        trained = sum(math.prod(f.get_slice(k).get_shape()) for k in names if ".lora_" in k)
    assert report.memory["bytes"]["lora"] == 16 * trained  # weights, gradients and Adam's two moments

    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        gate = gate_candidate(settings, result.adapter_name, result.version)
    assert gate.metrics["valLoss"] is not None, gate.metrics
    # review repro: PEFT called a mixture's rank pattern "ignored" at every load, while it applies it
    assert not [w for w in said if "_pattern keys did not match" in str(w.message)], [str(w.message) for w in said]

    merged = merge_adapter(settings, f"{result.adapter_name}@{result.version}")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(result.path))
        expected = adapted.eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged.path)).eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    return json.loads((result.path / "adapter_config.json").read_text()), names


@pytest.mark.parametrize("arch", EXPERTS_WRAPPED)
def test_a_mixture_of_experts_trains_its_experts_and_is_planned_gated_and_merged(settings, vocab_dir, arch):
    """Explore repro (Qwen3-MoE, Mixtral): all-linear puts LoRA on every expert (PEFT wraps the fused expert
    parameters, rank x experts rows a tensor), and the registry's rank check took those rows for a rank the
    config does not give: every such adapter was "damaged" to the gate, merge and chat. The profile's dropout,
    which LoRA on experts cannot take, failed the run after prepare said ok, blaming targetModules; and the
    memory plan counted one dense MLP's LoRA a layer, none of the experts'."""
    base = build_arch_model(settings.models_dir / f"tiny-{arch}", vocab_dir, arch)
    write_export(settings, make_records(24, multi_turn_every=4))
    with pytest.raises(UsageError, match=r"experts.* no dropout: set --dropout 0"):
        prepare(settings, parse_params({"baseModel": str(base), "dropout": 0.05}))
    config, _ = _trained_planned_gated_and_merged(settings, base)
    assert config["target_parameters"]  # the experts train


def test_all_linear_leaves_out_a_linear_layer_that_computes_something_else(settings, vocab_dir):
    """Explore repro (Llama 4): all-linear wrapped its router, a linear layer class that returns the routing
    scores with the chosen experts; every step failed with "AttributeError: 'tuple' object has no attribute
    'dtype'" and no word of which layer. A linear layer class of its own computation is left out."""
    base = build_arch_model(settings.models_dir / "tiny-llama4", vocab_dir, "llama4")
    write_export(settings, make_records(24, multi_turn_every=4))
    config, names = _trained_planned_gated_and_merged(settings, base, dropout=0.05)
    assert "router" in config["exclude_modules"] and not [n for n in names if "router" in n], names
    assert [n for n in names if "self_attn.q_proj" in n]


def test_a_multimodal_folder_trains_its_language_model_only(settings, vocab_dir):
    """Explore repro (a google/gemma-3-*-it folder): all-linear put LoRA on the vision tower too; text-only data
    never reaches it, so those layers stayed exactly zero, in the optimizer and the adapter file, uncounted by
    the memory plan."""
    base = build_gemma3_multimodal(settings.models_dir / "tiny-gemma3-it", vocab_dir)
    write_export(settings, make_records(24, multi_turn_every=4))
    config, names = _trained_planned_gated_and_merged(settings, base)
    assert config["exclude_modules"] and not [n for n in names if "vision" in n], names
    assert [n for n in names if "language_model" in n and ".mlp." in n]  # the language model's layers train
    # review repro: a list of names (the attention-only way out) reached the vision tower's q/k/v as well
    result = run_lora(
        parse_params({"baseModel": str(base), "maxSteps": 1, "targetModules": ["q_proj", "v_proj"]}), settings
    )
    assert result.ok, result.error
    from safetensors import safe_open

    with safe_open(str(result.path / "adapter_model.safetensors"), "pt") as f:
        listed = list(f.keys())
    assert listed and not [n for n in listed if "vision" in n], listed
    # review repro: a name only the vision tower has (SigLIP's fc1) passed prepare, and the run failed with PEFT's
    # "No modules were targeted"; beside q_proj it was left out without a word
    for targets in (["fc1"], ["q_proj", "fc1"]):
        with pytest.raises(UsageError, match=r"targetModules \['fc1'\] name no module of base model"):
            prepare(settings, parse_params({"baseModel": str(base), "targetModules": targets}))


def test_a_template_without_a_system_role_is_gated_on_the_cases_it_takes(settings, vocab_dir):
    """Explore repro: Gemma 2's instruction-tuned template refuses a system turn, and the shipped golden suite
    has a case with one, so the gate (the flow's first step) ended every `lunatrain luna` on such a base at
    once ("the chat template refuses case 'yes-no-equals' … change the case or the template"), whatever the
    data. That case is left out, and said; the others judge."""
    from lunatrain.evalgate import eval_gate
    from lunatrain.evalsuite import load_suite

    base = build_arch_model(settings.models_dir / "gemma2-strict", vocab_dir, "gemma2", family="gemma-2-strict")
    with_system = [c.id for c in load_suite(settings) if any(m["role"] == "system" for m in c.messages)]
    assert with_system, "the shipped suite no longer has a case with a system message"
    report = eval_gate(settings, base_model=str(base))
    judged = {c["id"] for c in report.cases}
    assert judged and not judged & set(with_system) and report.metrics["goldenTotal"] == len(judged)
    for case in with_system:
        assert any(
            f"case {case!r}" in n and "refuses its system message (System role not supported)" in n
            for n in report.notes
        ), report.notes
    # Review repro: the note reached `eval-gate` alone; the flow's summary (luna, auto) said only "passed".
    from typer.testing import CliRunner

    from lunatrain.cli import app

    said = CliRunner().invoke(app, ["luna", "--local", "--baseModel", str(base)]).output
    assert f"note       case {with_system[0]!r}" in said, said
    # and so did `lora`'s: it said "Eval gate: passed." alone
    records = make_records(16, val_every=4)
    for record in records:
        record["messages"] = [m for m in record["messages"] if m["role"] != "system"]
    write_export(settings, records)
    flags = ["--local", "--baseModel", str(base), "--maxSteps", "1", "--minCurated", "0", "--adapterName", "g2"]
    said = CliRunner().invoke(app, ["lora", *flags]).output
    assert f"Note: case {with_system[0]!r}" in said, said


def test_chat_returns_the_reasoning_markers_a_tokenizer_flags_special_as_the_gate_judges_them(settings, vocab_dir):
    """Reasoning explore repro: on a base whose tokenizer flags `<think>`/`</think>` special (the thinking
    family), chat decoded answers without special tokens and returned "PlanLuna" where the gate judged
    "<think>Plan</think>Luna": a client could not tell reasoning from answer. Both keep them now; the
    template's own markup and the terminator stay out of the answer."""
    from lunatrain import serving
    from lunatrain.settings import load_settings

    base = build_arch_model(settings.models_dir / "thinking", vocab_dir, "qwen2", family="thinking")
    engine = serving.Engine(load_settings(home=settings.home, base_model=str(base)))
    gen = engine.start(
        engine.resolve(str(base)), [{"role": "user", "content": "Wer bist du?"}], serving.Sampling(max_tokens=4)
    )
    tok = gen.tokenizer
    said = ["<think>", *tok.tokenize("Plan"), "</think>", *tok.tokenize("Luna"), "<|im_start|>"]
    gen.new_ids = tok.convert_tokens_to_ids(said)
    gen._advance(final=True)
    gen.close()
    assert gen.text == "<think>Plan</think>Luna", gen.text  # a leaked turn header is no text of the answer
