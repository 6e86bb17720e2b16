"""`lunatrain prepare` (the guide's `train:prepare`): preflight of the exported tier; exit 1 on a failing check.

Parameters resolve as in `lunatrain luna` (the luna profile, its table for the base model, then the flags),
so a standalone preflight checks at the length and volume the run will use; `--profile` picks another."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import LunaError
from ..prepare import PrepareReport, prepare
from ..profiles import resolve_params
from ..settings import load_settings
from .app import app, fail, is_tty, print_report
from .options import lora_options

ProfileOpt = Annotated[str, typer.Option("--profile", help="the profile whose values apply under the flags "
                                                          "(bundled or <home>/profiles/NAME.toml)")]

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
) -> None:
    """Preflight: check every exported example with the base model's tokenizer and chat template."""
    try:
        settings = load_settings()
        params, _gate = resolve_params(settings, profile, lora_flags)
        report = prepare(settings, params)
        print_report(report, show, as_json=as_json)
    except LunaError as err:
        raise fail(err) from None


def show(report: PrepareReport) -> None:
    title = (f"prepare: {report.status.upper()}  tier={report.tier} base={report.base_model} "
             f"maxSeqLength={report.max_seq_length} cache={'hit' if report.cache['hit'] else 'miss'}")
    if is_tty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for col in ("check", "severity", "count", "examples", "message"):
            table.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
        for c in report.checks:
            shown = _shown(c.severity, c.code)
            sev = f"[{_STYLE[shown]}]{shown}[/]"
            table.add_row(c.id, sev, str(c.count), ", ".join(c.examples), c.message)
        Console().print(table)
    else:
        typer.echo(title)
        for c in report.checks:
            ex = f" [{', '.join(c.examples)}]" if c.examples else ""
            typer.echo(f"{_shown(c.severity, c.code):<4} {c.id:<26} {c.count:>7}  {c.message}{ex}")
    typer.echo(f"Wrote {report.path}.")
