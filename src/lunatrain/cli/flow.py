"""`lunatrain auto` and `lunatrain luna` (the guide's `train:auto` / `train:luna`): the four steps in order.

`luna` is `auto --profile luna`. Flags override the profile; `--dry-run` prints the resolved parameters
and the steps as JSON and does nothing else (the docs and the guide's command lines are tested that way).
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Annotated, Any

import typer

from .. import distributed, trainer_client
from ..ensure import ensure_trainer
from ..errors import LunaError, UsageError
from ..flow import STEPS, FlowResult, run_flow, summary_lines
from ..params import LoraParams, parse_params
from ..profiles import load_profile
from ..settings import Settings, load_settings
from .app import app, fail
from .options import lora_options

ProfileOpt = Annotated[str | None, typer.Option("--profile", help="a profile name (bundled or <home>/profiles/NAME.toml)")]
LocalOpt = Annotated[bool, typer.Option("--local", help="train in this process instead of the trainer service")]
EnsureOpt = Annotated[bool, typer.Option("--ensure-trainer", "--ensureTrainer", help="start the trainer before anything else")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "--dryRun", help="print the resolved parameters and steps; run nothing")]


def resolve(settings: Settings, profile: str | None, flags: dict[str, Any]) -> tuple[LoraParams, dict[str, Any]]:
    """Profile values under the given flags; the profile's gate thresholds (empty without a profile)."""
    if profile:
        loaded = load_profile(settings, profile)
        return loaded.params(flags), loaded.gate
    return parse_params(flags), {}


def local_lora(settings: Settings, params: LoraParams, gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train in this process, then gate the new version with `gate` thresholds (a profile's [gate]).
    Under torchrun every rank trains; only rank 0 shows progress and gates."""
    from ..evalgate import gate_candidate
    from ..progress import ProgressDisplay
    from ..train import run_lora

    main = distributed.from_env().main
    display = ProgressDisplay() if main else None
    with display or contextlib.nullcontext():
        result = run_lora(params, settings, on_event=display.on_event if display else None)
    adapter = {"name": result.adapter_name, "version": result.version} if result.ok else None
    if result.ok and params.gate and main:
        gate_candidate(settings, result.adapter_name, result.version, thresholds=gate)
    return {"status": result.status.value, "adapter": adapter, "error": result.error}


def service_lora(settings: Settings, params: LoraParams, gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Submit to the trainer service (the gate runs there, with `gate` thresholds) and follow the job."""
    from .trainer import follow_and_report

    ensure_trainer(settings)
    job = trainer_client.submit(settings, params, None, gate)
    typer.echo(f"Submitted job {job.id} to {settings.lora_trainer_url}.")
    follow_and_report(settings, job.id)
    job = trainer_client.get_job(settings, job.id)
    return {"status": job.status, "jobId": job.id,
            "adapter": job.adapter.model_dump() if job.adapter else None,
            "error": job.error.model_dump() if job.error else None}


def run(command: str, profile: str | None, flags: dict[str, Any], *, local: bool, ensure: bool, dry_run: bool) -> None:
    try:
        settings = load_settings()
        params, gate = resolve(settings, profile, flags)
        if dry_run:
            typer.echo(json.dumps({"command": command, "profile": profile, "steps": list(STEPS), "local": local,
                                   "ensureTrainer": ensure, "params": params.wire(), "gate": gate}, indent=2))
            return
        if distributed.from_env().active:
            raise UsageError(f"`lunatrain {command}` runs in one process; under torchrun run `lunatrain lora --local` "
                             "after `lunatrain export` and `lunatrain prepare`.")
        if ensure and not local:
            ensure_trainer(settings, explicit=True)
        result: FlowResult = run_flow(
            settings, params, functools.partial(local_lora if local else service_lora, gate=gate), gate_thresholds=gate,
            on_step=lambda name: typer.echo(f"==> {name}"),
        )
    except LunaError as err:
        partial = err.details if isinstance(err.details, FlowResult) else None
        if partial is not None:
            for line in summary_lines(settings, partial):
                typer.echo(line, err=True)
        raise fail(err) from None
    typer.echo("")
    for line in summary_lines(settings, result):
        typer.echo(line)


@app.command("auto")
@lora_options
def auto_cmd(
    lora_flags: dict,
    profile: ProfileOpt = None,
    local: LocalOpt = False,
    ensure_trainer_flag: EnsureOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """The full flow (train:auto): eval-gate, export, prepare, lora — stops at the first failure."""
    run("auto", profile, lora_flags, local=local, ensure=ensure_trainer_flag, dry_run=dry_run)


@app.command("luna")
@lora_options
def luna_cmd(
    lora_flags: dict,
    local: LocalOpt = False,
    ensure_trainer_flag: EnsureOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """`auto` with the Luna profile (train:luna): luna-adapter, versioned, curated tier unless given."""
    run("luna", "luna", lora_flags, local=local, ensure=ensure_trainer_flag, dry_run=dry_run)
