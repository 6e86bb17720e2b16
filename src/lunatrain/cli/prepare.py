"""`lunatrain prepare` (the guide's `train:prepare`): preflight of the exported tier; exit 1 on a failing check."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ..errors import LunaError
from ..params import LoraParams, parse_params
from ..prepare import PrepareReport, prepare
from ..settings import load_settings
from .app import app, fail, is_tty

_STYLE = {"info": "green", "warn": "yellow", "fail": "bold red"}


def build_params(settings: Any, profile: str | None, flags: dict[str, Any]) -> LoraParams:
    """Profile values (when named), then the flags that were given."""
    given = {k: v for k, v in flags.items() if v is not None}
    if profile:
        from ..profiles import load_profile

        return load_profile(settings, profile).params(given)
    return parse_params(given)


@app.command("prepare")
def prepare_cmd(
    dataset_tier: Annotated[str | None, typer.Option("--dataset-tier", "--datasetTier", help="curated | memory | merged")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", "--baseModel", help="default ASSISTANT_BASE_MODEL")] = None,
    max_seq_length: Annotated[int | None, typer.Option("--max-seq-length", "--maxSeqLength")] = None,
    min_curated: Annotated[int | None, typer.Option("--min-curated", "--minCurated")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "--batchSize")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    gradient_accumulation: Annotated[int | None, typer.Option("--gradient-accumulation", "--gradientAccumulation")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", "--maxSteps")] = None,
    packing: Annotated[bool | None, typer.Option("--packing/--no-packing")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda (for the time estimate)")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="start from a profile's [lora] values")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Preflight: check every exported example with the base model's tokenizer and chat template."""
    try:
        settings = load_settings()
        params = build_params(settings, profile, {
            "dataset_tier": dataset_tier, "base_model": base_model, "max_seq_length": max_seq_length,
            "min_curated": min_curated, "batch_size": batch_size, "epochs": epochs,
            "gradient_accumulation": gradient_accumulation, "max_steps": max_steps, "packing": packing,
            "device": device,
        })
        report = prepare(settings, params)
        if as_json:
            typer.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2, sort_keys=True))
        else:
            show(report)
        report.raise_on_fail()
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
            sev = f"[{_STYLE[c.severity]}]{c.severity}[/]"
            table.add_row(c.id, sev, str(c.count), ", ".join(c.examples), c.message)
        Console().print(table)
    else:
        typer.echo(title)
        for c in report.checks:
            ex = f" [{', '.join(c.examples)}]" if c.examples else ""
            typer.echo(f"{c.severity:<4} {c.id:<26} {c.count:>7}  {c.message}{ex}")
    typer.echo(f"Wrote {report.path}.")
