"""`lunatrain merge --adapter NAME@VERSION`: write base + adapter as one plain Hugging Face model."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import LunaError
from ..settings import load_settings
from .app import app, fail


@app.command("merge")
def merge_cmd(
    adapter: Annotated[
        str,
        typer.Option(
            "--adapter",
            help="NAME@VERSION, NAME@latest, or NAME (NAME@active): the version active on the configured base",
        ),
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="merge even if the base model changed since training, or replace a merged model other versions "
            "were trained on",
        ),
    ] = False,
) -> None:
    """Merge an adapter into its base model (safetensors, loadable by AutoModelForCausalLM)."""
    from ..merge import merge_adapter

    try:
        result = merge_adapter(load_settings(), adapter, force=force)
    except LunaError as err:
        raise fail(err) from None
    said = f"Merged {result.name}@{result.version} into {result.base_model}: {result.path}"
    if result.replaced:
        said += " (it replaces the earlier merge of this version)"
    typer.echo(said + ".")
    gate = result.gate or {}
    if gate and not gate.get("passed"):  # merging is the owner's call; saying what the gate found is ours
        reasons = "; ".join(gate.get("reasons") or []) or gate.get("status") or "not passed"
        typer.echo(f"Note: the eval gate refused this version ({reasons}).")
    if stale := result.stale:  # as `adapters activate` says it: a standalone model is outside lunatrain's marks
        reason = (stale.get("reason") if isinstance(stale, dict) else None) or "retrain needed"
        typer.echo(
            f"Note: {result.name}@{result.version} is stale ({reason}): the merged model holds that content too; "
            "train a new version (`lunatrain luna`) and merge it to leave it out."
        )
