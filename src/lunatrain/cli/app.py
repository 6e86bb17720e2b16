"""The Typer app every `cli/<stage>.py` module adds its commands to, and the error boundary.

Options are declared with both spellings, kebab-case first and the guide's camelCase second
(`typer.Option("--min-curated", "--minCurated")`); click accepts `--x=v` and `--x v` for both.
"""

from __future__ import annotations

import sys

import typer

from ..errors import LunaError

app = typer.Typer(
    name="lunatrain",
    help="Reproducible LoRA adapter training for a personal assistant (the Luna training guide's steps).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(err: LunaError) -> typer.Exit:
    """Print the error's one sentence and return the Exit to raise (exit 1 for checks, 2 for usage)."""
    typer.echo(f"error: {err.message}", err=True)
    return typer.Exit(err.exit_code)


def is_tty() -> bool:
    return sys.stdout.isatty()
