"""`lunatrain lora` (the guide's `train:lora`): train one LoRA adapter.

By default the job is submitted to the trainer service (started on demand, see `--ensure-trainer`) and
followed until it ends; `--local` trains in this process with a progress bar. Both paths are shared with
`lunatrain auto/luna` (cli/flow.py), so a job behaves the same whichever command started it; after a
successful run the eval gate decides whether the new version becomes active (unless `--no-gate`).
Every LoRA parameter is an option in both spellings (`--learning-rate` / `--learningRate`), generated
from LoraParams by `cli/options.py`. Parameters resolve as in `lunatrain prepare` and `luna` (the luna
profile, its table for the base model, then the flags), so the standard order export → prepare → lora
trains what prepare checked; `--profile` picks another.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .. import distributed
from ..errors import LunaError
from ..params import FlowOptions
from ..settings import load_settings
from .app import app, fail, json_text
from .flow import EnsureOpt, LocalOpt, ProfileOpt, local_lora, resolve, service_lora
from .options import lora_options


def _describe(settings: Any, outcome: dict[str, Any]) -> list[str]:
    from .. import registry

    adapter = outcome.get("adapter")
    if outcome.get("status") != "succeeded" or not adapter:
        error = outcome.get("error") or {}
        return [f"LoRA training {outcome.get('status')}: {error.get('message', 'no adapter was produced')}"]
    revision = adapter.get("revision")
    entry = (
        registry.get_revision(settings, adapter["name"], revision)
        if revision
        else registry.get_version(settings, adapter["name"], adapter["version"])
    )
    metrics = entry.get("metrics", {})
    lines = [f"Adapter {entry['name']}@{entry['version']} written to {entry['path']}."]
    if revision and entry.get("replaced"):  # a staged overwrite run the gate refused: the slot kept its own
        lines = [
            f"Adapter {entry['name']}@{entry['version']} revision {revision} was not kept: {entry['path']} still holds the revision before it."
        ]
    if metrics.get("valLoss") is not None:
        base = metrics.get("baseValLoss")
        lines.append(
            f"Validation loss {metrics['valLoss']:.4f}" + (f" (base model {base:.4f})." if base is not None else ".")
        )
    # The gate this run met (the registry's record may be an older one's when recording this one failed).
    gate = outcome.get("gate") or entry.get("gate")
    if gate and gate.get("status") == "error":
        why = "; ".join(gate.get("reasons") or []).rstrip(".")
        lines.append(f"Eval gate: error: {why}; {entry['name']}@{entry['version']} is registered but not active.")
    elif gate:
        lines.append(f"Eval gate: {gate.get('status', gate)}.")
    lines += [f"Note: {n.rstrip('.')}." for n in (gate or {}).get("notes") or []]  # what the decision rests on too
    return lines


@app.command("lora")
@lora_options
def lora_cmd(
    lora_flags: dict,
    profile: ProfileOpt = "luna",
    local: LocalOpt = False,
    ensure_trainer_flag: EnsureOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "--dryRun", help="print the resolved parameters; run nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
) -> None:
    """Train a LoRA adapter on the exported data (train:lora): via the trainer service, or --local; with the
    values prepare checks (the luna profile unless --profile names another)."""
    from ..service.ensure import ensure_trainer

    try:
        settings = load_settings()
        r = resolve(settings, profile, lora_flags)
        local = local or distributed.from_env().active  # under torchrun the launched processes are the trainers
        if dry_run:
            typer.echo(
                json_text(
                    {
                        "command": "lora",
                        "profile": profile,
                        "local": local,
                        "params": r.params.wire(),
                        "options": r.options.wire(),
                        "gate": r.gate,  # the thresholds a gated run meets, as `auto --dry-run` shows them
                    }
                )
            )
            return
        if ensure_trainer_flag and not local:
            ensure_trainer(settings, explicit=True)
        lora = local_lora if local else service_lora
        outcome = lora(settings, r.params, r.options, r.gate, stderr=as_json)  # --json: stdout is the outcome
        if not distributed.from_env().main:  # under torchrun rank 0 reports for all
            raise typer.Exit(0 if outcome.get("status") == "succeeded" else 1)
        report(settings, outcome, r.options, as_json)
    except LunaError as err:
        raise fail(err) from None


def report(settings: Any, outcome: dict[str, Any], options: FlowOptions, as_json: bool) -> None:
    """Print a run's outcome (`--json`: the document) and end as `lunatrain lora` ends: exit 1 when it did not
    succeed, or when the gate it met kept it inactive."""
    lines = _describe(settings, outcome)  # raises before anything is printed
    if as_json:
        typer.echo(json_text(outcome, sort_keys=True))
    else:
        for line in lines:
            typer.echo(line)
    refused = options.gate and not (outcome.get("gate") or {}).get("passed")
    if outcome.get("status") != "succeeded" or refused:  # trained but kept inactive by the gate: exit 1 too
        raise typer.Exit(1)
