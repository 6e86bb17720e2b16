"""The memory plan: shapes from config.json, the checkpointing decision, refusals that name the option that
would fit, and its place before a job (prepare, run_lora before the model loads). Run:
`pytest tests/test_memplan.py -q`."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from lunatrain import memplan, models
from lunatrain.errors import CheckFailed
from lunatrain.models import resolve_base
from lunatrain.params import LoraParams, parse_params

from family_templates import ARCHITECTURES, tiny_config
from helpers import make_records, write_export

GIB = 1 << 30
CUDA_16 = {"type": "cuda", "memoryFree": 16 * GIB}


def _shape(name: str) -> memplan.Shape:
    return next(s for s in memplan.reference_shapes() if s.name == name)


@pytest.mark.parametrize("tied", [True, False])
def test_the_shape_counts_the_parameters_of_the_real_model(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    shape = memplan.Shape.from_config(config.to_dict(), "x")
    assert shape.params == sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert shape.linear_params == linear


def test_lora_bytes_match_the_peft_adapter_of_luna_tiny(settings):
    """16 bytes (weight, gradient, two AdamW moments) per LoRA parameter PEFT actually creates."""
    from peft import LoraConfig, get_peft_model

    info = models.resolve_base(None, settings)
    model = get_peft_model(models.load_model(info, settings), LoraConfig(r=8, target_modules="all-linear"))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    job = memplan.Job("cpu", 100, 50, 1, 8, ("all-linear",), True, "none", False)
    assert memplan.estimate(memplan.model_shape(info), job)["lora"] == 16 * n_lora
    job = memplan.Job("cpu", 100, 50, 1, 8, ("q_proj", "v_proj"), True, "none", False)
    model = get_peft_model(models.load_model(info, settings), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert memplan.estimate(memplan.model_shape(info), job)["lora"] == 16 * sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_auto_checkpointing_turns_on_only_when_needed():
    shape, params = _shape("Llama-3.2-1B"), LoraParams(batch_size=4, max_seq_length=4096)
    roomy = memplan.plan(shape, params, {"type": "cuda", "memoryFree": 140 * GIB})
    assert roomy.fits and not roomy.checkpointing and roomy.checkpointing_reason.startswith("not needed")
    tight = memplan.plan(shape, params, CUDA_16)
    assert tight.fits and tight.checkpointing and tight.checkpointing_reason == "needed to fit"
    assert tight.parts["activations"] < roomy.parts["activations"] / 4
    forced = memplan.plan(
        shape, params.model_copy(update={"gradient_checkpointing": "true"}), {"type": "cuda", "memoryFree": 140 * GIB}
    )
    assert forced.checkpointing and forced.checkpointing_reason == "requested"


def test_a_job_that_cannot_fit_names_the_option_that_would():
    shape = _shape("Llama-3.1-8B")  # 16 GB of bf16 weights: not on a 16 GB card, but in 4 bits
    plan = memplan.plan(shape, LoraParams(), CUDA_16)
    assert not plan.fits and plan.suggestion == "--quantize=4bit"
    assert plan.message.startswith("This job needs about") and "it would fit with --quantize=4bit" in plan.message
    assert memplan.plan(shape, LoraParams(quantize="4bit"), CUDA_16).fits
    # checkpointing switched off by hand: turning it back on is the smallest change
    off = memplan.plan(_shape("Llama-3.2-1B"), LoraParams(max_seq_length=4096, gradient_checkpointing="false"), CUDA_16)
    assert off.suggestion == "--gradientCheckpointing=true"
    # already 4-bit: a smaller micro-batch, keeping the samples per optimizer step
    long = LoraParams(quantize="4bit", batch_size=8, max_seq_length=8192)
    plan = memplan.plan(shape, long, CUDA_16)
    assert plan.suggestion and plan.suggestion.startswith("--batchSize=")
    batch = int(plan.suggestion.split()[0].split("=")[1])
    assert f"--gradientAccumulation={8 // batch}" in plan.suggestion
    fixed = memplan.plan(shape, long.model_copy(update={"batch_size": batch}), CUDA_16)
    assert fixed.fits
    hopeless = memplan.plan(_shape("Llama-3.3-70B"), LoraParams(), {"type": "cuda", "memoryFree": 8 * GIB})
    assert hopeless.suggestion is None and "use a smaller base model" in hopeless.message


def test_chunked_loss_is_what_keeps_a_large_vocabulary_small():
    shape = _shape("Llama-3.2-1B")
    job = memplan.Job("cuda", 16384, 16384, 1, 16, ("all-linear",), True, "none", True)
    chunked = memplan.estimate(shape, job)["logits"]
    from dataclasses import replace

    plain = memplan.estimate(replace(shape, chunked_loss=False), job)["logits"]
    assert plain > 16384 * 128256 * 12 > 20 * chunked  # >25 GB of logits vs about 1 GB


def test_check_fits_raises_one_sentence_for_luna_tiny_on_a_tiny_device(settings):
    params = parse_params({"maxSeqLength": 4096, "batchSize": 64})
    with pytest.raises(CheckFailed) as err:
        memplan.check_fits(settings, params, {"type": "cpu", "memoryFree": 1200 << 20})
    message = err.value.message
    assert message.startswith("This job needs about") and message.count(". ") == 0 and message.endswith(".")
    fix = message.split("it would fit with ")[1].rstrip(".")
    batch, accumulation = (int(flag.split("=")[1]) for flag in fix.split())
    assert fix.startswith("--batchSize=") and batch * accumulation >= 64
    assert memplan.check_fits(
        settings, params.model_copy(update={"batch_size": batch}), {"type": "cpu", "memoryFree": 1200 << 20}
    ).fits
    plan = memplan.check_fits(settings, params, {"type": "cpu", "memoryFree": 64 * GIB})
    assert plan.fits and plan.base_model == "luna-tiny" and plan.tokens == 64 * 4096


def test_a_refusal_carries_its_check_for_the_dashboard_and_the_trainer_refuses_only_what_no_data_fits(settings):
    """Dashboard repro: the preflight said a job of batchSize 1024 x maxSeqLength 131072 on luna-tiny fits
    (about 1.25 GiB: the data holds far fewer tokens), while Start and `lora` were refused by the trainer,
    which planned the worst case (1176.8 GiB) before it had the data, with a fix sized for data that does not
    exist. The trainer now refuses at submit only what no data could make fit (the run plans the data before
    it loads the model). And the refusal came without its check, so the German page showed it in English."""
    big = parse_params({"batchSize": 1024, "maxSeqLength": 131072, "gradientCheckpointing": "false"})
    cpu = {"type": "cpu", "memoryFree": 20 * GIB}
    with pytest.raises(CheckFailed) as worst:
        memplan.check_fits(settings, big, cpu)  # the worst case: every micro-batch full
    assert worst.value.params == {
        "check": "check.memory_plan.too_big",
        "needGiB": round(
            memplan.plan(memplan.model_shape(resolve_base("luna-tiny", settings)), big, cpu).total / GIB, 2
        ),
        "budgetGiB": round(memplan.usable(20 * GIB, "cpu") / GIB, 2),
        "suggestion": worst.value.message.split("it would fit with ")[1].rstrip("."),
    }, worst.value.params
    least = memplan.check_fits(settings, big, cpu, least=True)  # what the trainer checks at submit
    assert least.fits and least.tokens == 1
    huge = {"type": "cpu", "memoryFree": 1 << 20}  # not even the weights: refused whatever the data
    with pytest.raises(CheckFailed) as none_fits:
        memplan.check_fits(settings, big, huge, least=True)
    assert none_fits.value.params["check"] == "check.memory_plan.too_big_any", none_fits.value.params
    assert "use a smaller base model or a device with more memory" in none_fits.value.message


def test_capabilities_list_the_reference_shapes(settings):
    lines = memplan.capabilities({"type": "cuda", "memoryFree": 24 * GIB})
    # repro: the head named only the free memory, so "needs 20.2 GiB" beside "22.0 GiB free" read as wrong
    assert lines[0].startswith("What this cuda can train (24.0 GiB free, 21.6 GiB usable; LoRA r=16, 4 x 1024 tokens")
    assert len(lines) == len(memplan.reference_shapes()) + 2
    verdict = {line.split()[0]: line for line in lines[1:-1]}
    assert "fits (" in verdict["Qwen2.5-0.5B"] and "too large" in verdict["Llama-3.3-70B"]
    assert "--quantize=4bit" in lines[-1]
    assert memplan.capabilities({"type": "cpu", "memoryFree": 512 << 20})[-1] == "  largest: none of these shapes"


# --- before a job ----------------------------------------------------------------------------------


def _small_device(monkeypatch, free: int) -> None:
    monkeypatch.setattr(memplan, "device_memory", lambda kind: {"type": kind, "memoryFree": free})


@pytest.mark.usefixtures("no_gpu")  # device auto: the CPU, as the messages say
def test_run_lora_refuses_before_loading_the_model(settings, monkeypatch):
    from lunatrain import train

    write_export(settings, make_records(24, val_every=6))
    _small_device(monkeypatch, 600 << 20)

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(CheckFailed, match=r"^This job needs about .* on cpu but only"):
        train.run_lora(parse_params({"adapterName": "nofit", "maxSeqLength": 128}), settings)
    assert not (settings.adapters_dir / "nofit").exists()


@pytest.mark.usefixtures("no_gpu")
def test_a_job_that_cannot_fit_is_a_failed_check_for_prepare_and_lora_alike(settings, monkeypatch):
    """Repro: the same job too large for the device ended `prepare` with exit 1 (a failed check) but
    `lora` with exit 2 (a usage error; the trainer answered 422), although the options are valid and only
    this machine is too small. Both are a failed check now: exit 1, and 409 check_failed from the trainer."""
    import httpx
    from typer.testing import CliRunner

    from lunatrain.cli import app
    from lunatrain.service import client

    write_export(settings, make_records(24, val_every=6))
    _small_device(monkeypatch, 600 << 20)
    for args in (
        [*["prepare", "--minCurated=0"], "--maxSeqLength=128"],
        [*["lora", "--local", "--minCurated=0", "--maxSeqLength=128"]],
    ):
        r = CliRunner().invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1, (args, r.output)
        assert "needs about" in lines[-1] and "on cpu but only" in lines[-1], (args, r.output)
    assert not (settings.adapters_dir / "luna-adapter").exists()
    # the trainer's 409 check_failed reaches `lora` (and the API) as a failed check, not as a conflict
    body = {"error": {"code": "check_failed", "message": "This job needs about 2.0 GiB on cpu but only 0.5 GiB."}}
    err = client._error(settings, httpx.Response(409, json=body))
    assert isinstance(err, CheckFailed) and err.exit_code == 1 and err.message == body["error"]["message"]


@pytest.mark.usefixtures("no_gpu")  # device auto: the CPU, as the messages say
def test_auto_checkpointing_is_decided_by_the_plan_and_recorded(settings, monkeypatch):
    """On a device where the job only fits with checkpointing, auto turns it on, and the report says so."""
    from lunatrain import train

    write_export(settings, make_records(24, val_every=6))
    params = parse_params({"adapterName": "auto-ck", "epochs": 1, "maxSteps": 1, "maxSeqLength": 128, "rank": 4})
    shape = memplan.model_shape(models.resolve_base(None, settings))
    train_set = [e for e in _tokenized(settings).train if e.n_supervised]
    tokens, supervised, rows = memplan.largest_batch(train_set, params, shape)
    sizes = {
        ck: memplan.estimate(shape, memplan.Job("cpu", tokens, supervised, rows, 4, ("all-linear",), True, "none", ck))[
            "total"
        ]
        for ck in (False, True)
    }
    assert sizes[True] < sizes[False]
    # free memory whose budget lies between the two estimates
    _small_device(monkeypatch, int((sizes[True] + sizes[False]) / 2 / memplan.BUDGET_FRACTION["cpu"]))
    seen = {}
    real = train.load_lora_model

    def spy(*args, **kwargs):
        model, chosen, loss = real(*args, **kwargs)
        # `is_gradient_checkpointing` is the deprecated name of later transformers 5.x releases
        base = model.get_base_model()
        named = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else None
        seen["checkpointing"] = getattr(base, named or "is_gradient_checkpointing")
        return model, chosen, loss

    monkeypatch.setattr(train, "load_lora_model", spy)
    result = train.run_lora(params, settings)
    assert result.ok and seen["checkpointing"] is True
    plan = result.report["memoryPlan"]
    assert plan["gradientCheckpointing"] is True and plan["gradientCheckpointingReason"] == "needed to fit"
    assert plan["tokensPerMicroBatch"] == tokens and result.report["params"]["gradientCheckpointing"] == "auto"
    assert result.report["loss"] == {"path": "chunked", "chunkTokens": 5461}


def _tokenized(settings):
    from lunatrain.export import read_tier
    from lunatrain.tokens import tokenize_tier

    tok = models.load_tokenizer(None, settings)
    return tokenize_tier(settings, "curated", tok, 128, data=read_tier(settings, "curated"))


@pytest.mark.usefixtures("no_gpu")  # device auto: the CPU, as the messages say
def test_prepare_writes_the_plan_and_fails_when_the_job_cannot_fit(settings, monkeypatch):
    from lunatrain.prepare import prepare

    write_export(settings, make_records(24, val_every=6))
    report = prepare(settings, parse_params({"maxSeqLength": 128}))
    check = report.check("memory_plan")
    assert check.severity == "info" and check.message.startswith("luna-tiny fits on cpu")
    assert check.count == 0  # a finding, not a figure: the bytes are in the plan and the message, never a count
    written = json.loads((settings.reports_training_dir / "prepare-latest.json").read_text())
    assert written["memoryPlan"]["fits"] is True and written["memoryPlan"]["bytes"]["weights"] > 0

    _small_device(monkeypatch, 600 << 20)
    report = prepare(settings, parse_params({"maxSeqLength": 128}))
    assert report.status == "fail" and report.check("memory_plan").severity == "fail"
    assert report.check("memory_plan").count == 1
    with pytest.raises(
        CheckFailed,
        match=r"^Preflight failed: memory_plan \(1\); this job needs about .*"
        r"change the options\.$",
    ):
        report.raise_on_fail()


def _small_shape(varlen: bool) -> memplan.Shape:
    return memplan.Shape(
        "x",
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=4,
        head_dim=16,
        intermediate=128,
        vocab=512,
        tied=True,
        varlen=varlen,
    )


def test_largest_batch_bounds_every_micro_batch():
    from lunatrain.tokens import IGNORE, Encoded

    samples = [Encoded(list(range(n)), [IGNORE] * (n - s) + [1] * s) for n, s in ((10, 2), (50, 5), (30, 25), (5, 5))]
    flat = _small_shape(varlen=True)
    assert memplan.largest_batch(samples, parse_params({"batchSize": 2}), flat) == (50 + 30, 25 + 5, 1)
    assert memplan.largest_batch(samples, parse_params({"batchSize": 10}), flat) == (95, 37, 1)


@pytest.mark.parametrize(
    ("packing", "varlen", "laid_out"),
    [
        (True, True, (2048 + 7 * 60, 1)),  # one flat row: no padding
        (False, True, (8 * 2048, 8)),  # a row per sample, each padded to the longest
        (True, False, (3 * 2048, 3)),  # first-fit rows of maxSeqLength, padded: at most 2S/C + 1 of them
    ],
)
def test_the_largest_micro_batch_is_measured_as_training_lays_it_out(packing, varlen, laid_out):
    """Explore repro: the plan counted the batchSize longest samples' tokens, as if every micro-batch were one
    unpadded row. Without packing each sample is a row padded to the batch's longest, and a model without
    per-sample attention (Gemma 2) gets first-fit rows padded to the widest: a batch of one 2048-token sample
    and seven short ones ran 8 x 2048 (or 2 x 2048) positions, and peak memory was 2 to 3.3 times the plan
    that said "fits"."""
    from lunatrain.tokens import IGNORE, Encoded

    lengths = [2048] + [60] * 80
    samples = [Encoded(list(range(n)), [IGNORE] * (n - 5) + [1] * 5) for n in lengths]
    params = parse_params({"batchSize": 8, "maxSeqLength": 2048, "packing": packing})
    batch = memplan.largest_batch(samples, params, _small_shape(varlen))
    assert (batch.tokens, batch.rows) == laid_out and batch.supervised == 8 * 5
    # and the plan counts those positions, and for a dense mask the rows as they are
    planned = memplan.plan(_small_shape(varlen), params, {"type": "cpu", "memoryFree": 64 << 30}, batch=batch)
    assert planned.tokens == laid_out[0]


def test_a_cpu_job_on_a_gpu_machine_is_planned_against_the_cpu(settings):
    plan = memplan.check_fits(settings, parse_params({"device": "cpu"}), {"type": "cuda", "memoryFree": 1})
    assert plan.device == "cpu" and plan.fits


def _measured_gpu_rows() -> list[dict]:
    """The rows of bench/results/memory_gpu.md (device memory measured on an H200 per shape and option), each
    as {column name: cell}."""
    from pathlib import Path

    table = Path(__file__).resolve().parent.parent / "bench" / "results" / "memory_gpu.md"
    lines = [line.strip().strip("|") for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].split("|")]
    rows = [dict(zip(head, (c.strip() for c in line.split("|")), strict=True)) for line in lines[2:]]
    return rows


def test_the_estimate_admits_no_job_the_gpu_measurements_show_does_not_fit():
    """The plan against bench/results/memory_gpu.md (three published shapes, bf16 and 4-bit, with and without
    checkpointing, measured on an H200): a job the plan admits uses at most BUDGET_FRACTION of the free
    memory by its estimate, so the measured memory must stay under estimate / BUDGET_FRACTION; and the plan
    must not refuse jobs that fit by far (a third over the measured memory)."""
    from dataclasses import replace

    names = {"qwen2.5-0.5b": "Qwen2.5-0.5B", "llama-3.2-1b": "Llama-3.2-1B", "llama-3.1-8b": "Llama-3.1-8B"}
    mib = lambda cell: int(cell.replace(",", "")) << 20
    rows = _measured_gpu_rows()
    assert len(rows) == 12 and {r["model"] for r in rows} == set(names)
    for r in rows:
        shape = replace(_shape(names[r["model"]]), chunked_loss=r["loss"] == "chunked")
        ck = {"on": True, "off": False}[r["checkpointing"]]
        job = memplan.Job(
            "cuda", int(r["tokens"]), int(r["supervised"]), 1, 16, ("all-linear",), True, r["quantize"], ck
        )
        estimate = memplan.estimate(shape, job)["total"]
        ratio = mib(r["in use"]) / estimate
        assert 0.75 <= ratio <= 1 / memplan.BUDGET_FRACTION["cuda"], (r, estimate, ratio)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "gpt_oss"])
def test_the_plan_lays_batches_out_as_training_will_on_each_family(arch, tmp_path):
    """Review repro: the plan took per-sample attention for every model without attention softcapping, while
    training also keeps its own attention for attention sinks (gpt-oss) and logit caps: a gpt-oss batch the
    plan counted as one unpadded row trained as padded rows with a dense mask (3.4 times the plan). The plan
    asks the model's own architecture, as training does."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from lunatrain import kernels

    cls_name, extra = ("GptOssConfig", {"num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": 8})
    if arch != "gpt_oss":
        cls_name, _, extra = ARCHITECTURES[arch]
    config = tiny_config(cls_name, pad_token_id=0, **extra)
    config.save_pretrained(tmp_path)
    planned = memplan.model_shape(types.SimpleNamespace(id=arch, path=str(tmp_path))).varlen
    model = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(config), LoraConfig(r=2, target_modules="all-linear")
    )
    kernels.install(model, "cpu")
    assert planned == kernels.uses_varlen(model), arch
    assert planned is (arch not in ("gemma2", "gpt_oss"))


def test_no_micro_batch_of_first_fit_rows_exceeds_the_plan():
    """Review repro: the plan laid out first-fit rows for the batchSize longest samples, but micro-batches are
    drawn at random and first fit is not monotone: of lengths [60, 45, 45, 40, 40] at maxSeqLength 100 and
    batch size 3 it counted 180 positions, and the batch [60, 40, 40] takes 2 rows of 100."""
    import itertools
    import random

    from lunatrain.tokens import IGNORE, Encoded, make_batch

    rng = random.Random(7)
    cases = [([60, 45, 45, 40, 40], 3, 100)]
    cases += [([rng.randint(1, 1024) for _ in range(8)], rng.randint(1, 5), 1024) for _ in range(40)]
    for lengths, batch_size, capacity in cases:
        samples = [Encoded(list(range(n)), [IGNORE] * (n - 1) + [1]) for n in lengths]
        params = parse_params({"batchSize": batch_size, "maxSeqLength": capacity})
        bound = memplan.largest_batch(samples, params, _small_shape(varlen=False))
        for batch in itertools.combinations(samples, batch_size):
            laid = make_batch(list(batch), capacity, 0).input_ids
            assert laid.numel() <= bound.tokens, (lengths, batch_size, [len(s) for s in batch], bound)


def test_the_plan_never_runs_the_model_folders_own_code(tmp_path, monkeypatch):
    """Review repro: deciding per-sample attention built the model from its config without
    trust_remote_code=False. A config of a type transformers ships but not as a causal LM (t5), whose auto_map
    names the folder's own class, made transformers ask on stdin whether to run the folder's code, and a "y"
    ran it during `prepare`."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg |= {"model_type": "t5", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "RAN"
    (tmp_path / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedModel\nclass EvilForCausalLM(PreTrainedModel):\n    pass\n"
    )
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")  # a user answering y
    memplan.model_shape(types.SimpleNamespace(id="m", path=str(tmp_path)))
    assert not asked and not marker.exists(), "the model folder's Python code was offered or ran"


def test_the_plan_counts_every_expert_of_a_mixture_of_experts_model(tmp_path):
    """Explore repro: the shape counted one dense MLP per layer and never read the experts, so a gpt-oss model
    of 221M parameters was planned with 96.5 MiB of weights against 842 MiB; and 4-bit weights were planned
    for the experts, which transformers keeps as fused parameters that bitsandbytes does not quantize. The
    plan counts the model built on the meta device: every parameter, and as quantizable only its linear
    layers."""
    import transformers

    config = tiny_config("GptOssConfig", num_local_experts=8, num_experts_per_tok=2, sliding_window=8)
    config.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(config)
    shape = memplan.model_shape(types.SimpleNamespace(id="moe", path=str(tmp_path)))
    assert shape.params == sum(p.numel() for p in model.parameters())
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert shape.linear_params == sum(m.weight.numel() for m in linear)
    assert shape.experts_per_token == 2  # each token's activations go through two experts' MLPs


def test_a_gpu_without_native_bfloat16_is_planned_in_float32():
    """Review repro: the plan took 2 bytes a value on every GPU, while training computes in float32 where
    bfloat16 is not native: a 3B job was planned at 9.6 GiB ("fits" on 16 GiB) that needs 17.3."""
    shape, params = _shape("Llama-3.2-1B"), LoraParams(gradient_checkpointing="false")
    native = memplan.plan(shape, params, CUDA_16)
    emulated = memplan.plan(shape, params, CUDA_16 | {"bf16": False})
    assert emulated.parts["weights"] == 2 * native.parts["weights"]
    assert emulated.parts["activations"] == 2 * native.parts["activations"]


def test_a_model_is_built_for_its_plan_once_per_config_and_installation(settings, tiny, monkeypatch):
    """Planning builds the base model on the meta device, which needs torch and transformers: 3-4 CPU-seconds
    of imports in a process that has neither (the trainer admitting its first job after prepare planned the
    same model). What the build says is kept in data/cache/shapes, keyed by the config.json, the installed
    transformers and torch and lunatrain's code: a changed config is built again, and a damaged or unwritable
    cache is only a cache."""
    info = models.resolve_base(None, settings)
    first = memplan.model_shape(info, settings)
    assert len(list((settings.cache_dir / "shapes").glob("*.json"))) == 1

    built: list[str] = []
    real = models.meta_model
    monkeypatch.setattr(models, "meta_model", lambda i: built.append(i.id) or real(i))
    assert memplan.model_shape(info, settings) == first and built == []  # another process would read it too

    (cached,) = (settings.cache_dir / "shapes").glob("*.json")
    cached.write_text("{not json")
    assert memplan.model_shape(info, settings) == first and built == ["luna-tiny"]
    assert memplan.model_shape(info, settings) == first and built == ["luna-tiny"]  # written whole again

    config = json.loads((Path(info.path) / "config.json").read_text())
    (Path(info.path) / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    changed = memplan.model_shape(info, settings)
    assert built == ["luna-tiny"] * 2 and changed.counted[0] < first.counted[0]

    # what an earlier installation kept goes with the next file written (each update would leave one a model)
    kept = json.loads(max((settings.cache_dir / "shapes").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    older = settings.cache_dir / "shapes" / "older.json"
    older.write_text(json.dumps(kept | {"ident": [kept["ident"][0], "4.0.0", "2.0.0", "0123456789abcdef"]}))
    (Path(info.path) / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    memplan.model_shape(info, settings)
    assert not older.exists() and len(list((settings.cache_dir / "shapes").glob("*.json"))) == 3
    (Path(info.path) / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))

    # review repro: a cache that cannot be written (a full disk: fsio says it as DiskFull) failed the plan
    from lunatrain import fsio
    from lunatrain.errors import DiskFull

    def full(*args, **kwargs):
        raise DiskFull("The disk is full.")

    shutil.rmtree(settings.cache_dir / "shapes")
    with monkeypatch.context() as m:
        m.setattr(fsio, "atomic_write_text", full)
        assert memplan.model_shape(info, settings) == changed

    (settings.cache_dir / "shapes").mkdir(exist_ok=True)

    shutil.rmtree(settings.cache_dir / "shapes")
    (settings.cache_dir / "shapes").write_text("a file where the folder goes")
    assert memplan.model_shape(info, settings) == changed and len(built) == 5


def test_a_multimodal_config_without_its_default_text_values_is_planned_from_transformers_defaults(tmp_path):
    """Review repro: transformers writes Gemma 3's 4b/12b/27b `text_config` without the values that equal its
    defaults (heads, vocabulary), and the plan refused those models ("does not describe a decoder"). And a
    `head_dim` of 0, transformers' own "derive it" in some configs, was refused after the dimension checks."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from lunatrain.memplan import model_shape

    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34}
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(SimpleNamespace(path=str(tmp_path), id="gemma-3-4b-it"))
    defaults = AutoConfig.for_model("gemma3_text")
    assert (shape.hidden, shape.layers) == (2560, 34)
    assert (shape.heads, shape.kv_heads, shape.vocab) == (
        defaults.num_attention_heads,
        defaults.num_key_value_heads,
        defaults.vocab_size,
    )
    plain = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    plain |= {"vocab_size": 1000, "intermediate_size": 128, "head_dim": 0}
    assert memplan.Shape.from_config(plain, "m").head_dim == 16
