"""Preflight benchmark: throughput of `lunatrain prepare` (examples/s and tokens/s) with luna-tiny's tokenizer.

Run:  .venv/bin/python bench/prepare.py                  # 100k synthetic chat examples (several minutes on 2 cores)
      .venv/bin/python bench/prepare.py --n 20000 --baseline-n 2000 --workdir /tmp/bp

It writes a synthetic curated export (the export's own file and summary format) of N chat examples
(system prompt on a third, one in five multi-turn), then times `prepare()` twice in this process:

- first run: every example rendered with the chat template, tokenized and masked (the cache is filled);
- cached run: the same call again, served from the tokenized cache (what `lora` gets after `prepare`).

Baseline in the same run: the usual Hugging Face way to get assistant masks,
`tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)` per example,
on the first `--baseline-n` examples (the rates are per second, so the subsample compares fairly). The table
is printed and saved to bench/results/prepare.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchargs import at_least, confine_settings, out_file, run, versions, work_dir
from words import WORDS

if TYPE_CHECKING:
    from lunatrain.settings import Settings

SYSTEM = "Du bist Luna, eine warmherzige, knappe persönliche Assistentin."


def synthetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + rng.choice([".", "?", "!"])

    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        msgs += [{"role": "user", "content": text(3, 20)}, {"role": "assistant", "content": text(5, 60)}]
        if i % 5 == 0:
            msgs += [{"role": "user", "content": text(2, 10)}, {"role": "assistant", "content": text(3, 30)}]
        h = hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest()
        split = "val" if i % 10 == 0 else "train"
        out.append(
            {
                "messages": msgs,
                "id": f"ex-{i + 1}",
                "hash": h,
                "source": "curated",
                "split": split,
                "conversation_id": None,
                "tags": [],
                "rating": None,
            }
        )
    return out


def write_export(training_dir: Path, records: list[dict]) -> None:
    """The export's files and a matching summary (same formulas as lunatrain.export)."""
    from lunatrain import export as ex

    training_dir.mkdir(parents=True, exist_ok=True)
    dump = lambda r: json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"
    lines = [dump(r) for r in records]
    content = {ex.CURATED_FILE: "".join(lines), ex.MEMORY_FILE: "", ex.MERGED_FILE: "".join(lines)}
    for split, name in ex.SPLIT_FILES.items():
        content[name] = "".join(line for line, r in zip(lines, records, strict=True) if r["split"] == split)
    files = {}
    for name, text in content.items():
        data = text.encode()
        (training_dir / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "records": text.count("\n"), "bytes": len(data)}
    fp = ex.dataset_fingerprint({name: f["sha256"] for name, f in files.items()})
    counts = {t: {"total": 0, "train": 0, "val": 0, "test": 0} for t in ex.TIERS}
    for r in records:
        for t in ("curated", "merged"):
            counts[t]["total"] += 1
            counts[t][r["split"]] += 1
    summary = {
        "format": ex.SUMMARY_FORMAT,
        "exported_at": "bench",
        "store_revision": "bench",
        "ratios": {"train": 0.9, "val": 0.1, "test": 0.0},
        "counts": counts,
        "files": files,
        "fingerprint": fp,
    }
    (training_dir / ex.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def baseline(tokenizer, records: list[dict], max_len: int) -> tuple[float, int]:
    """Seconds and tokens for HF apply_chat_template with assistant masks, one example at a time."""
    t = time.perf_counter()
    tokens = 0
    for r in records:
        out = tokenizer.apply_chat_template(
            r["messages"], return_assistant_tokens_mask=True, return_dict=True, truncation=True, max_length=max_len
        )
        tokens += len(out["input_ids"])
    return time.perf_counter() - t, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=at_least(1), default=100_000, help="synthetic chat examples to prepare")
    ap.add_argument("--baseline-n", type=at_least(1), default=10_000, help="of them, how many the baseline tokenizes")
    ap.add_argument("--max-seq-length", type=at_least(8), default=512, help="the job's maxSeqLength, in tokens")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lunatrain-bench-prepare"),
        help="the data root of the run: a new or empty folder, or one a benchmark made",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (export, token cache, report)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "prepare.md",
        help="the table's file (default: bench/results/prepare.md)",
    )
    args = ap.parse_args()
    out_file(ap, args.out)
    confine_settings()

    from lunatrain.settings import load_settings

    with work_dir(ap, args.workdir, keep=args.keep) as home:
        rows = measure(load_settings(home=home), args)
    write_results(rows, args)


def measure(settings: Settings, args: argparse.Namespace) -> list[tuple]:
    from lunatrain import models
    from lunatrain.params import parse_params
    from lunatrain.prepare import prepare

    tokenizer = models.load_tokenizer(None, settings)  # builds luna-tiny once, outside the timings
    records = synthetic(args.n)
    write_export(settings.training_dir, records)
    params = parse_params({"max_seq_length": args.max_seq_length})

    rows = []
    for label in ("prepare, first run (tokenize + cache)", "prepare, cached run"):
        t = time.perf_counter()
        report = prepare(settings, params)
        wall = time.perf_counter() - t
        tokens = sum(s["tokens"] for s in report.tokens.values())
        rows.append((label, args.n, wall, tokens, report.cache["hit"]))
        print(f"{label}: {wall:.1f}s status={report.status} cache_hit={report.cache['hit']}", flush=True)
    sub = records[: args.baseline_n]
    wall, tokens = baseline(tokenizer, sub, args.max_seq_length)
    rows.append(("baseline: HF apply_chat_template + assistant mask", len(sub), wall, tokens, None))
    return rows


def write_results(rows: list[tuple], args: argparse.Namespace) -> None:
    head = ["| run | examples | seconds | examples/s | tokens/s | cache hit |", "|---|---:|---:|---:|---:|---|"]
    body = [
        f"| {label} | {n:,} | {w:.1f} | {n / w:,.0f} | {tok / w:,.0f} | {'' if hit is None else hit} |"
        for label, n, w, tok, hit in rows
    ]
    first, cached = rows[0][2], rows[1][2]
    base_rate = rows[2][1] / rows[2][2]
    notes = [
        "",
        f"Cached run {first / cached:.1f}x faster than the first; first run "
        f"{(args.n / first) / base_rate:.2f}x the baseline's examples/s (the baseline only tokenizes; "
        "prepare also runs every check and writes the cache and report).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {versions()}, "
        f"torch threads {__import__('torch').get_num_threads()}, maxSeqLength {args.max_seq_length}, "
        f"tokens per example {rows[0][3] / args.n:.0f}. Timings on a shared machine vary by run.",
    ]
    table = "\n".join(["# Preflight (prepare) throughput, luna-tiny tokenizer", "", *head, *body, *notes]) + "\n"
    print(table)
    args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    run(main)
