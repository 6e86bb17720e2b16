"""The memory plan's estimate against measured peaks: CPU peak RSS of a fresh process per configuration.

Run:  .venv/bin/python bench/memory.py            (about 2-3 minutes on 2 cores)
      .venv/bin/python bench/memory.py --only 20M  (one model)

Each row trains three optimizer steps in a new child process, exactly as `train.train` does: the base model
loaded by `train.load_lora_model` (LoRA r=16 on all linear layers, dropout 0.05, kernels installed, the
chosen checkpointing and quantization), one flat micro-batch of `tokens` random tokens of which the last
60% are supervised, `train.loss_sum`'s loss (chunked, or the plain path), AdamW. The child reports its peak
RSS (`ru_maxrss`), which counts everything the process ever held: the runtime, the weights, the step, and
what the C allocator kept of freed memory; a second run of each row measures live memory alone. The
estimate is `memplan.estimate` for the same shape and options; ratio = measured / estimate. Models:
luna-tiny (~0.3M parameters) and a ~20M-parameter Llama architecture with a 16k vocabulary built by
`models.build_tiny_model`. The table is printed and written to bench/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (label, build_tiny_model kwargs or None for luna-tiny's defaults, tokens per micro-batch)
MODELS = [
    ("luna-tiny", {}, 2048),
    ("20M", {"hidden": 384, "layers": 8, "heads": 6, "kv_heads": 6, "intermediate": 1024, "model_vocab": 16384}, 4096),
]
# (checkpointing, loss path, quantize)
VARIANTS = [(False, "plain", "none"), (False, "chunked", "none"), (True, "chunked", "none"), (True, "chunked", "4bit")]
STEPS = 3


def child(model_dir: str, tokens: int, checkpointing: bool, path: str, quantize: str) -> None:
    """One measurement (run in a fresh process): STEPS training steps, then print the peak RSS as JSON."""
    import resource

    import torch

    from lunatrain import models, train
    from lunatrain.params import parse_params, steps_per_epoch, total_steps
    from lunatrain.settings import load_settings
    from lunatrain.tokens import IGNORE, Encoded, make_batch

    torch.set_num_threads(2)
    settings = load_settings()
    base = models.resolve_base(model_dir, settings)
    params = parse_params(
        {
            "rank": 16,
            "dropout": 0.05,
            "quantize": quantize,
            "gradientCheckpointing": "true" if checkpointing else "false",
            "epochs": STEPS,  # one sample: one step per epoch
        }
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, _kernels, loss = train.load_lora_model(params, settings, base, "cpu", False, checkpointing)
    if path == "plain":
        loss = {"path": "plain"}
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (tokens,), generator=gen).tolist()
    cut = int(tokens * 0.4)
    sample = Encoded(ids, [IGNORE] * cut + ids[cut:], False, tokens)
    batch = make_batch([sample], tokens, 0, flat=True)
    run = train.Run(
        params=params,
        settings=settings,
        base=base,
        tokenizer=None,
        model=model,
        device="cpu",
        autocast_dtype=None,
        data=None,
        tokens=None,
        train=[],
        val=[],
        steps_per_epoch=steps_per_epoch(1, params),
        total_steps=total_steps(1, params),
        work_dir=Path("."),
        loss=loss,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    for _ in range(run.total_steps):
        opt.zero_grad(set_to_none=True)
        (train.loss_sum(run, batch) / batch.n_supervised).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "runtime": before * 1024, "supervised": batch.n_supervised, "loss": loss["path"]}))


def measure(model_dir: Path, tokens: int, checkpointing: bool, path: str, quantize: str, live: bool) -> dict:
    """Peak RSS of a child process; `live`: with glibc's mmap threshold fixed at 64 KiB, so that freed tensors
    go back to the system at once and the peak is that of the tensors alive at one time."""
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(tokens), str(int(checkpointing)), path, quantize]
    env = os.environ | {"OMP_NUM_THREADS": "2", "ASSISTANT_HOME": str(model_dir.parent)}
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="measure only this model label")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.md")
    args = ap.parse_args()

    from lunatrain import memplan
    from lunatrain.memplan import Job
    from lunatrain.models import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs, tokens in MODELS:
            if args.only and label != args.only:
                continue
            path = build_tiny_model(Path(tmp) / label, **kwargs)
            shape = memplan.Shape.from_config(json.loads((path / "config.json").read_text()), label)
            params_m = shape.params / 1e6
            for ck, loss_path, quantize in VARIANTS:
                got = measure(path, tokens, ck, loss_path, quantize, live=False)
                live = measure(path, tokens, ck, loss_path, quantize, live=True)
                job = Job(
                    device="cpu",
                    tokens=tokens,
                    supervised=got["supervised"],
                    rows=1,
                    rank=16,
                    targets=("all-linear",),
                    dropout=True,
                    quantize=quantize,
                    checkpointing=ck,
                )
                est = memplan.estimate(replace(shape, chunked_loss=loss_path == "chunked"), job)
                slack = est["allocator"]
                rows.append(
                    {
                        "model": label,
                        "params": params_m,
                        "tokens": tokens,
                        "ck": ck,
                        "loss": got["loss"],
                        "quantize": quantize,
                        "est": est,
                        "slack": slack,
                        "peak": got["peak"],
                        "live": live["peak"],
                    }
                )
                r = rows[-1]
                print(
                    f"{label:<10} ck={ck!s:<5} loss={r['loss']:<8} q={quantize:<5} "
                    f"estimate {est['total'] / 2**20:8.1f} MiB  measured {r['peak'] / 2**20:8.1f} MiB  "
                    f"ratio {r['peak'] / est['total']:.2f}; live {(est['total'] - slack) / 2**20:8.1f} "
                    f"vs {r['live'] / 2**20:8.1f} MiB",
                    flush=True,
                )
    table = render(rows)
    print(table)
    args.out.write_text(table, encoding="utf-8")


def render(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = [
        "# Memory plan: estimate vs measured peak (CPU)",
        "",
        f"`bench/memory.py` on {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch threads 2,",
        f"float32. Each row is a fresh process training {STEPS} optimizer steps on one flat micro-batch (60% of the",
        "tokens supervised), LoRA r=16 on all linear layers, dropout 0.05. MiB. `measured`: peak RSS of the process;",
        "`estimate`: `memplan.estimate` (runtime overhead and `allocator`, the C allocator's retained blocks, included);",
        "`live`: the same run with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_=65536`), so freed",
        "tensors leave at once, against the estimate without the allocator share. `loss`: chunked or plain",
        "cross-entropy; `logits`: the estimate's share for the loss.",
        "",
        "| model | params | tokens | checkpointing | loss | quantize | weights | activations | logits | allocator | estimate | measured | measured/estimate | live estimate | live measured | ratio |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e = r["est"]
        lines.append(
            f"| {r['model']} | {r['params']:.1f}M | {r['tokens']} | {'on' if r['ck'] else 'off'} | {r['loss']} | "
            f"{r['quantize']} | {mib(e['weights'])} | {mib(e['activations'])} | {mib(e['logits'])} | {mib(e['allocator'])} | "
            f"{mib(e['total'])} | {mib(r['peak'])} | {r['peak'] / e['total']:.2f} | {mib(e['total'] - r['slack'])} | "
            f"{mib(r['live'])} | {r['live'] / (e['total'] - r['slack']):.2f} |"
        )
    lines += ["", "Savings measured (peak RSS, same model and tokens):", ""]
    for kind in ("peak", "live"):
        by = {(r["model"], r["ck"], r["loss"], r["quantize"]): r[kind] for r in rows}
        for model in dict.fromkeys(r["model"] for r in rows):
            plain, chunked = by.get((model, False, "plain", "none")), by.get((model, False, "chunked", "none"))
            ck, q4 = by.get((model, True, "chunked", "none")), by.get((model, True, "chunked", "4bit"))
            if plain and chunked:
                lines.append(
                    f"- {model}, {'peak RSS' if kind == 'peak' else 'live'}: plain loss {mib(plain)} → "
                    f"chunked {mib(chunked)} ({mib(plain - chunked)} less)"
                    + (f" → with checkpointing {mib(ck)}" if ck else "")
                    + (f" → and 4-bit weights {mib(q4)}" if q4 else "")
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model_dir, tokens, ck, path, quantize = sys.argv
        child(model_dir, int(tokens), ck == "1", path, quantize)
    else:
        main()
