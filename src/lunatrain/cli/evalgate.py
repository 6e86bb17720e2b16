"""`lunatrain eval-gate` (the guide's `eval:gate`): evaluate the active adapter (or --adapter, or the base
model) on the eval suite; exit 1 when a threshold fails or a metric regresses."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import LunaError
from ..evalgate import GateReport, GateThresholds, eval_gate, parse_thresholds
from ..settings import load_settings
from ..templates import cli_template
from .app import app, as_written, fail, fail_listing, given, is_tty, print_report, tables_fit


def _threshold_help(field: str) -> str:
    """A threshold flag's help: what it bounds and its default, from GateThresholds (one place for both)."""
    info = GateThresholds.model_fields[field]
    return f"{info.description}; default {info.default}, or --profile's [gate] value"


@app.command("eval-gate")
def eval_gate_cmd(
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="NAME@VERSION, or NAME for its active version")
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            "--baseModel",
            help="base model whose active adapter is gated (default ASSISTANT_BASE_MODEL)",
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="thresholds from the profile's [gate] table (default: luna)")
    ] = None,
    min_golden_pass_rate: Annotated[
        float | None,
        typer.Option("--min-golden-pass-rate", "--minGoldenPassRate", help=_threshold_help("min_golden_pass_rate")),
    ] = None,
    max_golden_pass_rate_drop: Annotated[
        float | None,
        typer.Option(
            "--max-golden-pass-rate-drop",
            "--maxGoldenPassRateDrop",
            help=_threshold_help("max_golden_pass_rate_drop"),
        ),
    ] = None,
    max_val_loss_ratio_vs_base: Annotated[
        float | None,
        typer.Option(
            "--max-val-loss-ratio-vs-base",
            "--maxValLossRatioVsBase",
            help=_threshold_help("max_val_loss_ratio_vs_base"),
        ),
    ] = None,
    max_loss_regression: Annotated[
        float | None,
        typer.Option("--max-loss-regression", "--maxLossRegression", help=_threshold_help("max_loss_regression")),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            "--chatTemplate",
            help="chat template for a base model without one (bundled name or .jinja file); adapters bring theirs",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Evaluation gate: golden cases + val/test loss against the base model and the recorded baseline."""
    try:
        given(adapter, "--adapter", "an adapter (NAME or NAME@VERSION)")
        given(base_model, "--baseModel", "a base model (hub id, local folder or luna-tiny)")
        given(chat_template, "--chatTemplate", "a template (a bundled name or a .jinja file)")
        settings = load_settings()
        from ..profiles import load_profile

        # The luna profile's [gate] unless another is named, as `lunatrain luna` gates after training: the
        # guide's `npm run eval:gate` must not pass what the flow refused. ("" is an invalid name.)
        # In one spelling (the profile may use camelCase, the flags are snake_case), so a flag replaces its key.
        chosen = load_profile(settings, "luna" if profile is None else profile)
        thresholds: dict[str, Any] = parse_thresholds(chosen.gate, strict=True).model_dump()
        flags = {
            "min_golden_pass_rate": min_golden_pass_rate,
            "max_golden_pass_rate_drop": max_golden_pass_rate_drop,
            "max_val_loss_ratio_vs_base": max_val_loss_ratio_vs_base,
            "max_loss_regression": max_loss_regression,
        }
        thresholds |= {k: v for k, v in flags.items() if v is not None}
        template = cli_template(chat_template, settings) if chat_template is not None else None
        # on the profile's base model, as the flow's first step judges it (a flag still wins)
        base_model = base_model or chosen.base_model
        report = eval_gate(
            settings, adapter=adapter, base_model=base_model, thresholds=thresholds, chat_template=template
        )
    except LunaError as err:  # a golden suite's mistakes: every one named, as `examples import` names a file's
        # (a JSON document only for such a list: any other failure is its one sentence, as for every command)
        raise fail_listing(err, as_json and isinstance(err.details, list)) from None
    try:
        print_report(report, show, as_json=as_json)  # a failed gate: its report, then exit 1
    except LunaError as err:
        raise fail(err) from None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def show(report: GateReport) -> None:
    m, b, bl = report.metrics, report.base_metrics, report.baseline.get("metrics") or {}
    rows = [
        ("golden pass rate", m.get("goldenPassRate"), b.get("goldenPassRate"), bl.get("goldenPassRate")),
        ("val loss", m.get("valLoss"), b.get("valLoss"), bl.get("valLoss")),
        ("test loss", m.get("testLoss"), b.get("testLoss"), bl.get("testLoss")),
        ("stopped", m.get("stoppedRate"), b.get("stoppedRate"), bl.get("stoppedRate")),
    ]
    # The base the candidate was evaluated on: its own training base, which an adapter activated with --force
    # does not share with the configured one (a note says so).
    on = f" on base model {report.candidate['baseModel']!r}" if report.candidate["kind"] == "adapter" else ""
    title = (
        f"eval gate: {report.decision.upper()}  {report.candidate['ref']}{on} vs {report.baseline['ref']} "
        f"({report.baseline['source']})"
    )
    failed = [c for c in report.cases if not c["passed"]]
    if tables_fit(is_tty()):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=as_written(title), title_justify="left")
        for col in ("metric", "candidate", "base model", "baseline"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for name, *vals in rows:
            table.add_row(name, *(_fmt(v) for v in vals))
        console = Console()
        console.print(table)
        for c in failed:
            console.print(
                Text.assemble(
                    "  ", ("case ", "yellow"), as_written(c["id"], "yellow"), " failed: ", as_written(_why(c))
                )
            )
        for r in report.reasons:
            console.print(Text.assemble("  ", as_written(r, "bold red")))
    else:
        typer.echo(title)
        typer.echo("metric\tcandidate\tbase model\tbaseline")  # the terminal table's column names
        for name, *vals in rows:
            typer.echo("\t".join([name, *(_fmt(v) for v in vals)]))
        for c in failed:
            typer.echo(f"case {c['id']} failed: {_why(c)}")
        for r in report.reasons:
            typer.echo(f"reason: {r}")
    for n in report.notes:
        typer.echo(f"note: {n}")
    typer.echo(
        f"{report.candidate['ref']}: {m.get('goldenPassed')}/{m.get('goldenTotal')} golden cases passed. "
        f"Wrote {report.path}."
    )


def _why(case: dict) -> str:
    """The checks a case failed, where it is written, and whether the baseline passed it:
    `contains, regex (timed out after 1 s) (my.jsonl:3, passed on the baseline)`."""
    from ..evalsuite import REGEX_SECONDS

    bad = [
        k["type"] + (f" (timed out after {REGEX_SECONDS:g} s)" if k.get("timedOut") else "")
        for k in case["checks"]
        if not k["passed"]
    ]
    before = ", passed on the baseline" if case.get("baselinePassed") is True else ""
    return f"{', '.join(bad)} ({case['source']}{before})"
