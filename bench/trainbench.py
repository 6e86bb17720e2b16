"""What bench/train_cpu.py and bench/train_gpu.py share: the data, the LoRA setup, the three contenders and
the table. Each contender gets a fresh copy of the same base model with the same LoRA (r=16, alpha 32,
dropout 0.05, all linear layers), the same samples, batch size, learning rate, schedule and number of
optimizer steps:

- `trainer-pad`: `transformers.Trainer` + PEFT with a pad-to-longest collator (the common setup);
- `trainer-flatten`: `Trainer` with `DataCollatorWithFlattening` (one row per batch, position ids);
- `lunatrain`: our loop's step as `train.train` runs it: `kernels.install` (per-sample attention; the
  16-bit LoRA dropout on CPU), `tokens.make_batch` (one flat unpadded row) + `train.forward_supervised`
  (logits only at supervised positions), AdamW (fused on CUDA), clipping, cosine schedule.

Reported: real (non-pad) tokens per second over the timed steps (the first step is a warm-up and not
timed), best of several rounds run in rotating order, and each contender's ratio to the baselines.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Setup:
    make_base: Callable[[], Any]  # a fresh base model (same weights every call)
    device: str  # "cpu" | "cuda"
    steps: int
    batch_size: int
    lr: float
    max_len: int
    checkpointing: bool = False  # activation checkpointing for every contender (large models)
    threads: int = 2


def add_run_options(ap: argparse.ArgumentParser, *, rounds: int, min_len: int, max_len: int) -> None:
    """The options both training benchmarks take (their defaults differ by the hardware they are for)."""
    from benchargs import at_least, number

    ap.add_argument("--steps", type=at_least(2), default=6, help="optimizer steps per contender (first is warm-up)")
    ap.add_argument("--rounds", type=at_least(1), default=rounds, help="repetitions of all contenders; the best counts")
    ap.add_argument("--batch-size", type=at_least(1), default=8, help="samples per optimizer step")
    ap.add_argument("--lr", type=number(above=0), default=2e-4, help="learning rate")
    # a sample of one token has no next token to learn: a batch of them supervises nothing
    ap.add_argument("--min-len", type=at_least(2), default=min_len, help="shortest sample, in tokens")
    ap.add_argument("--max-len", type=at_least(2), default=max_len, help="longest sample, in tokens")


def sample_lengths(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse `--min-len` above `--max-len` (exit 2): the table would say "lengths 200-64" of samples that
    all have one length."""
    if args.min_len > args.max_len:
        ap.error(f"--min-len {args.min_len} is above --max-len {args.max_len}")


def make_samples(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[Any]:
    """Token-id samples with a log-uniform length spread (many short, some long, like chat data), the first
    40% of each a masked prompt."""
    from lunatrain.tokens import IGNORE, Encoded

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        ids = [rng.randrange(8, vocab) for _ in range(length)]
        prompt = int(length * 0.4)
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:], False, length))
    return out


def lora_model(setup: Setup) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    if setup.device == "cpu":
        torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    model = setup.make_base()
    model.config.use_cache = False
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_ours(setup: Setup, samples: list[Any]) -> tuple[int, float]:
    """Our step, as in train.train: flat batch → supervised logits → sum CE / supervised tokens."""
    import torch
    import torch.nn.functional as F
    from transformers import get_cosine_schedule_with_warmup

    from lunatrain import kernels
    from lunatrain.compat import enable_checkpointing
    from lunatrain.tokens import make_batch
    from lunatrain.train import forward_supervised

    model = lora_model(setup)
    if setup.checkpointing:
        enable_checkpointing(model)
    kernels.install(model, setup.device)
    flat = kernels.uses_varlen(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.lr, fused=setup.device == "cuda")
    sched = get_cosine_schedule_with_warmup(opt, 0, setup.steps)
    autocast = torch.bfloat16 if setup.device == "cuda" else None
    tokens, start = 0, 0.0
    for step in range(setup.steps):
        chunk = samples[step * setup.batch_size : (step + 1) * setup.batch_size]
        batch = make_batch(chunk, setup.max_len, 0, packing=True, flat=flat)
        opt.zero_grad(set_to_none=True)
        logits, targets = forward_supervised(model, batch, setup.device, autocast)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / batch.n_supervised
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step == 0:
            _sync(setup.device)
            start = time.perf_counter()  # warm-up step done
        else:
            tokens += batch.n_tokens
    _sync(setup.device)
    return tokens, time.perf_counter() - start


def run_trainer(setup: Setup, samples: list[Any], flatten: bool) -> tuple[int, float]:
    import torch
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    model = lora_model(setup)
    counted: list[int] = []

    def pad_collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros((len(features), width), dtype=torch.long)
        att = torch.zeros((len(features), width), dtype=torch.long)
        lab = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], att[i, :n], lab[i, :n] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
        counted.append(int(att.sum()))
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def flat_collate(features):
        counted.append(sum(len(f["input_ids"]) for f in features))
        return flat(features)

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_end(self, _args, state, _control, **_kw):
            _sync(setup.device)
            if state.global_step == 1:
                Clock.start = time.perf_counter()
            Clock.end = time.perf_counter()

    class InOrder(Trainer):
        """The samples in the order lunatrain's loop takes them (the Trainer shuffles by default): every
        contender times the same batches after the same warm-up batch."""

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    data = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples[: setup.steps * setup.batch_size]]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=setup.batch_size,
            max_steps=setup.steps,
            learning_rate=setup.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            max_grad_norm=1.0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=setup.device == "cpu",
            bf16=setup.device == "cuda",
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
            remove_unused_columns=False,
            gradient_checkpointing=setup.checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if setup.checkpointing else None,
        )
        trainer = InOrder(
            model=model,
            args=targs,
            train_dataset=data,
            data_collator=flat_collate if flatten else pad_collate,
            callbacks=[Clock()],
        )
        trainer.train()
    return sum(counted[1 : setup.steps]), Clock.end - Clock.start


def contenders(setup: Setup, samples: list[Any]) -> list[tuple[str, Callable[[], tuple[int, float]]]]:
    return [
        ("trainer-pad", lambda: run_trainer(setup, samples, flatten=False)),
        ("trainer-flatten", lambda: run_trainer(setup, samples, flatten=True)),
        ("lunatrain", lambda: run_ours(setup, samples)),
    ]


def measure(setup: Setup, samples: list[Any], rounds: int, label: str = "") -> dict[str, list[float | None]]:
    """tokens/s of every contender per round, in rotating order, so a burst of load from other processes
    penalizes no contender systematically. A contender that runs out of GPU memory gets None."""
    runs = contenders(setup, samples)
    result: dict[str, list[float | None]] = {name: [] for name, _ in runs}
    for r in range(rounds):
        for name, fn in runs[r % len(runs) :] + runs[: r % len(runs)]:
            try:
                tokens, seconds = fn()
                rate: float | None = tokens / seconds
                print(
                    f"{label}round {r + 1} {name}: {tokens} tokens in {seconds:.1f}s = {rate:,.0f} tokens/s", flush=True
                )
            except _oom_errors() as exc:
                rate = None
                print(f"{label}round {r + 1} {name}: out of memory ({type(exc).__name__})", flush=True)
            result[name].append(rate)
            _free(setup.device)
    return result


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else ()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def best(rates: list[float | None]) -> float | None:
    done = [r for r in rates if r is not None]
    return max(done) if done else None


TABLE_HEAD = [
    "| contender | real tokens/s (best) | all rounds | vs trainer-pad | vs trainer-flatten |",
    "|---|---:|---|---:|---:|",
]


def write_table(lines: list[str], out: Path) -> None:
    """Print the table and save it (bench/results/…)."""
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table, encoding="utf-8")


def table_rows(name_prefix: str, rounds: dict[str, list[float | None]]) -> list[str]:
    """Markdown rows: contender, best tokens/s, every round, ratio to trainer-pad and trainer-flatten."""
    pad, flat = best(rounds["trainer-pad"]), best(rounds["trainer-flatten"])

    def ratio(x: float | None, base: float | None) -> str:
        return f"{x / base:.2f}x" if x and base else "—"

    lines = []
    for name, rates in rounds.items():
        tps = best(rates)
        every = ", ".join("OOM" if x is None else f"{x:,.0f}" for x in rates)
        shown = "OOM" if tps is None else f"{tps:,.0f}"
        lines.append(f"| {name_prefix}{name} | {shown} | {every} | {ratio(tps, pad)} | {ratio(tps, flat)} |")
    return lines
