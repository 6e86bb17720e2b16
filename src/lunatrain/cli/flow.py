"""`lunatrain auto` and `lunatrain luna` (the guide's `train:auto` / `train:luna`): the four steps in order.

`luna` is `auto --profile luna`. Flags override the profile; `--dry-run` prints the resolved parameters
and the steps as JSON and does nothing else (the docs and the guide's command lines are tested that way).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from .. import distributed, registry
from ..errors import LunaError, UsageError
from ..flow import STEPS, FlowResult, job_outcome, run_flow, submit_or_join, summary_lines, train_and_gate
from ..params import FlowOptions, LoraParams, parse_run, run_keys
from ..profiles import fit_dropout, load_profile
from ..service.ensure import ensure_trainer
from ..settings import Settings, load_settings
from .app import Signalled, app, fail, given, json_text, said_interrupted
from .options import lora_options

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="a profile name (bundled or <home>/profiles/NAME.toml)")
]
LocalOpt = Annotated[bool, typer.Option("--local", help="train in this process instead of the trainer service")]
EnsureOpt = Annotated[
    bool, typer.Option("--ensure-trainer", "--ensureTrainer", help="start the trainer before anything else")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", "--dryRun", help="print the resolved parameters and steps; run nothing")
]
RetrainOpt = Annotated[
    bool,
    typer.Option(
        "--retrain",
        help="train even when a version of the adapter was already trained on this data with these parameters",
    ),
]
AdapterOpt = Annotated[
    str | None,
    typer.Option("--adapter", help="the eval-gate step evaluates NAME or NAME@VERSION instead of the active adapter"),
]


@dataclass(frozen=True)
class Resolved:
    params: LoraParams
    options: FlowOptions
    gate: dict[str, Any]  # the profile's [gate] thresholds (empty: the defaults)


def resolve(settings: Settings, profile: str | None, flags: dict[str, Any]) -> Resolved:
    """Profile values under the given flags, the base model resolved (flag > profile > ASSISTANT_BASE_MODEL)."""
    from ..flow import resolve_base

    if profile is not None:  # "" too: an invalid name, not "no profile" (the API refuses it alike)
        loaded = load_profile(settings, profile)
        params, options = loaded.resolve(flags, for_run=True)
        return Resolved(_absolute_dir(resolve_base(settings, params)), options, loaded.gate)
    params, options = parse_run(flags)
    params = fit_dropout(settings, params, run_keys(flags))
    return Resolved(_absolute_dir(resolve_base(settings, params)), options, {})


def _absolute_dir(params: LoraParams) -> LoraParams:
    """A base model directory named relative to the working directory, as its absolute path: the trainer works
    in the data root, where the same name is another path or none, and the registry records the name, which
    eval-gate and merge from another directory could not find. (models.resolve_base takes a directory before a
    hub id, so this is the directory a --local run trains on.)"""
    from ..models import TINY_ID, local_dir

    base = params.base_model
    if base and base != TINY_ID and (found := local_dir(base)) is not None:
        return params.model_copy(update={"base_model": str(found)})
    return params


class _CtrlC:
    """While training in this process: the first Ctrl-C asks the loop to stop after the step it is in (as a
    cancel does: the run is recorded, its epoch checkpoints stay for --resume); a second one interrupts at
    once. SIGTERM (a `kill`, a service manager) and SIGHUP (the terminal closed) stop it the same way, the
    command then ending with their status (143, 129). Under torchrun every rank gets the signal and the ranks
    agree on the step to stop at."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.pressed = False
        self.signum = signal.SIGINT
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            # SIGHUP or SIGTERM ignored when the command started stays ignored: `nohup lunatrain lora --local`
            # must train on when its terminal closes. Ctrl-C is always taken (as Python's own handler would
            # not be where a script started the command in the background): it reaches only a foreground job.
            for sig in self.SIGNALS:
                if sig == signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._press)
        return self

    def _press(self, signum: int, _frame: Any) -> None:
        self.pressed, self.signum = True, signal.Signals(signum)
        self.restore()  # the next one acts at once: Python's KeyboardInterrupt, the default end for the others
        said = "Ctrl-C" if signum == signal.SIGINT else self.signum.name
        again = " (press it again to quit at once)" if signum == signal.SIGINT else ""
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            typer.echo(f"\n{said}: stopping after this step{again}.", err=True)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)  # 130 for Ctrl-C: the shell's status for a command ended by that signal

    def at_once(self) -> None:
        """Training is over (the gate runs): from now on each signal stops the command at once, as a second
        Ctrl-C does; SIGTERM and SIGHUP raise `Signalled`, so that they are said as Ctrl-C is."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if sig == signal.SIGINT else self._raise)

    def _raise(self, signum: int, _frame: Any) -> None:
        self.restore()
        raise Signalled(signum)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __exit__(self, *_exc: object) -> None:
        self.restore()


def local_lora(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions,
    gate: dict[str, Any] | None = None,
    *,
    stderr: bool = False,
) -> dict[str, Any]:
    """Train in this process, then gate the new version with `gate` thresholds (a profile's [gate]).
    Under torchrun every rank trains; only rank 0 shows progress and gates. Ctrl-C while training ends the
    command with exit 130 and a sentence on how to resume. `stderr`: the progress goes there (`--json`,
    whose stdout is the outcome alone)."""
    from ..flow import check_min_curated
    from ..progress import ProgressDisplay

    check_min_curated(settings, options)
    main = distributed.from_env().main
    display = ProgressDisplay(stream=sys.stderr if stderr else sys.stdout) if main else None
    trained: dict[str, Any] = {}
    ended: dict[str, Any] = {}  # the outcome, for the retention after it

    def on_trained(outcome: dict[str, Any]) -> None:
        ctrl_c.at_once()  # trained: a signal during the gate is an interrupt
        trained.update(outcome)

    # The retention runs once the handlers are given back: a signal while it cleans up (it may wait for a
    # concurrent gc) takes its own course, as before the run; the gate is over, nothing is left to say.
    with _then_retention(settings, main, params, ended), _CtrlC() as ctrl_c, display or contextlib.nullcontext():
        try:
            outcome = train_and_gate(
                settings,
                params,
                options,
                thresholds=gate,
                on_event=display.on_event if display else None,
                should_stop=lambda: ctrl_c.pressed,
                on_trained=on_trained,
                may_gate=lambda: main,
            )
            ended.update(outcome)
        except KeyboardInterrupt as exc:
            if not trained.get("adapter"):
                raise
            signum = exc.signum if isinstance(exc, Signalled) else signal.SIGINT
            said_interrupted()
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                typer.echo(f"error: {_gate_interrupted(settings, trained['adapter'], signum)}", err=True)
            raise typer.Exit(128 + int(signum)) from None
    if ctrl_c.pressed and outcome["status"] == "cancelled":
        said_interrupted()
        if main:
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone; the report says it all
                typer.echo(f"error: {_training_interrupted(outcome['error'], ctrl_c.signum)}", err=True)
        raise typer.Exit(ctrl_c.exit_code)
    if ctrl_c.pressed and main and outcome.get("status") == "succeeded":
        # The press came after the loop's last look at it: "stopping after this step" did not come true.
        said = "Ctrl-C" if ctrl_c.signum == signal.SIGINT else ctrl_c.signum.name
        with contextlib.suppress(OSError):
            typer.echo(f"{said} came after the last step, too late to stop the run: it finished and is kept.", err=True)
    return outcome


@contextlib.contextmanager
def _then_retention(settings: Settings, main: bool, params: LoraParams, ended: dict[str, Any]) -> Iterator[None]:
    """The retention policy once the run has ended, however it ended, as the trainer applies it after every
    job: a daily `luna --local` leaves no token cache or idle work directory behind that `gc` would take. A run
    that did not succeed keeps the checkpoint its message offers to resume from."""
    try:
        yield
    finally:
        if main:
            from ..retention import after_run

            after_run(settings, resumable=None if ended.get("status") == "succeeded" else params.adapter_name)


def _training_interrupted(error: dict[str, Any], signum: int = signal.SIGINT) -> str:
    where = error["message"].removeprefix("cancelled at ")
    by = "Interrupted" if signum == signal.SIGINT else f"Interrupted ({signal.Signals(signum).name})"
    if (error.get("params") or {}).get("epochsDone"):
        return (
            f"{by}: training stopped at {where} and is recorded as cancelled; run the same command with "
            "--resume to continue from the last epoch checkpoint."
        )
    # a checkpoint is saved at the end of an epoch: --resume would start over as well
    return (
        f"{by}: training stopped at {where}, before its first epoch ended, and is recorded as cancelled; no "
        "checkpoint was saved, so running the command again starts over."
    )


def _gate_interrupted(settings: Settings, adapter: dict[str, Any], signum: int = signal.SIGINT) -> str:
    ref = f"{adapter['name']}@{adapter['version']}"
    by = "Interrupted" if signum == signal.SIGINT else f"Interrupted ({signal.Signals(signum).name})"
    if adapter.get("revision") is not None:  # train_and_gate discarded the staged revision
        try:
            slot = registry.get_version(settings, adapter["name"], adapter["version"])
            held = None if slot.get("replaced") else slot.get("revision")
        except LunaError:
            held = None
        now = f"the slot still serves revision {held}" if held is not None else "the slot holds no revision yet"
        return (
            f"{by} during the eval gate: revision {adapter['revision']} of {ref} was not gated and is "
            f"discarded; {now}. Run the command again to train it anew."
        )
    try:  # its base, named in the commands where it is not the configured one (a --baseModel run)
        flag = registry.base_flag(
            settings, registry.get_version(settings, adapter["name"], adapter["version"])["baseModel"]["id"]
        )
    except (LunaError, KeyError, TypeError):
        flag = ""
    return (
        f"{by} during the eval gate: {ref} is trained and registered but not gated, so it is not served; "
        f"`lunatrain eval-gate --adapter {ref}{flag}` scores it and `lunatrain adapters activate {ref}{flag}` serves "
        "it."
    )


def service_lora(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions,
    gate: dict[str, Any] | None = None,
    *,
    stderr: bool = False,
) -> dict[str, Any]:
    """Submit to the trainer service (the gate runs there, with `gate` thresholds) and follow the job;
    `stderr`: what it says while following goes there (`--json`)."""
    from ..service import client

    job, joined = submit_or_join(settings, params, options, thresholds=gate)
    if joined:  # a second terminal: the job the first one queued, followed here too
        typer.echo(
            f"Job {job.id} ({job.status}) already trains these parameters on this export: following it.", err=stderr
        )
    else:
        typer.echo(f"Submitted job {job.id} to {client.base_url(settings)}.", err=stderr)
    return follow_job(settings, job.id, stderr=stderr)


def follow_job(settings: Settings, job_id: str, *, stderr: bool = False) -> dict[str, Any]:
    """Follow a job of the trainer to its end and return its outcome: the job as the follower saw it end (a
    trainer that settled it as it stopped can no longer be asked)."""
    from .trainer import follow_and_report

    return job_outcome(follow_and_report(settings, job_id, stderr=stderr))


def run(
    command: str,
    profile: str | None,
    flags: dict[str, Any],
    local: bool,
    ensure: bool,
    dry_run: bool,
    adapter: str | None = None,
    retrain: bool = False,
) -> None:
    try:
        if given(adapter, "--adapter", "an adapter (NAME or NAME@VERSION)") is not None:
            registry.parse_ref(adapter)  # a malformed name: refused by the dry run too, as by the run
        settings = load_settings()
        r = resolve(settings, profile, flags)
        if dry_run:
            typer.echo(
                json_text(
                    {
                        "command": command,
                        "profile": profile,
                        "steps": list(STEPS),
                        "local": local,
                        "ensureTrainer": ensure,
                        "params": r.params.wire(),
                        "options": r.options.wire(),
                        "gate": r.gate,
                        "adapter": adapter,
                        "retrain": retrain,
                    }
                )
            )
            return
        if distributed.from_env().active:
            raise UsageError(
                f"`lunatrain {command}` runs in one process; under torchrun run `lunatrain lora` (it trains in "
                "each process there) after `lunatrain export` and `lunatrain prepare`."
            )
        if ensure and not local:
            ensure_trainer(settings, explicit=True)
        if local:  # this process trains: a device it does not have is said before any step changes anything
            from ..models import resolve_device

            resolve_device(r.params.device)
        result: FlowResult = run_flow(
            settings,
            r.params,
            r.options,
            functools.partial(local_lora if local else service_lora, gate=r.gate),
            adapter=adapter,
            gate_thresholds=r.gate,
            on_step=lambda name: typer.echo(f"==> {name}"),
            retrain=retrain,
            ranks=1 if local else None,
            profile=profile,
            follow_job=None if local else functools.partial(follow_job, settings),
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
    adapter: AdapterOpt = None,
    retrain: RetrainOpt = False,
) -> None:
    """The full flow (train:auto): eval-gate, export, prepare, lora — stops at the first failure."""
    run("auto", profile, lora_flags, local, ensure_trainer_flag, dry_run, adapter, retrain)


@app.command("luna")
@lora_options
def luna_cmd(
    lora_flags: dict,
    local: LocalOpt = False,
    ensure_trainer_flag: EnsureOpt = False,
    dry_run: DryRunOpt = False,
    adapter: AdapterOpt = None,
    retrain: RetrainOpt = False,
) -> None:
    """`auto` with the Luna profile (train:luna): luna-adapter, versioned, curated tier unless given."""
    run("luna", "luna", lora_flags, local, ensure_trainer_flag, dry_run, adapter, retrain)
