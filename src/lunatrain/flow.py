"""The guide's flows, in one place; the trainer's worker, the CLI and the API routes each make one call here.

- `train_and_gate`: one LoRA run, then the eval gate on the new version (promoted when it passes) — what a
  job does, in the trainer's child process or in-process with `--local`.
- `submit_or_join`: the job submit of `lora`, `start`, `quick-start` and `example-adapter`: the base model
  resolved where the user asked (never the trainer's own environment), minCurated checked, the trainer ensured,
  and a job that already trains the same on this export followed instead of a second one.
- `quick_start` / `example_adapter`: the API's one-click flows (export, optionally seed, then submit).
- `run_flow` (`auto` / `luna`, the guide's `train:auto` / `train:luna`): eval-gate → export → prepare →
  lora in the guide's production order, stopping at the first failure with one sentence that names the step
  and the fix. Its lora step is passed in: submit to the trainer service and follow the job, or
  `train_and_gate` in process; either way it returns the job's outcome as a dict. A flow run daily trains
  only when something changed (`unchanged_version`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import evalgate, export, fsio, prepare, registry
from .compat import with_bitsandbytes
from .errors import CheckFailed, DamagedFile, LunaError, NotFound, StorageError, UsageError
from .fsio import check_writable, file_lock, read_json
from .messages import coded, counted
from .params import FlowOptions, LoraParams, run_identity_of, run_key, trained_key
from .settings import PREPARE_REPORT, Settings
from .wire import now_iso, parse_iso

STEPS = ("eval-gate", "export", "prepare", "lora")

# What to do when a step fails, said once at the end of the error sentence.
_FIX = {
    "eval-gate": "fix, roll back or deactivate the active adapter (`lunatrain adapters rollback {name}`, "
    "`lunatrain adapters deactivate {name}`) or name one with --adapter, and run again",
    "export": "check the database settings (ASSISTANT_DB_URL) and the split ratios, then run again",
    "prepare": f"fix the examples listed in reports/training/{PREPARE_REPORT}, or lower --minCurated",
    # the lora step has none: a run that failed says where to look (its log, `jobs list`), and a refusal
    # before it (an overwrite slot on another base, content withdrawn since the export) says its own fix
}


def _base_fix(profile: str | None) -> str:
    """The advice when the first step judged the base model (no adapter active on it, none named): there is
    nothing to roll back or deactivate; the thresholds are what the base cannot pass."""
    where = f"of profile {profile}" if profile else "in use"
    lora = f"`lunatrain lora --profile {profile}`" if profile else "`lunatrain lora`"
    return (
        f"no adapter is active on the base model, so the gate judged the base model itself, which fails the [gate] "
        f"thresholds {where}; lower them, or train a first adapter with {lora} (it gates only what it trains), "
        "and run again"
    )


Event = dict[str, Any]
LoraStep = Callable[[Settings, LoraParams, FlowOptions], dict[str, Any]]
"""Runs one LoRA job; returns its outcome: {"status": "succeeded"|"failed"|"cancelled", "adapter": {name,
version, path} | None, "metrics": {...}, "error": {code, message} | None, "gate": the gate record | None,
"jobId": str | None}."""


def job_outcome(job: Any) -> dict[str, Any]:
    """The outcome (see LoraStep) of a job the trainer ran (service.jobs.Job), as a local run returns it."""
    return {
        "status": job.status,
        "adapter": job.adapter.model_dump() if job.adapter else None,
        "error": job.error.model_dump() if job.error else None,
        "gate": job.gate,
        "metrics": job.metrics,
        "jobId": job.id,
    }


# --- one run: train, then gate --------------------------------------------------------------------


def _holds_slot(settings: Settings, name: str, revision: int) -> bool:
    """Whether the overwrite run's revision took the slot: its gate passing says so only when no newer run's
    revision took it meanwhile."""
    try:
        entry = registry.get_revision(settings, name, revision)
    except LunaError:
        return False
    return not entry.get("replaced") and not entry.get("staged")


def train_and_gate(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions,
    *,
    thresholds: dict[str, Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool | str] | None = None,
    job_id: str | None = None,
    on_trained: Callable[[dict[str, Any]], None] | None = None,
    may_gate: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Train one adapter; once it is registered call `on_trained(outcome)`, then (with `options.gate` and
    while `may_gate()`) gate the new version with `thresholds`, promoting it when it passes. A failing gate
    never undoes the adapter. Returns the outcome (see LoraStep)."""
    from .train import run_lora

    check_suite(settings, options)
    # Again when the job starts: a queued job reads the export current then, which may hold fewer examples than
    # the one it was accepted on (rejected and exported again while it waited).
    check_min_curated(settings, options)
    # An overwrite run the gate will judge waits beside its slot: it replaces what is served only if it passes.
    result = run_lora(params, settings, on_event=on_event, should_stop=should_stop, job_id=job_id, stage=options.gate)
    adapter = None
    revision = (result.report or {}).get("revision")
    if result.ok and result.version and result.path is not None:
        path = settings.shown(result.path)
        path = (result.report or {}).get("path") or path  # the slot's, not where a staged run waits
        adapter = {"name": result.adapter_name, "version": result.version, "path": str(path)}
        adapter |= {"revision": revision} if revision is not None else {}  # the overwrite slot's run
    error = None
    if not result.ok:
        error = result.error or {"code": "training_error", "message": "training failed"}
    outcome: dict[str, Any] = {
        "status": result.status.value,
        "adapter": adapter,
        "error": error,
        "gate": None,
        "metrics": (result.report or {}).get("metrics") or {},
        "jobId": job_id,
    }
    if adapter is None:
        return outcome
    if on_trained is not None:
        on_trained(outcome)
    judged = options.gate and may_gate()  # asked once: both branches below must see the same answer
    if options.gate and not judged and revision is not None:
        registry.settle_slot(settings, adapter["name"], revision, keep=False)  # not judged: the slot keeps its own
    if judged:
        emit = on_event or (lambda _e: None)
        emit(
            {
                "type": "log",
                "message": f"eval gate for {adapter['name']}@{adapter['version']}",
                **coded("log.gate_started", name=adapter["name"], version=adapter["version"]),
            }
        )
        try:
            # A cancel that comes while the gate evaluates (minutes on a real model) keeps its decision from
            # taking effect: the version stays registered, inactive.
            report = evalgate.gate_candidate(
                settings,
                adapter["name"],
                adapter["version"],
                revision=revision,
                promote=lambda: not (should_stop and should_stop() is True),  # a sentence is no cancel
                thresholds=thresholds,
                data=result.data,  # what it trained on, not an export that finished meanwhile
            )
            outcome["gate"] = report.gate_record()
        except Exception as exc:  # a broken gate never undoes the adapter: registered, inactive
            said = exc.message if isinstance(exc, LunaError) else f"{type(exc).__name__}: {exc}"  # ours: its sentence
            outcome["gate"] = {"status": "error", "passed": False, "reasons": [said]}
            if revision is not None:  # a staged overwrite run that was not judged never takes the slot
                registry.settle_slot(settings, adapter["name"], revision, keep=False)
        except KeyboardInterrupt:  # Ctrl-C of `lora --local` (its caller says what became of the version)
            if revision is not None:
                registry.settle_slot(settings, adapter["name"], revision, keep=False)
            raise
        reasons = "; ".join(outcome["gate"].get("reasons") or [])
        passed = bool(outcome["gate"].get("passed"))
        # The last job's report says what became of it: the gate's decision and, for an overwrite run, whether
        # it took the slot (refused, its report's path still holds the revision before it).
        kept = {"kept": passed and _holds_slot(settings, adapter["name"], revision)} if revision is not None else {}
        registry.annotate_latest(settings, result.report or {}, gate=outcome["gate"], **kept)
        emit(
            {
                "type": "log",
                "message": f"eval gate {outcome['gate'].get('status')}" + (f": {reasons}" if reasons else ""),
                **coded(
                    "log.gate_passed" if passed else "log.gate_failed",
                    name=adapter["name"],
                    version=adapter["version"],
                    reasons=reasons,
                    reasonCodes=outcome["gate"].get("reasonCodes") or [],
                ),
            }
        )
    return outcome


# --- submitting a job to the trainer --------------------------------------------------------------


def resolve_base(settings: Settings, params: LoraParams) -> LoraParams:
    """The base model, resolved once where the user asked: flag > profile > this process's
    ASSISTANT_BASE_MODEL > default. The job carries it; the trainer never substitutes its own. An adapter
    directory is refused here (adapter on adapter), before anything is submitted."""
    from .models import local_dir, refuse_adapter_dir
    from .params import check_adapter_name

    base = params.base_model or settings.base_model
    # found as the steps find it: from the working directory, else under the data root
    refuse_adapter_dir(local_dir(base, settings.home), base)
    check_adapter_name(params, base)
    return params if params.base_model else params.model_copy(update={"base_model": base})


def check_min_curated(settings: Settings, options: FlowOptions, curated: int | None = None) -> None:
    """minCurated against the current export (or `curated` examples), with prepare's sentence; before any job
    starts. Short of it, the sentence names the missing step when the examples are in the database but not
    (all) in the export: no export at all, or one older than the database."""
    count = prepare.curated_count(settings) if curated is None else curated
    check = prepare.volume_check(count, options.min_curated)
    if check.severity != "fail":
        return
    # The check's own code and values, for a client to say it in its language (the dashboard in German).
    said = {"check": check.code, **(check.params or {})}
    if curated is None:
        summary = export.read_summary(settings)
        if summary is None:
            raise export.no_export(settings)
        stale = prepare.stale_check(settings, summary)
        if stale.severity == "warn":
            raise CheckFailed(f"Not enough data: {check.message}; {stale.message}.", params=said)
    raise CheckFailed(f"Not enough data: {check.message}.", params=said)


def check_suite(settings: Settings, options: FlowOptions) -> None:
    """The golden suite the gate will judge with, read now when the run is gated: a suite with a mistake (a
    regex that does not compile, a misnamed file) is said before a job is queued or trains for hours, not by
    the gate after it."""
    if options.gate:
        from . import evalsuite

        evalsuite.check_suite(settings)


def check_chat_template(settings: Settings, params: LoraParams) -> None:
    """An unknown chatTemplate name is the caller's mistake (UsageError): said before anything is copied,
    exported or started, not by the trainer or the run after it."""
    if params.chat_template:
        from .templates import load_template

        load_template(params.chat_template, settings)


def submit_or_join(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions,
    *,
    thresholds: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[Any, bool]:
    """Queue one job on this data root's trainer (started on demand) and return it (service.jobs.Job) and
    False; unless a job queued or running already trains these parameters on the data exported now
    (`joinable_twin`) and no `request_id` is given: that job then, and True. Two tabs pressing Start within a
    second queued two jobs that trained one export to two versions of the same weights."""
    from .models import fetch_if_allowed
    from .service import client
    from .service.ensure import ensure_trainer

    check_chat_template(settings, params)
    params = resolve_base(settings, params)
    fetch_if_allowed(str(params.base_model), settings)  # allowed here, the trainer finds it in the cache
    check_data(settings, params, options)
    ensure_trainer(settings)
    with file_lock(submit_lock_path(settings)):
        # A start with a requestId is its client's own: a retry must find the job that id names, and a joined
        # job does not carry it (the retry after that job ended would train the data again).
        if request_id is None and (twin := joinable_twin(settings, params, options, thresholds)) is not None:
            return twin, True
        return client.submit(settings, params, options, request_id, thresholds), False


def submit_lock_path(settings: Settings) -> Path:
    """The lock that makes a twin's check and the submit one step for every start on this data root: the API's
    threads (each opens it: flock excludes open files, not processes) and other processes (`lora` in two
    terminals, the API and the CLI) would otherwise both find no twin and both queue."""
    return settings.trainer_dir / "submit.lock"


def check_data(settings: Settings, params: LoraParams, options: FlowOptions) -> None:
    """What the export and the suite must hold before a job of `params` is queued: minCurated, a golden suite
    the gate can read, the tier's files as export wrote them and nothing deleted or rejected since. The
    client checks it before it submits, and the trainer again for a client that calls it directly."""
    check_min_curated(settings, options)
    check_suite(settings, options)
    export.refuse_replaced(settings, params.dataset_tier)
    export.refuse_withdrawn(settings, params.dataset_tier)
    export.refuse_nothing_to_train(settings, params.dataset_tier)


def check_before_export(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions,
    *,
    thresholds: dict[str, Any] | None,
    request_id: str | None,
    curated: int,
) -> Any:
    """Everything `submit_or_join` would refuse, checked before a one-click flow seeds or exports, so that a refused
    start changes nothing: the base model, the trainer's own checks (parameters, memory plan, template,
    requestId) without queueing, and minCurated against the `curated` approved examples the export will hold.
    Returns the job `request_id` already names (a retry: the flow must not seed or export again), else None.
    """
    from .service import client
    from .service.ensure import ensure_trainer

    check_chat_template(settings, params)
    params = resolve_base(settings, params)
    ensure_trainer(settings)
    existing = client.check(settings, params, options, request_id, thresholds)
    if existing is None:
        check_min_curated(settings, options, curated)
        check_suite(settings, options)
    return existing


@dataclass(frozen=True)
class Started:
    """What a start from the API made: the job (service.jobs.Job); `joined`: a job already queued or running
    with these parameters on this data (`submit_or_join`), no new one; what was seeded and the export's
    summary, for the one-click starts that seed and export first (None when they did neither)."""

    job: Any
    joined: bool = False
    seeded: dict[str, int] | None = None
    export: export.ExportSummary | None = None


def quick_start(
    settings: Settings, profile_name: str, overrides: dict[str, Any], request_id: str | None = None
) -> Started:
    """The profile's parameters on its short schedule, on a fresh export of the store. A retry (a requestId
    that names a job of the same parameters) returns that job and exports nothing (summary None)."""
    from . import store
    from .profiles import load_profile

    profile = load_profile(settings, profile_name)
    params, options = profile.resolve(overrides, quick=True, for_run=True)
    counts = store.counts(settings)
    curated = counts["totals"]["curated_approved"]  # what the export will write to the tier
    existing = check_before_export(
        settings, params, options, thresholds=profile.gate, request_id=request_id, curated=curated
    )
    if existing is not None:  # a retry of an accepted request: its job, whatever the store holds now
        return Started(existing)
    _refuse_empty_tier(counts, params.dataset_tier)
    summary = export.export(settings, **export.kept_ratios(settings))
    job, joined = submit_or_join(settings, params, options, thresholds=profile.gate, request_id=request_id)
    return Started(job, joined, export=summary)


def _refuse_empty_tier(counts: dict[str, Any], tier: str) -> None:
    """CheckFailed, before a one-click start exports, when the store holds no approved sample of `tier` (a
    profile asking no minimum of curated examples; an example adapter on a store of memory items only): the
    job would fail with "add examples and export again", an export the one-click start makes itself."""
    from .status import approved_per_tier

    if approved_per_tier(counts["examples"], counts["memory"], counts["approved_twice"])[tier] == 0:
        raise CheckFailed(
            f"Not enough data: no approved samples for the {tier} tier yet: {prepare.get_samples(tier)}.",
            params={"check": "tier.no_samples", "tier": tier},
        )


def example_adapter(settings: Settings, adapter_name: str, request_id: str | None = None) -> Started:
    """An example adapter on the bundled dataset: seeded into an empty store, exported, submitted with the
    Luna profile's short schedule. Returns what it started (`Started`: the job, whether it joined one, what
    was seeded, None when the store had data, and the export summary); a retry of the same requestId returns
    its job and neither seeds nor exports."""
    from . import store
    from .profiles import load_profile

    profile = load_profile(settings, "luna")
    params, options = profile.resolve(
        {"adapterName": adapter_name, "datasetTier": "curated", "minCurated": 0}, quick=True, for_run=True
    )
    # first: a refused start leaves the store and the export untouched
    existing = check_before_export(settings, params, options, thresholds=profile.gate, request_id=request_id, curated=0)
    if existing is not None:
        return Started(existing)
    counts = store.counts(settings)
    seeded = None
    if counts["totals"]["examples"] == 0 and counts["totals"]["memory"] == 0:
        res = store.load_seed(settings)
        seeded = {"examplesAdded": res.examples_added, "memoryAdded": res.memory_added}
    else:  # the user's own data, never mixed with the bundled examples: it must hold some to train on
        _refuse_empty_tier(counts, params.dataset_tier)
    summary = export.export(settings, **export.kept_ratios(settings))
    job, joined = submit_or_join(settings, params, options, thresholds=profile.gate, request_id=request_id)
    return Started(job, joined, seeded, summary)


# --- auto / luna ----------------------------------------------------------------------------------


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
    options: FlowOptions = field(default_factory=FlowOptions)
    steps: list[StepOutcome] = field(default_factory=list)
    adapter: dict[str, Any] | None = None  # the registered version entry, when the lora step succeeded
    started: str = ""  # when the steps began and ended (UTC, as every record): a cron log of many days
    ended: str = ""
    # each report's (modification time in ns, inode; None: none there) as the steps began: the summary names
    # only those the run wrote (an earlier run's gate report would read as this one's). A report is written to a
    # new file moved in place, so a new one differs in its inode too, within one tick of the file clock.
    reports_before: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return len(self.steps) == len(STEPS) and all(s.ok for s in self.steps)


def run_flow(
    settings: Settings,
    params: LoraParams,
    options: FlowOptions,
    lora_step: LoraStep,
    *,
    adapter: str | None = None,
    gate_thresholds: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
    retrain: bool = False,
    ranks: int | None = None,
    profile: str | None = None,
    follow_job: Callable[[str], dict[str, Any]] | None = None,
) -> FlowResult:
    """Run the four steps in order; the first gates `adapter` (NAME or NAME@VERSION) when given, else the
    active adapter on the base model. Returns the result when all pass — including the eval gate on the newly
    trained version, when gating is on; raises CheckFailed (exit 1) naming the failed step and the fix, with
    the partial result in `details`. The lora step trains nothing when the adapter's newest version on the
    base was trained on this data with these parameters (`unchanged_version`), unless `retrain`. `ranks`: the
    processes the lora step trains in (1 in this process), else the trainer's, as prepare counts them. `profile`:
    the profile the parameters and thresholds came from, for the advice a failed step ends with. `follow_job`
    (through the trainer): follows a job to its end; a job of these parameters queued or running already (an
    earlier flow's, which stopped following it) is waited for instead of training the data a second time."""
    params = resolve_base(settings, params)
    if adapter:
        from .registry import parse_ref

        parse_ref(adapter)  # a malformed name is the caller's mistake (exit 2), not a failed gate step
    check_chat_template(settings, params)  # before the export changes anything
    if params.device == "cuda":  # prepare would refuse it, after the gate step rewrote its report
        from .models import resolve_device

        resolve_device(params.device)
    from .models import check_targets_of

    check_targets_of(params, settings)  # a mistyped layer name, likewise
    if params.quantize != "none":
        # The gate step loads PEFT before the lora step trains: PEFT must find bitsandbytes when it does
        # (a command starts without it; compat.with_bitsandbytes says why).
        with_bitsandbytes()
    # The steps write the gate's report, the export and prepare's report: a folder none of them can write is
    # said before the first step, not once the gate has evaluated for minutes on a real model.
    check_writable(
        [settings.reports_eval_dir, settings.training_dir, settings.reports_training_dir],
        f"run the flow for {params.adapter_name}",
    )
    result = FlowResult(params=params, options=options)

    def step(name: str, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> None:
        if on_step:
            on_step(name)
        started = time.monotonic()
        try:
            ok, summary, detail = fn()
        except UsageError as err:  # the caller's mistake, met in this step: its own sentence and exit 2
            result.steps.append(StepOutcome(name, False, round(time.monotonic() - started, 3), err.message, {}))
            raise UsageError(
                f"Step {name} failed: {err.message}", details=result, code=err.code, params=err.params
            ) from None
        except StorageError as err:  # a file or the database failed: its sentence says the fix, not the step's
            result.steps.append(
                StepOutcome(name, False, round(time.monotonic() - started, 3), err.message, {"code": err.code})
            )
            raise type(err)(
                f"Step {name} failed: {err.message}", details=result, code=err.code, params=err.params
            ) from None
        except LunaError as err:
            ok, summary, detail = False, err.message, {"code": err.code}
            if isinstance(err, NotFound):  # a name that is not there: its sentence says where to look, no more
                detail["fix"] = ""
        result.steps.append(StepOutcome(name, ok, round(time.monotonic() - started, 3), summary, detail))
        if not ok:
            fix = detail["fix"] if "fix" in detail else _FIX.get(name, "").format(name=params.adapter_name)
            raise CheckFailed(f"Step {name} failed: {summary.rstrip('.')}{f'; {fix}' if fix else ''}.", details=result)

    gated_first: list[evalgate.GateReport] = []  # the first step's decision, which the lora step may reuse

    def gate_current() -> tuple[bool, str, dict[str, Any]]:
        try:
            report = evalgate.eval_gate(
                settings,
                adapter=adapter,
                prefer=params.adapter_name,
                base_model=params.base_model,
                thresholds=gate_thresholds,
                chat_template=params.chat_template,
            )
        except (NotFound, DamagedFile):
            if adapter or (unjudged := _active_without_files()) is None:
                raise
            # Files lost (a partial restore, deleted by hand): "train it again" is what this flow is about to do.
            # The new version's gate judges it by the lost one's record, else against the base model.
            return True, f"{unjudged}: nothing to judge before this run, which trains a new version", {}
        gated_first.append(report)
        ref = report.candidate.get("ref", "base model")
        reasons = "; ".join(report.reasons)
        name = report.candidate.get("name")  # None when the base model was judged
        fix = _FIX["eval-gate"].format(name=name) if name else _base_fix(profile)
        return (
            report.passed,
            f"{ref} {'passed' if report.passed else 'failed'}" + (f": {reasons}" if reasons else ""),
            {"decision": report.decision, "path": report.path, "notes": report.notes}
            | ({} if report.passed else {"fix": fix}),
        )

    def _active_without_files() -> str | None:
        """The sentence "NAME@VERSION is active, but its files are …" for the version the first step would judge,
        when its files are missing or damaged; None when they are not (the step's error was of something else)."""
        entry = evalgate.select_candidate(settings, base_model=params.base_model, prefer=params.adapter_name)
        why = registry.unusable_files(settings, entry) if entry is not None else None
        return f"{entry.get('name')}@{entry.get('version')} is active, but {why}" if entry and why else None

    def export_data() -> tuple[bool, str, dict[str, Any]]:
        summary = export.export(settings, **export.kept_ratios(settings))
        tier = params.dataset_tier  # the tier this run trains on, not always the curated one
        counts = summary.counts[tier]
        kept = "".join(f"; kept your edited {name} as {aside}" for name, aside in summary.kept_aside)
        return (
            True,
            (
                f"{counts['total']} {tier} samples ({counts['train']} train, {counts['val']} val), "
                f"fingerprint {summary.fingerprint[:12]}{kept}"
            ),
            {"fingerprint": summary.fingerprint},
        )

    prepared: list[prepare.PrepareReport] = []

    def preflight() -> tuple[bool, str, dict[str, Any]]:
        report = prepare.prepare(settings, params, min_curated=options.min_curated)
        prepared.append(report)
        failed = [c for c in report.checks if c.severity == "fail"]
        # The checks of the report's status (failed ones, else those that warned): what to act on, without
        # running prepare again to learn which.
        said = failed or [c for c in report.checks if c.severity == "warn"]
        problems = [f"{c.id} ({c.count})" for c in said]
        text = f"status {report.status}" + (f": {', '.join(problems)}" if problems else "")
        detail: dict[str, Any] = {"status": report.status, "path": str(report.path)}
        samples = sum(report.dataset.get("counts", {}).values())
        empty = any(c.code == "check.empty_train.empty" for c in failed)
        # No examples to fix: where to get some (also where no minCurated is asked, as `auto` asks none).
        if any(c.code == "check.volume.none" for c in report.checks):
            detail["fix"] = f"{prepare.GET_EXAMPLES}, then run again"
        elif empty and samples == 0:
            detail["fix"] = f"{prepare.get_samples(report.tier)}, then run again"
        elif empty:  # the few samples there are fell into val/test: too few, not wrong
            detail["fix"] = (
                f"all {counted(samples, 'sample')} of the {report.tier} tier fell into val/test, so none is left to "
                f"train on: {prepare.get_samples(report.tier)}"
            )
        elif failed:
            # The volume check's sentence names the count required (from a profile the user may not know of);
            # other failed checks have examples to fix, which a lower minCurated would not change.
            volume = [c.message for c in failed if c.id == "volume"]
            fixes = (
                [f"fix the examples listed in reports/training/{PREPARE_REPORT}"] if len(failed) > len(volume) else []
            )
            detail["fix"] = "; ".join(volume + fixes)
        return report.status != "fail", text, detail

    def lora() -> tuple[bool, str, dict[str, Any]]:
        name = params.adapter_name
        if not retrain and (same := unchanged_version(settings, params, prepared[-1], ranks)) is not None:
            return repeat(same)
        run = params
        twin = None if retrain or follow_job is None else active_twin(settings, params, options, gate_thresholds)
        if twin is not None:
            # An earlier flow detached from it (`timeout`, a closed terminal): its lock is gone, its job is not.
            if on_step:
                on_step(f"waiting for job {twin.id} ({twin.status}), which trains {name} with these parameters")
            ended = follow_job(twin.id)
            # A repeat only when it trained this data: it may have read an export older than this flow's.
            if (same := unchanged_version(settings, params, prepared[-1], ranks)) is not None:
                return repeat(same)
            if ended.get("status") != "succeeded":  # cancelled or failed: its checkpoint, if any, is this run's
                run = params.model_copy(update={"resume": True})
        outcome = lora_step(settings, run, options)
        trained = outcome.get("adapter") or {}
        if outcome.get("status") != "succeeded" or not trained.get("version"):
            err = outcome.get("error") or {}
            look = "the run's log above" if not outcome.get("jobId") else "`lunatrain jobs list`"
            outcome |= {"fix": f"see {look}, then run again"}  # a local run has no job to look up
            return False, f"job {outcome.get('status')}: {err.get('message', 'no adapter registered')}", outcome
        result.adapter = registry.get_version(settings, name, trained["version"])
        ref = f"{name}@{trained['version']}"
        gate = outcome.get("gate") or {}
        if options.gate and not gate.get("passed"):  # registered, but the gate kept it inactive: the flow failed
            reasons = "; ".join(gate.get("reasons") or []) or gate.get("status") or "no gate outcome"
            return False, f"{ref} was trained but the eval gate refused it ({reasons})", outcome | refused(ref)
        return True, ref, outcome

    def refused(ref: str) -> dict[str, Any]:
        # on the run's base, which a --baseModel run may not have configured: the command names it then
        flag = registry.base_flag(settings, (result.adapter or {}).get("baseModel", {}).get("id"))
        return {
            "fix": f"`lunatrain adapters show {ref}` says why; change the data or the parameters and run again "
            f"(`lunatrain adapters activate {ref}{flag}` serves it anyway, and the gate step of later runs then "
            "judges it against the base model)"
        }

    def repeat(entry: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        """The step when nothing changed since `entry`: no run; the version it would repeat is named, and gated
        now when the gate has not passed it (never gated, a gate that failed to run, thresholds or a suite
        changed since it refused): a decision is made on it, not on a copy of it."""
        ref = f"{entry['name']}@{entry['version']}"
        said = f"{ref} was trained on this data with these parameters; not trained again (--retrain trains anyway)"
        detail: dict[str, Any] = {
            "status": "unchanged",
            "adapter": {"name": entry["name"], "version": entry["version"]},
        }
        fingerprint = (entry.get("baseModel") or {}).get("fingerprint")
        older = not registry.same_entry(entry, _on_base(settings, entry["name"], fingerprint)[-1])
        # An older version is what a run would have copied: a copy would be judged against the version served
        # now, and so is it, unless it is the one served. The newest keeps what the gate or the user decided.
        served = registry.same_entry(registry.active_version(settings, entry["name"], fingerprint or "?"), entry)
        if options.gate and (not (entry.get("gate") or {}).get("passed") or (older and not served)):
            first = gated_first[0] if gated_first else None
            if first and first.passed and first.candidate.get("ref") == ref and not entry.get("revision"):
                # The first step judged this very version (the active one, against the base model) a moment
                # ago, under the same thresholds: its decision is recorded instead of evaluating it again.
                report = first
                registry.record_gate(settings, entry["name"], entry["version"], report.gate_record())
            else:
                report = evalgate.gate_candidate(
                    settings,
                    entry["name"],
                    entry["version"],
                    revision=entry.get("revision"),
                    thresholds=gate_thresholds,
                )
            detail["gate"] = report.gate_record()
            entry = registry.get_version(settings, entry["name"], entry["version"])
            if not report.passed:
                result.adapter = entry
                return False, f"{said}; gated now, it is refused ({'; '.join(report.reasons)})", detail | refused(ref)
            said += "; gated now, it passed"
        result.adapter = entry
        return True, said, detail

    with one_flow_at_a_time(settings, on_step):
        result.started = now_iso()
        result.reports_before = {str(p): _modified(p) for p in _reports(settings)}
        try:
            step("eval-gate", gate_current)
            step("export", export_data)
            step("prepare", preflight)
            step("lora", lora)
        finally:
            result.ended = now_iso()
    return result


def active_twin(settings: Settings, params: LoraParams, options: FlowOptions, thresholds: dict[str, Any] | None) -> Any:
    """A job of the trainer queued or running with these very parameters (resume aside) on the same base
    (however its directory is spelled: the API keeps one relative to the data root), gated or not as this flow
    and under the same thresholds (its version's gate is then this flow's), else None; None too when the
    trainer cannot be asked (the lora step starts it and says what it must)."""
    from .models import local_dir
    from .service import client

    skip = {"resume", "base_model"}
    wanted, th = params.model_dump(mode="json", exclude=skip), evalgate.parse_thresholds(thresholds)
    here = local_dir(str(params.base_model), settings.home)
    try:
        jobs = [j for status in ("running", "queued") for j in client.list_jobs(settings, limit=100, status=status)]
    except LunaError:
        return None
    for job in jobs:
        try:
            theirs = job.lora_params()
            same_base = theirs.base_model == params.base_model or (
                here is not None and local_dir(str(theirs.base_model), settings.home) == here
            )
            if (
                same_base
                and theirs.model_dump(mode="json", exclude=skip) == wanted
                and job.options.gate == options.gate
                and evalgate.parse_thresholds(job.gate_thresholds) == th
            ):
                return job
        except (ValueError, LunaError):  # a job this release reads otherwise: not this flow's
            continue
    return None


def joinable_twin(
    settings: Settings, params: LoraParams, options: FlowOptions, thresholds: dict[str, Any] | None
) -> Any:
    """`active_twin`, when it trains the data exported now: a queued job reads the export current when it
    starts; a running one read the export current when it started, whose file of the tier must be the current
    one's (data exported differently since is trained again)."""
    twin = active_twin(settings, params, options, thresholds)
    if twin is None or twin.status == "queued":
        return twin
    try:
        tier = params.dataset_tier
        then = export.tier_sha_at(settings, tier, parse_iso(twin.started_at)) if twin.started_at else None
        return twin if then is not None and then == export.tier_sha_at(settings, tier) else None
    except (ValueError, LunaError):  # no time or no summary to tell by: train, as without a twin
        return None


FLOW_LOCK = "flow.lock"  # in data/: held by the flow running on the data root, naming its process


@contextlib.contextmanager
def one_flow_at_a_time(settings: Settings, on_step: Callable[[str], None] | None = None) -> Iterator[None]:
    """The flow's steps, one flow of a data root at a time: a cron run overlapping a manual one (or a timer
    catching up) trained the same data twice, to two versions with the same weights. A second flow waits,
    saying for whom, and then finds the data unchanged. A lock of the operating system (flock), so one that
    was killed holds nothing."""
    path = settings.data_dir / FLOW_LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")
    except OSError as exc:
        raise fsio.storage_error(exc, f"the lock file {path}") from exc
    with fh:
        holder = _flow_holder(fh)
        if holder is not None:  # held: said once, then waited for
            if on_step:
                on_step(f"waiting for the flow already running on this data root (pid {holder[0]}, since {holder[1]})")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {now_iso()}".encode())
            fh.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                fh.truncate(0)  # nobody's once it ends: a waiter never names a flow that is over
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_HOLDER_WAIT_S = 5.0


def _flow_holder(fh: Any) -> tuple[str, str] | None:
    """None when this process took the flow lock; else the pid and start of the flow holding it. A flow names
    itself just after it takes the lock: for that moment the file is empty, and it is read again (a bounded
    wait) until it names its holder, or the lock comes free."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        fh.seek(0)
        pid, _, since = fh.read().decode("utf-8", "replace").strip().partition(" ")
        if pid or time.monotonic() > deadline:
            return pid or "?", since or "?"
        time.sleep(0.05)


def unchanged_version(
    settings: Settings, params: LoraParams, prepared: prepare.PrepareReport, ranks: int | None = None
) -> dict[str, Any] | None:
    """The adapter's newest version on the base `prepared` checked that was trained on this very tier file with
    these parameters, tokenizer and chat template (its run's identity, `params.run_identity_of`) by as many
    processes: a run now would repeat it (the same seed gives the same weights), and add a version that differs
    from it in nothing. Not only the newest: data that went back to what an older version learned repeats that
    one. None when no version matches, or what one holds is unknown."""
    identity = run_identity_of(
        params,
        data=prepared.dataset.get("tierSha256"),
        base=prepared.base_fingerprint,
        tokenizer=prepared.template.get("tokenizerHash"),
        template=prepared.template.get("hash"),
    )
    key, trained = run_key(identity), trained_key(identity, prepared.dataset.get("trainedSha256"))
    for entry in reversed(_on_base(settings, params.adapter_name, prepared.base_fingerprint)):
        # The same trained content (new tags or ids change the file, not the weights); a version from before
        # trainedKey was recorded by its tier file; one from before runKey: trained again once.
        if entry.get("trainedKey") != trained and entry.get("runKey") != key:
            continue
        if entry.get("replaced"):  # an overwrite run the gate refused: its files are gone, a run makes it anew
            continue
        try:
            if registry.unusable_files(settings, entry):  # lost or damaged (a cleanup, a bad copy): made anew
                continue
        except LunaError:  # files linked out of the data root: not a version to stand on either
            continue
        if _ranks(settings, entry) == (ranks or prepared.estimate.get("ranks", 1)):  # the combined batch
            return entry
    return None


def _on_base(settings: Settings, name: str, fingerprint: str | None) -> list[dict[str, Any]]:
    """The adapter's versions trained on the base with `fingerprint`, oldest first (none when the registry
    cannot be read: the lora step says so)."""
    try:
        adapter = registry.list_adapters(settings).get(name)
    except LunaError:
        return []
    return [
        e for e in (adapter or {}).get("versions", []) if (e.get("baseModel") or {}).get("fingerprint") == fingerprint
    ]


def _ranks(settings: Settings, entry: dict[str, Any]) -> int | None:
    """How many processes trained `entry` (its training report; None when it cannot be read)."""
    try:
        report = read_json(registry.adapter_dir(settings, entry) / registry.REPORT_FILE, {})
        ranks = (report.get("dataParallel") or {}).get("ranks", 1)
    except (LunaError, AttributeError):
        return None
    return ranks if isinstance(ranks, int) else None


def versus_base(val: float, base: float) -> str:
    """How the adapter's val loss compares with the base model's, in words: lower is better, and a difference
    below 0.05% is no difference worth a sign."""
    change = (val - base) / base
    if abs(change) < 0.0005:
        return "about the same as the base model"
    return f"{abs(change):.1%} {'lower' if change < 0 else 'higher'} than the base model"


def _another_build(settings: Settings, trained_on: dict[str, Any]) -> str | None:
    """The words for a version trained on other weights under the configured base's name than this process
    resolves (a trainer reading another Hugging Face cache or model copy); None when they are the same."""
    from .models import resolve_base as resolve

    try:
        here = resolve(None, settings)
    except LunaError:
        return None
    if trained_on.get("id") != here.id or trained_on.get("fingerprint") in (None, here.fingerprint):
        return None
    revision = trained_on.get("revision")
    return (
        f"the build of {here.id} the trainer found" + (f", revision {revision[:12]}" if revision else "") + ", not "
        "the one this command resolves: give the trainer the same Hugging Face cache (HF_HOME) or model directory"
    )


def _reports(settings: Settings) -> tuple[Path, ...]:
    return (settings.lora_latest_report, settings.registry_file, settings.prepare_report, settings.eval_report)


def _modified(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:  # not there (or not readable): not one to look at
        return None
    return st.st_mtime_ns, st.st_ino


def summary_lines(settings: Settings, result: FlowResult) -> list[str]:
    """The closing summary a person reads: adapter, val loss vs base, gate, where the files are."""
    lines = [f"{'run':<10} {result.started} to {result.ended}"] if result.started else []
    lines += [f"{s.step:<10} {'ok' if s.ok else 'FAILED':<6} {s.seconds:7.1f}s  {s.summary}" for s in result.steps]
    # What the last gate's decision rests on besides its numbers (a golden case its template refuses, left out):
    # the first step's gate of a fresh data root ran before the export, whose "no export" is no news by then.
    gates = [g for s in result.steps if (g := s.detail if "notes" in s.detail else s.detail.get("gate")) is not None]
    exported = any(s.step == "export" and s.ok for s in result.steps)
    notes = [
        n
        for n in (gates[-1].get("notes") or [] if gates else [])
        if not (exported and getattr(n, "coded", {}).get("code") == "gate.no_export")
    ]
    lines += [f"note       {n}" for n in notes]
    entry = result.adapter
    if entry:
        metrics = entry.get("metrics") or {}
        val, base = metrics.get("valLoss"), metrics.get("baseValLoss")
        gate = entry.get("gate") or {}
        trained_on = entry.get("baseModel") or {}
        state = registry.activation_state(settings, entry, str(trained_on.get("fingerprint")))
        said = " (active)" if state["active"] else f" (not active: {state['reason']})"
        if other := _another_build(settings, trained_on):  # active or not: retraining here would do it again
            said = f" (active on {other})" if state["active"] else f" (not active; trained on {other})"
        lines.append(f"adapter    {entry['name']}@{entry['version']} on {trained_on.get('id')}{said}")
        if val is not None and base is not None:
            # Measured in training, on the base as it was held there (the gate loads it the same way).
            bits = (entry.get("quantization") or {}).get("bits")
            held = f", both on the {bits}-bit base the run trained with" if bits else ""
            lines.append(
                f"val loss   {val:.4f} vs base {base:.4f}" + (f" ({versus_base(val, base)}{held})" if base else "")
            )
        if gate:
            reasons = "; ".join(gate.get("reasons") or [])
            lines.append(f"gate       {gate.get('status')}" + (f": {reasons}" if reasons else ""))
        folder = settings.home / str(entry.get("path"))  # a registry path is relative to the data root
        files = ["adapter"] + [f for f in (registry.REPORT_FILE, registry.LOSS_CURVE_FILE) if (folder / f).is_file()]
        lines.append(f"files      {entry.get('path')}/ ({', '.join(files)})")

    # Only the reports this run wrote: a flow that failed early never wrote the later steps' reports, and an
    # earlier run's (yesterday's gate decision) would read as this one's. Told by each file's own time at the
    # start, not by clocks (a file's time is a coarser clock's, and a report of the moment before is not ours).
    def written(path: Path) -> bool:
        now = _modified(path)
        return now is not None and (str(path) not in result.reports_before or now != result.reports_before[str(path)])

    training = [
        p.name for p in (settings.lora_latest_report, settings.registry_file, settings.prepare_report) if written(p)
    ]
    # Within the data root, as `files` names the adapter's folder.
    home = settings.home
    where = ([f"{settings.reports_training_dir.relative_to(home)}/ ({', '.join(training)})"] if training else []) + (
        [str(settings.eval_report.relative_to(home))] if written(settings.eval_report) else []
    )
    if where:
        lines.append(f"reports    {', '.join(where)}")
    return lines
