"""Showing a training run: a live progress bar on a terminal, plain lines otherwise, and the loss-curve image.

`ProgressDisplay` consumes the events `train.run_lora` emits ({"type": "progress" | "eval" | "log", ...}),
so the CLI, the trainer service's log and tests all see the same stream.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class ProgressDisplay:
    """Use as a context manager and pass `display.on_event` as `on_event`.

    On a terminal: a rich bar with step, loss, tokens/s and ETA. Otherwise (logs, CI, pipes): one plain
    line per `every` seconds plus every eval and log event, so log files stay readable.
    """

    def __init__(self, *, tty: bool | None = None, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressDisplay:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("training", total=None, loss="-", tps="-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "progress":
            loss, tps = f"{event['loss']:.4f}", f"{event.get('tokensPerSec') or 0:,.0f}"
            if self._progress is not None:
                self._progress.update(
                    self._task,
                    total=event["totalSteps"],
                    completed=event["step"],
                    description=f"epoch {event['epoch']}/{event.get('epochs', '?')}",
                    loss=loss,
                    tps=tps,
                )
                return
            now = time.monotonic()
            if now - self._last >= self.every or event["step"] == event["totalSteps"]:
                self._last = now
                self._line(
                    f"step {event['step']}/{event['totalSteps']} ({event['percent']:.0f}%) epoch {event['epoch']} "
                    f"loss {loss} {tps} tok/s ETA {_fmt_eta(event.get('etaSeconds'))}"
                )
        elif kind == "eval":
            val, base = event.get("valLoss"), event.get("baseValLoss")
            parts = [f"epoch {event['epoch']}:"]
            parts += [f"val loss {val:.4f}"] if val is not None else []
            parts += [f"base val loss {base:.4f}"] if base is not None else []
            self._line(" ".join(parts))
        elif kind == "log":
            self._line(str(event.get("message", "")))

    def _line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)


def plot_loss_curve(
    path: Path, curve: list[dict], epochs: list[dict], base_val_loss: float | None, *, title: str = ""
) -> Path:
    """Training loss per step, validation loss per epoch and the base model's validation loss as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (services, CI)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if curve:
            ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], label="train loss", linewidth=1)
        vals = [(e["step"], e["valLoss"]) for e in epochs if e.get("valLoss") is not None]
        if vals:
            ax.plot(*zip(*vals, strict=True), "o-", label="val loss")
        if base_val_loss is not None:
            ax.axhline(base_val_loss, linestyle="--", color="grey", label="base model val loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per supervised token)")
        ax.set_title(f"LoRA training {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
