"""`auto` / `luna` (the guide's `train:auto` / `train:luna`): eval-gate → export → prepare → lora in the
guide's production order, stopping at the first failure with one sentence that names the step and the fix.

The lora step is passed in: the CLI submits to the trainer service and follows the job (or trains in
process with `--local`); either way it returns the job's outcome as a dict, and this module reads the
registry and the reports for the final summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import evalgate, export, prepare, registry
from .errors import CheckFailed, LunaError
from .params import LoraParams
from .settings import Settings

STEPS = ("eval-gate", "export", "prepare", "lora")

# What to do when a step fails, said once at the end of the error sentence.
_FIX = {
    "eval-gate": "fix or roll back the active adapter (`lunatrain adapters rollback NAME`) and run again",
    "export": "check the database settings (ASSISTANT_DB_URL) and the split ratios, then run again",
    "prepare": "fix the examples listed in reports/training/prepare-latest.json, or lower --minCurated",
    "lora": "see `lunatrain jobs show` and reports/training/lora-latest.json, then run again",
}

LoraStep = Callable[[Settings, LoraParams], dict[str, Any]]
"""Runs one LoRA job; returns {"status": "succeeded"|"failed"|"cancelled", "adapter": {name, version,
path} | None, "error": {code, message} | None, "jobId": str | None}."""


@dataclass
class StepOutcome:
    step: str
    ok: bool
    seconds: float
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class FlowResult:
    params: LoraParams
    steps: list[StepOutcome] = field(default_factory=list)
    adapter: dict[str, Any] | None = None  # the registered version entry, when the lora step succeeded

    @property
    def ok(self) -> bool:
        return len(self.steps) == len(STEPS) and all(s.ok for s in self.steps)


def run_flow(
    settings: Settings,
    params: LoraParams,
    lora_step: LoraStep,
    *,
    gate_thresholds: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> FlowResult:
    """Run the four steps in order. Returns the result when all pass; raises CheckFailed (exit 1) naming
    the failed step and the fix, with the partial result in `details`."""
    result = FlowResult(params=params)

    def step(name: str, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> None:
        if on_step:
            on_step(name)
        started = time.monotonic()
        try:
            ok, summary, detail = fn()
        except LunaError as err:
            ok, summary, detail = False, err.message, {"code": err.code}
        result.steps.append(StepOutcome(name, ok, round(time.monotonic() - started, 3), summary, detail))
        if not ok:
            raise CheckFailed(f"Step {name} failed: {summary.rstrip('.')}; {_FIX[name]}.", details=result)

    def gate_current() -> tuple[bool, str, dict[str, Any]]:
        report = evalgate.eval_gate(settings, base_model=params.base_model, thresholds=gate_thresholds,
                                    chat_template=params.chat_template)
        ref = report.candidate.get("ref", "base model")
        reasons = "; ".join(report.reasons)
        return report.passed, f"{ref} {'passed' if report.passed else 'failed'}" + (f": {reasons}" if reasons else ""), {
            "decision": report.decision, "path": report.path}

    def export_data() -> tuple[bool, str, dict[str, Any]]:
        summary = export.export(settings)
        curated = summary.counts["curated"]
        return True, (f"{curated['total']} curated samples ({curated['train']} train, {curated['val']} val), "
                      f"fingerprint {summary.fingerprint[:12]}"), {"fingerprint": summary.fingerprint}

    def preflight() -> tuple[bool, str, dict[str, Any]]:
        report = prepare.prepare(settings, params)
        problems = [f"{c.id} ({c.count})" for c in report.checks if c.severity == "fail"]
        text = f"status {report.status}" + (f": {', '.join(problems)}" if problems else "")
        return report.status != "fail", text, {"status": report.status, "path": str(report.path)}

    def lora() -> tuple[bool, str, dict[str, Any]]:
        outcome = lora_step(settings, params)
        adapter = outcome.get("adapter") or {}
        if outcome.get("status") != "succeeded" or not adapter.get("version"):
            err = outcome.get("error") or {}
            return False, f"job {outcome.get('status')}: {err.get('message', 'no adapter registered')}", outcome
        result.adapter = registry.get_version(settings, adapter["name"], adapter["version"])
        return True, f"{adapter['name']}@{adapter['version']}", outcome

    step("eval-gate", gate_current)
    step("export", export_data)
    step("prepare", preflight)
    step("lora", lora)
    return result


def summary_lines(settings: Settings, result: FlowResult) -> list[str]:
    """The closing summary a person reads: adapter, val loss vs base, gate, where the files are."""
    lines = [f"{s.step:<10} {'ok' if s.ok else 'FAILED':<6} {s.seconds:7.1f}s  {s.summary}" for s in result.steps]
    entry = result.adapter
    if entry:
        metrics = entry.get("metrics") or {}
        val, base = metrics.get("valLoss"), metrics.get("baseValLoss")
        gate = entry.get("gate") or {}
        aliases = registry.list_adapters(settings).get(entry["name"], {}).get("aliases", {})
        base_id = (entry.get("baseModel") or {}).get("id")
        lines.append(f"adapter    {entry['name']}@{entry['version']} on {base_id}"
                     + (" (active)" if aliases.get("active") == entry["version"] else " (not active)"))
        if val is not None and base is not None:
            lines.append(f"val loss   {val:.4f} vs base {base:.4f} ({(1 - val / base) * 100:+.1f}% better)"
                         if base else f"val loss   {val:.4f}")
        if gate:
            reasons = "; ".join(gate.get("reasons") or [])
            lines.append(f"gate       {gate.get('status')}" + (f": {reasons}" if reasons else ""))
        lines.append(f"files      {entry.get('path')}/ (adapter, training-report.json, loss-curve.png)")
    lines.append(f"reports    {settings.reports_training_dir}/ (lora-latest.json, lora-adapters.json, "
                 f"prepare-latest.json), {settings.reports_eval_dir}/eval-gate-latest.json")
    return lines
