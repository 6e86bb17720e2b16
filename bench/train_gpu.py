"""Training throughput on one GPU: lunatrain's loop vs Hugging Face Trainer + PEFT, for three real
architectures with random weights (nothing is downloaded), in one run.

Run (on a CUDA machine):  python bench/train_gpu.py                       (all presets, ~5-8 minutes)
                          python bench/train_gpu.py --presets llama-3.2-1b --rounds 2
                          python bench/train_gpu.py --quantize 4bit   (QLoRA: table in train_gpu_4bit.md)
Smoke test anywhere:      python bench/train_gpu.py --presets tiny --device cpu --steps 2 --threads 1 --out /tmp/t.md

Contenders and method as in bench/trainbench.py: same LoRA (r=16, all linear layers), bf16 autocast on
CUDA, same samples (lengths spread 128-4096 tokens, log-uniform), batch 8, same learning rate and schedule.
The 8B preset uses activation checkpointing for every contender (as one would to fit it). A contender
that runs out of memory is reported as OOM. The table goes to bench/results/train_gpu.md.

With `--quantize 4bit` every contender trains on the same 4-bit base (QLoRA: NF4, double quantization, the
job's compute dtype), loaded from disk by `models.load_model` exactly as a job loads it; the random weights
are written to a temporary folder first (bench/shapes.py). The Trainer contenders get that model as it is,
not through PEFT's `prepare_model_for_kbit_training`, which would add float32 copies of the norms and
checkpointing for them alone. The table goes to bench/results/train_gpu_4bit.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
from pathlib import Path

from benchargs import at_least, confine_settings, description, out_file, run, versions
from shapes import CHECKPOINTING, PRESETS, build_on_disk, config, random_model
from trainbench import (
    ROOT,
    TABLE_HEAD,
    Setup,
    add_run_options,
    make_samples,
    measure,
    sample_lengths,
    table_rows,
    write_table,
)

from lunatrain.compat import with_bitsandbytes, without_bitsandbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument(
        "--presets",
        nargs="+",
        default=["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"],
        choices=sorted(PRESETS),
        help="model shapes (bench/shapes.py); tiny: a smoke test",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test")
    add_run_options(ap, rounds=1, min_len=128, max_len=4096)
    ap.add_argument("--threads", type=at_least(1), default=2, help="torch threads with --device cpu")
    ap.add_argument("--quantize", default="none", choices=["none", "4bit"], help="4bit: QLoRA on a 4-bit base")
    ap.add_argument("--out", type=Path, help="default: bench/results/train_gpu.md (train_gpu_4bit.md with 4bit)")
    args = ap.parse_args()
    sample_lengths(ap, args)
    if args.device == "cuda":
        import torch  # alone: transformers, PEFT and bitsandbytes would cost seconds more before the refusal

        if not torch.cuda.is_available():
            ap.error("no CUDA device here; run it on a CUDA machine, or use --device cpu for a smoke test")
    confine_settings()
    quantized = args.quantize == "4bit"
    out = out_file(ap, args.out or ROOT / "bench" / "results" / ("train_gpu_4bit.md" if quantized else "train_gpu.md"))
    # bitsandbytes' import costs seconds: only a 4-bit run lets PEFT find it (it looks once, when it loads)
    if quantized:
        with_bitsandbytes()
    else:
        without_bitsandbytes()

    import torch

    from lunatrain import kernels, models
    from lunatrain.settings import load_settings

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    precision = "bf16 autocast" if args.device == "cuda" else "float32"
    stack = versions()
    if quantized:
        import bitsandbytes as bnb

        stack += f", bitsandbytes {bnb.__version__}"
    lines = [
        f"# Training throughput on {gpu} (LoRA r=16, all linear layers, "
        f"{'4-bit NF4 base, ' if quantized else ''}{precision})",
        "",
        f"Random-weight models with the published shapes. Data: {args.steps * args.batch_size} samples, lengths "
        f"{args.min_len}-{args.max_len} (log-uniform), 40% masked prompt. Batch {args.batch_size}, {args.steps} steps "
        f"(first untimed), lr {args.lr}, best of {args.rounds} round(s). {stack}. Attention in lunatrain's loop: "
        f"{'varlen-flash' if args.device == 'cuda' and kernels.flash_varlen_ok() else 'varlen-sdpa'}.",
        "",
        TABLE_HEAD[0].replace("| contender", "| model / contender"),
        TABLE_HEAD[1],
    ]
    with tempfile.TemporaryDirectory() as tmp:  # the 4-bit runs' bases on disk (an 8B model is 16 GB)
        settings = load_settings(home=Path(tmp)) if quantized else None
        for name in args.presets:
            cfg = config(name)
            on_disk = Path(tmp) / name
            if quantized:
                build_on_disk(name, on_disk, args.device)

            def make_base(on_disk=on_disk, name=name):
                if not quantized:
                    return random_model(name, args.device, dtype)
                model = models.load_model(str(on_disk), settings, args.device, dtype, "4bit")
                # a table titled "4-bit" must come from 4-bit layers, not from a load that quietly did not quantize
                if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
                    raise SystemExit(f"{name}: the base loaded without 4-bit layers")
                return model

            setup = Setup(
                make_base,
                args.device,
                args.steps,
                args.batch_size,
                args.lr,
                args.max_len,
                checkpointing=name in CHECKPOINTING,
                threads=args.threads,
            )
            samples = make_samples(args.steps * args.batch_size, cfg.vocab_size, args.min_len, args.max_len, seed=1)
            rounds = measure(setup, samples, args.rounds, label=f"{name} ")
            suffix = " (checkpointing)" if setup.checkpointing else ""
            lines += table_rows(f"{name}{suffix} / ", rounds)
            shutil.rmtree(on_disk, ignore_errors=True)
            write_table(lines, out)  # after each model: a run cut short keeps what it measured


if __name__ == "__main__":
    run(main)
