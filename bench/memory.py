"""The memory plan's estimate against measured peaks: CPU peak RSS (or, on CUDA, the device memory) of a
fresh process per configuration.

Run:  .venv/bin/python bench/memory.py            (about 2-3 minutes on 2 cores)
      .venv/bin/python bench/memory.py --only 20M --out /tmp/m.md  (one model; without --out not saved)
      python bench/memory.py --device cuda         (on a CUDA machine: three published shapes, ~3-5 minutes)

Each row trains three optimizer steps in a new child process, exactly as `train.train` does: the base model
loaded by `train.load_lora_model` (LoRA r=16 on all linear layers, dropout 0.05, kernels installed, the
chosen checkpointing and quantization), one flat micro-batch of `tokens` random tokens of which the last
60% are supervised, `train.loss_sum`'s loss (chunked, or the plain path), AdamW. The child reports its peak
RSS (`ru_maxrss`), which counts everything the process ever held: the runtime, the weights, the step, and
what the C allocator kept of freed memory; a second run of each row measures live memory alone. The
estimate is `memplan.estimate` for the same shape and options; ratio = measured / estimate. Models:
luna-tiny (~0.3M parameters) and a ~20M-parameter Llama architecture with a 16k vocabulary built by
`models.build_tiny_model`. The table is printed and written to bench/results/memory.md; the reading below it
(from "Reading the table") is written by hand and kept.

On CUDA the models are the published shapes of bench/shapes.py (random bfloat16 weights written to disk
once, so that each child loads them as a job does, quantized ones included), bf16 autocast. The child
reports the device memory in use at the end (`torch.cuda.mem_get_info`: the CUDA context and everything
the caching allocator reserved, which it keeps; every process on the device counts, so run it on an idle
GPU) and the allocator's peak of live tensors; the table goes to bench/results/memory_gpu.md. With `--only`
the other models' rows and the text below the table are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from benchargs import confine_settings, description, out_file, run, versions
from shapes import build_on_disk

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
# On CUDA: (preset of bench/shapes.py, tokens per micro-batch). 4096 tokens is the size of the plan's default
# job (batch 4 x 1024) that `lunatrain health`'s fit table is computed for; that table counts every position
# as supervised, these rows 60% of them, as in chat data.
GPU_MODELS = [("qwen2.5-0.5b", 4096), ("llama-3.2-1b", 4096), ("llama-3.1-8b", 4096)]


def child(model_dir: str, tokens: int, checkpointing: bool, path: str, quantize: str, device: str) -> None:
    """One measurement (run in a fresh process): STEPS training steps, then print the peak as JSON."""
    import resource

    import torch

    from lunatrain import models, train
    from lunatrain.params import parse_params, total_steps
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
    cuda = device == "cuda"
    model, _kernels, loss = train.load_lora_model(params, settings, base, device, cuda, checkpointing)
    if path == "plain":
        loss = {"path": "plain"}
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (tokens,), generator=gen).tolist()
    cut = int(tokens * 0.4)
    sample = Encoded(ids, [IGNORE] * cut + ids[cut:], False, tokens)
    batch = make_batch([sample], tokens, 0, flat=True)
    autocast_dtype = torch.bfloat16 if cuda else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    for _ in range(total_steps(1, params)):
        opt.zero_grad(set_to_none=True)
        (train.batch_loss_sum(model, batch, device, autocast_dtype, loss) / batch.n_supervised).backward()
        opt.step()
    out = {"supervised": batch.n_supervised, "loss": loss["path"]}
    if cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        # `peak`: the device memory in use (context + what the caching allocator reserved and keeps, which
        # is at least its peak); `allocated`: the largest total of live tensors.
        out |= {"peak": total - free, "allocated": torch.cuda.max_memory_allocated()}
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out |= {"peak": peak, "runtime": before * 1024}
    print(json.dumps(out))


def measure(
    model_dir: Path, tokens: int, checkpointing: bool, path: str, quantize: str, live: bool, device: str = "cpu"
) -> dict:
    """Peak RSS of a child process (on CUDA: its device memory, see `child`); `live` (CPU): with glibc's mmap
    threshold fixed at 64 KiB, so that freed tensors go back to the system at once and the peak is that of the
    tensors alive at one time."""
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(tokens), str(int(checkpointing)), path, quantize]
    cmd.append(device)
    env = os.environ | {"OMP_NUM_THREADS": "2", "ASSISTANT_HOME": str(model_dir.parent)}
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--only", help="measure only this model label")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the published shapes on a GPU")
    ap.add_argument("--out", type=Path, help="default: bench/results/memory.md (memory_gpu.md with --device cuda)")
    args = ap.parse_args()
    confine_settings()  # each child gets its own data root (measure)
    labels = [m[0] for m in (GPU_MODELS if args.device == "cuda" else MODELS)]
    if args.only and args.only not in labels:
        ap.error(f"argument --only: no model named {args.only!r} ({', '.join(labels)})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here; run it on a CUDA machine, or leave --device out")
        gpu_main(args.only, out_file(ap, args.out or ROOT / "bench" / "results" / "memory_gpu.md"))
        return
    # One model's rows would replace the other's in the results file: written only where --out says.
    out = args.out or (None if args.only else ROOT / "bench" / "results" / "memory.md")
    if out is not None:
        out_file(ap, out)

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
    if out is None:
        print("(not saved: give --out to keep the rows of one model)")
        return
    # The reading below the generated part was written by hand: kept.
    reading = _reading(out) if out.is_file() else []
    out.write_text(table + ("\n" + "\n".join(reading) + "\n" if reading else ""), encoding="utf-8")


def gpu_main(only: str | None, out: Path) -> None:
    """The plan against the device memory on CUDA, for the published shapes of bench/shapes.py."""
    from lunatrain import memplan
    from lunatrain.memplan import Job

    by_model, tail = _table_of(out) if only and out.is_file() else ({}, [])
    with tempfile.TemporaryDirectory() as tmp:
        for label, tokens in GPU_MODELS:
            if only and label != only:
                continue
            path = Path(tmp) / label
            build_on_disk(label, path)
            shape = memplan.Shape.from_config(json.loads((path / "config.json").read_text()), label)
            by_model[label] = []
            for ck, loss_path, quantize in VARIANTS:
                try:
                    got = measure(path, tokens, ck, loss_path, quantize, live=False, device="cuda")
                except SystemExit as failed:  # one configuration that fails (out of memory) ends no others
                    print(failed, flush=True)
                    continue
                job = Job("cuda", tokens, got["supervised"], 1, 16, ("all-linear",), True, quantize, ck)
                est = memplan.estimate(replace(shape, chunked_loss=loss_path == "chunked"), job)
                row = {"model": label, "params": shape.params / 1e9, "tokens": tokens, "ck": ck} | got
                by_model[label].append(gpu_row(row | {"quantize": quantize, "est": est}))
                print(by_model[label][-1], flush=True)
            shutil.rmtree(path)  # an 8B model is 16 GB of disk
            # rewrite the table after each model: a run cut short keeps what it measured
            rows = [r for m, _ in GPU_MODELS for r in by_model.get(m, [])]
            out.write_text("\n".join(gpu_header() + rows + tail) + "\n", encoding="utf-8")
    if out.is_file():
        print(out.read_text())


def _table_of(out: Path) -> tuple[dict[str, list[str]], list[str]]:
    """An earlier table's rows by model, and the lines below the table (its reading)."""
    lines = out.read_text(encoding="utf-8").splitlines()
    by_model: dict[str, list[str]] = {}
    last = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines) - 1)
    for line in lines[: last + 1]:
        model = line.strip("|").split("|")[0].strip()
        if any(model == m for m, _ in GPU_MODELS):
            by_model.setdefault(model, []).append(line)
    return by_model, lines[last + 1 :]


def _reading(out: Path) -> list[str]:
    """The hand-written lines of an earlier CPU table, from its "Reading the table" paragraph on."""
    lines = out.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Reading the table")), len(lines))
    return lines[start:]


def gpu_header() -> list[str]:
    import torch

    name = torch.cuda.get_device_name(0)
    return [
        f"# Memory plan: estimate vs measured device memory ({name})",
        "",
        f"`python bench/memory.py --device cuda` on one {name}: {versions()}.",
        "Random bfloat16 weights of published shapes (bench/shapes.py), loaded from disk as a job loads them; each row",
        f"a fresh process training {STEPS} optimizer steps on one flat micro-batch (60% supervised), LoRA r=16 on all",
        "linear layers, dropout 0.05, bf16 autocast. MiB. `in use`: the device memory in use after the steps (the CUDA",
        "context and all the caching allocator reserved); `allocated`: the allocator's peak of live tensors, against",
        "the estimate without its `overhead` (context, workspaces, fragmentation).",
        "",
        "| model | params | tokens | supervised | checkpointing | loss | quantize | weights | activations | logits "
        "| overhead | estimate | in use | in use/estimate | estimate w/o overhead | allocated | ratio |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def gpu_row(r: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"
    e = r["est"]
    bare = e["total"] - e["overhead"]
    return (
        f"| {r['model']} | {r['params']:.2f}B | {r['tokens']} | {r['supervised']} | {'on' if r['ck'] else 'off'} | "
        f"{r['loss']} | "
        f"{r['quantize']} | {mib(e['weights'])} | {mib(e['activations'])} | {mib(e['logits'])} | "
        f"{mib(e['overhead'])} | {mib(e['total'])} | {mib(r['peak'])} | {r['peak'] / e['total']:.2f} | "
        f"{mib(bare)} | {mib(r['allocated'])} | {r['allocated'] / bare:.2f} |"
    )


def render(rows: list[dict]) -> str:
    mib = lambda n: f"{round(n / 2**20):,}"  # rounded first: a small negative is "0", not "-0"
    lines = [
        "# Memory plan: estimate vs measured peak (CPU)",
        "",
        f"`bench/memory.py` on {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, {versions()},",
        f"torch threads 2, float32. Each row is a fresh process training {STEPS} optimizer steps on one flat",
        "micro-batch (60% of the tokens supervised), LoRA r=16 on all linear layers, dropout 0.05. MiB. `measured`:",
        "peak RSS of the process;",
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
                    f"chunked {mib(chunked)} ({mib(abs(plain - chunked))} {'less' if plain >= chunked else 'more'})"
                    + (f" → with checkpointing {mib(ck)}" if ck else "")
                    + (f" → and 4-bit weights {mib(q4)}" if q4 else "")
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model_dir, tokens, ck, path, quantize, device = sys.argv
        run(lambda: child(model_dir, int(tokens), ck == "1", path, quantize, device))
    else:
        run(main)
