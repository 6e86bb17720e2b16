"""`lunatrain adapters list|show|activate|deactivate|rollback|diff|repair`: the adapter registry from the
command line.

Activation is per base model: `activate`, `deactivate NAME` and `rollback` act on the configured base model
(ASSISTANT_BASE_MODEL, or `--baseModel`); adapters active on other bases stay as they are."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .. import registry
from ..errors import LunaError, UsageError
from ..fsio import read_json
from ..messages import counted
from ..settings import Settings, load_settings
from .app import app, fail, given, json_text

adapters_app = typer.Typer(
    help="Trained LoRA adapters: list, show, activate, deactivate, roll back, compare.", no_args_is_help=True
)
app.add_typer(adapters_app, name="adapters")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--baseModel",
        "--base-model",
        help="the base model to act on (hub id, local folder or luna-tiny); default ASSISTANT_BASE_MODEL",
        show_default=False,
    ),
]


def _settings(base_model: str | None) -> Any:
    """The settings with `--baseModel` as the configured base model: activations are kept per base model."""
    base_model = given(base_model, "--baseModel", "a base model (hub id, local folder or luna-tiny)")
    return load_settings(**({"base_model": base_model} if base_model is not None else {}))


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "-" if x is None else str(x)


def _badges(
    entry: dict[str, Any],
    aliases: dict[str, str],
    active_on: list[str],
    *,
    missing: bool = False,
    merge_gone: bool = False,
) -> str:
    marks = ["latest"] if aliases.get("latest") == entry["version"] and not entry.get("replaced") else []
    marks += [f"active on {base}" for base in active_on]
    if entry.get("replaced"):
        marks.append("not kept" if entry.get("notKept") else "replaced")
    if entry.get("stale"):
        marks.append("stale: retrain needed")
    gate = entry.get("gate")
    if isinstance(gate, dict) and gate.get("status"):
        refused = gate.get("passed") and isinstance(gate.get("earlierRefusal"), dict)
        marks.append(f"gate {gate['status']}" + (", refused earlier" if refused else ""))
    if entry.get("merged"):
        # "into a model": `merged` alone read as the dataset tier of that name, shown on the same line
        marks.append("merged into a model: its folder is gone" if merge_gone else "merged into a model")
    if missing:  # deleted by hand: still registered (and maybe active), but nothing can load it
        marks.append("files missing: train it again")
    return " ".join(f"[{m}]" for m in marks)


def _configured(settings: Any) -> Any:
    """The configured base model, to tell an activation on another build of it (None: unknown, or luna-tiny
    not built yet, which listing must not build)."""
    from ..models import TINY_ID, resolve_base

    if settings.base_model == TINY_ID and not (settings.models_dir / TINY_ID / "config.json").exists():
        return None
    try:
        return resolve_base(None, settings)
    except (LunaError, ValueError, OSError):  # a base that cannot be used: the ids alone, as before
        return None


@adapters_app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """Every adapter version, grouped by the base model it was trained on, with where it is active."""
    try:
        settings = load_settings()
        adapters = registry.list_adapters(settings)
        active = registry.list_active(settings)
    except LunaError as err:
        raise fail(err) from None
    configured = _configured(settings) if active or adapters else None
    if as_json:
        typer.echo(
            json_text(
                {
                    "adapters": adapters,
                    "byBase": registry.by_base(settings),
                    "active": [
                        {k: a[k] for k in ("name", "version", "base", "baseModel")}
                        | {
                            "baseLabel": registry.base_label(
                                settings, a["baseModel"], a["base"], configured, a["entry"]
                            )
                        }
                        for a in active
                    ],
                },
                sort_keys=True,
            )
        )
        return
    if not adapters:
        typer.echo("No adapters yet; train one with `lunatrain lora` or `lunatrain luna`.")
        return
    for fingerprint, group in sorted(registry.by_base(settings).items(), key=lambda g: g[1]["baseModel"]):
        trained_on = group["baseModel"]
        label = registry.base_label(settings, trained_on, fingerprint, configured)
        # a folder moved and configured at its new place: named by that place, and by the one trained on
        moved = f"; trained as {trained_on}" if label != str(trained_on) else ""
        typer.echo(f"base {label} (fingerprint {fingerprint[:12]}{moved})")
        for e in group["versions"]:
            aliases = adapters.get(e["name"], {}).get("aliases", {})
            active_on = [
                registry.base_label(settings, a["baseModel"], a["base"], configured, e)
                for a in active
                if a["name"] == e["name"] and registry.same_entry(a["entry"], e)
            ]
            rev = f" rev {e['revision']}" if e.get("revision") else ""
            m = e.get("metrics", {})
            missing = not e.get("replaced") and not registry.loadable(settings, e)
            typer.echo(
                f"  {e['name']}@{e['version']}{rev}  tier {e.get('datasetTier', '-')}  "
                f"val {_fmt(m.get('valLoss'))} (base {_fmt(m.get('baseValLoss'))})  {e.get('created', '')}  "
                f"{_badges(e, aliases, active_on, missing=missing, merge_gone=registry.merge_gone(settings, e))}".rstrip()
            )


@adapters_app.command("show")
def show_cmd(
    ref: Annotated[
        str, typer.Argument(metavar="NAME[@VERSION]", help="NAME or NAME@VERSION (VERSION may be latest or active)")
    ],
    # Accepted as every reading command accepts it (a script passes --json throughout): the output is JSON anyway.
    _as_json: Annotated[bool, typer.Option("--json", help="print JSON (what this command prints anyway)")] = False,
) -> None:
    """One version's registry entry, whether it is active (or why not), and its training report (JSON)."""
    try:
        settings = load_settings()
        name, version = registry.parse_ref(ref)
        entry = registry.get_version(settings, name, version)
        report = read_json(registry.adapter_dir(settings, entry) / registry.REPORT_FILE)
    except LunaError as err:
        raise fail(err) from None
    out = entry | registry.files_marks(settings, entry)
    try:  # active on the configured base model, or why not
        base = registry.configured_base(settings)
        out["state"] = registry.activation_state(settings, entry, base.fingerprint, base.id)
    except LunaError as err:
        out["state"] = {"active": False, "reason": f"the configured base model cannot be read: {err.message}"}
    if isinstance(report, dict):
        out["report"] = {k: report.get(k) for k in ("metrics", "epochs", "device", "packages", "durationSeconds")}
    typer.echo(json_text(out, sort_keys=True))


@adapters_app.command("activate")
def activate_cmd(
    ref: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="NAME@VERSION")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="activate even if it was trained on another base model (the same model changed since; weights of another shape are refused)",
        ),
    ] = False,
    base_model: BaseOpt = None,
) -> None:
    """Make a version the active adapter on the configured base model (refused if it was trained on another)."""
    try:
        settings = _settings(base_model)
        name, version = registry.parse_ref(ref)
        if not version:  # the latest version may be one the eval gate refused: which one is the user's choice
            raise UsageError(f"activate takes NAME@VERSION, not {ref!r}; `lunatrain adapters list` shows its versions.")
        entry = registry.activate(settings, name, version, force=force, reason="cli", base_named=base_model is not None)
    except LunaError as err:
        raise fail(err) from None
    typer.echo(f"{entry['name']}@{entry['version']} is now active on base model {settings.base_model!r}.")
    _say_stale(settings, entry)


@adapters_app.command("deactivate")
def deactivate_cmd(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="NAME[@VERSION]", help="NAME (on the configured base model) or NAME@VERSION (on every base)"
        ),
    ],
    base_model: BaseOpt = None,
) -> None:
    """Stop using an adapter: NAME is no longer active on the configured base model (NAME@VERSION: that
    version on any base). Its versions stay registered; `activate` brings one back."""
    try:
        name, version = registry.parse_ref(ref)
        done = registry.deactivate(_settings(base_model), name, version)
    except LunaError as err:
        raise fail(err) from None
    for d in done:
        typer.echo(f"{d['name']}@{d['version']} is no longer active on base model {d['baseModel']}.")


@adapters_app.command("rollback")
def rollback_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="adapter name")], base_model: BaseOpt = None
) -> None:
    """Make the version active before the current one on the configured base model active again."""
    try:
        settings = _settings(base_model)
        adapter, version = registry.parse_ref(name)
        if version:  # the version to go back to is the one before the active one: naming one would be ignored
            raise UsageError(f"rollback takes an adapter name, not {name!r}; to make {name} active, use `activate`.")
        entry = registry.rollback(settings, adapter, base_named=base_model is not None)
    except LunaError as err:
        raise fail(err) from None
    typer.echo(f"{entry['name']}@{entry['version']} is active again on base model {settings.base_model!r}.")
    _say_stale(settings, entry)


def _say_stale(settings: Settings, entry: dict[str, Any]) -> None:
    """A version made active that was trained on content deleted since serves it again: said at once, not
    only by a later `status`, with the way out: a newer version of it on this base trained without that content
    (`luna` would not train this data again, nor activate a version the user rolled back from), else training."""
    stale = entry.get("stale")
    if not stale:
        return
    reason = stale.get("reason") if isinstance(stale, dict) else None
    fingerprint = (entry.get("baseModel") or {}).get("fingerprint")
    clean = [
        v
        for v in registry.list_adapters(settings).get(entry["name"], {}).get("versions", [])
        if registry.version_number(v["version"]) > registry.version_number(entry["version"])
        and (v.get("baseModel") or {}).get("fingerprint") == fingerprint
        and not v.get("stale")
        and (v.get("gate") or {}).get("passed") is not False
        and registry.loadable(settings, v)
    ]
    way_out = "train a new version (`lunatrain luna`) to leave it out"
    if clean:
        ref = f"{entry['name']}@{clean[-1]['version']}"
        way_out = f"{ref} was trained without it (`lunatrain adapters activate {ref}`)"
    typer.echo(
        f"Note: {entry['name']}@{entry['version']} is stale ({reason or 'retrain needed'}): it still serves that "
        f"content; {way_out}."
    )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}.{k}" if prefix else k)
    return out


@adapters_app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(metavar="A", help="NAME@VERSION")],
    b: Annotated[str, typer.Argument(metavar="B", help="NAME@VERSION")],
) -> None:
    """What differs between two versions: parameters, data, base model, metrics."""
    try:
        settings = load_settings()
        ea, eb = (registry.get_version(settings, *registry.parse_ref(r)) for r in (a, b))
    except LunaError as err:
        raise fail(err) from None
    keys = (
        "params",
        "datasetTier",
        "datasetFingerprint",
        "trainSamples",  # what the run kept of the tier: another tokenizer or maxSeqLength drops others
        "resumedFromEpoch",  # `params.resume` alone says what was asked: a run with nothing to resume starts fresh
        "baseModel",
        "metrics",
        "tokenizerHash",
        "templateHash",
    )
    fa, fb = (_flat({k: e.get(k) for k in keys}) for e in (ea, eb))
    rows = [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    if not rows:
        typer.echo("No differences in parameters, data, base model or metrics.")
    for k, va, vb in rows:
        typer.echo(f"{k}: {_differing(va, vb, loss=k.endswith('Loss'))}")
    # The fingerprint is the whole export's; trainedKey is what a run reads of its tier with its parameters and
    # base: the same key trains the same weights (the flow does not train such data again).
    key = ea.get("trainedKey")
    if key and key == eb.get("trainedKey") and any(k == "datasetFingerprint" for k, _, _ in rows):
        typer.echo(
            f"Note: both trained on the same data with the same parameters and base model (trainedKey {key}); the "
            "export around it changed (another tier, ids, tags or ratings), not what they trained on."
        )


def _differing(a: Any, b: Any, *, loss: bool = False) -> str:
    """Two values that differ, written so that they read differently: floats with as many significant digits
    as that takes (a learning rate of 1e-05 is not 0.0000, two losses equal to four places are not equal); a
    loss with four decimals at least, as `adapters list` and every report write it (8.4220, not 8.422)."""
    if not (isinstance(a, float) or isinstance(b, float)):
        return f"{_fmt(a)} -> {_fmt(b)}"
    shown = "f" if loss else "g"
    for digits in range(4 if loss else 5, 18):
        sa, sb = (f"{x:.{digits}{shown}}" if isinstance(x, float) else _fmt(x) for x in (a, b))
        if sa != sb:
            break
    return f"{sa} -> {sb}"


@adapters_app.command("repair")
def repair_cmd() -> None:
    """Rebuild an unreadable registry from the adapter folders' training reports (the damaged file is kept
    beside it as lora-adapters.json.damaged-<time>); settle overwrite runs left staged by a stopped process;
    mark versions trained on deleted content stale."""
    try:
        result = registry.repair(load_settings())
    except LunaError as err:
        raise fail(err) from None
    for run in result["settled"]:
        typer.echo(f"Settled {run}: its process stopped before the eval gate decided, so the slot kept its own.")
    for ref in result.get("added", []):
        typer.echo(
            f"Added {ref}: its folder holds a finished run that the registry lacked (a registry restored from an "
            "older backup?)."
        )
    for ref in result["stale"]:
        typer.echo(f"Marked {ref} stale: it was trained on content deleted since (retrain needed).")
    if not result["repaired"]:
        if not result["settled"] and not result.get("added"):
            readable = f"The registry is readable ({counted(result['versions'], 'version')})"
            typer.echo(f"{readable}; nothing {'else ' if result['stale'] or result['skipped'] else ''}to repair.")
    else:
        kept = f"; the damaged file is kept as {result['damagedFile']}" if result["damagedFile"] else ""
        typer.echo(
            f"Rebuilt the registry with {counted(result['versions'], 'version')} of "
            f"{counted(len(result['adapters']), 'adapter')}{kept}."
        )
    for folder in result["skipped"]:
        typer.echo(
            f"Left out {folder}: it stays on disk; train it again, or fix the file, move "
            "reports/training/lora-adapters.json aside and repair once more."
        )
