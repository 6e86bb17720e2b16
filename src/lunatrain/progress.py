"""Showing a training run: a live progress bar on a terminal, plain lines otherwise, and the loss-curve image.

`ProgressDisplay` consumes the events `train.run_lora` emits ({"type": "progress" | "eval" | "log", ...}),
so the CLI, the trainer service's log and tests all see the same stream.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
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


def event_line(event: dict[str, Any]) -> str | None:
    """One training event (progress, eval, log, trained) as a plain line; None for other kinds. The one wording
    of a local run's display, of following a trainer job and of `jobs events`: losses to 4 places, tokens/s
    whole, fields the event lacks left out."""
    kind = event.get("type")
    if kind == "progress":
        step = f"step {event.get('step')}/{event.get('totalSteps') or '?'}"
        if event.get("percent") is not None:
            step += f" ({math.floor(event['percent'])}%)"  # cut, not rounded: 99.6% is not done
        return " ".join([step, *progress_details(event)])
    if kind == "eval":
        val, base = event.get("valLoss"), event.get("baseValLoss")
        parts = [f"epoch {event.get('epoch')}:"]
        parts += [f"val loss {val:.4f}"] if isinstance(val, int | float) else []
        parts += [f"base val loss {base:.4f}"] if isinstance(base, int | float) else []
        return " ".join(parts)
    if kind == "log":
        return str(event.get("message", ""))
    if kind == "trained":
        adapter, metrics = event.get("adapter") or {}, event.get("metrics") or {}
        line = f"adapter {adapter.get('name')}@{adapter.get('version')} registered ({adapter.get('path')})"
        losses = [(n, metrics.get(k)) for n, k in (("val loss", "valLoss"), ("train loss", "trainLoss"))]
        said = [f"{n} {v:.4f}" for n, v in losses if isinstance(v, int | float)]
        return line + (": " + ", ".join(said) if said else "")
    return None


def progress_details(event: dict[str, Any]) -> list[str]:
    """A progress event's epoch, loss, tokens/s and ETA, as `event_line` says them (a bar shows the step)."""
    parts = [f"epoch {event['epoch']}"] if event.get("epoch") is not None else []
    parts += [f"loss {event['loss']:.4f}"] if isinstance(event.get("loss"), int | float) else []
    parts += [f"{event['tokensPerSec']:,.0f} tok/s"] if isinstance(event.get("tokensPerSec"), int | float) else []
    parts += [f"ETA {_fmt_eta(event['etaSeconds'])}"] if event.get("etaSeconds") is not None else []
    return parts


class ProgressDisplay:
    """Use as a context manager and pass `display.on_event` as `on_event`.

    On a terminal: a rich bar with step, loss, tokens/s and ETA. Otherwise (logs, CI, pipes): one plain
    line per `every` seconds plus every eval and log event, so log files stay readable. `stream` None: a
    stream that is closed (`2>&-`), where nothing is shown. The display is advice: a stream that refuses a
    write (a full disk, a pipe whose reader is gone) ends the display, never the run it shows; only stdout's
    closed pipe goes on up, the pipeline's own ending (`lunatrain lora --local | head`).
    """

    def __init__(self, *, stream: TextIO | None, tty: bool | None = None, every: float = 5.0) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty()) if tty is None else tty
        self.every = every
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressDisplay:
        if self.tty and self.stream is not None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                # a field, not `{task.total:.0f}`: the total is unknown (None) until the first step, and rich
                # draws the bar before that
                TextColumn("step {task.fields[steps]}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                # the engine's ETA, as a pipe and `jobs follow` say it (rich's own counts model loading in)
                TextColumn("ETA {task.fields[eta]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("training", total=None, steps="0/?", loss="-", tps="-", eta="-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._shown(lambda: self._progress.__exit__(*exc))

    def on_event(self, event: dict[str, Any]) -> None:
        if self.stream is not None:
            self._shown(lambda: self._show(event))

    def _shown(self, show: Callable[[], Any]) -> None:
        from .console import OutputLost

        try:
            show()
        except (OSError, OutputLost) as exc:
            if isinstance(exc, BrokenPipeError) and self.stream is sys.stdout:
                raise
            progress, self.stream, self._progress = self._progress, None, None  # the run goes on, unshown
            if progress is not None:
                with contextlib.suppress(Exception):
                    progress.stop()

    def _show(self, event: dict[str, Any]) -> None:
        if event.get("type") == "progress":
            if self._progress is not None:
                self._progress.update(
                    self._task,
                    total=event["totalSteps"],
                    completed=event["step"],
                    description=f"epoch {event['epoch']}/{event.get('epochs', '?')}",
                    steps=f"{event['step']}/{event['totalSteps']}",
                    loss=f"{event['loss']:.4f}",
                    tps=f"{event.get('tokensPerSec') or 0:,.0f}",
                    eta=_fmt_eta(event["etaSeconds"]) if event.get("etaSeconds") is not None else "-",
                )
                return
            now = time.monotonic()
            if now - self._last < self.every and event["step"] != event["totalSteps"]:
                return
            self._last = now
        line = event_line(event)
        if line is not None:
            self._line(line)

    def _line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)  # messages may quote user text
        else:
            print(text, file=self.stream, flush=True)


# The loss-curve image, drawn with Pillow: importing matplotlib and laying out a figure cost about 0.9 s of CPU
# per job on a 2-core machine, a third of a short job forked from the warm worker. Drawn at twice the size and
# scaled down, so that lines and text are smooth. Colours as the usual plotting defaults.
_SIZE = (700, 400)
_SCALE = 2
_BOX = (72, 34, 16, 46)  # plot area margins at 1x: left, top, right, bottom
_TRAIN, _VAL, _BASE = (31, 119, 180), (255, 127, 14), (128, 128, 128)
_INK, _GRID = (38, 38, 38), (225, 225, 225)


def _nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart; whole numbers only if `whole`) in lo..hi."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(step, 1.0) if whole else step
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _tick_text(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{decimals}f}"


def _span(values: list[float], pad: float) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def plot_loss_curve(
    path: Path, curve: list[dict], epochs: list[dict], base_val_loss: float | None, *, title: str = ""
) -> Path:
    """Training loss per step, validation loss per epoch and the base model's validation loss as a line, as a
    PNG of 700x400 pixels (the same bytes for the same numbers)."""
    from PIL import Image, ImageDraw, ImageFont

    def plottable(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """The points a line can pass through: a nan or inf loss (a diverged step) is left out, not drawn."""
        return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]

    train = plottable([(c["step"], c["loss"]) for c in curve])
    vals = plottable([(e["step"], e["valLoss"]) for e in epochs if e.get("valLoss") is not None])
    base = base_val_loss if base_val_loss is not None and math.isfinite(base_val_loss) else None
    x0, x1 = _span([x for x, _ in train + vals], 0.03)
    y0, y1 = _span([y for _, y in train + vals] + ([base] if base is not None else []), 0.06)
    xticks, yticks = _nice_ticks(x0, x1, whole=True), _nice_ticks(y0, y1)  # steps are whole numbers

    k = _SCALE
    font, big = ImageFont.load_default(size=11 * k), ImageFont.load_default(size=13 * k)
    label = "loss (per supervised token)"
    box = font.getbbox(label)  # the axis label's box, before it is turned upright
    # The plot moves right when the widest y tick label needs it (a loss in the millions): from the image's
    # edge, the rotated axis label, a gap, the tick labels, the tick marks.
    widest = max((font.getlength(_tick_text(v, yticks)) for v in yticks), default=0.0)
    width, height = _SIZE[0] * k, _SIZE[1] * k
    left = max(_BOX[0] * k, math.ceil(4 * k + box[3] + 2 * k + 6 * k + widest + 6 * k))
    top, right, bottom = _BOX[1] * k, width - _BOX[2] * k, height - _BOX[3] * k
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for value in xticks:
        px = at(value, y0)[0]
        draw.line([(px, top), (px, bottom)], fill=_GRID, width=k)
        draw.line([(px, bottom), (px, bottom + 4 * k)], fill=_INK, width=k)
        draw.text((px, bottom + 6 * k), _tick_text(value, xticks), font=font, fill=_INK, anchor="mt")
    for value in yticks:
        py = at(x0, value)[1]
        draw.line([(left, py), (right, py)], fill=_GRID, width=k)
        draw.line([(left - 4 * k, py), (left, py)], fill=_INK, width=k)
        draw.text((left - 6 * k, py), _tick_text(value, yticks), font=font, fill=_INK, anchor="rm")
    if base is not None:
        by, dash = at(x0, base)[1], 8 * k
        for start in range(int(left), int(right), 2 * dash):
            draw.line([(start, by), (min(start + dash, right), by)], fill=_BASE, width=2 * k)
    if len(train) > 1:
        draw.line([at(x, y) for x, y in train], fill=_TRAIN, width=2 * k, joint="curve")
    elif train:
        cx, cy = at(*train[0])
        draw.ellipse([cx - 2 * k, cy - 2 * k, cx + 2 * k, cy + 2 * k], fill=_TRAIN)
    if len(vals) > 1:
        draw.line([at(x, y) for x, y in vals], fill=_VAL, width=3 * k, joint="curve")
    for x, y in vals:
        cx, cy = at(x, y)
        draw.ellipse([cx - 5 * k, cy - 5 * k, cx + 5 * k, cy + 5 * k], fill=_VAL)
    draw.rectangle([left, top, right, bottom], outline=_INK, width=k)

    heading, middle = f"LoRA training {title}".strip(), (left + right) / 2
    room = 2 * (width - middle - 10 * k)  # centred over the plot: a long adapter name gets a smaller font
    size = 13 * k
    while size > 6 * k and draw.textlength(heading, font=big) > room:
        size -= k
        big = ImageFont.load_default(size=size)
    draw.text((middle, 10 * k), heading, font=big, fill=_INK, anchor="mt")
    draw.text((middle, height - 6 * k), "optimizer step", font=font, fill=_INK, anchor="md")
    side = Image.new("RGB", (box[2] + 2 * k, box[3] + 2 * k), "white")
    ImageDraw.Draw(side).text((k, 0), label, font=font, fill=_INK)
    side = side.rotate(90, expand=True)
    image.paste(side, (4 * k, int((top + bottom - side.height) / 2)))

    entries = [
        (n, c, d)
        for n, c, d, shown in (
            ("train loss", _TRAIN, False, bool(train)),
            ("val loss", _VAL, False, bool(vals)),
            ("base model val loss", _BASE, True, base is not None),
        )
        if shown
    ]
    if entries:
        line_h = 17 * k
        text_w = max(draw.textlength(n, font=font) for n, _, _ in entries)
        lx1, ly0 = right - 8 * k, top + 8 * k
        lx0 = lx1 - text_w - 44 * k
        draw.rectangle([lx0, ly0, lx1, ly0 + line_h * len(entries) + 6 * k], fill="white", outline=_GRID, width=k)
        for i, (name, colour, dashed) in enumerate(entries):
            y = ly0 + 3 * k + line_h * i + line_h / 2
            segments = (
                [(lx0 + 6 * k, lx0 + 14 * k), (lx0 + 20 * k, lx0 + 28 * k)] if dashed else [(lx0 + 6 * k, lx0 + 28 * k)]
            )
            for a, b in segments:
                draw.line([(a, y), (b, y)], fill=colour, width=2 * k)
            draw.text((lx0 + 34 * k, y), name, font=font, fill=_INK, anchor="lm")

    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize(_SIZE, Image.Resampling.LANCZOS).save(path, format="PNG")
    return path
