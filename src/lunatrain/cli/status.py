"""`lunatrain status`: data readiness and the last export, job, prepare and gate (GET /assistant/training/status)."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated, Any

import typer

from ..errors import LunaError, UsageError
from ..params import MIN_CURATED_MAX
from ..service.jobs import ACTIVE
from ..settings import Settings, load_settings
from ..status import STATUSES, training_status
from .app import app, as_written, fail, is_tty, json_text, tables_fit


@app.command("status")
def status_cmd(
    min_curated: Annotated[
        int | None,
        typer.Option(
            "--min-curated",
            "--minCurated",
            min=0,
            help="approved curated examples needed to be ready  [default: the luna profile's, 30 as shipped]",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Data status: counts per source and curation status, readiness, last export, job, prepare, gate."""
    try:
        if min_curated is not None and min_curated > MIN_CURATED_MAX:  # as the API's ?minCurated, the flows'
            raise UsageError(f"--minCurated must be at most {MIN_CURATED_MAX:,} (got {min_curated}).")
        settings = load_settings()
        status = training_status(settings, min_curated) | {"settings": in_effect(settings)}
    except LunaError as err:
        raise fail(err) from None
    if as_json:
        typer.echo(json_text(status, sort_keys=True))
        return
    show(status)


def in_effect(settings: Settings) -> dict[str, str]:
    """What this command read: the data root, the database and the base model the flow trains, and where that
    comes from. A mistyped ASSISTANT_HOME otherwise showed an empty project, with nothing naming the root."""
    from ..params import run_keys
    from ..profiles import load_profile
    from ..store import database_shown

    # the environment is read without regard to case (settings.py), and so is this
    named = any(key.upper() == "ASSISTANT_BASE_MODEL" for key in os.environ)
    base, source = settings.base_model, "ASSISTANT_BASE_MODEL" if named else "the default"
    with contextlib.suppress(LunaError):  # a profile that does not load is among the problems status names
        profile = load_profile(settings, "luna")
        if run_keys(profile.lora).get("base_model"):
            base, source = profile.base_model, "the luna profile"
    database = database_shown(settings)
    return {"dataRoot": str(settings.home), "database": database, "baseModel": base, "baseModelFrom": source}


def _no_export(s: dict[str, Any]) -> str:
    """No export to show: none yet, or one whose summary cannot be read (an export exists: not "never")."""
    unreadable = any((c or {}).get("code") == "status.export_unreadable" for c in s.get("problemCodes", []))
    return "unreadable (see the problem below)" if unreadable else "never"


def _facts(s: dict[str, Any]) -> list[tuple[str, str]]:
    exp, job, prep, gate, act = s["lastExport"], s["lastJob"], s["lastPrepare"], s["lastGate"], s["activeAdapter"]
    changed = {True: " (database changed since: export again)", False: " (up to date)", None: ""}[
        s["changedSinceExport"]
    ]
    trainer = s["trainer"]
    tiers = "; ".join(
        f"{tier} {'yes' if t['ready'] else 'no'} ({t['approved']} approved)" for tier, t in s["tiers"].items()
    )
    where = s["settings"]
    facts = [
        ("data root", where["dataRoot"]),
        ("database", where["database"]),
        ("base model", f"{where['baseModel']} ({where['baseModelFrom']})"),
        (
            "ready",
            f"{'yes' if s['ready'] else 'no'}: {s['curatedApproved']} approved curated, minCurated {s['minCurated']}",
        ),
        ("ready per tier", tiers),
        (
            "trainer",
            f"{trainer['label']} ({trainer['url']})"
            + (
                ""
                if trainer["reachable"]
                else f"; its address is held by {trainer['heldBy']} (see problems)"
                if trainer.get("heldBy")
                else "; it starts on demand, or run `lunatrain trainer`"
                if trainer.get("onDemand", True)
                else "; starting it on demand is off (ASSISTANT_LORA_ENSURE_ON_DEMAND=false): run `lunatrain trainer`"
            ),
        ),
        ("last export", f"{exp['time']} fingerprint {str(exp['fingerprint'])[:12]}{changed}" if exp else _no_export(s)),
        (
            "last job",
            f"{job['status']} {job['adapterName']}{'@' + job['version'] if job['version'] else ''}{_on(job)}"
            + (
                f" val loss {val:.4f}"
                if isinstance(val := (job.get("metrics") or {}).get("valLoss"), int | float)
                else ""
            )
            + _job_ref(job)
            # the version it made and the gate refused: "succeeded" alone read as the version in use
            + ("; the eval gate refused it" if (job.get("gate") or {}).get("passed") is False else "")
            + (f": {job['error'].get('message')}" if isinstance(job.get("error"), dict) else "")
            if job
            # a job database that cannot be read (a problem below says why): "never" would not be the truth
            else "unknown"
            if any(str((c or {}).get("code", "")).startswith("status.jobs_db_") for c in s.get("problemCodes") or [])
            else "never",
        ),
        (
            "last prepare",
            f"{prep['status']}{_on(prep)} ({prep['created']}){' failed: ' + ', '.join(prep['failed']) if prep['failed'] else ''}"
            + ("; of an older export; run `lunatrain prepare`" if prep.get("matchesExport") is False else "")
            if prep
            else "never",
        ),
        (
            "last gate",
            f"{'passed' if gate['passed'] else 'failed'} {gate['candidate']}{_on(gate)} ({gate['created']})"
            + (f": {'; '.join(gate['reasons'])}" if gate["reasons"] else "")
            if gate
            else "never",
        ),
        (
            "active adapter",
            # with a registry that cannot be read "none" would not be the truth
            _adapter(act) if act else "none" if s["activeAdaptersKnown"] else "unknown",
        ),
    ]
    others = [a for a in s["activeAdapters"] if a is not act]
    if others:
        facts.append(("also active", ", ".join(_adapter(a) for a in others)))
    facts += [("problem", problem) for problem in s["problems"]]
    return facts


def _adapter(a: dict[str, Any]) -> str:
    """An active adapter as status names it: one that was trained on a since deleted example is still served,
    and the plain output says so as `adapters list` does (`--json` has it as `stale`); one whose files are gone
    is not served at all (`filesMissing`)."""
    marks = [
        m
        for m, on in (
            ("stale: retrain needed", a.get("stale")),
            ("files missing: train it again", a.get("filesMissing")),
        )
        if on
    ]
    return f"{a['name']}@{a['version']} on {a.get('baseLabel') or a['baseModel']}" + "".join(f" ({m})" for m in marks)


def _job_ref(job: dict[str, Any]) -> str:
    """ " (no version, JOB)": a job that ended without registering a version says so (a queued or running one
    has none yet, which is no news); the job id, when there is one, follows."""
    ended = job["status"] not in ACTIVE
    refs = ["no version"] if ended and not job["version"] else []
    refs += [job["jobId"]] if job.get("jobId") else []
    return f" ({', '.join(refs)})" if refs else ""


def _on(report: dict[str, Any]) -> str:
    """The " on BASE" of a stage's last report: after a switch of base model it may be for another base than the
    active adapter's line names. Nothing for a base model's own gate (its ref, base:ID, names it)."""
    base = report.get("baseModel")
    return f" on {base}" if base and report.get("candidate") != f"base:{base}" else ""


def show(s: dict[str, Any]) -> None:
    rows = [(f"{src} examples", *(s["examples"][src][k] for k in (*STATUSES, "total"))) for src in s["examples"]]
    rows.append(("memory items", *(s["memoryItems"][k] for k in (*STATUSES, "total"))))
    if tables_fit(is_tty()):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title="training data", title_justify="left")
        for col in ("source", *STATUSES, "total"):
            table.add_column(col, justify="left" if col == "source" else "right")
        for row in rows:
            table.add_row(*(str(v) for v in row))
        console = Console()
        console.print(table)
        for key, value in _facts(s):
            console.print(Text.assemble((f"{key}:", "bold"), " ", as_written(value)), highlight=False)
    else:
        typer.echo("source\t" + "\t".join((*STATUSES, "total")))
        for row in rows:
            typer.echo("\t".join(str(v) for v in row))
        for key, value in _facts(s):
            typer.echo(f"{key}: {value}")
