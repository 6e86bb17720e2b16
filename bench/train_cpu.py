"""Training throughput on CPU: lunatrain's loop vs Hugging Face Trainer + PEFT, in one run.

Run:  .venv/bin/python bench/train_cpu.py            (about 3-5 minutes on 2 cores)
      .venv/bin/python bench/train_cpu.py --steps 6 --rounds 3 --threads 2 --hidden 384 --layers 6

The contenders (trainer-pad, trainer-flatten, lunatrain; see bench/trainbench.py) train the same LoRA on
the same Llama-architecture model (random weights, built by `models.build_tiny_model`, ~17M parameters
with a 16k vocabulary) and the same synthetic chat-like samples (lengths spread 32-512 tokens), float32.
Only ratios within one run mean anything: these machines are shared and noisy. The table is printed and
written to bench/results/train_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from benchargs import at_least, confine_settings, description, out_file, run, versions
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

from lunatrain.compat import without_bitsandbytes

without_bitsandbytes()  # nothing here quantizes: spare the seconds bitsandbytes' import costs


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    add_run_options(ap, rounds=3, min_len=32, max_len=512)
    ap.add_argument("--hidden", type=at_least(2), default=384, help="model width: a multiple of twice --heads")
    ap.add_argument("--layers", type=at_least(1), default=6, help="transformer layers")
    ap.add_argument("--heads", type=at_least(1), default=6, help="attention heads (as many key/value heads)")
    # A model's vocabulary is at least its tokenizer's: a smaller one would be raised without a word.
    ap.add_argument(
        "--vocab", type=at_least(3072), default=16384, help="model vocabulary; at least 3072 (the tokenizer's size)"
    )
    # a string default goes through `type` too: OMP_NUM_THREADS=0 is refused like --threads 0
    ap.add_argument(
        "--threads",
        type=at_least(1),
        default=os.environ.get("OMP_NUM_THREADS", "2"),
        help="torch threads (default: $OMP_NUM_THREADS, else 2)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "train_cpu.md",
        help="the table's file (default: bench/results/train_cpu.md)",
    )
    args = ap.parse_args()
    sample_lengths(ap, args)
    # RoPE rotates each head's dimensions in pairs: a head of odd width fails deep inside transformers
    if args.hidden % (2 * args.heads):
        ap.error(f"--hidden {args.hidden} is not a multiple of twice --heads {args.heads} (heads of even width)")
    out_file(ap, args.out)
    confine_settings()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lunatrain.models import build_tiny_model

    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            Path(tmp) / "bench-model",
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.heads,
            intermediate=max(64, int(args.hidden * 8 / 3) // 64 * 64),  # at least one block below hidden 24
            model_vocab=args.vocab,
        )
        cfg = AutoConfig.from_pretrained(path)

        def make_base():
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, use_safetensors=True, local_files_only=True
            )

        setup = Setup(make_base, "cpu", args.steps, args.batch_size, args.lr, args.max_len, threads=args.threads)
        n_params = sum(p.numel() for p in make_base().parameters())
        samples = make_samples(args.steps * args.batch_size, cfg.vocab_size, args.min_len, args.max_len, seed=1)
        rounds = measure(setup, samples, args.rounds)
    lines = [
        "# Training throughput on CPU (LoRA r=16, all linear layers, float32)",
        "",
        f"Model: Llama architecture, {n_params / 1e6:.1f}M parameters (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
        f"layers, vocab {cfg.vocab_size}), random weights. Data: {len(samples)} samples, lengths {args.min_len}-"
        f"{args.max_len} (log-uniform), 40% masked prompt. Batch {args.batch_size}, {args.steps} steps (first untimed), "
        f"lr {args.lr}. {versions()}, {args.threads} threads, {platform.machine()}, "
        f"load average before the run {load_before[0]:.1f} on {os.cpu_count()} CPUs (shared machine: ratios only).",
        "",
        f"Best of {args.rounds} rounds in rotating order.",
        "",
        *TABLE_HEAD,
        *table_rows("", rounds),
    ]
    write_table(lines, args.out)


if __name__ == "__main__":
    run(main)
