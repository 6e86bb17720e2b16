"""Preflight checks and the tokenized cache. Run: `pytest tests/test_prepare.py -q` (add `-m "not slow"`
to skip the one that trains).

The planted dataset holds exactly one instance of each record-level problem, so every check's count and
example id are asserted exactly; the clean dataset must come out `ok`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lunatrain import export as export_mod
from lunatrain.cli import app
from lunatrain.errors import CheckFailed, NotFound, UsageError
from lunatrain.params import parse_params, total_steps
from lunatrain.prepare import optimizer_steps, prepare
from lunatrain.settings import load_settings

from helpers import make_records, write_export

MAX_LEN = 512


def write_files(settings, records: list[dict], *, extra_curated_lines: tuple[str, ...] = ()) -> None:
    """Write the export's files and a summary that matches them (the export's own format and formulas)."""
    d = settings.training_dir
    d.mkdir(parents=True, exist_ok=True)
    line = lambda r: json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"
    curated = [r for r in records if r["source"] == "curated"]
    content = {
        export_mod.CURATED_FILE: "".join(map(line, curated)) + "".join(extra_curated_lines),
        export_mod.MEMORY_FILE: "".join(line(r) for r in records if r["source"] == "memory"),
        export_mod.MERGED_FILE: "".join(map(line, records)),
    }
    for split, name in export_mod.SPLIT_FILES.items():
        content[name] = "".join(line(r) for r in curated if r["split"] == split)
    files = {}
    for name, text in content.items():
        data = text.encode("utf-8")
        (d / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "records": text.count("\n"), "bytes": len(data)}
    counts = {t: {"total": 0, "train": 0, "val": 0, "test": 0} for t in export_mod.TIERS}
    for r in records:
        for t in ("merged", r["source"] if r["source"] in ("curated", "memory") else "merged"):
            counts[t]["total"] += 1
            counts[t][r["split"]] += 1
    fp = export_mod.dataset_fingerprint({name: f["sha256"] for name, f in files.items()})
    summary = {
        "format": export_mod.SUMMARY_FORMAT,
        "exported_at": "2025-01-01T00:00:00+00:00",
        "store_revision": "none",
        "ratios": {"train": 0.8, "val": 0.2, "test": 0.0},
        "counts": counts,
        "files": files,
        "fingerprint": fp,
    }
    (d / export_mod.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", "utf-8")


def clean_records(n: int = 60, val_every: int = 5) -> list[dict]:
    out, seen = [], set()
    for r in make_records(n, seed=3, val_every=val_every):
        if r["hash"] not in seen:  # the generator repeats a few samples; an export never does
            seen.add(r["hash"])
            out.append(r | {"id": f"ex-{r['id']}"})
    return out


def _variant(
    rec: dict,
    rid: str,
    *,
    answer: str | None = None,
    messages: list | None = None,
    split: str | None = None,
    rehash: bool = True,
) -> dict:
    new = copy.deepcopy(rec)
    new["id"] = rid
    if messages is not None:
        new["messages"] = messages
    if answer is not None:
        new["messages"][-1]["content"] = answer
    if split is not None:
        new["split"] = split
    if rehash:
        new["hash"] = hashlib.sha256(json.dumps(new["messages"], sort_keys=True).encode()).hexdigest()
    return new


def planted_records() -> list[dict]:
    """A clean base (only 3 val samples: too few) plus one instance of each record-level problem."""
    base = [r for r in clean_records(40, val_every=1000)]
    curated_train = [r for r in base if r["source"] == "curated" and r["split"] == "train"]
    for r in curated_train[:2]:
        r["split"] = "val"
    a, b, c, d = curated_train[2], curated_train[3], curated_train[4], curated_train[5]
    exchange = [m for m in d["messages"] if m["role"] != "system"][-2:]
    user = [{"role": "user", "content": "Erzähl mir was."}]
    return base + [
        _variant(a, "bad-empty", answer="   "),
        _variant(a, "bad-trivial", answer="…"),
        _variant(b, "bad-dup", rehash=False),  # same hash, same split
        _variant(c, "bad-leak", rehash=False, split="val"),  # same hash, other split
        _variant(
            a,
            "bad-near",
            messages=[{"role": m["role"], "content": "  " + m["content"].upper() + " !"} for m in a["messages"]],
        ),
        _variant(a, "bad-long", messages=_turn("Was kannst du?", "Eine sehr lange Antwort über Luna. " * 120)),
        _variant(a, "bad-noanswer", messages=user),
        _variant(a, "bad-special", messages=_turn("Bist du fertig?", "Erledigt.<|im_end|> Noch etwas?")),
        # one question, two different facts: the adapter would learn either, or a blend
        _variant(a, "bad-fact-1", messages=_turn("Wie heißt mein Hund?", "Dein Hund heißt Bruno.")),
        _variant(a, "bad-fact-2", messages=_turn("Wie heißt mein Hund?", "Dein Hund heißt Bello.")),
        _variant(a, "bad-fact-3", messages=_turn("wie heißt mein Hund", "Dein Hund heißt BRUNO!")),  # fact 1 again
        # d's exchange after other turns in another conversation, whose split is val: the same prompt and answer
        # in train and in val, under two hashes
        _variant(
            d,
            "bad-exchange",
            messages=[*_turn("Guten Morgen!", "Guten Morgen! Was steht an?"), *copy.deepcopy(exchange)],
            split="val",
        ),
    ]


def _turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def params(**kw):
    return parse_params({"max_seq_length": MAX_LEN, "batch_size": 2, "epochs": 1} | kw)


EXPECTED = {  # check id -> (severity, count, example ids)
    "export_summary": ("fail", 1, ["assistant-sft-memory.jsonl"]),
    "malformed_record": ("fail", 1, [f"{export_mod.CURATED_FILE}:{{line}}"]),
    "volume": ("fail", None, []),
    "empty_train": ("info", None, []),
    "empty_response": ("fail", 1, ["bad-empty"]),
    "trivial_response": ("warn", 1, ["bad-trivial"]),
    "special_tokens_in_content": ("fail", 1, ["bad-special"]),
    "duplicate_exact": ("warn", 1, ["bad-dup"]),
    "duplicate_across_splits": ("fail", 1, ["bad-leak"]),
    "duplicate_normalized": ("warn", 2, ["bad-near", "bad-fact-3"]),
    "conflicting_answers": ("warn", 2, ["bad-fact-1", "bad-fact-2"]),
    "exchange_across_splits": ("warn", 1, ["bad-exchange"]),
    "truncated": ("warn", 1, ["bad-long"]),
    "no_trained_tokens": ("warn", 1, ["bad-noanswer"]),
    "eot_not_trained": ("info", 0, []),
    "val_too_small": ("warn", 4, []),
    "export_stale": ("info", 0, []),
    "reasoning_dropped": ("info", 0, []),  # no answer here has reasoning to drop
    "system_dropped": ("info", 0, []),  # ChatML keeps every system message
}


def test_planted_problems_are_each_reported_once(settings, tiny):
    records = planted_records()
    curated_lines = sum(1 for r in records if r["source"] == "curated")
    write_files(settings, records, extra_curated_lines=('{"messages": "not a list", "split": "train"}\n',))
    # an edit by hand after the export: the memory file no longer matches the summary
    mem = settings.training_dir / export_mod.MEMORY_FILE
    mem.write_text(mem.read_text("utf-8").replace("wohnt", "lebt", 1), "utf-8")

    report = prepare(settings, params(), min_curated=1000)

    assert report.status == "fail"
    got = {c.id: c for c in report.checks}
    for cid, (severity, count, examples) in EXPECTED.items():
        check = got[cid]
        assert check.severity == severity, (cid, check)
        if count is not None:
            assert check.count == count, (cid, check)
        assert check.examples == [e.replace("{line}", str(curated_lines + 1)) for e in examples], (cid, check)
    # the curated file's chat records: its malformed line is no example (it counted as one, data-check repro)
    assert got["volume"].count == curated_lines
    assert set(got) == set(EXPECTED) | {"token_stats", "estimate", "terminator", "memory_plan"}
    written = json.loads(Path(report.path).read_text("utf-8"))
    assert written["status"] == "fail"
    assert {c["id"]: c["count"] for c in written["checks"]}["duplicate_across_splits"] == 1
    with pytest.raises(CheckFailed, match="duplicate_across_splits"):
        report.raise_on_fail()


@pytest.mark.usefixtures("no_gpu")  # the estimate for device auto: the CPU
def test_clean_dataset_passes_with_token_stats_and_estimate(settings, tiny):
    records = clean_records()
    write_files(settings, records)
    report = prepare(settings, params(), min_curated=10)
    assert report.status == "ok", [c for c in report.problems]
    assert report.raise_on_fail() is report
    # Repro: the report named its token cache by absolute path, wrong once the data root moved
    cache = Path(report.cache["path"])
    assert not cache.is_absolute() and (settings.home / cache).exists(), cache
    train = [r for r in records if r["source"] == "curated" and r["split"] == "train"]
    stats = report.tokens["train"]
    assert stats["count"] == len(train) == report.check("token_stats").count
    assert 0 < stats["minLength"] <= stats["medianLength"] <= stats["p95Length"] <= stats["maxLength"] <= MAX_LEN
    assert 0 < stats["supervisedTokens"] < stats["tokens"]
    est = report.estimate
    assert est["device"] == "cpu" and est["optimizerSteps"] >= 1 and est["seconds"] > 0
    assert est["tokens"] == stats["tokens"]  # one epoch
    assert est["ranks"] == 1 and est["optimizerSteps"] == total_steps(len(train), params())
    # Repro: with ASSISTANT_LORA_GPUS=2 (two gloo processes on CPU) prepare said twice the steps the job ran:
    # each rank takes its own micro-batches, so a step trains both ranks' batches.
    two = prepare(load_settings(home=settings.home, lora_gpus=2), params(), min_curated=10).estimate
    assert two["ranks"] == 2 and two["optimizerSteps"] == total_steps(len(train), params(), 2)
    assert two["optimizerSteps"] < est["optimizerSteps"] and two["tokens"] == est["tokens"]
    # Explore repro: only the JSON's `ranks` said so; `lora --local` trains on one process, twice the steps.
    said = prepare(load_settings(home=settings.home, lora_gpus=2), params(), min_curated=10).check("estimate")
    assert said.code == "check.estimate.computed_ranks" and said.params["ranks"] == 2, said
    assert said.params["localSteps"] == est["optimizerSteps"]
    assert said.message.endswith(
        f"on 2 processes, as the trainer runs it; `lora --local` trains on one: ~{est['optimizerSteps']} steps"
    ), said.message
    assert "processes" not in report.check("estimate").message


def test_a_summary_that_does_not_list_the_tier_file_is_a_failed_check_not_a_crash(settings, tiny):
    """Repro: with a summary whose `files` lacked the trained tier's file, prepare raised KeyError before it
    wrote its report (reading the tier file's sha256 for the run's identity), where it had reported a failing
    export_summary check; `luna`'s prepare step ended in a traceback."""
    write_files(settings, clean_records())
    path = settings.training_dir / export_mod.SUMMARY_FILE
    summary = json.loads(path.read_text())
    del summary["files"][export_mod.CURATED_FILE]
    path.write_text(json.dumps(summary))
    report = prepare(settings, params(), min_curated=10)
    assert report.status == "fail" and report.check("export_summary").severity == "fail", report.problems
    assert report.dataset["tierSha256"] is None and settings.prepare_report.is_file()


def test_missing_export_is_a_clear_error(settings, tiny):
    with pytest.raises(NotFound, match="lunatrain export"):
        prepare(settings, params())


def test_val_split_empty_although_ratio_is_set(settings, tiny):
    records = [r | {"split": "train"} for r in clean_records(30)]
    write_files(settings, records)
    check = prepare(settings, params()).check("val_too_small")
    assert (check.severity, check.count) == ("warn", 0)
    assert "empty" in check.message


def _with_template(settings, tiny, name: str, template: str):
    model = settings.models_dir / name
    shutil.copytree(tiny, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text("utf-8"))
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg), "utf-8")
    return model


def _with_spare_rows(settings, tiny, name: str, rows: int = 3136):
    """luna-tiny with embedding rows beyond its vocabulary (as most real models have), for tokens a template
    adds; the rows it had keep their weights."""
    import torch
    from safetensors.torch import load_file, save_file

    model = settings.models_dir / name
    shutil.copytree(tiny, model)
    weights = load_file(str(model / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.cat([embed, embed[: rows - embed.shape[0]] * 0.5])
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text("utf-8"))
    (model / "config.json").write_text(json.dumps(cfg | {"vocab_size": rows}), "utf-8")
    return model


def test_the_template_terminator_is_trained_even_when_it_is_not_eos(settings, tiny):
    """A template that closes assistant turns with another token than the tokenizer's eos (the Gemma/Phi-3
    shape): that token is what is trained, and the report names it."""
    other = _with_template(
        settings,
        tiny,
        "tiny-other-eot",
        (
            "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
            "{%- if message['role'] == 'assistant' %}{{- '<|endoftext|>' }}{%- else %}{{- '<|im_end|>' }}{%- endif %}"
            "{{- '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
        ),
    )
    write_files(settings, clean_records(30))
    report = prepare(settings, params(base_model=str(other)))
    assert report.check("eot_not_trained").severity == "info", report.check("eot_not_trained")
    term = report.template["terminator"]
    assert term["text"] == "<|endoftext|>" and not term["inGenerationConfig"]  # luna-tiny's eos is <|im_end|>
    saved = json.loads(Path(report.path).read_text("utf-8"))
    assert saved["template"]["terminator"]["text"] == "<|endoftext|>" and len(saved["template"]["hash"]) == 64
    assert prepare(settings, params()).template["terminator"]["text"] == "<|im_end|>"


# DeepSeek-R1's shape (written for these tests): full-width markers, every answer's reasoning stripped, and a
# generation prompt that opens a reasoning block no rendered answer has.
R1_STYLE = (
    "{%- for m in messages %}{%- if m['role'] == 'system' %}{{- m['content'] }}"
    "{%- elif m['role'] == 'user' %}{{- '<\uff5cUser\uff5c>' + m['content'] }}"
    "{%- else %}{%- set c = m['content'] %}{%- if '</think>' in c %}{%- set c = c.split('</think>')[-1] %}{%- endif %}"
    "{{- '<\uff5cAssistant\uff5c>' + (c | trim) + '<\uff5cend\u2581of\u2581sentence\uff5c>' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<\uff5cAssistant\uff5c><think>\\n' }}{%- endif %}"
)


def test_a_template_that_drops_the_reasoning_it_serves_after_is_said_before_a_run(settings, tiny):
    """Reasoning explore repros: with DeepSeek-R1's template every answer trained without the `<think>` block
    the data gave it, and chat and the gate then asked the model after `<｜Assistant｜><think>\\n`, which training
    never put before an answer; prepare said nothing of either. Its full-width markers were no tokens, so the
    turn terminator was 18 tokens that no generation stops on, and prepare said adapters "ship one that does"."""
    from lunatrain.templates import store_template

    (settings.home / "r1.jinja").write_text(R1_STYLE, "utf-8")
    r1 = store_template(settings.home / "r1.jinja", settings)  # what `--chatTemplate r1.jinja` selects
    roomy = _with_spare_rows(settings, tiny, "tiny-roomy")  # its markers are added as tokens: rows for them
    records = clean_records(30)
    thinking = [r for r in records if r["source"] == "curated"][:5]  # the tier prepare reads
    for rec in thinking:
        answer = rec["messages"][-1]
        answer["content"] = "<think>\nIch denke nach.\n</think>\n\n" + answer["content"]
    write_files(settings, records)
    report = prepare(settings, params(chat_template=r1, base_model=str(roomy)))
    dropped = report.check("reasoning_dropped")
    assert (dropped.severity, dropped.count) == ("warn", 5), dropped
    assert sorted(dropped.examples) == sorted(r["id"] for r in thinking), dropped
    gap = report.check("generation_prompt")
    assert gap.severity == "warn" and gap.params == {"gap": "'<think>\\n'"}, gap
    assert "generation prompt ends in '<think>\\n', which training never puts before an answer" in gap.message
    term = report.check("terminator")  # the markers are added as tokens now: one token ends a turn
    assert (
        term.severity == "info"
        and term.count == 1
        and report.template["terminator"]["text"] == ("<\uff5cend\u2581of\u2581sentence\uff5c>")
    ), term
    # A base model's own template whose markers its tokenizer lacks: the terminator stays text, and is said so.
    own = _with_template(settings, tiny, "tiny-r1", R1_STYLE)
    term = prepare(settings, params(base_model=str(own))).check("terminator")
    assert term.severity == "warn" and term.code == "check.terminator.several_tokens" and term.count > 1, term
    # A Qwen3-style template keeps the last answer's reasoning and asks after what training puts first.
    from family_templates import THINKING

    qwen3 = _with_template(settings, tiny, "tiny-thinking", THINKING)
    report = prepare(settings, params(base_model=str(qwen3)))
    assert report.check("reasoning_dropped").severity == "info"
    assert "generation_prompt" not in [c.id for c in report.checks]


def test_a_terminator_of_several_tokens_is_a_warning_that_nothing_stops_on_it():
    """Reasoning explore repro: a terminator of 18 tokens was an info saying adapters and merged models ship a
    generation_config that stops on it; only one token can end a generation."""
    from lunatrain.prepare import _terminator_check
    from lunatrain.templates import Terminator

    check = _terminator_check(Terminator("</antwort>", (10, 11, 12), (2,), 2))
    assert check.severity == "warn" and check.code == "check.terminator.several_tokens", check
    assert check.params == {"terminator": "</antwort>", "tokens": 3}
    assert "which is 3 tokens: a generation stops only on one token" in check.message


def test_template_without_a_terminator_fails_in_one_sentence(settings, tiny):
    bare = _with_template(
        settings,
        tiny,
        "tiny-no-eot",
        (
            "{%- for message in messages %}{{- message['role'] + ': ' + message['content'] + '\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
        ),
    )
    write_files(settings, clean_records(30))
    with pytest.raises(UsageError, match="emits nothing after an assistant answer"):
        prepare(settings, params(base_model=str(bare)))


STRICT_ROLES = (
    "{%- for m in messages %}{%- if not loop.first and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant') }}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_every_example_the_template_refuses_is_one_failing_check(settings, tiny):
    """A template that refuses an example ([INST]-style strict alternation) stopped prepare at the first one
    with exit 2 and no report, so fixing N examples took N runs; all problems are collected, then it fails
    once (with the other checks still run on the rest)."""
    strict = _with_template(settings, tiny, "tiny-strict", STRICT_ROLES)
    records = clean_records(30)
    train = [r for r in records if r["source"] == "curated" and r["split"] == "train"]
    val = [r for r in records if r["source"] == "curated" and r["split"] == "val"]

    def twice_user(rec: dict, rid: str) -> dict:
        user = next(m for m in rec["messages"] if m["role"] == "user")
        return _variant(rec, rid, messages=[user, copy.deepcopy(user), rec["messages"][-1]])

    records += [twice_user(train[0], "bad-roles-1"), twice_user(val[0], "bad-roles-2")]
    write_files(settings, records)

    report = prepare(settings, params(base_model=str(strict)), min_curated=1)
    check = report.check("template_refused")
    assert (check.severity, check.count, check.examples) == ("fail", 2, ["bad-roles-1", "bad-roles-2"]), check
    assert "Conversation roles must alternate" in check.message
    assert report.status == "fail"
    assert report.check("token_stats").count == len(train)  # the refused ones left out, the rest checked
    saved = json.loads(Path(report.path).read_text("utf-8"))
    assert saved["status"] == "fail" and "template_refused" in {c["id"] for c in saved["checks"]}
    with pytest.raises(CheckFailed, match="template_refused"):
        report.raise_on_fail()
    # the CLI: the check's table and one failing sentence, exit 1 (a data check), not a usage error
    result = CliRunner().invoke(app, ["prepare", f"--baseModel={strict}", "--minCurated=1"])
    assert result.exit_code == 1 and "bad-roles-1, bad-roles-2" in result.output, result.output
    # training still refuses the tier (its tokens are never cached without the refused examples)
    from lunatrain.export import read_tier
    from lunatrain.models import load_chat_tokenizer, resolve_base
    from lunatrain.tokens import tokenize_tier

    info = resolve_base(str(strict), settings)
    tok, _ = load_chat_tokenizer(info, settings, None)
    with pytest.raises(UsageError, match="refuses example bad-roles-1"):
        tokenize_tier(settings, "curated", tok, MAX_LEN, data=read_tier(settings, "curated"), base=info)


# Renders only the last assistant turn (as some templates show only the final answer of a conversation).
LAST_ANSWER_ONLY = (
    "{%- for m in messages %}{%- if m['role'] != 'assistant' or loop.last %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_drops_an_assistant_turn_names_the_example_in_the_refused_check(settings, tiny):
    """Repro: a template that drops an earlier assistant turn stopped prepare with "The chat template drops or
    rewrites assistant turn 2; it cannot be trained on." naming no example, and at the first one only."""
    dropping = _with_template(settings, tiny, "tiny-last-answer", LAST_ANSWER_ONLY)
    records = clean_records(30)
    curated = [r for r in records if r["source"] == "curated"]

    def two_answers(rec: dict, rid: str) -> dict:
        user, answer = rec["messages"][-2], rec["messages"][-1]
        earlier = [{"role": "user", "content": "Hallo!"}, {"role": "assistant", "content": "Hallo, ich bin Luna."}]
        return _variant(rec, rid, messages=[*earlier, copy.deepcopy(user), copy.deepcopy(answer)])

    records += [two_answers(curated[0], "two-answers-1"), two_answers(curated[1], "two-answers-2")]
    write_files(settings, records)
    report = prepare(settings, params(base_model=str(dropping)), min_curated=1)
    check = report.check("template_refused")
    several = [r["id"] for r in records if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert {"two-answers-1", "two-answers-2"} <= set(several)
    assert (check.severity, sorted(check.examples)) == ("fail", sorted(several)), check
    assert "drops or rewrites assistant turn 2" in check.message, check.message
    assert report.check("token_stats").count > 0  # the rest was checked


def test_cache_hit_on_second_prepare_and_miss_on_template_or_length_change(settings, tiny):
    write_files(settings, clean_records(30))
    first = prepare(settings, params())
    second = prepare(settings, params())
    assert (first.cache["hit"], second.cache["hit"]) == (False, True)
    assert first.cache["key"] == second.cache["key"]
    assert second.tokens == first.tokens

    shorter = prepare(settings, params(max_seq_length=64))
    assert not shorter.cache["hit"] and shorter.cache["key"] != first.cache["key"]

    variant = settings.models_dir / "tiny-template-variant"
    shutil.copytree(tiny, variant)
    cfg_path = variant / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text("utf-8"))
    cfg["chat_template"] = "{#- same rendering, a different template text -#}" + cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg), "utf-8")
    other = prepare(settings, params(base_model=str(variant)))
    assert not other.cache["hit"] and other.cache["key"] != first.cache["key"]
    assert other.tokens == first.tokens  # same tokens, but never served from another template's entry
    assert prepare(settings, params()).cache["hit"]

    # Explore repro: a cache whose data (behind a sound header) was overwritten in place was trusted: the run
    # trained on the wrong tokens and prepare blamed the data. It is a miss now, rebuilt the same.
    path = next(p for p in (settings.cache_dir / "tokens").iterdir() if p.name.endswith(".safetensors") and
                first.cache["key"][:32] in p.name)  # fmt: skip
    data = bytearray(path.read_bytes())
    data[-40:-20] = b"\x07" * 20
    path.write_bytes(bytes(data))
    again = prepare(settings, params())
    found = [[(c.id, c.severity, c.count, c.examples) for c in r.checks] for r in (again, second)]
    assert not again.cache["hit"] and again.tokens == first.tokens and found[0] == found[1]
    assert prepare(settings, params()).cache["hit"]


def test_optimizer_steps_match_the_training_loop():
    p = parse_params({"batch_size": 2, "epochs": 3, "gradient_accumulation": 2})
    assert optimizer_steps(9, p) == 9  # ceil(9 / 4) = 3 per epoch
    assert optimizer_steps(9, p.model_copy(update={"packing": False})) == 9  # packing changes layout, not count
    assert optimizer_steps(9, p.model_copy(update={"max_steps": 5})) == 5
    assert optimizer_steps(0, p) == 0


def test_cli_prints_table_and_exits_1_on_fail(settings, tiny):
    records = planted_records()
    write_files(settings, records)
    result = CliRunner().invoke(app, ["prepare", "--maxSeqLength=512", "--min-curated", "5", "--show", "2"])
    assert result.exit_code == 1, result.output
    assert "duplicate_across_splits" in result.output and "bad-leak" in result.output
    assert "Preflight failed" in result.output
    # the samples asked for are shown before the failure (they were not shown at all): they help find why
    assert result.output.count("--- sample ") == 2 and result.output.index("--- sample") < result.output.index(
        "Preflight failed"
    ), result.output
    write_files(settings, clean_records())
    result = CliRunner().invoke(app, ["prepare", "--max-seq-length", "512", "--minCurated=5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["status"] == "ok"
    result = CliRunner().invoke(app, ["prepare", "--dataset-tier", "nope"])
    assert result.exit_code == 2 and "datasetTier" in result.output


def test_training_reads_the_tokens_prepare_cached(settings, tiny, monkeypatch):
    """After prepare, a LoRA run tokenizes nothing: with the encoder disabled it still trains, from the
    cache entry prepare wrote (same key)."""
    from lunatrain import tokens, train

    write_files(settings, clean_records(30))
    report = prepare(settings, params())
    assert not report.cache["hit"]

    def no_tokenizing(*_a, **_k):
        raise AssertionError("training tokenized again instead of using the cache")

    monkeypatch.setattr(tokens, "encode_chat", no_tokenizing)
    result = train.run_lora(params(max_steps=1, rank=4), settings)
    assert result.ok, result.error
    assert result.report["dataset"]["tokenCacheKey"] == report.cache["key"]


def test_a_sample_longer_than_the_models_context_gives_no_transformers_warning(settings, tiny, capfd):
    """transformers warned "Token indices sequence length is longer than the specified maximum sequence length
    for this model (10012 > 4096)…" into prepare's output: samples are cut to maxSeqLength before any model
    sees them, and the `truncated` check already names them."""
    records = clean_records(30)
    long = _variant(records[0], "ex-long", answer="wort " * 5000)
    write_files(settings, [*records, long])
    report = prepare(settings, params())
    assert "ex-long" in next(c for c in report.checks if c.id == "truncated").examples
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_a_conversation_longer_than_max_seq_length_is_shown_with_its_oldest_exchanges_left_out(settings, tiny):
    """Repro: a 20-turn conversation longer than maxSeqLength kept its first 512 tokens; prepare said "will be
    cut", and `--show` marked the first answer and half of the second as trained, never the last one, the
    example's own response. Now its oldest exchanges are left out, the warning says so, and the last answer
    ends with its terminator (the eot check holds for it)."""
    records = clean_records(30)
    turns = [{"role": "system", "content": "Du bist Luna."}]
    for i in range(10):
        turns += [
            {"role": "user", "content": f"Frage {i}: erzähl mir etwas über Thema {i}. " * 3},
            {"role": "assistant", "content": f"Antwort {i}: Thema {i} hat eine lange Geschichte. " * 3},
        ]
    turns[-1]["content"] = "FINALE ANTWORT: die wichtigste Antwort."
    long = _variant(records[0], "ex-long", messages=turns, split="train")
    write_files(settings, [long, *records])
    result = CliRunner().invoke(app, ["prepare", "--maxSeqLength=512", "--min-curated", "5", "--show", "1"])
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if line.startswith("--- sample ex-long"))
    assert re.search(r"tokens trained \(its first \d+ messages left out\)$", head), head
    shown = result.output[result.output.index(head) :]
    assert "[[FINALE ANTWORT: die wichtigste Antwort.<|im_end|>]]" in shown, shown
    assert "Du bist Luna." in shown and "Frage 0:" not in shown, shown
    check = next(c for c in prepare(settings, params()).checks if c.id == "truncated")
    assert check.examples == ["ex-long"] and check.message == (
        "1 sample is longer than maxSeqLength=512: its oldest exchanges are left out so that the last answer is "
        "trained, and one exchange longer than that is cut at its end (raise maxSeqLength or shorten it)"
    ), check.message
    checks = {c.id: c for c in prepare(settings, params()).checks}
    assert checks["eot_not_trained"].severity == "info"
    # the lengths are the whole conversations' (what maxSeqLength is weighed against), the trained tokens not
    stats = checks["token_stats"]
    assert stats.params["maxLength"] > 512 and "(whole conversations)" in stats.message, stats.message
    assert stats.message.endswith("(within maxSeqLength)"), stats.message


def test_a_check_that_finds_one_record_says_it_in_the_singular():
    """Repro: "1 samples with an empty assistant response", "only 1 val samples", "1 lines are not valid chat
    records"."""
    from lunatrain.prepare import _check, _val_check, volume_check

    assert _check("malformed_record", "fail", ["a"], "lines are not valid chat records", "ok").message == (
        "1 line is not a valid chat record"
    )
    assert _check("empty_response", "fail", ["a"], "samples with an empty assistant response", "ok").message == (
        "1 sample with an empty assistant response"
    )
    truncated = "samples are longer than maxSeqLength=64: their oldest exchanges are left out (shorten them)"
    assert _check("truncated", "warn", ["a"], truncated, "ok").message == (
        "1 sample is longer than maxSeqLength=64: its oldest exchanges are left out (shorten it)"
    )
    assert _check("truncated", "warn", ["a", "b"], truncated, "ok").message == f"2 {truncated}"  # several: as written
    assert _val_check(1, 0.1).message.startswith("only 1 val sample (")
    assert volume_check(1, 30).message.startswith("1 approved curated example, 30 required")


def test_target_modules_the_base_model_lacks_are_refused_by_prepare_and_by_the_run(settings, tiny):
    """Repro: `prepare --targetModules=foo` passed (the run then refused it), and `q_proj,zzz` passed both:
    PEFT refuses only a list that matches nothing, so the mistyped name was left out without a word. Both
    refuse it now, naming it and the model's linear layers, before anything is written."""
    from lunatrain.train import run_lora

    write_files(settings, clean_records())
    expected = (
        "targetModules ['zzz'] name no module of base model 'luna-tiny'; its linear layers are down_proj, "
        "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or use all-linear)."
    )
    bad = params(targetModules=["q_proj", "zzz"])
    with pytest.raises(UsageError) as refused:
        prepare(settings, bad)
    assert refused.value.message == expected
    assert not settings.prepare_report.exists()
    with pytest.raises(UsageError) as refused:
        run_lora(bad, settings)
    assert refused.value.message == expected
    assert not settings.adapters_dir.exists() or not any(settings.adapters_dir.iterdir())
    assert prepare(settings, params(targetModules=["q_proj", "v_proj"])).status != "fail"


@pytest.fixture(scope="module")
def arch_vocab(tmp_path_factory):
    from family_templates import save_vocab

    return save_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.mark.parametrize(
    ("arch", "linear"),
    [
        ("qwen2", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ("llama", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ("gemma2", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ("gemma3", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ("mistral", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ("phi3", "down_proj, gate_up_proj, o_proj, qkv_proj"),  # fused projections: q_proj is no module here
    ],
)
def test_target_modules_are_checked_against_each_familys_own_layers(settings, arch_vocab, arch, linear):
    """The names come from the model built on the meta device from its config.json, as each family names its
    layers; the model the run loads has the same ones."""
    from transformers import AutoModelForCausalLM

    from lunatrain.models import check_target_modules, module_kinds, resolve_base

    from family_templates import build_arch_model

    path = build_arch_model(settings.models_dir / f"tiny-{arch}", arch_vocab, arch)
    info = resolve_base(str(path), settings)
    kinds = module_kinds(info)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert kinds == {n: type(m).__name__ for n, m in loaded.named_modules()}
    check_target_modules(linear.split(", "), kinds, info.id)
    with pytest.raises(UsageError) as refused:
        check_target_modules(["q_proj", "v_proj", "o_proj"] if arch == "phi3" else ["qkv_proj"], kinds, info.id)
    assert refused.value.message.endswith(f"its linear layers are {linear} (or use all-linear).")


def test_more_ranks_than_gpus_leaves_the_estimate_on_one_process(settings, monkeypatch):
    """Review finding: with ASSISTANT_LORA_GPUS above the visible GPUs, prepare's estimate raised the trainer's
    refusal, so `prepare` (and a `--local` flow, which trains on one process) failed where it used to report."""
    from types import SimpleNamespace

    from lunatrain import models
    from lunatrain import prepare as prepare_mod

    class Sample(list):
        n_supervised = 1

    monkeypatch.setattr(prepare_mod, "_visible_gpus", lambda: 1)
    monkeypatch.setattr(models, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(prepare_mod, "_flops_speed", lambda info, device: 1000.0)
    tokenized = SimpleNamespace(train=[Sample([1, 2, 3])] * 8)
    info = SimpleNamespace(fingerprint="f" * 64)
    est = prepare_mod.estimate_run(load_settings(home=settings.home, lora_gpus=2), params(), tokenized, info)
    assert est["ranks"] == 1 and est["optimizerSteps"] == total_steps(8, params())


def test_target_modules_lora_cannot_adapt_or_tied_embeddings_are_refused_before_the_load(settings, tiny):
    """Repro: `--targetModules mlp` (or `model`, `input_layernorm`) passed prepare and the API (202), then the run
    failed after loading the model with PEFT's repr of the whole module; `embed_tokens` on a base whose input
    embedding and output layer share one weight (luna-tiny, Qwen2.5-0.5B, Llama-3.2-1B, Gemma) trained and
    served, but merged into another model (the merged weight moves both sides), and `embed_tokens,lm_head`
    trained the whole run, then failed saving. Each is one sentence now, before any weight is read; an untied
    base may adapt its embeddings."""
    import json
    import shutil

    from lunatrain.models import check_target_modules, module_kinds, resolve_base

    info = resolve_base("luna-tiny", settings)
    kinds = module_kinds(info)
    assert kinds.tied == {"model.embed_tokens", "lm_head"} and "model.layers.0.self_attn.q_proj" in kinds.adaptable
    check_target_modules(["q_proj", "v_proj", "down_proj"], kinds, info.id)
    for targets, says in (
        (
            ["q_proj", "mlp"],
            "['mlp'] name modules of base model 'luna-tiny' that LoRA cannot adapt ('mlp' is LlamaMLP)",
        ),
        (["model"], "'model' is LlamaModel"),
        (["input_layernorm"], "'input_layernorm' is LlamaRMSNorm"),
        (
            ["embed_tokens"],
            "['embed_tokens'] name the input embedding or output layer, which base model 'luna-tiny' "
            "ties into one weight (lm_head and model.embed_tokens)",
        ),
        (["embed_tokens", "lm_head"], "leave them out"),
    ):
        with pytest.raises(UsageError) as refused:
            check_target_modules(targets, kinds, info.id)
        assert says in refused.value.message and "its linear layers are" in refused.value.message, refused.value
    write_export(settings, make_records(24))
    with pytest.raises(UsageError, match="LoRA cannot adapt"):  # prepare says it as the run does (exit 2)
        prepare(settings, parse_params({"targetModules": ["q_proj", "mlp"], "maxSeqLength": 128}))

    untied = settings.models_dir / "untied"
    shutil.copytree(info.path, untied)
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    own = module_kinds(resolve_base(str(untied), settings))
    assert own.tied == frozenset()
    check_target_modules(["embed_tokens", "lm_head", "q_proj"], own, "untied")


def test_quantize_without_bitsandbytes_is_refused_by_prepare_and_before_a_job_is_queued(settings, tiny, monkeypatch):
    """Repro: with bitsandbytes missing, `prepare --quantize 4bit` said OK and the trainer queued the job (202),
    which then failed; only `--local` said it, at the model load. prepare and the submit check (the trainer's
    and the flow's, `check_targets_of`) now say it first. A process that hides bitsandbytes from itself
    (a command that will not quantize, compat.without_bitsandbytes) still sees it installed."""
    import sys

    from lunatrain import models

    write_export(settings, make_records(24))
    quantized = parse_params({"quantize": "4bit", "maxSeqLength": 128})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # hidden here, installed on disk
    models.check_targets_of(quantized, settings)
    monkeypatch.setattr(models, "_installed", lambda name: name != "bitsandbytes")
    for attempt in (lambda: prepare(settings, quantized), lambda: models.check_targets_of(quantized, settings)):
        with pytest.raises(UsageError, match=r"quantize=4bit needs bitsandbytes: pip install 'bitsandbytes>=0.50'\."):
            attempt()
    models.check_targets_of(parse_params({"maxSeqLength": 128}), settings)  # unquantized: nothing to check


def test_near_duplicates_in_another_split_are_named_first_and_counted():
    """Repro: `Question number 5?` in train and `question  number 5?` in val were reported as one more
    near-duplicate, like two in the same split, though val then measures memorisation. The warning now
    counts those in another split than their twin, and names them first."""
    from lunatrain.prepare import _duplicate_checks

    def rec(rid, question, split):
        return {"id": rid, "hash": rid, "split": split, "messages": _turn(question, f"Antwort auf {question.lower()}")}

    records = [
        rec("a1", "Frage Nummer 1?", "train"),
        rec("a2", "frage nummer 1", "train"),  # same split: a plain near-duplicate
        rec("b1", "Frage Nummer 2?", "train"),
        rec("b2", "frage  NUMMER 2", "val"),  # its twin is in train
    ]
    [check] = [c for c in _duplicate_checks(records) if c.id == "duplicate_normalized"]
    assert (check.severity, check.count, check.examples) == ("warn", 2, ["b2", "a2"]), check
    assert check.message.endswith(
        "(1 of them in another split than the sample it repeats: val/test partly measure memorisation)"
    )
    assert check.params == {"count": 2, "acrossSplits": 1}


def _rec(rid: str, question: str, answer: str) -> dict:
    """A train record of one exchange, its id its hash."""
    return {"id": rid, "hash": rid, "split": "train", "messages": _turn(question, answer)}


def test_invisible_characters_and_emoji_answers_do_not_hide_near_duplicates_or_conflicts():
    """Data-check repro: a zero-width space or a soft hyphen inside a word split it when folding, so four rows that
    all read "Wie heißt die Hauptstadt?" were two duplicate pairs, and "Wie alt ist Lu\u200bna?" answered with 4
    years was no conflict with "Wie alt ist Luna?" answered with 3; two different emoji-only answers to one
    question were never compared (they fold to nothing)."""
    from lunatrain.prepare import _duplicate_checks

    records = [
        _rec("h1", "Wie heißt die Hauptstadt?", "Berlin."),
        _rec("h2", "Wie hei\u200bßt die Hauptstadt?", "Berlin."),
        _rec("h3", "Wie heißt die Haupt\u00adstadt?", "Berlin."),
        _rec("h4", "Wie heißt\u2060 die Hauptstadt?", "Berlin."),
        _rec("l1", "Wie alt ist Luna?", "Drei Jahre."),
        _rec("l2", "Wie alt ist Lu\u200bna?", "Vier Jahre."),
        _rec("e1", "Wie geht es dir?", "\U0001f600"),
        _rec("e2", "Wie geht es dir?", "\U0001f622"),
    ]
    checks = {c.id: c for c in _duplicate_checks(records)}
    assert (checks["duplicate_normalized"].count, checks["duplicate_normalized"].examples) == (3, ["h2", "h3", "h4"])
    assert sorted(checks["conflicting_answers"].examples) == ["e1", "e2", "l1", "l2"], checks["conflicting_answers"]


def test_the_marks_of_indic_and_thai_words_are_letters_when_folding_not_punctuation():
    """Unicode explore repro: folding took vowel signs and viramas (Unicode marks) for punctuation, so "दिन कब है?"
    (when is the day?) and "दान कब है?" (when is the donation?) were one question answered twice
    (`conflicting_answers`), two Thai questions with other verbs too, and "हाँ" (yes) was a trivial answer where
    "Ja" is none. A mark on a symbol (an emoji's variation selector) still folds with it."""
    from lunatrain.prepare import _content_checks, _duplicate_checks, normalize

    records = [
        _rec("d1", "दिन कब है?", "कल।"),
        _rec("d2", "दान कब है?", "परसों।"),
        _rec("t1", "คุณกินข้าวหรือยัง", "กินแล้ว"),
        _rec("t2", "คุณกันข้าวหรือยัง", "ยังไม่ได้กัน"),
        _rec("n1", "Wie heißt du?", "Luna."),
        _rec("n2", "wie HEISST du", "Nova."),  # a conflict that folds across case and punctuation still is one
    ]
    checks = {c.id: c for c in _duplicate_checks(records)}
    assert sorted(checks["conflicting_answers"].examples) == ["n1", "n2"], checks["conflicting_answers"]
    assert checks["duplicate_normalized"].count == 0, checks["duplicate_normalized"]
    trivial = {c.id: c for c in _content_checks([_rec("y1", "Bist du bereit?", "हाँ"), _rec("y2", "Ok?", "👍️")], None)}
    assert trivial["trivial_response"].examples == ["y2"], trivial["trivial_response"]
    assert normalize("है?") == "है" and normalize("❤️") == normalize("❤") != normalize("💙")
    # review repro: a keycap emoji's variation selector and enclosing mark were kept as letter marks; second
    # review: a variation selector split a word ("葛\U000e0100城" folded to two)
    assert normalize("5\ufe0f\u20e3") == normalize("5") and normalize("Ja\ufe0f!") == "ja"
    assert normalize("葛\U000e0100城") == normalize("葛城") and normalize("a\ufe0fb") == "ab"
    keycap = {c.id: c for c in _content_checks([_rec("k1", "Wie viele?", "5\ufe0f\u20e3")], None)}
    assert keycap["trivial_response"].examples == ["k1"]


def test_volume_counts_the_records_of_the_curated_file_not_its_lines(settings):
    """Data-check repro: 28 approved examples and 3 lines of junk appended by hand to the curated file passed
    `volume` as "31 approved curated examples (minCurated 30)" (the run was refused by other checks; the row
    said ok, and POST /lora/start checks minCurated with that count)."""
    from lunatrain import export
    from lunatrain.prepare import curated_count

    records = make_records(40)
    write_export(settings, records)
    approved = sum(r["source"] == "curated" for r in records)
    assert curated_count(settings) == approved
    curated = export.export_dir(settings) / export.CURATED_FILE
    with curated.open("a", encoding="utf-8") as fh:
        fh.write('not json\n{"messages": "no list"}\n\n[]\n')
    assert curated_count(settings) == approved


@pytest.mark.parametrize(("seconds", "said"), [(0.3, "<1s"), (0.5, "<1s"), (0.51, "1s"), (1.4, "1s")])
def test_an_estimate_under_a_second_is_said_so(seconds, said):
    """Data-check repro: an estimate of 0.5 s printed "~0s" (rounded down), where smaller ones said "<1s"."""
    from lunatrain.prepare import _duration

    assert _duration(seconds) == said


@pytest.mark.parametrize("env", [{"TERM": "dumb"}, {"NO_COLOR": "1"}])
def test_show_marks_trained_tokens_on_a_terminal_that_cannot_colour_them(monkeypatch, capsys, env):
    """Repro: `prepare --show` on a terminal with TERM=dumb (an editor's shell, some CI consoles) printed the
    samples with no highlighting and without the [[…]] markers, so trained and context tokens looked the same;
    under NO_COLOR they differed only by bold against bold and dim. Where the console cannot colour, the
    trained pieces are marked [[…]] as in a pipe."""
    from types import SimpleNamespace

    from lunatrain.cli import prepare as prepare_cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(prepare_cli, "is_tty", lambda *_a: True)
    sample = {
        "id": "ex-1",
        "tokens": 9,
        "trainedTokens": 3,
        "truncated": False,
        "pieces": [
            {"text": "<|im_start|>user\nHallo<|im_end|>\n<|im_start|>assistant\n", "trained": False},
            {"text": "Hallo!<|im_end|>", "trained": True},
        ],
    }
    prepare_cli.show_samples(SimpleNamespace(template={"terminator": {"text": "<|im_end|>"}}, samples=[sample]))
    out = capsys.readouterr().out
    assert "[[Hallo!<|im_end|>]]" in out and "\x1b[" not in out, out


def test_an_estimate_under_a_second_is_not_said_as_none():
    """Numbers repro: a one-step run's estimate of 0.1 s read "~0s"."""
    from lunatrain.prepare import _duration

    assert [_duration(s) for s in (0.1, 0.6, 89, 91, 5400, 90061.5, None)] == [
        "<1s",
        "1s",
        "89s",
        "2min",
        "1.5h",
        "25.0h",
        "?",
    ]


def test_a_check_that_found_more_records_than_it_lists_says_so(settings, tiny):
    """CLI-text repro: prepare listed 5 ids for a check that found 17, with nothing to say more were found."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    records = make_records(40)
    for record in records[:9]:
        record["messages"][-1]["content"] = ""  # empty answers: one check, nine records
    write_export(settings, records)
    r = CliRunner().invoke(app, ["prepare", "--minCurated", "0"])
    [line] = [ln for ln in r.output.splitlines() if ln.startswith("fail ") and " empty_response " in ln]
    found = int(line.split()[2])
    assert found > 5 and line.endswith(f", … {found - 5} more (--json lists them)]"), line
    assert line.split("[")[1].count(",") == 5, line  # five ids, then how many more


def test_check_ids_stay_whole_in_a_narrow_terminal(settings, tiny, monkeypatch):
    """CLI-text repro: at 80 columns the preflight table broke check ids mid-word (`exchange_across_s` /
    `plits`), the name one looks up in the report."""
    from typer.testing import CliRunner

    from lunatrain.cli import app
    from lunatrain.cli import prepare as prepare_cli

    monkeypatch.setattr(prepare_cli, "is_tty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    write_export(settings, make_records(40))
    out = CliRunner().invoke(app, ["prepare", "--minCurated", "0"]).output
    ids = ["export_summary", "special_tokens_in_content", "exchange_across_splits", "empty_response"]
    assert all(re.search(rf"│ {name} +│", out) for name in ids), out


def test_a_check_lists_every_record_to_fix_in_its_report_and_the_first_few_on_the_terminal(settings, tiny):
    """Long-text repro: a check named at most 5 record ids, in prepare-latest.json and `--json` too, while the
    README says each failing check names the ids to fix: 31 truncated samples were 5 ids, and nothing gave
    the rest. The report lists them all (up to a bound); the CLI's lines show the first five and how many more."""
    write_files(settings, clean_records(30))
    report = prepare(settings, params(max_seq_length=16))
    cut = report.check("truncated")
    assert cut.count > 5 and len(cut.examples) == cut.count, (cut.count, cut.examples)
    result = CliRunner().invoke(app, ["prepare", "--maxSeqLength=16", "--min-curated", "5", "--json"])
    listed = next(c for c in json.loads(result.stdout)["checks"] if c["id"] == "truncated")
    assert listed["examples"] == cut.examples
    plain = CliRunner().invoke(app, ["prepare", "--maxSeqLength=16", "--min-curated", "5"]).output
    line = next(x for x in plain.splitlines() if " truncated " in x)
    assert f", … {cut.count - 5} more (--json lists them)]" in line and cut.examples[5] not in line, line
    # review repro: past the report's bound the line promised --json would list what it does not
    from lunatrain.cli.prepare import _listed
    from lunatrain.prepare import Check

    many = Check("truncated", "warn", 1312, [f"r{i}" for i in range(1000)], "…")
    assert _listed(many).endswith(", … 1307 more (--json lists the first 1000)"), _listed(many)


def test_a_val_sample_that_a_longer_train_conversation_trains_is_named(settings, tiny):
    """Conversations repro: the same conversation imported at two lengths without a conversationId (or again under
    a new id) split by its last exchange each: the short one in val, the longer one in train, which trains every
    answer of the short one. `exchange_across_splits` compared last exchanges only and said "no exchange in
    train and in val/test". A val/test sample any of whose trained exchanges a train sample trains is named."""
    from lunatrain.prepare import _exchange_check

    short = [*_turn("Wie heißt du?", "Ich bin Luna."), *_turn("Was kannst du?", "Ich helfe beim Planen.")]
    longer = [*short, *_turn("Danke!", "Gern geschehen.")]
    records = [
        {"id": "short", "hash": "h-short", "split": "val", "messages": short},
        {"id": "longer", "hash": "h-longer", "split": "train", "messages": longer},
        {"id": "other", "hash": "h-other", "split": "val", "messages": _turn("Wie spät ist es?", "Mittag.")},
    ]
    check = _exchange_check(records)
    assert check.severity == "warn" and check.examples == ["short"], check
    assert check.message.startswith("1 sample holds an exchange"), check.message  # review: "1 sample hold"
    # an exchange the train sample holds as context only (weight 0) is not trained there: no leak
    records[1]["messages"][1] = {"role": "assistant", "content": "Ich bin Luna.", "weight": 0}
    records[1]["messages"][3] = {"role": "assistant", "content": "Ich helfe beim Planen.", "weight": 0}
    assert _exchange_check(records).count == 0


def test_an_exchange_told_again_in_another_case_or_with_a_full_stop_is_named_across_splits(settings, tiny):
    """Split-leak repro: a conversation whose first exchange was a standalone example's in lower case and without
    its full stop ("name river 3" / "River 3 is the Elbe"), in val while the example trained: prepare said "no
    exchange in train and in val/test", where the same pair as whole samples is a normalized duplicate. Exchanges
    are compared folded as duplicates are (case, width, whitespace, punctuation)."""
    from lunatrain.prepare import _exchange_check

    conversation = [*_turn("name river 3", "River 3 is the Elbe"), *_turn("How long is it?", "About 300 km.")]
    records = [
        {
            "id": "alone",
            "hash": "h-alone",
            "split": "train",
            "messages": _turn("Name river 3.", "River 3 is the Elbe."),
        },
        {"id": "told-again", "hash": "h-again", "split": "val", "messages": conversation},
    ]
    assert _exchange_check(records).examples == ["told-again"]
    records[0]["split"], records[1]["split"] = "val", "train"  # the other way round
    assert _exchange_check(records).examples == ["alone"]
    # punctuation alone is no content: two different exchanges of marks only are not one
    marks = [
        {"id": "a", "hash": "h-a", "split": "train", "messages": _turn("?", "…")},
        {"id": "b", "hash": "h-b", "split": "val", "messages": _turn("!", "?!")},
    ]
    assert _exchange_check(marks).count == 0


def test_samples_longer_than_the_base_models_context_are_refused_where_max_seq_length_would_keep_them(
    settings, tiny, tiny_dir
):
    """Explore repro: `--maxSeqLength 4096` on a base whose context is 512 positions trained 2,867-token samples,
    prepare said OK and the adapter was registered, while chat refuses every prompt that long (and a model with
    learned positions cannot run them at all). prepare fails on such samples, naming them, and the run refuses
    them before it loads the model; a maxSeqLength within the context cuts them as usual, and one above it
    with no sample that long trains."""
    from lunatrain.train import run_lora

    short = settings.models_dir / "short-context"
    shutil.copytree(tiny_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 256}))
    records = clean_records(30)
    write_files(settings, [*records, _variant(records[0], "ex-long", answer="wort " * 400)])

    over = params(base_model=str(short), max_seq_length=1024)
    check = next(c for c in prepare(settings, over).checks if c.id == "over_context")
    assert (check.severity, check.examples, check.code) == ("fail", ["ex-long"], "check.over_context.found")
    assert check.message == (
        "1 sample is longer than the base model's context of 256 tokens, which maxSeqLength=1024 lets it keep: "
        "chat refuses prompts that long; set maxSeqLength to 256 or less (or shorten it)"
    ), check.message
    with pytest.raises(UsageError) as refused:
        run_lora(over, settings)
    assert refused.value.message == (
        "1 sample is longer than the base model's context of 256 tokens, which maxSeqLength=1024 lets it keep; "
        "set maxSeqLength to 256 or less (prepare names it)."
    ), refused.value.message
    assert not settings.adapters_dir.exists() or not any(settings.adapters_dir.iterdir())

    # review repro: a test sample that long was trained (and then measured by the gate) without a word
    write_files(settings, [*records, _variant(records[0], "ex-long", answer="wort " * 400, split="test")])
    assert next(c for c in prepare(settings, over).checks if c.id == "over_context").examples == ["ex-long"]
    with pytest.raises(UsageError, match="^1 sample is longer than the base model's context of 256 tokens"):
        run_lora(over, settings)
    within = {c.id: c for c in prepare(settings, params(base_model=str(short), max_seq_length=256)).checks}
    assert "over_context" not in within and within["truncated"].examples == ["ex-long"]
    write_files(settings, records)
    fits = {c.id: c for c in prepare(settings, over).checks}
    assert (fits["over_context"].severity, fits["over_context"].code) == ("info", "check.over_context.ok")
    assert fits["over_context"].message == "no sample is longer than the base model's context of 256 tokens"
    assert run_lora(params(base_model=str(short), max_seq_length=1024, max_steps=1, rank=4), settings).ok


@pytest.mark.slow
@pytest.mark.usefixtures("no_gpu")
def test_the_estimate_counts_the_processes_of_the_trainer_that_runs_not_of_this_command(settings, tiny):
    """Estimates repro: a trainer started with ASSISTANT_LORA_GPUS=2 trained a job on two processes, while
    `prepare` (without it) predicted twice the steps "on 1 process, as the trainer runs it"; and the other way
    round. A trainer running for the data root says its own count."""
    from trainer_helpers import start_trainer, stop_group

    write_export(settings, make_records(40, val_every=5))
    trainer = start_trainer(settings.home, ASSISTANT_LORA_GPUS="2")
    try:
        here = load_settings(home=settings.home)
        assert here.lora_gpus is None  # this command's environment says nothing
        est = prepare(here, params(), min_curated=10).estimate
        assert est["ranks"] == 2, est
    finally:
        stop_group(trainer.pid)
        trainer.wait(30)
    assert prepare(load_settings(home=settings.home), params(), min_curated=10).estimate["ranks"] == 1
