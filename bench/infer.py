"""Chat serving speed: tokens/s through the OpenAI-compatible endpoint, one stream and N concurrent streams,
against plain transformers `generate()` with the same PEFT adapter in one process.

    .venv/bin/python bench/infer.py [--prompts 16] [--max-tokens 64] [--concurrency 8]

One run, everything real: a fresh data root with the bundled dataset, a LoRA adapter trained on luna-tiny
(a few steps; its quality does not matter here, only that PEFT layers are in the forward pass), then

- endpoint, 1 stream: `lunatrain serve` as a subprocess, the prompts one after another, streamed (SSE);
- endpoint, N streams: the same prompts from N client threads at once;
- generate(), 1 at a time: the base model + adapter in this process, `model.generate` per prompt;
- generate(), batch of N: the same, N prompts per call (left-padded) — what batching in one process gives.

All greedy with the same token cap; tokens are counted as generated (the endpoint's `usage`, generate()'s
new tokens up to the stop token), so answers that stop early count what they produced. The table goes to
stdout and to bench/results/infer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_load import Serve  # same folder: the `lunatrain serve` subprocess helper
from benchargs import at_least, confine_settings, description, out_file, run, scratch_home, versions

from lunatrain.compat import without_bitsandbytes

without_bitsandbytes()  # nothing here quantizes: spare the seconds bitsandbytes' import costs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "infer.md"
MODEL = "luna-adapter"


def train_adapter(home: Path) -> list[list[dict]]:
    """Seed, export, train a few steps; return the eval suite's conversations as prompts."""
    from lunatrain import evalsuite, export, registry, store
    from lunatrain.settings import load_settings
    from lunatrain.train import run_lora

    settings = load_settings(home=home)
    store.load_seed(settings)
    export.export(settings)
    result = run_lora({"maxSteps": 8, "device": "cpu", "maxSeqLength": 256}, settings)
    if not result.ok:
        raise SystemExit(f"training failed: {result.error}")
    registry.activate(settings, MODEL, result.version)
    return [c.messages for c in evalsuite.load_suite(settings)]


def stream_one(client: httpx.Client, messages: list[dict], max_tokens: int) -> int:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


def endpoint(url: str, prompts: list[list[dict]], max_tokens: int, concurrency: int) -> tuple[int, float]:
    """(tokens, seconds) for all prompts, `concurrency` client threads taking the next prompt in turn."""
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    totals = [0] * concurrency
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    _, messages = queue.pop(0)
                try:
                    totals[i] += stream_one(client, messages, max_tokens)
                except BaseException as exc:  # reported after the run; a bench with errors is no result
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"endpoint errors: {errors[0]!r}")
    return sum(totals), elapsed


def in_process(home: Path, prompts: list[list[dict]], max_tokens: int, batch: int) -> tuple[int, float]:
    """(tokens, seconds) with transformers' generate() on base + the same adapter, `batch` prompts per call."""
    import torch
    from peft import PeftModel

    from lunatrain import models, registry, serving
    from lunatrain.settings import load_settings

    settings = load_settings(home=home)
    base = models.resolve_base(None, settings)
    tok = models.load_tokenizer(base, settings)
    entry = registry.get_version(settings, MODEL, "active")
    adapter_dir = registry.adapter_dir(settings, entry)
    model = PeftModel.from_pretrained(models.load_model(base, settings), str(adapter_dir), is_trainable=False).eval()
    stops = serving.stop_ids(tok, adapter_dir, Path(base.path))  # the endpoint's stop tokens
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    tok.padding_side = "left"
    tokens = 0
    with models.cpu_threads_for(model, "cpu"), torch.inference_mode():  # the same threads as the endpoint
        start = time.perf_counter()
        for k in range(0, len(texts), batch):
            enc = tok(texts[k : k + batch], add_special_tokens=False, padding=True, return_tensors="pt")
            out = model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                end = next((i for i, t in enumerate(row) if t in stops), len(row))
                tokens += end
        elapsed = time.perf_counter() - start
    return tokens, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--prompts", type=at_least(1), default=16, help="prompts per measurement (from the eval suite)")
    ap.add_argument("--max-tokens", type=at_least(1), default=64, help="new tokens per answer at most")
    ap.add_argument(
        "--concurrency", type=at_least(1), default=8, help="concurrent streams, and generate()'s batch size"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="the table's file (default: bench/results/infer.md)")
    args = ap.parse_args()
    out_file(ap, args.out)
    confine_settings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with scratch_home("lunatrain-bench-infer-") as home:
        suite = train_adapter(home)
        prompts = [suite[i % len(suite)] for i in range(args.prompts)]
        rows: list[tuple[str, int, float]] = []
        with Serve(home) as serve:
            endpoint(serve.url, prompts[:2], args.max_tokens, 1)  # warm-up: loads base and adapter
            rows.append(("endpoint, 1 stream", *endpoint(serve.url, prompts, args.max_tokens, 1)))
            rows.append(
                (
                    f"endpoint, {args.concurrency} concurrent streams",
                    *endpoint(serve.url, prompts, args.max_tokens, args.concurrency),
                )
            )
        in_process(home, prompts[:2], args.max_tokens, 1)  # warm-up
        rows.append(("generate(), 1 at a time", *in_process(home, prompts, args.max_tokens, 1)))
        rows.append(
            (f"generate(), batch of {args.concurrency}", *in_process(home, prompts, args.max_tokens, args.concurrency))
        )
    report(rows, args)


def report(rows: list[tuple[str, int, float]], args: argparse.Namespace) -> None:
    reference = rows[2][1] / rows[2][2]  # generate(), 1 at a time
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Chat serving speed ({datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"`{' '.join(['bench/infer.py', *sys.argv[1:]])}` on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"shared with other work (load average {load:.1f} at the end: numbers are noisy); luna-tiny on CPU with a "
        f"LoRA adapter (rank 16, all linear layers), greedy, at most {args.max_tokens} new tokens for each of "
        f"{args.prompts} eval-suite prompts. Client, server and generate() all on this machine. {versions()}.",
        "",
        "| how | tokens | seconds | tokens/s | vs generate() 1 at a time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        lines.append(f"| {name} | {tokens:,} | {seconds:.2f} | {rate:,.0f} | {rate / reference:.2f}x |")
    lines += [
        "",
        "The endpoint runs one forward pass at a time (each stream with its own KV cache and adapter, "
        "interleaved token by token), so concurrent streams gain only by overlapping each stream's work outside "
        "the model (HTTP, SSE framing, the client) with other streams' forward passes; a batched forward pass, "
        "as generate() with a batch does, is what would multiply throughput further.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    run(main)
