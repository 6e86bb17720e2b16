"""Eval gate (the guide's `eval:gate`): evaluate a candidate on the eval suite and decide pass or fail.

Candidate: `--adapter NAME@VERSION` (or NAME: its version active on the configured base model), else the
adapter active on the configured base model (activation is per adapter name and base model; with several,
luna-adapter, else an error naming `--adapter` and `lunatrain adapters deactivate`), else the base model
itself. The flows name the adapter they train (`prefer`): its active version, else the base model.
Evaluation:

- golden cases from the eval suite (`evalsuite`: data/eval/*.jsonl, the shipped Luna suite copied there
  when the folder has none): greedy generation through the chat template up to `maxNewTokens`, then checks;
- loss (mean per trained token) on the val and test splits of the export, for the candidate and for the
  base model (adapter switched off) on the same tokens.

Decision (thresholds: `GateThresholds`; a profile's [gate] table sets them): fail when the golden pass
rate is below `min_golden_pass_rate` (absolute, for real models), when val or test loss exceeds
`max_val_loss_ratio_vs_base` x the base model's, or when the candidate regresses against the baseline —
the golden pass rate drops by more than `max_golden_pass_rate_drop`, or a loss rises by more than
`max_loss_regression` (relative). Baseline: the active version of the candidate's adapter on its base (its
recorded gate metrics when they were measured on the same suite, data, base and length, else evaluated
now), else the base model; the base model too when the candidate is that active version itself. On the
built-in random-weight model only the relative rules mean anything, hence the absolute minimum defaults to 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from .errors import LISTED_PROBLEMS, CheckFailed, Conflict, DamagedFile, LunaError, NotFound, UsageError, some
from .evalsuite import (
    CHECK_TYPES,
    BoundedSearch,
    EvalCase,
    EvalCheck,
    ensure_suite,
    load_suite,
    parse_suite_file,
    suite_hash,
)
from .fsio import atomic_write_json, check_writable, file_lock, read_json
from .messages import Note, coded, counted
from .params import FewKeys, format_validation_error, refuse_twice
from .settings import EVAL_REPORT, Settings
from .tokens import CACHE_FORMAT
from .wire import finite, now_iso

log = logging.getLogger(__name__)

__all__ = [  # the suite's names are re-exported: callers need only this module
    "CHECK_TYPES",
    "EvalCase",
    "EvalCheck",
    "GateReport",
    "GateThresholds",
    "ensure_suite",
    "eval_gate",
    "gate_candidate",
    "judge",
    "last_report",
    "load_suite",
    "parse_suite_file",
    "parse_thresholds",
    "select_candidate",
    "suite_hash",
]

GATE_FORMAT = "lunatrain-eval-gate/1"
DEFAULT_TIER = "curated"
GEN_BATCH = 32  # golden cases generated together


# --- thresholds ---------------------------------------------------------------------------------


class GateThresholds(FewKeys):
    """Gate thresholds; snake_case or camelCase keys (a profile's [gate] table), unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )

    min_golden_pass_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="lowest golden pass rate, 0 to 1 (an absolute floor, for real models)"
    )
    max_golden_pass_rate_drop: float = Field(
        default=0.0, ge=0.0, le=1.0, description="largest drop of the golden pass rate against the baseline, 0 to 1"
    )
    max_val_loss_ratio_vs_base: float = Field(
        default=1.0, gt=0.0, le=100.0, description="largest val or test loss as a multiple of the base model's"
    )
    max_loss_regression: float = Field(
        default=0.02,
        ge=0.0,
        le=10.0,
        description="largest relative rise of val or test loss against the baseline, a fraction (0.02: 2%)",
    )

    @field_validator("*")
    @classmethod
    def _no_negative_zero(cls, value: float) -> float:
        return value + 0.0  # -0.0 passes `ge=0` and would be said as "allowed drop -0"


def parse_thresholds(data: dict[str, Any] | GateThresholds | None, *, strict: bool = False) -> GateThresholds:
    """`strict`: values as a profile's TOML typed them (true or "0.5" where a number belongs is a mistake there;
    a flag's text is converted)."""
    if isinstance(data, GateThresholds):
        return data
    refuse_twice(GateThresholds, data or {})
    try:
        return GateThresholds.model_validate(data or {}, strict=strict or None)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, "gate thresholds", "unknown threshold")) from None


# --- evaluating models --------------------------------------------------------------------------


def _unloadable(exc: DamagedFile | Conflict) -> str | None:
    """Why an adapter's files cannot be attached, in a few words (the caller names the adapter), or None for
    a conflict that is not about its files."""
    if isinstance(exc, DamagedFile):
        return exc.why
    return "its LoRA weights do not fit this base model" if exc.code == "adapter.does_not_fit" else None


class _Evaluator:
    """One loaded base model with the adapters under test attached by name; `use(None)` is the base."""

    def __init__(
        self,
        settings: Settings,
        base: Any,
        adapters: dict[str, Path],
        chat_template: str | None = None,
        optional: Collection[str] = (),
        quantize: str = "none",
    ) -> None:
        """`optional`: adapters (not the first) whose files may fail to load; each one that does is left out,
        with the reason in `self.unloadable`. `quantize`: the base loaded in 4 or 8 bits, as a QLoRA run
        trained on it (`_quantization`)."""
        from . import models

        self.unloadable: dict[str, str] = {}
        self.device = models.resolve_device("auto")
        # The candidate's own tokenizer and template (what it was trained with); the base model's otherwise.
        if "candidate" in adapters:
            self.tokenizer = models.load_adapter_tokenizer(adapters["candidate"], base, settings)
        else:
            self.tokenizer = models.load_tokenizer(base, settings, chat_template)
        # in the dtype training computes in (bfloat16 on a GPU that has it): float32 would need twice the
        # memory of the run it judges, and more than a card that trained the model holds
        model = models.load_model(base, settings, self.device, models.compute_dtype(self.device), quantize=quantize)
        self.peft = bool(adapters)
        if adapters:
            from peft import PeftModel

            from . import registry
            from .compat import peft_wrapping

            items = list(adapters.items())
            with peft_wrapping(), registry.loading(settings, items[0][1]):
                model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0], is_trainable=False)
            for name, path in items[1:]:
                try:
                    with peft_wrapping(), registry.loading(settings, path):
                        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                except (DamagedFile, Conflict) as exc:
                    if name not in optional or not _unloadable(exc):
                        raise
                    self.unloadable[name] = _unloadable(exc)
                    if name in model.peft_config:  # injected before its weights failed to load: never used
                        model.delete_adapter(name)
        model.eval()
        self.model = model
        self._base, self._settings = base, settings
        self.stop_ids = self._stops(self.tokenizer)
        self._own: dict[str, tuple[Any, list[int]]] = {}  # `adopt`: adapters that answer in their own template

    def adopt(self, name: str, path: Path, cases: list[EvalCase]) -> str | None:
        """Let attached adapter `name` (not the candidate: the active version, as baseline) answer in the
        tokenizer and template it was trained with, as it is served; judged in the candidate's template it
        would be measured on prompts it never saw. Why it cannot judge (its tokenizer cannot be loaded, or its
        template refuses a case the candidate's takes), else None."""
        from . import models

        try:
            own = models.load_adapter_tokenizer(path, self._base, self._settings)
        except (DamagedFile, UsageError) as exc:
            return f"has a tokenizer that cannot be loaded ({exc.message.rstrip('.')})"
        for case in cases:
            try:
                own.apply_chat_template(case.messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja2's raise_exception, as `renderable` meets it
                return f"answers in a chat template that refuses case {case.id!r} ({exc})"
        self._own[name] = (own, self._stops(own))
        return None

    def _stops(self, tokenizer: Any) -> list[int]:
        """Generation stops on the template's turn terminator, as training taught, and on the model's eos ids."""
        from . import models

        stops = set(models.turn_terminator(tokenizer, self._base).stop_ids)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return sorted(stops)

    def tokenizer_of(self, adapter: str | None) -> Any:
        return self._own[adapter][0] if adapter in self._own else self.tokenizer

    @contextlib.contextmanager
    def use(self, adapter: str | None):
        from .models import cpu_threads_for

        shared = self.tokenizer, self.stop_ids
        if adapter in self._own:
            self.tokenizer, self.stop_ids = self._own[adapter]
        try:
            with cpu_threads_for(self.model, self.device):
                if adapter is None and self.peft:
                    with self.model.disable_adapter():
                        yield
                else:
                    if adapter is not None:
                        self.model.set_adapter(adapter)
                    yield
        finally:
            self.tokenizer, self.stop_ids = shared

    def _shown(self, source: str) -> str:
        """A case's `file:line`, its file relative to the data root (as every path in the reports): the report
        stays true when the root moves."""
        path, _, line = source.rpartition(":")
        return f"{self._settings.shown(Path(path))}:{line}" if path else source

    def golden(self, cases: list[EvalCase]) -> list[dict[str, Any]]:
        """Greedy answers to every case, batched (left-padded) per token limit: one forward per new token
        for the whole group instead of one per case."""
        outputs: dict[str, tuple[str, bool, int]] = {}
        groups: dict[int, list[EvalCase]] = {}
        for case in cases:
            groups.setdefault(case.max_new_tokens, []).append(case)
        for limit, group in sorted(groups.items()):
            for k in range(0, len(group), GEN_BATCH):
                outputs |= self._generate(group[k : k + GEN_BATCH], limit)
        results = []
        with BoundedSearch() as search:  # one child for every regex check of the run
            for case in cases:
                output, stopped, n_new = outputs[case.id]
                checks = [c.outcome(output, stopped, search) for c in case.checks]
                results.append(
                    {
                        "id": case.id,
                        "source": self._shown(case.source),
                        "prompt": case.messages[-1]["content"],
                        "output": output,
                        "stopped": stopped,
                        "newTokens": n_new,
                        "checks": checks,
                        "passed": all(c["passed"] for c in checks),
                    }
                )
        return results

    def renderable(self, cases: list[EvalCase]) -> tuple[list[EvalCase], list[str]]:
        """The cases the chat template takes, and a note for each one left out because the template refuses
        its system message while taking the rest of it: Gemma 2's and early Mistral templates take no system
        turn, and the shipped suite has a case with one (the other cases still judge). A case refused for
        anything else, or every case, ends the gate as before (change the case or the template)."""
        from .tokens import first_special_token

        kept, notes = [], []
        refused: list[str] = []  # left out with a note: the gate's end only when no case is left
        fatal: list[str] = []  # no run can judge these: every one named at once, as the suite's own mistakes
        for case in cases:
            # A special token of this model written into a case (`<|im_end|>`) would be read as the control token
            # itself: the case would judge an answer to turns no user can send (chat refuses such a message).
            if (found := first_special_token(self.tokenizer, case.messages)) is not None:
                i, token = found[0] + 1, found[1]
                said = (
                    f"message {i} holds the special token {token!r}, which the model would read as a control "
                    "token, not as text (chat refuses it)"
                )
                refused.append(f"{case.source}: case {case.id!r}: {said}; remove it.")
                shown = self._shown(case.source)  # as the report's cases name it
                notes.append(
                    Note(
                        "gate.case_special_token",
                        f"case {case.id!r} ({shown}) was left out: {said}",
                        case=case.id,
                        source=shown,
                        token=token,
                        message=i,
                    )
                )
                continue
            try:
                self._fits(case, self._render(case))
            except UsageError as err:
                without = [m for m in case.messages if m["role"] != "system"]
                # too long for the model (no cause): no system message to leave out helps
                if err.__cause__ is None or len(without) == len(case.messages) or not self._renders(without):
                    fatal.append(err.message)
                    continue
                refused.append(err.message)
                shown = self._shown(case.source)
                notes.append(
                    Note(
                        "gate.case_left_out",
                        f"case {case.id!r} ({shown}) was left out: the chat template refuses its system "
                        f"message ({err.__cause__})",
                        case=case.id,
                        source=shown,
                        why=str(err.__cause__),
                    )
                )
                continue
            kept.append(case)
        for problems in (fatal, [] if kept else refused):
            if len(problems) == 1:
                raise UsageError(problems[0])
            if problems:
                raise UsageError(
                    f"The eval suite has {counted(len(problems), 'problem')} with this model: {some(problems)}.",
                    details=problems[:LISTED_PROBLEMS],
                    params={"count": len(problems)},
                )
        return kept, notes

    def _fits(self, case: EvalCase, text: str) -> None:
        """The case's prompt and its answer fit the model's context: past it a model with learned positions
        fails and one with rotary positions answers from places it never trained, and a long prompt kept
        the gate busy for hours."""
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        if not limit:
            return
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n + case.max_new_tokens > limit:
            raise UsageError(
                f"{case.source}: case {case.id!r} has a prompt of {n} tokens; with maxNewTokens "
                f"{case.max_new_tokens} that is over the model's context of {limit} tokens; shorten the case or "
                "lower its maxNewTokens."
            )

    def _renders(self, messages: list[dict[str, str]]) -> bool:
        try:
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # refused for another reason too
            return False
        return True

    def _render(self, case: EvalCase) -> str:
        try:
            return self.tokenizer.apply_chat_template(case.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates refuse what their model never saw (jinja2's raise_exception)
            raise UsageError(
                f"{case.source}: the chat template refuses case {case.id!r} ({exc}); change the case or the template."
            ) from exc

    def _generate(self, cases: list[EvalCase], limit: int) -> dict[str, tuple[str, bool, int]]:
        import torch

        tok = self.tokenizer
        texts = [self._render(c) for c in cases]
        side = tok.padding_side
        tok.padding_side = "left"  # answers start right after each prompt
        try:
            enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.device)
        finally:
            tok.padding_side = side
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=limit,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=tok.pad_token_id,
            )
        result = {}
        for case, row in zip(cases, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            new = row if end is None else row[:end]
            # keep every other special token in the text: a leaked <|im_start|> must be visible to checks
            result[case.id] = (
                tok.decode(new, skip_special_tokens=False),
                end is not None,
                len(new) + (end is not None),
            )
        return result

    def losses(self, tokenized: Any) -> dict[str, float | None]:
        """Mean loss per trained token on the val and test splits (None for an empty split)."""
        import torch
        import torch.nn.functional as F

        from .tokens import make_batch
        from .train import forward_supervised

        out: dict[str, float | None] = {}
        vocab = _vocabulary(self.model, self.tokenizer)
        for split in ("val", "test"):
            samples = [e for e in tokenized.splits.get(split, []) if e.n_supervised]
            total, count = 0.0, 0
            with torch.no_grad():
                for group in _bounded(samples, vocab):
                    batch = make_batch(group, tokenized.max_seq_length, self.tokenizer.pad_token_id)
                    logits, targets = forward_supervised(self.model, batch, self.device)
                    total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
                    count += int(targets.numel())
            out[split] = total / count if count else None
        return out


# The float32 logits a loss pass holds at once (supervised positions x vocabulary: 1 GiB; the pass peaks at a
# few times that, with the model's own logits and the log-softmax). Eight samples of 2,048 answer tokens over a
# 128k vocabulary would be 8 GiB of them, on a card that trained with a micro-batch of one.
GATE_LOGITS = 1 << 28


def _bounded(samples: list[Any], vocab: int) -> Iterator[list[Any]]:
    """`samples` in passes of at most eight, each within GATE_LOGITS (a sample beyond it alone)."""
    group: list[Any] = []
    supervised = 0
    for sample in samples:
        if group and (len(group) == 8 or (supervised + sample.n_supervised) * vocab > GATE_LOGITS):
            yield group
            group, supervised = [], 0
        group.append(sample)
        supervised += sample.n_supervised
    if group:
        yield group


def _vocabulary(model: Any, tokenizer: Any) -> int:
    """The width of the model's logits (its output layer; the tokenizer's size where that cannot be read)."""
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, TypeError, IndexError):
        return len(tokenizer)


def _golden_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    checks = [c for r in results for c in r["checks"]]
    passed = sum(1 for r in results if r["passed"])
    return {
        "goldenPassed": passed,
        "goldenTotal": len(results),
        "goldenPassRate": passed / len(results) if results else 0.0,
        "checksPassed": sum(1 for c in checks if c["passed"]),
        "checksTotal": len(checks),
        "stoppedRate": sum(1 for r in results if r["stopped"]) / len(results) if results else 0.0,
    }


# --- the gate -----------------------------------------------------------------------------------


# The failed golden cases a version's gate record names (the report has them all).
FAILED_CASES_KEPT = 10


@dataclass
class GateReport:
    decision: str  # pass | fail
    reasons: list[str]
    candidate: dict[str, Any]
    baseline: dict[str, Any]
    metrics: dict[str, Any]
    base_metrics: dict[str, Any]
    thresholds: dict[str, Any]
    context: dict[str, Any]
    cases: list[dict[str, Any]]
    created: str
    notes: list[str] = field(default_factory=list)  # Notes: each carries its code (noteCodes)
    reason_codes: list[dict[str, Any]] = field(default_factory=list)  # `reasons` as {code, params}
    promoted: bool | None = None  # gate_candidate only
    path: str = ""
    # The registry entry of the active version it was judged against (None: the base model); never written:
    # gate_candidate promotes only while that is still the active one.
    judged_against: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.decision == "pass"

    @property
    def note_codes(self) -> list[dict[str, Any] | None]:
        """`notes` as {code, params}, one for each (None for a plain sentence)."""
        return [getattr(n, "coded", None) for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        return finite(
            {
                "format": GATE_FORMAT,
                "decision": self.decision,
                "passed": self.passed,
                "reasons": self.reasons,
                "reasonCodes": self.reason_codes,
                "candidate": self.candidate,
                "baseline": self.baseline,
                "metrics": self.metrics,
                "baseMetrics": self.base_metrics,
                "thresholds": self.thresholds,
                "context": self.context,
                "cases": self.cases,
                "created": self.created,
                "notes": self.notes,
                "noteCodes": self.note_codes,
                "promoted": self.promoted,
            }
        )

    def gate_record(self) -> dict[str, Any]:
        """What the registry keeps on the version (and what a later gate compares against)."""
        failed = self.failed_cases()
        return finite(
            {
                "status": "passed" if self.passed else "failed",
                "passed": self.passed,
                "reasons": self.reasons,
                "reasonCodes": self.reason_codes,
                "at": self.created,
                "metrics": self.metrics,
                "baseMetrics": self.base_metrics,
                "context": self.context,
                "baseline": self.baseline.get("ref"),
                "promoted": self.promoted,
                "thresholds": self.thresholds,
                "notes": self.notes,  # what the decision rests on besides the numbers (a case left out)
                "noteCodes": self.note_codes,
                # which cases to look at: those the baseline passed first (what a lower pass rate rests on)
                "failedCases": failed[:FAILED_CASES_KEPT],
                "failedCaseCount": len(failed),
                # every failed case's id: a later gate judged against this record knows which cases its version
                # passed, however many more than the ten above it failed (`recorded_cases`)
                "failedCaseIds": [c["id"] for c in failed],
            }
        )

    def failed_cases(self) -> list[dict[str, Any]]:
        """The golden cases the candidate failed, those the baseline passed first: id, file:line, the checks
        failed, and whether the baseline passed it."""
        failed = sorted((c for c in self.cases if not c["passed"]), key=lambda c: c.get("baselinePassed") is not True)
        return [
            {
                "id": c["id"],
                "source": c["source"],
                "checks": [k["type"] for k in c["checks"] if not k["passed"]],
                "baselinePassed": c.get("baselinePassed"),
            }
            for c in failed
        ]

    def raise_on_fail(self) -> GateReport:
        if not self.passed:
            raise CheckFailed(
                f"Eval gate failed for {self.candidate['ref']}: "
                + "; ".join(self.reasons)
                + f" (see {self.path or EVAL_REPORT})."
            )
        return self


def recorded_cases(record: dict[str, Any], ids: list[str]) -> dict[str, bool | None]:
    """Which of the cases `ids` a gate record's version passed, as far as the record tells (its suite is this
    one: `_comparable`): the cases it names as failed did not; when it names every case it failed (all their ids
    in `failedCaseIds`, or at most FAILED_CASES_KEPT failed), it passed all others; else they are unknown (None). Without this a candidate judged
    against a record had no case marked as the baseline's pass, so its kept failures were the first in file
    order rather than its regressions."""
    listed = record.get("failedCases")
    failed = {c.get("id") for c in listed if isinstance(c, dict)} if isinstance(listed, list) else set()
    complete = isinstance(listed, list) and record.get("failedCaseCount") == len(failed)
    every = record.get("failedCaseIds")  # a record of a release before it lacks them: the ten above tell what they can
    if (
        isinstance(every, list)
        and all(isinstance(i, str) for i in every)
        and record.get("failedCaseCount") == len(set(every))
    ):
        failed, complete = set(every), True
    return {i: False if i in failed else (True if complete else None) for i in ids}


def eval_gate(
    settings: Settings,
    *,
    adapter: str | None = None,
    base_model: str | None = None,
    thresholds: dict[str, Any] | GateThresholds | None = None,
    prefer: str | None = None,
    chat_template: str | None = None,
) -> GateReport:
    """Evaluate an adapter and write reports/eval/eval-gate-latest.json. The candidate: `adapter`
    (NAME@VERSION, or NAME: its version active on the base model); else `prefer`'s active version on the
    base model, else the base model itself (the flows pass the adapter they train); else the one adapter
    active on the base model (luna-adapter when several are), else the base model. The base model is
    `base_model` or the configured one. `chat_template` (a template name) is for a base model without one;
    an adapter always brings the template it was trained with. Returns the report whatever the decision;
    `report.raise_on_fail()` turns a failed gate into CheckFailed."""
    th = parse_thresholds(thresholds)
    notes: list[str] = []
    entry = select_candidate(settings, adapter=adapter, base_model=base_model, prefer=prefer, notes=notes)
    if entry is not None:
        notes += _other_base(settings, entry, base_model)
    # Said before the models load and every case is asked (minutes on a real model), not once the decision
    # could not be written and was lost.
    check_writable([settings.reports_eval_dir], "run the eval gate")
    # Chosen as the active version (no version named): judged against the base model, as read now; another
    # version activated while the models load does not become its baseline.
    as_active = entry is not None and not (adapter and "@" in adapter)
    report = _run(settings, entry, base_model, th, chat_template, as_active=as_active)
    report.notes[:0] = notes
    _write(settings, report)
    return report


def gate_candidate(
    settings: Settings,
    name: str,
    version: str,
    *,
    revision: int | None = None,
    promote: bool | Callable[[], bool] = True,
    thresholds: dict[str, Any] | GateThresholds | None = None,
    data: Any = None,
) -> GateReport:
    """The post-training gate: evaluate NAME@VERSION (of the overwrite slot: its `revision`) against the
    current active version (else the base); when it passes and `promote`, make it active. The outcome is
    recorded on the version either way. A staged overwrite revision takes the slot only when it passes and
    `promote`. `promote` may be asked once the evaluation is done (a job cancelled meanwhile: False). `data`
    (an export.TierData): the tier the run read, measured instead of the current export, which an export
    that finished while the run trained may have split otherwise (its val samples then trained on)."""

    th = parse_thresholds(thresholds)
    # One gate of an adapter at a time on a data root (two `lora --local` runs at once, a job beside one): each
    # judges against what the one before it promoted, never both against the same old version, the later
    # promotion then displacing a version it was never compared with.
    with file_lock(settings.reports_training_dir / f".gate-{name}.lock"):
        return _gated(settings, name, version, revision, promote, th, data)


def _gated(
    settings: Settings,
    name: str,
    version: str,
    revision: int | None,
    promote: bool | Callable[[], bool],
    th: GateThresholds,
    data: Any = None,
) -> GateReport:
    from . import registry

    entry = (
        registry.get_revision(settings, name, revision) if revision else registry.get_version(settings, name, version)
    )
    if data is not None and data.fingerprint != entry.get("datasetFingerprint"):
        data = None  # not the version's own data (a caller's mistake): the current export, as `eval-gate` reads
    report = _run(settings, entry, None, th, data=data)
    report.promoted = False
    go = promote() if callable(promote) else promote
    if report.passed and not go:
        report.notes.append(Note("gate.cancelled", "not activated: the job was cancelled while the gate ran"))
    fingerprint = entry.get("baseModel", {}).get("fingerprint", "?")
    active_before = registry.active_version(settings, name, fingerprint)
    judged_against = report.judged_against
    unchanged = active_before is None if judged_against is None else registry.same_entry(active_before, judged_against)
    moved = not unchanged and not registry.same_entry(active_before, entry)
    staged = bool(entry.get("staged"))  # an overwrite revision not kept now is gone: only a new run brings it
    if report.passed and go and moved:
        # The active version changed by hand while this one was judged against another (`adapters activate`,
        # `deactivate`): the decision was about another pair, so it promotes nothing.
        report.notes.append(_moved(report, entry, active_before, staged))
        go = False
    current = (
        registry.get_revision(settings, name, entry["revision"])
        if entry.get("revision")
        else registry.get_version(settings, name, entry["version"])
    )
    if report.passed and go and current.get("stale"):
        # Examples it trained on were deleted while it trained or was judged: it is marked "retrain needed"
        # and is not served, as a run started a moment after the delete would have been refused.
        report.notes.append(
            Note(
                "gate.stale",
                "not activated: examples it was trained on were deleted meanwhile (retrain needed); `lunatrain "
                "export` and train again",
            )
        )
        go = False

    def unmoved(active: dict[str, Any] | None) -> bool:
        """Asked under the registry's lock as the slot is taken or the version activated: an activation by hand
        since the check above is not overridden by a version never compared with it."""
        return (
            (active is None and active_before is None)
            or registry.same_entry(active, active_before)
            or registry.same_entry(active, entry)
        )

    if staged:
        keep = report.passed and go
        try:
            entry = registry.settle_slot(
                settings, name, entry["revision"], keep=keep, replacing=unmoved if keep else None
            )
        except registry.ActiveMoved as err:  # not kept: the slot serves what it held
            report.notes.append(_moved(report, entry, err.active, staged))
            go = False
            entry = registry.get_revision(settings, name, entry["revision"])
    if report.passed and go and entry.get("replaced"):  # a newer run's revision took the slot meanwhile
        revision = entry.get("revision")
        report.notes.append(
            Note("gate.revision_gone", f"not kept: revision {revision} no longer exists", revision=revision)
        )
    elif report.passed and go:
        if registry.same_entry(active_before, entry):
            report.notes.append(Note("gate.already_active", "already active"))
        elif active_before is not None and active_before["version"] == entry["version"]:
            report.promoted = True  # the active slot now holds it
            ref, revision = f"{name}@{entry['version']}", active_before.get("revision")
            report.notes.append(
                Note("gate.replaced_revision", f"replaced {ref} revision {revision}", ref=ref, revision=revision)
            )
        else:
            report.promoted = True  # as recorded: the activation and the outcome are one registry write
            try:  # on the base it was trained on: a new base never takes the old base's adapter away
                registry.activate(
                    settings,
                    name,
                    entry["version"],
                    reason="eval gate passed",
                    own_base=True,
                    gate=report.gate_record(),
                    replacing=unmoved,
                )
                _write_decided(settings, report)
                return report
            except registry.ActiveMoved as err:  # a staged revision holds the slot by now: judge it again
                report.promoted = False
                report.notes.append(_moved(report, entry, err.active, False))
            except Conflict as err:  # e.g. a replaced revision
                report.promoted = False
                report.notes.append(Note("gate.not_activated", f"not activated: {err.message}", why=err.message))
    elif not report.passed:
        reasons = "; ".join(report.reasons)
        report.notes.append(Note("gate.stays_inactive", f"stays registered but inactive: {reasons}", reasons=reasons))
    registry.record_gate(settings, name, entry["version"], report.gate_record(), revision=entry.get("revision"))
    _write_decided(settings, report)
    return report


def _moved(report: GateReport, entry: dict[str, Any], active: dict[str, Any] | None, staged: bool) -> Note:
    """The note of a version not promoted because `active` (None: none) became the active version while it
    was judged against another; a staged overwrite revision is gone then, and only a new run brings it."""
    judged, ref = report.baseline.get("ref"), f"{entry['name']}@{entry['version']}"
    then = (
        f"to judge it against what is active now, `lunatrain eval-gate --adapter {ref}`, and if it passes "
        f"`lunatrain adapters activate {ref}`"
        if not staged
        else "train it again"
    )
    if active is None:
        return Note(
            "gate.baseline_gone" if not staged else "gate.baseline_gone_slot",
            f"not activated: it was judged against {judged}, which was deactivated meanwhile; {then}",
            judged=judged,
            ref=ref,
        )
    return Note(
        "gate.baseline_moved" if not staged else "gate.baseline_moved_slot",
        f"not activated: it was judged against {judged}, and {_ref(active, None)} became active meanwhile; {then}",
        judged=judged,
        active=_ref(active, None),
        ref=ref,
    )


def _write_decided(settings: Settings, report: GateReport) -> None:
    """The latest gate report, once the registry holds the decision: a report that cannot be written (a
    full disk) does not undo what the registry recorded; it is logged and noted on the report."""
    try:
        _write(settings, report)
    except (OSError, LunaError) as exc:
        said = exc.message if isinstance(exc, LunaError) else str(exc)
        log.warning("the gate decided and the registry recorded it, but its report was not written: %s", said)
        report.notes.append(Note("gate.report_not_written", f"its report was not written: {said}", why=said))


def last_report(settings: Settings) -> dict[str, Any] | None:
    try:
        return read_json(settings.eval_report)
    except ValueError:
        return None


def _write(settings: Settings, report: GateReport) -> None:
    path = settings.eval_report
    report.path = str(path)
    atomic_write_json(path, report.to_dict())


def _other_base(settings: Settings, entry: dict[str, Any], base_model: str | None) -> list[str]:
    """A note when the candidate was trained on another base than the configured one: it is judged on its
    own (the reference losses and the fingerprint its files were made for), which the reader may not expect
    of an adapter activated on the configured base with --force."""
    from . import registry

    try:
        configured = registry.configured_base(settings, base_model)
    except LunaError:  # gating a named version never needed the configured base: no note then
        return []
    trained_on = entry.get("baseModel") or {}
    if trained_on.get("fingerprint") == configured.fingerprint:
        return []
    ref, own = f"{entry['name']}@{entry['version']}", repr(trained_on.get("id"))
    if registry.same_entry(registry.active_version(settings, entry["name"], configured.fingerprint), entry):
        code, where = "gate.other_base_forced", f"is active on base model {configured.id!r} by --force, but was"
    else:
        code, where = "gate.other_base", f"is not for the configured base model {configured.id!r}: it was"
    text = f"{ref} {where} trained on {own}: it was gated on {own}, the base model it was trained on"
    return [Note(code, text, ref=ref, baseModel=configured.id, trainedOn=trained_on.get("id"))]


def select_candidate(
    settings: Settings,
    *,
    adapter: str | None = None,
    base_model: str | None = None,
    prefer: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any] | None:
    """The registry entry `eval_gate` evaluates (None: the base model); see `eval_gate`. Raises UsageError
    naming the way out when several adapters are active on the base model and none is named; when
    luna-adapter is chosen among several, `notes` gets a line naming the others."""
    from . import registry

    if adapter:
        name, version = registry.parse_ref(adapter)
        base = None if version else registry.configured_base(settings, base_model).fingerprint
        return registry.get_version(settings, name, version or "active", base=base)
    if prefer:
        return registry.active_version(settings, prefer, registry.configured_base(settings, base_model).fingerprint)
    return _active_for_base(settings, base_model, notes if notes is not None else [])


def _active_for_base(settings: Settings, base_model: str | None, notes: list[str]) -> dict[str, Any] | None:
    """The active adapter trained on the configured (or given) base model; None when there is none."""
    from . import registry

    base = registry.configured_base(settings, base_model)
    active = [a["entry"] for a in registry.list_active(settings, base.fingerprint)]
    if len(active) > 1:
        preferred = [e for e in active if e["name"] == "luna-adapter"]
        if not preferred:
            refs = [f"{e['name']}@{e['version']}" for e in active]
            raise UsageError(
                f"Several adapters are active on base model {base.id!r} ({', '.join(refs)}); gate one with "
                f"`lunatrain eval-gate --adapter {active[0]['name']}`, or deactivate the others with "
                f"`lunatrain adapters deactivate {active[-1]['name']}` (API: `adapter` in POST /assistant/training/"
                f"eval-gate, or POST /assistant/training/adapters/{active[-1]['name']}/deactivate).",
                code="gate.several_active",
                params={"adapters": refs, "baseModel": base.id},
            )
        refs = [f"{e['name']}@{e['version']}" for e in active]
        notes.append(
            Note(
                "gate.chose_luna_adapter",
                f"several adapters are active on base model {base.id!r} ({', '.join(refs)}): gated luna-adapter, "
                "the assistant's own; gate another with --adapter NAME",
                baseModel=base.id,
                adapters=refs,
            )
        )
        return preferred[0]
    return active[0] if active else None


def _ref(entry: dict[str, Any] | None, base: Any) -> str:
    return f"{entry['name']}@{entry['version']}" if entry else f"base:{base.id}"


def _run(
    settings: Settings,
    entry: dict[str, Any] | None,
    base_model: str | None,
    th: GateThresholds,
    chat_template: str | None = None,
    *,
    as_active: bool = False,
    data: Any = None,
) -> GateReport:
    """`as_active`: `entry` was chosen as the active version, so the base model is its baseline. `data`: the
    tier to measure losses on (gate_candidate), else the current export's."""
    from . import models, registry
    from .startup import import_training_stack

    notes: list[str] = []
    quantize = _quantization(entry, notes)  # before PEFT is imported: it looks for bitsandbytes once
    import_training_stack()  # in a command's own process: at the imports' least cost (startup.py)
    cases = load_suite(settings)
    if entry is not None:
        if entry.get("replaced"):
            raise Conflict(
                f"{entry['name']}@{entry['version']} revision {entry.get('revision')} was replaced and is gone."
            )
        trained_on = entry.get("baseModel", {})
        base = registry.trained_base(settings, entry, "gate it")
        if base.fingerprint != trained_on.get("fingerprint"):
            raise Conflict(
                f"{entry['name']}@{entry['version']} was trained on base model {trained_on.get('id')!r}, "
                "whose files have changed since (fingerprint differs); retrain it."
            )
        params = entry.get("params") or {}
        tier, max_len = entry.get("datasetTier", DEFAULT_TIER), int(params.get("maxSeqLength", 1024))
    else:
        base = models.resolve_base(base_model, settings)
        tier, max_len = DEFAULT_TIER, 1024
    # Never past the model's context: a model with learned positions fails there (the base judged alone at the
    # default length; a version trained before runs refused such samples).
    max_len = min(max_len, models.context_length(base) or max_len)

    # Baseline: the active version of the same adapter on the same base model. The active version itself (the
    # flow's first step, `eval-gate` without --adapter) is judged against the base model: against its own
    # record no regression could ever show, and a version activated after the gate refused it would "pass".
    baseline_entry = (
        registry.active_version(settings, entry["name"], base.fingerprint)
        if entry is not None and not as_active
        else None
    )
    if as_active or (baseline_entry is not None and registry.same_entry(baseline_entry, entry)):
        baseline_entry = None
        ref = _ref(entry, base)
        notes.append(
            Note(
                "gate.own_baseline",
                f"{ref} is the active version, so the base model is the baseline (not its own record)",
                ref=ref,
            )
        )

    adapters = {}
    if entry is not None:
        adapters["candidate"] = registry.readable_dir(settings, entry)
    unusable = None  # why the active version's files cannot judge
    if baseline_entry is not None and not registry.same_entry(baseline_entry, entry):
        # attached beside the candidate (adapter weights only); evaluated only if its record is not comparable.
        # An active version whose files are gone, damaged or of another base's shape cannot be the judge of
        # what replaces it: its record still can, and without one the base model judges (else no new version
        # could ever pass, and be served, and every retry would add one more version never judged).
        try:
            adapters["baseline"] = registry.readable_dir(settings, baseline_entry)
        except NotFound:
            unusable = "has no files"
        except DamagedFile as exc:
            unusable = f"cannot be loaded ({exc.why})"
    ev = _Evaluator(settings, base, adapters, chat_template, optional=("baseline",), quantize=quantize)
    cases, left_out = ev.renderable(cases)
    notes += left_out
    if "baseline" in ev.unloadable:
        del adapters["baseline"]
        unusable = f"cannot be loaded ({ev.unloadable['baseline']})"
    tokenized = _tokenized(settings, tier, ev.tokenizer, max_len, notes, data)
    context = {
        "format": GATE_FORMAT,
        "suite": suite_hash(cases),
        "tier": tier,
        "maxSeqLength": max_len,
        "data": _judged_data(tokenized),
        "base": base.fingerprint,
        "tokens": CACHE_FORMAT,  # which tokens carry labels: losses under another masking rule do not compare
    }
    if quantize != "none":  # losses on a quantized base compare only with losses on the same (records without
        context["quantize"] = quantize  # the key were measured in full precision)

    cand = "candidate" if entry is not None else None
    with ev.use(cand):
        results = ev.golden(cases)
        cand_losses = ev.losses(tokenized) if tokenized else {"val": None, "test": None}
    metrics = _golden_metrics(results) | {"valLoss": cand_losses["val"], "testLoss": cand_losses["test"]}
    with ev.use(None):
        base_losses = ev.losses(tokenized) if tokenized else {"val": None, "test": None}
    base_metrics: dict[str, Any] = {"valLoss": base_losses["val"], "testLoss": base_losses["test"]}

    baseline: dict[str, Any]
    baseline_cases = None
    # A record of an earlier release named the whole export's fingerprint as its data: the same data, then.
    also = {"data": tokenized.fingerprint} if tokenized else {}
    recorded = entry is not None and baseline_entry is not None and _comparable(baseline_entry, context, also)
    own_tokenized = None  # the baseline's val/test tokens in its own template, when it is evaluated
    if entry is not None and not recorded and "baseline" in adapters:
        unusable = ev.adopt("baseline", adapters["baseline"], cases)
        if unusable is None:
            own_tokenized, unusable = _own_tokenized(ev, tokenized, settings, tier, max_len, data)
    if entry is None:
        baseline = {"kind": "base", "ref": _ref(None, base), "source": "candidate itself", "metrics": metrics}
    elif recorded:
        baseline = {
            "kind": "adapter",
            "ref": _ref(baseline_entry, base),
            "revision": baseline_entry.get("revision"),
            "source": "recorded",
            "metrics": baseline_entry["gate"]["metrics"],
        }
        baseline_cases = recorded_cases(baseline_entry["gate"], [r["id"] for r in results])
    elif "baseline" in adapters and unusable is None:
        if keys := _record_differs(baseline_entry, context, also):  # measured again: why its record was not used
            ref, changed = _ref(baseline_entry, base), ", ".join(_CONTEXT_WORDS[key] for key in keys)
            notes.append(
                Note(
                    "gate.baseline_measured_again",
                    f"the active {ref} was measured again: its gate record was made on another {changed}",
                    ref=ref,
                    changed=changed,
                    changedKeys=keys,  # the dashboard says each part in its own language
                )
            )
        if quantize != "none" and (held := _trained_quantized(baseline_entry)) != quantize:
            trained, ref = "unquantized" if held == "none" else f"in {held}", _ref(baseline_entry, base)
            notes.append(
                Note(
                    "gate.baseline_quantized",
                    f"the active {ref}, trained {trained}, was measured on the base loaded in {quantize} as the "
                    "candidate trained, not as it is served",
                    ref=ref,
                    trained=trained,
                    quantize=quantize,
                )
            )
        with ev.use("baseline"):
            bl_results = ev.golden(cases)
            bl_losses = ev.losses(own_tokenized) if own_tokenized else {"val": None, "test": None}
        baseline_cases = {r["id"]: r["passed"] for r in bl_results}
        baseline = {
            "kind": "adapter",
            "ref": _ref(baseline_entry, base),
            "revision": baseline_entry.get("revision"),
            "source": "evaluated",
            "metrics": _golden_metrics(bl_results) | {"valLoss": bl_losses["val"], "testLoss": bl_losses["test"]},
        }
    else:
        if unusable:
            ref = _ref(baseline_entry, base)
            notes.append(
                Note(
                    "gate.baseline_unusable",
                    f"the active {ref} {unusable} and {'' if unusable.startswith('has ') else 'has '}no comparable "
                    "gate record, so the base model is the baseline",
                    ref=ref,
                    why=unusable,
                )
            )
        with ev.use(None):
            base_results = ev.golden(cases)
        baseline_cases = {r["id"]: r["passed"] for r in base_results}
        base_metrics |= _golden_metrics(base_results)
        baseline = {"kind": "base", "ref": _ref(None, base), "source": "evaluated", "metrics": base_metrics}
    if baseline_cases is not None:
        for r in results:
            r["baselinePassed"] = baseline_cases.get(r["id"])

    judged = judge(metrics, base_metrics, baseline, th, candidate_is_base=entry is None)
    if entry is not None and (unchanged := _no_change(_ref(entry, base), metrics, base_metrics)):
        notes.append(unchanged)
    measured_again = baseline["source"] == "evaluated" and baseline["kind"] == "adapter"
    for role, version in (("candidate", entry), ("baseline", baseline_entry if measured_again else None)):
        if version is not None and (seen := _trained_on_eval(settings, role, _ref(version, base), version, tokenized)):
            notes.append(seen)
    return GateReport(
        decision="fail" if judged else "pass",
        reasons=[text for text, _ in judged],
        reason_codes=[c for _, c in judged],
        candidate={
            "kind": "adapter" if entry else "base",
            "ref": _ref(entry, base),
            "name": entry["name"] if entry else None,
            "version": entry["version"] if entry else None,
            "revision": entry.get("revision") if entry else None,  # of the overwrite slot; repair checks it
            "baseModel": base.id,
            "baseFingerprint": base.fingerprint,
            "tier": tier,
            "device": ev.device,
            "quantize": quantize,
        },
        baseline=baseline,
        metrics=metrics,
        base_metrics=base_metrics,
        thresholds=th.model_dump(by_alias=True),  # as the flags, [gate] and the API spell them
        context=context,
        cases=results,
        created=now_iso(),
        notes=notes,
        judged_against=baseline_entry,
    )


def _own_tokenized(
    ev: _Evaluator, tokenized: Any, settings: Settings, tier: str, max_len: int, data: Any = None
) -> tuple[Any, str | None]:
    """The baseline's val/test tokens in its own template (the candidate's, when tokenizer and template are
    the same), and why they cannot be had: its template refuses an exported example."""
    from . import models
    from .tokens import TemplateRefused

    own = ev.tokenizer_of("baseline")
    if tokenized is None or (
        models.tokenizer_hash(own) == models.tokenizer_hash(ev.tokenizer)
        and models.template_hash(own) == models.template_hash(ev.tokenizer)
    ):
        return tokenized, None
    try:
        return _tokenized(settings, tier, own, max_len, [], data), None
    except TemplateRefused as exc:
        return None, f"answers in a chat template that refuses example {exc.record_id} ({exc.reason})"


def _trained_quantized(entry: dict[str, Any] | None) -> str:
    """How `entry`'s run held the base: "none", "4bit" or "8bit"."""
    return str(((entry or {}).get("params") or {}).get("quantize") or "none")


def _quantization(entry: dict[str, Any] | None, notes: list[str]) -> str:
    """How the gate loads the base: as the candidate trained on it. A QLoRA run is judged on the base it
    trained on, in the memory it trained in (a 13B model that trains in 4 bits on a 16 GB card needs 26 GB in
    bfloat16 before the gate evaluates anything). Where this process cannot quantize (no bitsandbytes, or
    PEFT loaded without it), in full precision, with a note."""
    quantize = _trained_quantized(entry)
    if quantize == "none":
        return quantize
    from .compat import with_bitsandbytes
    from .models import check_quantize_installed

    try:
        check_quantize_installed(quantize)
        with_bitsandbytes()
    except UsageError:
        why = "bitsandbytes is not installed here"
    except RuntimeError:
        why = "this process loaded PEFT without bitsandbytes"
    else:
        return quantize
    notes.append(
        Note(
            "gate.unquantized",
            f"the base model was loaded unquantized, not in {quantize} as the adapter trained ({why})",
            quantize=quantize,
            why=why,
        )
    )
    return "none"


def _trained_on_eval(settings: Settings, role: str, ref: str, entry: dict[str, Any], tokenized: Any) -> Note | None:
    """A note when val/test samples this gate measures `entry` on are in its training data (its
    train-hashes.txt): after the split ratios changed, a version measured again scores best on what it learned,
    and as the baseline it makes an honest candidate look like a regression. None when there are none, or its
    hashes cannot be read."""
    from .registry import TRAIN_HASHES_FILE, adapter_dir

    hashes = [s.hash for split in ("val", "test") for s in (tokenized.splits.get(split, []) if tokenized else [])]
    try:
        trained = set((adapter_dir(settings, entry) / TRAIN_HASHES_FILE).read_text(encoding="utf-8").split())
    except (OSError, LunaError):
        return None
    count = sum(h in trained for h in hashes if h)
    if not count:
        return None
    why = ", so the comparison favours it" if role == "baseline" else ""
    whose = "the active " if role == "baseline" else ""
    return Note(
        f"gate.{role}_trained_on_eval",
        f"{count} of the {len(hashes)} val/test samples are in the training data of {whose}{ref}: its losses on "
        f"them are lower than on data it never saw{why} (the split changed since it trained: the export's ratios?)",
        ref=ref,
        count=count,
        total=len(hashes),
    )


def _no_change(ref: str, metrics: dict[str, Any], base_metrics: dict[str, Any]) -> Note | None:
    """A note when the adapter's val and test losses are the base model's to float32's precision: a tie passes
    "not worse than the base", and such a version (a learning rate of ~0, a run of no step that learned) would
    become active without a word. None when a loss was not measured on either side or any differs."""
    splits = [s for s in ("val", "test") if None not in (metrics.get(f"{s}Loss"), base_metrics.get(f"{s}Loss"))]
    losses = [metrics[f"{s}Loss"] for s in splits]
    if not splits or any(
        not math.isclose(loss, base_metrics[f"{s}Loss"], rel_tol=1e-6) for s, loss in zip(splits, losses, strict=True)
    ):
        return None
    which, shown = "/".join(splits), f"{losses[0]:.4f}"
    return Note(
        "gate.no_change",
        f"{ref} changes no measured loss: its {which} loss is the base model's ({splits[0]} {shown}); its training "
        "changed nothing (its learning rate, steps or targets?)",
        ref=ref,
        splits=which,
        split=splits[0],
        loss=losses[0],
        shown={"loss": shown},
    )


def _tokenized(settings: Settings, tier: str, tokenizer: Any, max_len: int, notes: list[str], data: Any = None) -> Any:
    from .export import read_tier
    from .tokens import tokenize_tier

    try:
        data = data if data is not None else read_tier(settings, tier)
    except NotFound:
        notes.append(Note("gate.no_export", "no export: losses on val/test were not measured"))
        return None
    if not data.val and not data.test:
        notes.append(
            Note(
                "gate.no_eval_samples",
                f"the {tier} export has no val or test samples: losses were not measured",
                tier=tier,
            )
        )
        return None
    tokenized = tokenize_tier(settings, tier, tokenizer, max_len, data=data)
    # Samples whose answers all lie beyond maxSeqLength carry no label: a split of only those has no loss,
    # and the gate would rest on the golden cases alone without a word.
    cut = [
        s for s in ("val", "test") if tokenized.splits.get(s) and not any(e.n_supervised for e in tokenized.splits[s])
    ]
    if cut:
        one = len(cut) == 1
        notes.append(
            Note(
                "gate.eval_samples_cut",
                f"every {' and '.join(cut)} sample's answer lies beyond maxSeqLength {max_len}: "
                f"{'its loss was' if one else 'their losses were'} not measured",
                splits="/".join(cut),
                maxSeqLength=max_len,
            )
        )
    return tokenized


# What a gate record's context holds, in the words a note uses for each part that differs.
_CONTEXT_WORDS = {
    "suite": "golden suite (changed, or read otherwise by this release)",
    "data": "val/test data",
    "tier": "tier",
    "maxSeqLength": "maxSeqLength",
    "base": "build of the base model",
    "quantize": "quantization of the base",
    "format": "gate format",
    "tokens": "rule for which tokens carry labels",
}


def _judged_data(tokenized: Any) -> str | None:
    """What a gate's losses are measured on, for its record's context: the val and test records (by their
    content hashes, whatever template renders them: the template is the candidate's), not the whole export. A
    sample added to the train split alone changed the export's fingerprint, and the active version was measured
    again for nothing. The export's fingerprint where a record has no hash (a cache of an earlier release)."""
    if tokenized is None:
        return None
    samples = [(split, s.hash) for split in ("val", "test") for s in tokenized.splits.get(split, [])]
    if not all(h for _, h in samples):
        return tokenized.fingerprint
    return hashlib.sha256("".join(f"{split} {h}\n" for split, h in samples).encode()).hexdigest()


def _record_differs(
    entry: dict[str, Any] | None, context: dict[str, Any], also: dict[str, Any] | None = None
) -> list[str]:
    """The parts (`_CONTEXT_WORDS` keys) in which a version's gate record differs from this gate (none when it
    has no record to compare); `also`: values a part may have instead, as an earlier release recorded it."""
    gate = (entry or {}).get("gate") or {}
    recorded = gate.get("context")
    if not isinstance(recorded, dict) or not isinstance(gate.get("metrics"), dict):
        return []
    also = also or {}
    return [
        key
        for key in _CONTEXT_WORDS
        if recorded.get(key) != context.get(key) and (key not in also or recorded.get(key) != also[key])
    ]


def _comparable(entry: dict[str, Any], context: dict[str, Any], also: dict[str, Any] | None = None) -> bool:
    gate = entry.get("gate") or {}
    recorded = gate.get("context")
    return (
        isinstance(recorded, dict)
        and set(recorded) == set(context)
        and not _record_differs(entry, context, also)
        and isinstance(gate.get("metrics"), dict)
    )


def _apart(value: float, limit: float, digits: int, *, scale: float = 1.0, as_set: bool = False) -> tuple[str, str]:
    """`value` and `limit` (times `scale`) with `digits` decimals, or as many more as it takes to tell them
    apart: "0.47 is below the minimum 0.47" would not say why the gate refused. `as_set`: the limit as a
    user writes it ("0.93", "2", "0.9772236"), not with the value's decimals; never rounded, so that it is never
    shown onto or past a value it was broken by."""
    for d in range(digits, digits + 8):
        shown = f"{value * scale:.{d}f}", f"{limit * scale:.{d}f}"
        if shown[0] != shown[1]:
            return shown[0], _as_set(limit * scale) if as_set else shown[1]
    return repr(value * scale), repr(limit * scale)


def _as_set(limit: float) -> str:
    """A limit as it was set: 15 significant digits drop the noise of scaling (0.04696736 x 100 is
    4.696736000000001) and keep every digit a user writes."""
    return f"{limit:.15g}"


def judge(
    metrics: dict[str, Any],
    base_metrics: dict[str, Any],
    baseline: dict[str, Any],
    th: GateThresholds,
    *,
    candidate_is_base: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """Every failed rule as (English reason, {code, params} for a translated display); empty: pass. Also adds
    the loss ratios to `metrics`."""
    reasons: list[tuple[str, dict[str, Any]]] = []
    rate = metrics["goldenPassRate"]
    if rate < th.min_golden_pass_rate:
        shown_rate, shown_minimum = _apart(rate, th.min_golden_pass_rate, 2)
        reasons.append(
            (
                f"golden pass rate {shown_rate} is below the minimum {shown_minimum}",
                coded(
                    "gate.below_minimum",
                    rate=rate,
                    minimum=th.min_golden_pass_rate,
                    shown={"rate": shown_rate, "minimum": shown_minimum},
                ),
            )
        )
    for split in ("val", "test"):
        loss, base_loss = metrics.get(f"{split}Loss"), base_metrics.get(f"{split}Loss")
        if loss is None:
            continue
        if not math.isfinite(loss):
            reasons.append((f"{split} loss is {loss}", coded("gate.loss_not_finite", split=split, loss=str(loss))))
            continue
        if candidate_is_base or not base_loss:
            continue
        ratio = loss / base_loss
        metrics[f"{split}LossRatioVsBase"] = ratio
        if ratio > th.max_val_loss_ratio_vs_base:
            shown, allowed = _apart(ratio, th.max_val_loss_ratio_vs_base, 3, as_set=True)
            reasons.append(
                (
                    f"{split} loss {loss:.4f} is {shown} x the base model's {base_loss:.4f} (allowed {allowed})",
                    coded(
                        "gate.loss_vs_base",
                        split=split,
                        loss=loss,
                        ratio=ratio,
                        baseLoss=base_loss,
                        allowed=th.max_val_loss_ratio_vs_base,
                        shown={
                            "loss": f"{loss:.4f}",
                            "ratio": shown,
                            "baseLoss": f"{base_loss:.4f}",
                            "allowed": allowed,
                        },
                    ),
                )
            )
    if candidate_is_base or baseline.get("source") == "candidate itself":
        return reasons
    bl = baseline.get("metrics") or {}
    bl_rate = bl.get("goldenPassRate")
    # The overwrite slot's name is the candidate's own: the revision says which run it is measured against.
    against = baseline["ref"] + (f" revision {baseline['revision']}" if baseline.get("revision") else "")
    if bl_rate is not None and rate < bl_rate - th.max_golden_pass_rate_drop - 1e-9:
        shown_rate, shown_bl = _apart(rate, bl_rate, 2)  # "0.47 regresses against 0.47" would not say why
        drop = _as_set(th.max_golden_pass_rate_drop)
        reasons.append(
            (
                f"golden pass rate {shown_rate} regresses against {against} ({shown_bl}, allowed drop {drop})",
                coded(
                    "gate.pass_rate_regression",
                    rate=rate,
                    baseline=against,
                    baselineRate=bl_rate,
                    allowedDrop=th.max_golden_pass_rate_drop,
                    shown={"rate": shown_rate, "baselineRate": shown_bl, "allowedDrop": drop},
                ),
            )
        )
    if baseline.get("kind") == "adapter":  # against the base, the loss ratio rule above applies
        for split in ("val", "test"):
            loss, bl_loss = metrics.get(f"{split}Loss"), bl.get(f"{split}Loss")
            if loss is not None and bl_loss and math.isfinite(loss) and loss > bl_loss * (1 + th.max_loss_regression):
                rise, allowed = _apart(loss / bl_loss - 1, th.max_loss_regression, 0, scale=100, as_set=True)
                reasons.append(
                    (
                        f"{split} loss {loss:.4f} regresses against {against} ({bl_loss:.4f}: +{rise}%, allowed +{allowed}%)",
                        coded(
                            "gate.loss_regression",
                            split=split,
                            loss=loss,
                            baseline=against,
                            baselineLoss=bl_loss,
                            allowed=th.max_loss_regression,
                            allowedPercent=round(th.max_loss_regression * 100, 6),
                            risePercent=round((loss / bl_loss - 1) * 100, 6),
                            shown={
                                "loss": f"{loss:.4f}",
                                "baselineLoss": f"{bl_loss:.4f}",
                                "risePercent": rise,
                                "allowedPercent": allowed,
                            },
                        ),
                    )
                )
    return reasons
