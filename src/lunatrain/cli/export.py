"""`lunatrain export`: the store → data/training/ (tiers, deterministic splits, summary)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import LunaError
from ..export import SPLITS, TIERS, export, kept_ratios
from ..settings import load_settings
from .app import app, fail, is_tty, tables_fit


@app.command("export")
def export_cmd(
    val_ratio: Annotated[
        float | None,
        typer.Option(
            "--val-ratio",
            "--valRatio",
            help="default: ASSISTANT_TRAIN_VAL_RATIO when set, else the current export's, else 0.1",
        ),
    ] = None,
    test_ratio: Annotated[
        float | None,
        typer.Option(
            "--test-ratio",
            "--testRatio",
            help="default: ASSISTANT_TRAIN_TEST_RATIO when set, else the current export's, else 0.0",
        ),
    ] = None,
) -> None:
    """Export approved examples and memory to JSONL tiers with stable train/val/test splits."""
    try:
        settings = load_settings()
        if is_tty():
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task("exporting", total=None)
                summary = export(
                    settings,
                    val_ratio=val_ratio,
                    test_ratio=test_ratio,
                    on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        else:
            summary = export(settings, **kept_ratios(settings, val_ratio, test_ratio))
    except LunaError as err:
        raise fail(err) from None
    rows = [[tier, *(str(summary.counts[tier][k]) for k in ("total", *SPLITS))] for tier in TIERS]
    table = tables_fit(is_tty())
    if table:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"export (val {summary.ratios['val']}, test {summary.ratios['test']})")
        for col in ("tier", "total", *SPLITS):
            table.add_column(col, justify="left" if col == "tier" else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        typer.echo("tier\ttotal\ttrain\tval\ttest")
        for row in rows:
            typer.echo("\t".join(row))
    # the split ratios: the terminal's table title says them; a pipe has no title
    ratios = "" if table else f", val {summary.ratios['val']}, test {summary.ratios['test']}"
    typer.echo(f"Wrote {summary.directory} (fingerprint {summary.fingerprint[:12]}{ratios}).")
    for note in summary.notes():
        typer.echo(f"Note: {note[0].lower()}{note[1:]}")
    for name, aside in summary.kept_aside:
        typer.echo(
            f"Kept your edited data/training/{name} as data/training/{aside}: exports come from the database, "
            "so make the change there."
        )
