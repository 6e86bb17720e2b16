"""`lunatrain gc [--dry-run]`: apply the retention policy (retention.py, README "Retention")."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import LunaError
from ..messages import counted
from ..retention import collect, size_text
from ..settings import load_settings
from .app import app, fail, json_text

# Each kind in the closing sum, singular and plural: the kind ids of the item lines read as words there
# ("Removed 2 export, 5 job-events" did not).
_KIND_WORDS = {
    "export": ("export", "exports"),
    "job-events": ("job's events", "jobs' events"),
    "job-log": ("job log", "job logs"),
    "run-workdir": ("run work directory", "run work directories"),
    "staging": ("staging folder", "staging folders"),
    "token-cache": ("token cache", "token caches"),
}


def _counted(kind: str, n: int) -> str:
    return counted(n, *_KIND_WORDS.get(kind, (kind, kind)))


@app.command("gc")
def gc_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", "--dryRun", help="only list what would be removed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Remove old job events and logs, old exports, unused token caches, idle run checkpoints and what killed
    merges left half-written."""
    try:
        report = collect(load_settings(), dry_run=dry_run)
    except LunaError as err:
        raise fail(err) from None
    if as_json:
        typer.echo(json_text(report.to_dict(), sort_keys=True))
    else:
        for item in report.items:
            typer.echo(f"{item.kind:<12} {size_text(item.bytes):>10}  {item.path}  ({item.reason})")
        verb = "Would remove" if dry_run else "Removed"
        kinds = ", ".join(_counted(k, n) for k, (n, _) in sorted(report.by_kind().items())) or "nothing"
        typer.echo(f"{verb} {kinds}: {size_text(report.bytes)}.")
    if report.problems:  # the rest was cleaned; what could not be judged was kept, and that is an error
        for problem in report.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)
