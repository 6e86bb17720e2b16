"""`lunatrain prepare` (the guide's `train:prepare`): preflight of the exported tier; exit 1 on a failing check.

Parameters resolve as in `lunatrain luna` (the luna profile, its table for the base model, then the flags),
so a standalone preflight checks at the length and volume the run will use; `--profile` picks another."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import LunaError
from ..messages import counted
from ..prepare import SHOWN_EXAMPLES, PrepareReport, prepare
from ..settings import load_settings
from .app import app, as_written, fail, is_tty, print_report, tables_fit, visible
from .flow import resolve
from .options import lora_options

ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile", help="the profile whose values apply under the flags (bundled or <home>/profiles/NAME.toml)"
    ),
]

_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}


def _shown(severity: str, code: str) -> str:
    """A passed check reads "ok"; "info" is left for figures (token statistics, the estimate)."""
    return "ok" if severity == "info" and code.endswith(".ok") else severity


@app.command("prepare")
@lora_options
def prepare_cmd(
    lora_flags: dict,
    profile: ProfileOpt = "luna",
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    samples: Annotated[
        int, typer.Option("--show", min=0, max=100, help="print N train samples with the trained tokens marked")
    ] = 0,
) -> None:
    """Preflight: check every exported example with the base model's tokenizer and chat template, with the
    values the flow would train with (the luna profile unless --profile names another)."""
    try:
        settings = load_settings()
        r = resolve(settings, profile, lora_flags)
        report = prepare(settings, r.params, min_curated=r.options.min_curated, show=samples)

        def draw(report: PrepareReport) -> None:  # the samples too when the check fails: they help find why
            show(report)
            if samples:
                show_samples(report)

        print_report(report, draw, as_json=as_json)
    except LunaError as err:
        raise fail(err) from None


def show_samples(report: PrepareReport) -> None:
    """Each sample as the model sees it, trained tokens highlighted (on a terminal) or inside [[…]]."""
    term = report.template.get("terminator", {}).get("text", "")
    typer.echo(f"Trained: each assistant answer and its terminator {term!r}; everything else is context only.")
    tty = is_tty()
    if tty:
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
        # A terminal that shows no colour (TERM=dumb, NO_COLOR) would show trained and context pieces alike:
        # the [[…]] markers of a pipe then.
        tty = console.color_system is not None and not console.no_color
    for sample in report.samples:
        dropped = sample.get("dropped") or 0  # a report written before the field counts none
        shortened = [f"its first {counted(dropped, 'message')} left out"] if dropped else []
        shortened += ["cut at maxSeqLength"] if sample["truncated"] else []
        head = f"--- sample {sample['id']}: {sample['trainedTokens']} of {sample['tokens']} tokens trained" + (
            f" ({', '.join(shortened)})" if shortened else ""
        )
        if tty:
            text = Text(head + "\n", style="bold")
            for piece in sample["pieces"]:
                text.append(visible(piece["text"]), style="bold black on green" if piece["trained"] else "dim")
            console.print(text)
        else:
            typer.echo(head)
            typer.echo(
                "".join(f"[[{visible(p['text'])}]]" if p["trained"] else visible(p["text"]) for p in sample["pieces"])
            )


def show(report: PrepareReport) -> None:
    title = (
        f"prepare: {report.status.upper()}  tier={report.tier} base={report.base_model} "
        f"maxSeqLength={report.max_seq_length} cache={'hit' if report.cache['hit'] else 'miss'}"
    )
    if tables_fit(is_tty()):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=as_written(title), title_justify="left")
        for col in ("check", "severity", "count", "examples", "message"):
            # A check id is what one looks up (and greps the report for): never broken across lines.
            whole = col in ("check", "severity", "count")
            table.add_column(col, justify="right" if col == "count" else "left", overflow="fold", no_wrap=whole)
        for c in report.checks:
            shown = _shown(c.severity, c.code)
            sev = f"[{_STYLE[shown]}]{shown}[/]"
            table.add_row(c.id, sev, str(c.count), as_written(_listed(c)), as_written(c.message))
        Console().print(table)
    else:
        typer.echo(title)
        for c in report.checks:
            ex = f" [{_listed(c)}]" if c.examples else ""
            typer.echo(f"{_shown(c.severity, c.code):<4} {c.id:<26} {c.count:>7}  {c.message}{ex}")
    typer.echo(f"Wrote {report.path}.")


def _listed(check: Any) -> str:
    """The record ids a check names: the first few, and how many more (`--json` and the report list them)."""
    if not check.examples:  # a figure (steps, tokens), not records
        return ""
    more = check.count - min(len(check.examples), SHOWN_EXAMPLES)
    listed = "them" if len(check.examples) == check.count else f"the first {len(check.examples)}"
    return ", ".join(check.examples[:SHOWN_EXAMPLES]) + (f", … {more} more (--json lists {listed})" if more > 0 else "")
