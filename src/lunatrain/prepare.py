"""Prepare (the guide's `train:prepare`): a preflight over the exported tier before any LoRA job.

Every example of the tier is rendered with the base model's own chat template and tokenized with its own
tokenizer (through `tokens.tokenize_tier`, so the tokenized cache that training reads is filled here), and
then checked. All checks always run and are all reported; the status is `fail` when any check has a
failing finding, `warn` when any warns, else `ok`. The report goes to reports/training/prepare-latest.json.

Checks (id: severity when something is found):

- export_summary (fail): a data file is missing, or its sha256 / record count differs from the summary
  (edited by hand, or a torn copy), or a file of the tier was saved over its link in data/training (an
  editor, `sed -i`: the run would not train what the person sees there); the fingerprint is then recomputed from the files as they are, so the
  tokenized cache never serves tokens of other data.
- malformed_record (fail): a line that is not JSON or has no usable `messages`.
- export_stale (warn): the database changed since the export (store revision differs); fail when records of
  the export were deleted from it or rejected since (a run refuses to train on them).
- volume (fail): approved curated examples (the curated file's chat records) < minCurated; empty_train (fail): nothing to train on.
- empty_response (fail), trivial_response (warn, fewer than 2 letters or digits).
- duplicate_exact (warn): the same hash twice within a split; duplicate_across_splits (fail): one hash in
  two splits (val/test would measure memorisation); duplicate_normalized (warn): different hashes, same
  text after case/whitespace/punctuation folding (those in another split than their twin named first); conflicting_answers (warn): samples that ask the same
  (system prompt and turns before the last answer, folded the same way) and answer differently, one per
  distinct answer: a fact taught two ways is learned as either, or as a blend; exchange_across_splits (warn):
  val/test samples holding an exchange (a prompt and its trained answer) that a train sample of another
  conversation trains.
- truncated (warn): longer than maxSeqLength (its oldest exchanges left out; an exchange longer than that cut
  at its end, see tokens.encode_chat); no_trained_tokens (warn; fail when no train sample has any).
- terminator (info): the turn terminator the chat template emits after each answer, and whether the base
  model's generation_config.json stops on it (adapters and merged models ship one that does).
- eot_not_trained (fail): an assistant turn whose trained span does not end with the turn terminator, so
  the model would never learn to stop (samples cut at their end are left to the truncated check).
- template_refused (fail, only when found): examples the chat template raises on (e.g. roles that do not
  alternate for an [INST] template), all of them; the other checks run on the rest.
- special_tokens_in_content (fail): a literal special token (e.g. `<|im_end|>`) typed inside a message;
  the tokenizer turns it into a control token.
- val_too_small (warn): val split empty although its ratio is > 0, or fewer than 5 samples.
- token_stats, estimate (info): token length statistics and estimated steps and time.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
import sys
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

from . import export as export_mod
from .errors import JSON_FAULTS, CheckFailed, LunaError, UsageError
from .fsio import atomic_write_json, read_json
from .messages import coded, counted
from .params import LoraParams, total_steps
from .settings import PREPARE_REPORT, Settings
from .wire import now_iso

Severity = Literal["info", "warn", "fail"]
Status = Literal["ok", "warn", "fail"]
# Record ids a check lists in the report (--json, prepare-latest.json, the API): every one a user has to fix, up
# to a bound that keeps a report of a million bad records readable; the CLI and the dashboard show the first few.
MAX_EXAMPLES = 1000
SHOWN_EXAMPLES = 5
MIN_VAL = 5  # below this a val loss is mostly noise
ROLES = {"system", "user", "assistant"}

# Rough effective training throughput (FLOP/s) per device kind for a LoRA step, at ~4 x params FLOP per
# token (forward 2N, backward through activations 2N; frozen weights get no gradient). Calibrated on the
# architecture notes' measurements (CPU: 16M-param Llama, ~1.6k tokens/s on 2 cores; H200: 1.2B Llama, ~33k
# tokens/s). An order-of-magnitude estimate: the last job's measured speed replaces it when there is one.
_FLOPS = {"cpu_per_thread": 5e10, "cuda": 1.0e14, "cuda_hopper": 1.6e14, "mps": 5e12}
# Small models are bound by per-step overhead, not FLOPs: cap the estimate there.
_MAX_TOKENS_PER_S = {"cpu": 20_000.0, "cuda": 500_000.0, "mps": 50_000.0}


@dataclass
class Check:
    """One preflight check. `code` (check.<id>.<outcome>, see messages.py) and `params` say the same as the
    English `message` in a form the dashboard translates; `passed` tells a passed check (info severity)
    from an informational figure."""

    id: str
    severity: Severity
    count: int
    examples: list[str]
    message: str
    code: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code:
            coded(self.code, **self.params)  # registered, or a test fails here

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrepareReport:
    status: Status
    tier: str
    base_model: str
    base_fingerprint: str
    max_seq_length: int
    dataset: dict[str, Any]
    checks: list[Check]
    tokens: dict[str, Any]
    estimate: dict[str, Any]
    cache: dict[str, Any]
    created: str
    path: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    template: dict[str, Any] = field(default_factory=dict)  # name, hash, terminator, added tokens
    samples: list[dict[str, Any]] = field(default_factory=list)  # `show` samples with their trained spans
    memory: dict[str, Any] = field(default_factory=dict)  # memplan.MemoryPlan.to_dict()

    def check(self, check_id: str) -> Check:
        return next(c for c in self.checks if c.id == check_id)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.severity in ("warn", "fail")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "tier": self.tier,
            "baseModel": self.base_model,
            "baseFingerprint": self.base_fingerprint,
            "maxSeqLength": self.max_seq_length,
            "dataset": self.dataset,
            "checks": [c.to_dict() for c in self.checks],
            "tokens": self.tokens,
            "estimate": self.estimate,
            "cache": self.cache,
            "created": self.created,
            "params": self.params,
            "template": self.template,
            "samples": self.samples,
            "memoryPlan": self.memory,
        }

    def raise_on_fail(self) -> PrepareReport:
        """Raise CheckFailed (exit 1) naming the failing checks; return self otherwise."""
        failed = [c for c in self.checks if c.severity == "fail"]
        if failed:
            names = "; ".join(f"{c.id} ({c.count})" for c in failed)
            fix = "fix the data" if any(c.id != "memory_plan" for c in failed) else "change the options"
            # the memory plan's own sentence names the option that would make the job fit
            memory = next(
                (f"; {c.message[0].lower()}{c.message[1:].rstrip('.')}" for c in failed if c.id == "memory_plan"), ""
            )
            raise CheckFailed(f"Preflight failed: {names}{memory}; see {self.path or PREPARE_REPORT} and {fix}.")
        return self


# --- the entry function -------------------------------------------------------------------------


def prepare(settings: Settings, params: LoraParams, *, min_curated: int = 0, show: int = 0) -> PrepareReport:
    """Run every preflight check on the exported `params.dataset_tier` and write prepare-latest.json.

    Returns the report whatever its status (failure is data); `report.raise_on_fail()` turns a failing
    status into CheckFailed. Raises NotFound when there is no export and UsageError for a bad base model
    or a template without a turn terminator (examples the template refuses are the failing check
    template_refused). `show`: how many train samples to include with their trained spans marked
    (`samples`: what `prepare --show` prints and the dashboard shows).
    """
    from . import models
    from .templates import check_embedding_room

    if params.base_model:  # an adapter as base is a usage error, export or not (cheap: one file lookup)
        models.refuse_adapter_dir(Path(params.base_model).expanduser(), params.base_model)
    tier = params.dataset_tier
    # Every file read from one export, and read first: a tokenizer takes seconds to load, and an export that
    # finished meanwhile would have made this one old (pinned: its retention leaves it until this is read).
    with export_mod.pinned(settings) as directory:
        summary = export_mod.read_summary(settings, directory)
        if summary is None:
            raise export_mod.no_export(settings)
        file_shas, mismatched = _verify_files(directory, summary)
        splits, bad_lines = _read_tier(directory / export_mod.TIER_FILES[tier])
        curated = sum(map(len, splits.values())) if tier == "curated" else curated_count(settings, directory)
    info = models.resolve_base(params.base_model, settings)
    tokenizer, added = models.load_chat_tokenizer(info, settings, params.chat_template)
    if added and (rows := models.embedding_rows(info)) is not None:  # as the run refuses it, before GPU hours
        check_embedding_room(rows, tokenizer, added, info.id)
    terminator = models.turn_terminator(tokenizer, info)  # fails early, in one sentence, without a terminator
    if not isinstance(params.target_modules, str):  # names, checked as the run checks them (all-linear fits all)
        models.check_target_modules(params.target_modules, models.module_kinds(info), info.id)
    models.check_expert_dropout(params, info)
    models.check_stored_quantization(params.quantize, info)
    models.check_quantize_installed(params.quantize)

    checks: list[Check] = []
    checks.append(_summary_check(mismatched, export_mod.replaced_names(settings, export_mod.tier_names(tier))))
    fingerprint = export_mod.dataset_fingerprint(file_shas) if mismatched else summary["fingerprint"]
    checks.append(
        _check("malformed_record", "fail", bad_lines, "lines are not valid chat records", "no malformed lines")
    )
    records = [r for s in export_mod.SPLITS for r in splits[s]]
    checks.append(stale_check(settings, summary, records))

    checks += _volume_checks(curated, min_curated, len(splits["train"]))
    checks += _content_checks(records, tokenizer)
    checks += _duplicate_checks(records)

    data = export_mod.TierData(tier, splits["train"], splits["val"], splits["test"], fingerprint, summary)
    tokenized, data, refused = _tokenize(settings, tokenizer, params.max_seq_length, data, info, terminator.text)
    if refused:
        checks.append(_refused_check(refused))
    checks.append(_terminator_check(terminator))
    checks += _reasoning_checks(records, tokenizer)
    checks += _token_checks(data, tokenized, list(terminator.ids))
    if (context := models.context_length(info)) is not None and params.max_seq_length > context:
        checks.append(_context_check(data, tokenized, context))
    checks.append(_val_check(len(splits["val"]), float(summary.get("ratios", {}).get("val", 0.0))))

    token_stats = dict(tokenized.stats)
    checks.append(_stats_check(tokenized))
    estimate = estimate_run(settings, params, tokenized, info)
    said = {"steps": estimate["optimizerSteps"], "seconds": estimate["seconds"], "device": estimate["device"]}
    message = (
        f"~{counted(estimate['optimizerSteps'], 'optimizer step')}, "
        f"~{_duration(estimate['seconds'])} on {estimate['device']} ({estimate['source']})"
    )
    code = "check.estimate.measured" if estimate["source"].startswith("measured") else "check.estimate.computed"
    if estimate["ranks"] > 1:  # the trainer's processes; a --local run trains on one, with more steps
        said |= {"ranks": estimate["ranks"], "localSteps": estimate["localSteps"]}
        message += (
            f" on {estimate['ranks']} processes, as the trainer runs it; `lora --local` trains on one: "
            f"~{estimate['localSteps']} steps"
        )
        code += "_ranks"
    checks.append(Check("estimate", "info", estimate["optimizerSteps"], [], message, code, said))
    memory = _memory_check(params, tokenized, info, estimate["device"], settings)
    checks.append(memory[0])

    status: Status = (
        "fail"
        if any(c.severity == "fail" for c in checks)
        else ("warn" if any(c.severity == "warn" for c in checks) else "ok")
    )
    report = PrepareReport(
        status=status,
        tier=tier,
        base_model=info.id,
        base_fingerprint=info.fingerprint,
        max_seq_length=params.max_seq_length,
        dataset={
            "fingerprint": fingerprint,
            "tierSha256": data.sha256,  # the trained tier's own file: part of a run's identity
            "trainedSha256": data.trained_sha256,  # what a run reads of it: a repeat's key (flow.unchanged_version)
            "summaryFingerprint": summary.get("fingerprint"),
            "storeRevision": summary.get("store_revision"),
            "exportedAt": summary.get("exported_at"),
            "counts": {s: len(splits[s]) for s in export_mod.SPLITS},
            "curatedApproved": curated,
        },
        checks=checks,
        tokens=token_stats,
        estimate=estimate,
        # relative to the data root: the report stays true when the root moves
        cache={"hit": tokenized.cache_hit, "key": tokenized.key, "path": str(settings.shown(tokenized.path))},
        created=now_iso(),
        params=params.wire() | {"minCurated": min_curated},
        template={
            "name": params.chat_template or "model",
            "hash": models.template_hash(tokenizer),
            "tokenizerHash": models.tokenizer_hash(tokenizer),  # with the hash: what a run records as its own
            "terminator": terminator.to_dict(),
            "addedTokens": added,
        },
        samples=[
            marked_sample(tokenizer, enc, _rid(rec))
            for rec, enc in list(zip(data.train, tokenized.train, strict=True))[:show]
        ],
        memory=memory[1],
    )
    path = settings.prepare_report
    report.path = str(path)
    atomic_write_json(path, report.to_dict())
    return report


def last_report(settings: Settings) -> dict[str, Any] | None:
    """The last prepare report as written, or None."""
    try:
        return read_json(settings.prepare_report)
    except ValueError:
        return None


# --- export integrity ---------------------------------------------------------------------------


def _verify_files(directory: Path, summary: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """sha256 of every data file as it is now, and the names that differ from the summary."""
    shas: dict[str, str] = {}
    mismatched: list[str] = []
    expected = summary.get("files", {})
    for name in export_mod.DATA_FILES:
        path = directory / name
        h, lines = hashlib.sha256(), 0
        try:
            with open(path, "rb") as fh:
                for line in fh:
                    h.update(line)
                    lines += 1
        except FileNotFoundError:
            shas[name] = "missing"
            mismatched.append(name)
            continue
        shas[name] = h.hexdigest()
        want = expected.get(name, {})
        if shas[name] != want.get("sha256") or lines != want.get("records", lines):
            mismatched.append(name)
    return shas, mismatched


def _summary_check(mismatched: list[str], replaced: list[str]) -> Check:
    if replaced:  # what the person sees under the guide's names is not what the run trains (a run refuses it)
        return Check(
            "export_summary",
            "fail",
            len(replaced),
            replaced[:MAX_EXAMPLES],
            export_mod.replaced_sentence(replaced),
            "check.export_summary.replaced",
            {"count": len(replaced)},
        )
    if not mismatched:
        return Check(
            "export_summary",
            "info",
            0,
            [],
            "every file matches the export summary (sha256, records)",
            "check.export_summary.ok",
        )
    return Check(
        "export_summary",
        "fail",
        len(mismatched),
        mismatched[:MAX_EXAMPLES],
        f"{counted(len(mismatched), 'file')} {'differs' if len(mismatched) == 1 else 'differ'} from the export summary "
        "(edited by hand or torn); run `lunatrain export`",
        "check.export_summary.mismatch",
        {"count": len(mismatched)},
    )


def _read_tier(path: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """The tier's records by split, and `file:line` of each line that is not a usable chat record."""
    splits: dict[str, list[dict]] = {s: [] for s in export_mod.SPLITS}
    bad: list[str] = []
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        return splits, []  # reported by the export_summary check
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except JSON_FAULTS:
                bad.append(f"{path.name}:{n}")
                continue
            if not _well_formed(rec):
                bad.append(f"{path.name}:{n}")
                continue
            splits[rec["split"]].append(rec)
    return splits, bad


def _well_formed(rec: Any) -> bool:
    if not isinstance(rec, dict) or rec.get("split") not in export_mod.SPLITS:
        return False
    msgs = rec.get("messages")
    return (
        isinstance(msgs, list)
        and bool(msgs)
        and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
    )


def stale_check(settings: Settings, summary: dict[str, Any], records: Iterable[dict[str, Any]] = ()) -> Check:
    """Whether the database changed since the export with this summary: a warning (the export is used as it
    is), unless some of `records` were deleted or rejected since, which fails."""
    from . import store

    if not store.has_database(settings):
        return Check(
            "export_stale",
            "info",
            0,
            [],
            "no database here; the export is checked as it is",
            "check.export_stale.no_database",
        )
    current = store.revision(settings)
    if current == summary.get("store_revision"):
        return Check(
            "export_stale", "info", 0, [], "the export is up to date with the database", "check.export_stale.ok"
        )
    # A run refuses to train on content deleted or rejected since (export.refuse_withdrawn): the preflight
    # fails on it too, naming the records by their export ids as the other checks do.
    deleted, rejected = export_mod.withdrawn(settings, records)
    if deleted or rejected:
        n = len(deleted) + len(rejected)
        one = n == 1
        kind = "withdrawn" if deleted and rejected else "deleted" if deleted else "rejected"
        how = f"deleted ({len(deleted)}) or rejected ({len(rejected)})" if kind == "withdrawn" else kind
        return Check(
            "export_stale",
            "fail",
            n,
            sorted(deleted + rejected)[:MAX_EXAMPLES],
            f"{n} sample{'' if one else 's'} in the export {'was' if one else 'were'} {how} since; "
            "run `lunatrain export`",
            f"check.export_stale.{kind}",
            {"count": n, "deleted": len(deleted), "rejected": len(rejected)},
        )
    return Check(
        "export_stale",
        "warn",
        1,
        [],
        "the database changed since the last export; run `lunatrain export`",
        "check.export_stale.changed",
    )


# --- record checks ------------------------------------------------------------------------------


def _tokenize(
    settings: Settings, tokenizer: Any, max_seq_length: int, data: Any, info: Any, terminator: str
) -> tuple[Any, Any, list[Any]]:
    """(tokenized tier, the records it holds, TemplateRefused of every example the chat template refuses).

    Tokenizing stops at the first refused example, so a user fixing N of them needed N runs. On a refusal
    each record is tried once more to collect them all, and the rest is tokenized under a fingerprint of its
    own: the other checks still run on it, and training, which reads the cache by the export's fingerprint,
    never finds tokens of the tier without the refused examples (it refuses the tier until they are fixed)."""
    from . import tokens

    try:
        return tokens.tokenize_tier(settings, data.tier, tokenizer, max_seq_length, data=data, base=info), data, []
    except tokens.TemplateRefused:
        pass
    refused: list[tokens.TemplateRefused] = []
    kept: dict[str, list[dict[str, Any]]] = {}
    for split in export_mod.SPLITS:
        kept[split] = []
        for rec in getattr(data, split):
            try:
                tokens.encode_record(tokenizer, rec, max_seq_length, terminator)
            except tokens.TemplateRefused as err:
                refused.append(err)
            else:
                kept[split].append(rec)
    rest = replace(data, **kept, fingerprint=f"{data.fingerprint}-without-refused")
    tokenized = tokens.tokenize_tier(settings, data.tier, tokenizer, max_seq_length, data=rest, base=info)
    return tokenized, rest, refused


def _refused_check(refused: list[Any]) -> Check:
    first = refused[0].reason
    return _check(
        "template_refused",
        "fail",
        [err.record_id for err in refused],
        f"examples the chat template refuses (first: {first}); fix them or choose another template (--chatTemplate)",
        "the chat template renders every example",
        reason=first,
    )


def _rid(rec: dict) -> str:
    return str(rec.get("id") or str(rec.get("hash", ""))[:12])


# A check's sentence is written for several records; these make it read right for one ("1 sample is …").
_SINGULAR = (
    ("lines are ", "line is "),
    ("samples are ", "sample is "),
    ("samples have ", "sample has "),
    ("samples contain ", "sample contains "),
    ("samples duplicate ", "sample duplicates "),
    ("samples end ", "sample ends "),
    ("samples hold ", "sample holds "),
    ("samples ", "sample "),
    ("repeated samples ", "repeated sample "),
    ("hashes appear ", "hash appears "),
    ("examples ", "example "),
)
_SINGULAR_LATER = (
    ("(first: ", "("),
    ("fix them", "fix it"),
    ("in their text", "in its text"),
    ("shorten them", "shorten it"),
    ("their oldest exchanges", "its oldest exchanges"),
    ("lets them keep", "lets it keep"),
    ("not valid chat records", "not a valid chat record"),
)


def _one(what: str) -> str:
    for many, one in _SINGULAR:
        if what.startswith(many):
            what = one + what[len(many) :]
            break
    for many, one in _SINGULAR_LATER:
        what = what.replace(many, one)
    return what


def _check(cid: str, severity: Severity, ids: list[str], what: str, ok: str, **params: Any) -> Check:
    """A record check: passed (info, code check.<id>.ok) or `severity` with the records found (.found).
    `what` is said of several records; for one, `_one` makes it singular."""
    if not ids:
        return Check(cid, "info", 0, [], ok, f"check.{cid}.ok", params)
    return Check(
        cid,
        severity,
        len(ids),
        ids[:MAX_EXAMPLES],
        f"{len(ids)} {what if len(ids) > 1 else _one(what)}",
        f"check.{cid}.found",
        {"count": len(ids), **params},
    )


def curated_count(settings: Settings, directory: Path | None = None) -> int:
    """Approved curated examples in the current export (what minCurated is checked against): its chat records,
    not its lines (a line of junk added by hand is no example; malformed_record names it)."""
    splits, _bad = _read_tier((directory or export_mod.export_dir(settings)) / export_mod.CURATED_FILE)
    return sum(len(records) for records in splits.values())


# Where examples come from, for a store that has none approved yet.
GET_EXAMPLES = (
    "add or import examples (`lunatrain examples add`, `lunatrain examples import FILE`; approve pending ones "
    "with `lunatrain examples approve`) or load the bundled ones (`lunatrain examples seed`)"
)
GET_MEMORY = "add memory items (`lunatrain memory add`; approve pending ones with `lunatrain memory approve`)"


def get_samples(tier: str) -> str:
    """Where a tier's samples come from: the memory tier holds memory items, the merged tier both kinds."""
    if tier == "memory":
        return GET_MEMORY
    return GET_EXAMPLES if tier == "curated" else f"{GET_EXAMPLES}, or {GET_MEMORY}"


def volume_check(curated: int, min_curated: int) -> Check:
    """minCurated against the export: the same check (and sentence) for prepare and every job submit."""
    if curated == 0 < min_curated:  # a first run: nothing to curate yet, so say where examples come from
        return Check(
            "volume",
            "fail",
            0,
            [],
            f"no approved curated examples yet, {min_curated} required (minCurated): {GET_EXAMPLES}",
            "check.volume.none",
            {"minCurated": min_curated},
        )
    if curated < min_curated:
        return Check(
            "volume",
            "fail",
            curated,
            [],
            f"{counted(curated, 'approved curated example')}, {min_curated} required (minCurated); curate more or lower it",
            "check.volume.too_few",
            {"curated": curated, "minCurated": min_curated},
        )
    return Check(
        "volume",
        "info",
        curated,
        [],
        f"{counted(curated, 'approved curated example')} (minCurated {min_curated})",
        "check.volume.ok",
        {"curated": curated, "minCurated": min_curated},
    )


def _volume_checks(curated: int, min_curated: int, n_train: int) -> list[Check]:
    vol = volume_check(curated, min_curated)
    empty = (
        Check(
            "empty_train",
            "fail",
            0,
            [],
            "the tier's train split is empty: nothing to train on",
            "check.empty_train.empty",
        )
        if n_train == 0
        else Check(
            "empty_train",
            "info",
            n_train,
            [],
            counted(n_train, "train sample"),
            "check.empty_train.ok",
            {"count": n_train},
        )
    )
    return [vol, empty]


def _alnum(text: str) -> int:
    """Letters and digits, with the marks written on them: "हाँ" ("yes") is one letter and two vowel marks (an
    emoji's variation selector or keycap is none)."""
    folding = _folding()
    return len(folding.letter.findall(text)) if folding.has_marks(text) else sum(map(str.isalnum, text))


def special_token_samples(records: Iterable[dict], tokenizer: Any) -> list[str]:
    """The ids of the records with a literal special token in a message's text (prepare fails them, and a
    run refuses them: the tokenizer would read the text as the control token itself)."""
    from .tokens import special_token_pattern

    special_re = special_token_pattern(tokenizer)
    if special_re is None:
        return []
    return [_rid(rec) for rec in records if any(special_re.search(m["content"]) for m in rec["messages"])]


def _content_checks(records: list[dict], tokenizer: Any) -> list[Check]:
    empty, trivial = [], []
    for rec in records:
        # the answers that are trained (a turn with weight 0 is context only, as a user turn is)
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant" and m.get("weight", 1) != 0]
        if any(not a.strip() for a in answers):
            empty.append(_rid(rec))
        elif any(_alnum(a) < 2 for a in answers):
            trivial.append(_rid(rec))
    special = special_token_samples(records, tokenizer)
    return [
        _check("empty_response", "fail", empty, "samples with an empty assistant response", "no empty responses"),
        _check(
            "trivial_response",
            "warn",
            trivial,
            "samples with a trivial response (fewer than 2 letters or digits)",
            "no trivial responses",
        ),
        _check(
            "special_tokens_in_content",
            "fail",
            special,
            "samples contain a literal special token in their text (the tokenizer turns it into a control token)",
            "no special tokens inside message text",
        ),
    ]


_PUNCT = re.compile(r"[\W_]+")
# Characters that show as nothing (zero-width space and joiners, soft hyphen, word joiner, BOM, bidi marks): as
# punctuation they would split a word in two, so that a copy that looks the same folds otherwise.
# Variation selectors too: they choose a glyph's form (emoji or text style, an ideograph's variant), not a letter.
_INVISIBLE = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufe00-\ufe0f\ufeff\U000e0100-\U000e01ef]"
)


@dataclass(frozen=True)
class _Folding:
    """Patterns that fold text with the letter marks kept (`_folding`)."""

    space: re.Pattern[str]  # a run of what folding turns into a space
    letter: re.Pattern[str]  # one letter, digit or letter mark
    marks_bmp: re.Pattern[str]  # one letter mark of the Basic Multilingual Plane

    def has_marks(self, text: str) -> bool:
        """Whether `text` holds a letter mark. Asked first: a class of every mark's ranges is slow to match, but
        one of the BMP's alone is fast."""
        if self.marks_bmp.search(text):
            return True
        # astral letter marks (a few historic scripts) asked one character at a time: a class of their ranges is
        # slow to match, and text with emoji has astral characters but few of them
        return any(unicodedata.category(c) in ("Mn", "Mc") for c in _ASTRAL.findall(text))


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


@functools.cache
def _folding() -> _Folding:
    """The vowel signs and viramas of Indic and Southeast Asian scripts are marks, not word characters to `re`:
    folded away, "दिन" (day) and "दान" (donation) were one word. Marks on symbols (variation selectors, the
    combining marks for symbols, an enclosing keycap) are no letters: an emoji still folds as its symbol.
    Built once, on first use (0.2 s)."""
    marks = [
        c
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)) in ("Mn", "Mc")
        and not (0xFE00 <= c <= 0xFE0F or 0xE0100 <= c <= 0xE01EF or 0x20D0 <= c <= 0x20FF)
    ]

    def ranges(codes: list[int]) -> str:
        runs = (list(run) for _step, run in groupby(enumerate(codes), lambda p: p[1] - p[0]))
        return "".join(f"{re.escape(chr(run[0][1]))}-{re.escape(chr(run[-1][1]))}" for run in runs)

    every = ranges(marks)
    return _Folding(
        space=re.compile(f"(?:[^\\w{every}]|_)+"),
        letter=re.compile(f"[^\\W_]|[{every}]"),
        marks_bmp=re.compile(f"[{ranges([c for c in marks if c < 0x10000])}]"),
    )


def normalize(text: str) -> str:
    """Fold case, unicode width/compatibility forms, invisible characters, whitespace and punctuation:
    near-duplicates collide. A text of symbols only (an emoji answer) is its symbols: two of them differ, where
    a text of punctuation only ("…") folds to nothing (the trivial and empty checks report it)."""
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text)).casefold()
    # Most text has no letter mark left after NFKC (Latin, CJK): the plain class is several times faster.
    folding = _folding()
    words = " ".join((folding.space if folding.has_marks(text) else _PUNCT).sub(" ", text).split())
    return words or "".join(c for c in text if unicodedata.category(c).startswith("S"))


def _exchanges(rec: dict) -> list[tuple[str, str]]:
    """A record's trained exchanges: each user message with the assistant answer right after it, unless that
    answer has weight 0 (context only), as (prompt, answer) folded as near-duplicates are (`normalize`: a twin in
    another case or without its full stop is the same exchange); one that folds to nothing is left out."""
    out, turns = [], [m for m in rec["messages"] if m["role"] in ("user", "assistant")]
    for ask, answer in itertools.pairwise(turns):
        if ask["role"] == "user" and answer["role"] == "assistant" and answer.get("weight", 1) != 0:
            exchange = (normalize(ask["content"]), normalize(answer["content"]))
            if all(exchange):
                out.append(exchange)
    return out


def _exchange_check(records: list[dict]) -> Check:
    """A val/test sample holding an exchange (prompt and answer) that a train sample of another hash trains: samples
    of one conversation share a split, so the same exchange told in two conversations (after other turns, under
    another system prompt), or one conversation imported at two lengths without its conversationId, follows
    each, and the longer one trains every answer of the shorter. The split cannot join them without moving
    samples when examples come and go; prepare names the val/test copies instead (one hash in two splits is
    duplicate_across_splits)."""
    trained: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rec in records:
        if rec["split"] == "train":
            for exchange in _exchanges(rec):
                trained[exchange].add(str(rec.get("hash")))
    found = [
        _rid(rec)
        for rec in records
        if rec["split"] != "train" and any(trained.get(x, set()) - {str(rec.get("hash"))} for x in _exchanges(rec))
    ]
    return _check(
        "exchange_across_splits",
        "warn",
        found,
        "samples hold an exchange a train sample of another conversation trains (val/test partly measure "
        "memorisation; keep a conversation under one conversationId)",
        "no exchange in train and in val/test",
    )


def _duplicate_checks(records: list[dict]) -> list[Check]:
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_hash[str(rec.get("hash") or _content_hash(rec))].append(rec)
    within, across = [], []
    for group in by_hash.values():
        if len({r["split"] for r in group}) > 1:
            # name the copy that sits outside the first record's split: that is the one to remove
            across.append(_rid(next(r for r in group if r["split"] != group[0]["split"])))
        seen: set[str] = set()
        for rec in group:
            if rec["split"] in seen:
                within.append(_rid(rec))
            seen.add(rec["split"])
    by_norm: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for h, group in by_hash.items():
        rec = group[0]
        if not any(normalize(m["content"]) for m in rec["messages"] if m["role"] == "assistant"):
            continue  # nothing left after folding: the empty/trivial checks report it
        by_norm[tuple((m["role"], normalize(m["content"])) for m in rec["messages"])].append((h, rec))
    # Those in another split than the first of their group come first: val/test then measure memorisation.
    near_across = [_rid(r) for g in by_norm.values() for _h, r in g[1:] if r["split"] != g[0][1]["split"]]
    near = near_across + [_rid(r) for g in by_norm.values() for _h, r in g[1:] if r["split"] == g[0][1]["split"]]
    across_note = (
        f" ({len(near_across)} of them in another split than the sample "
        f"{'it repeats' if len(near_across) == 1 else 'they repeat'}: val/test partly measure memorisation)"
        if near_across
        else ""
    )
    # The same question (everything before the last turn) under different answers: per question, the first
    # sample of each distinct answer, so the user sees every version and keeps one.
    answers: dict[tuple, dict[tuple[str, str], str]] = defaultdict(dict)
    for key, group in by_norm.items():
        if key[-1][0] == "assistant" and key[-1][1]:
            answers[key[:-1]].setdefault(key[-1], _rid(group[0][1]))
    conflicting = [rid for by_answer in answers.values() if len(by_answer) > 1 for rid in by_answer.values()]
    return [
        _exchange_check(records),
        _check("duplicate_exact", "warn", within, "repeated samples within a split (same hash)", "no exact duplicates"),
        _check(
            "duplicate_across_splits",
            "fail",
            across,
            "hashes appear in more than one split (val/test would measure memorisation)",
            "no hash in two splits",
        ),
        _check(
            "duplicate_normalized",
            "warn",
            near,
            "samples duplicate another after folding case, whitespace and punctuation" + across_note,
            "no normalized duplicates",
            **({"acrossSplits": len(near_across)} if near_across else {}),
        ),
        _check(
            "conflicting_answers",
            "warn",
            conflicting,
            "samples answer a question that another sample answers differently (keep one answer per question)",
            "no question with different answers",
        ),
    ]


def _content_hash(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec["messages"], ensure_ascii=False, sort_keys=True).encode()).hexdigest()


# --- token checks -------------------------------------------------------------------------------


def _labeled_runs(labels: list[int], ignore: int) -> Iterable[tuple[int, int]]:
    start = None
    for i, lab in enumerate(labels):
        if lab != ignore and start is None:
            start = i
        elif lab == ignore and start is not None:
            yield start, i
            start = None
    if start is not None:
        yield start, len(labels)


def _reasoning_checks(records: list[dict], tokenizer: Any) -> list[Check]:
    """What the template makes of the data, said before a run trains on it: system messages it leaves out of a
    trained conversation (Mistral v0.3's), answers whose `<think>` block a thinking template drops (the last
    answer's too), and a generation prompt that opens what no trained answer is preceded by (chat and the gate
    would ask the model from there)."""
    from .tokens import generation_prompt_gap, reasoning_dropped, system_dropped

    dropped = [_rid(rec) for rec in records if reasoning_dropped(tokenizer, rec["messages"])]
    no_system = [_rid(rec) for rec in records if system_dropped(tokenizer, rec["messages"])]
    checks = [
        _check(
            "system_dropped",
            "warn",
            no_system,
            "samples have a system message the chat template leaves out of a conversation that ends with an answer "
            "(it writes it before a last user turn only): they train without it, while chat and the eval gate ask "
            "with it",
            "the chat template keeps each sample's system message",
        ),
        _check(
            "reasoning_dropped",
            "warn",
            dropped,
            "samples end in an answer whose <think> reasoning the chat template drops: they train without it (use "
            "a template that keeps the last answer's reasoning, or leave the reasoning out of the data)",
            "the chat template keeps the reasoning of each sample's last answer",
        ),
    ]
    gap = generation_prompt_gap(tokenizer)
    if gap is not None:
        checks.append(
            Check(
                "generation_prompt",
                "warn",
                1,
                [],
                f"the chat template's generation prompt ends in {gap!r}, which training never puts before an "
                "answer: chat and the eval gate ask the model from a place it never learned from",
                "check.generation_prompt.differs",
                {"gap": repr(gap)},  # as the sentence writes it: a newline seen as \n
            )
        )
    return checks


def _terminator_check(term: Any) -> Check:
    if len(term.ids) > 1:  # only one token can end a generation: nothing stops where training taught
        return Check(
            "terminator",
            "warn",
            len(term.ids),
            [],
            f"assistant turns end with {term.text!r} (trained), which is {len(term.ids)} tokens: a generation stops "
            "only on one token, so chat and the eval gate do not stop there (a chat template whose markers the "
            "tokenizer has as tokens ends turns with one)",
            "check.terminator.several_tokens",
            {"terminator": term.text, "tokens": len(term.ids)},
        )
    where = (
        "the base model's generation_config stops on it too"
        if term.in_generation_config
        else "the base model's generation_config does not stop on it; adapters and merged models ship one that does"
    )
    code = "check.terminator.stops" if term.in_generation_config else "check.terminator.shipped"
    return Check(
        "terminator",
        "info",
        len(term.ids),
        [],
        f"assistant turns end with {term.text!r} (trained); {where}",
        code,
        {"terminator": term.text},
    )


def marked_sample(tokenizer: Any, enc: Any, rid: str) -> dict[str, Any]:
    """One tokenized sample as text pieces, each flagged trained or not: what the loss sees."""
    from .tokens import IGNORE

    pieces = [
        {"text": tokenizer.decode([t for t, _lab in group], skip_special_tokens=False), "trained": trained}
        for trained, group in groupby(zip(enc.input_ids, enc.labels, strict=True), lambda p: p[1] != IGNORE)
    ]
    return {
        "id": rid,
        "tokens": len(enc),
        "trainedTokens": enc.n_supervised,
        "truncated": enc.truncated,
        "dropped": enc.dropped,
        "pieces": pieces,
    }


def _token_checks(data: Any, tokenized: Any, eot_ids: list[int]) -> list[Check]:
    from .tokens import IGNORE

    truncated, untrained, no_eot = [], [], []
    train_with_tokens = 0
    for split in export_mod.SPLITS:
        for rec, enc in zip(getattr(data, split), tokenized.splits.get(split, []), strict=True):
            rid = _rid(rec)
            if enc.shortened:
                truncated.append(rid)
            if enc.n_supervised == 0:
                untrained.append(rid)
                continue
            if split == "train":
                train_with_tokens += 1
            if enc.truncated:
                continue  # its end was cut off: reported as truncated (one that lost its oldest turns still ends)
            n = len(eot_ids)
            if not n or any(enc.labels[max(a, b - n) : b] != eot_ids for a, b in _labeled_runs(enc.labels, IGNORE)):
                no_eot.append(rid)
    untrained_check = _check(
        "no_trained_tokens",
        "warn",
        untrained,
        "samples have no trained token after masking (no assistant text left)",
        "every sample has trained tokens",
    )
    if untrained and data.train and train_with_tokens == 0:
        untrained_check.severity = "fail"
    return [
        _check(
            "truncated",
            "warn",
            truncated,
            f"samples are longer than maxSeqLength={tokenized.max_seq_length}: their oldest exchanges are left "
            "out so that the last answer is trained, and one exchange longer than that is cut at its end (raise "
            "maxSeqLength or shorten them)",
            "no sample exceeds maxSeqLength",
            maxSeqLength=tokenized.max_seq_length,
        ),
        untrained_check,
        _check(
            "eot_not_trained",
            "fail",
            no_eot,
            "samples have an assistant turn whose turn terminator is outside the loss mask "
            "(the model would never learn to stop); check the chat template",
            "the turn terminator is trained",
        ),
    ]


def _context_check(data: Any, tokenized: Any, context: int) -> Check:
    """Only where maxSeqLength is above the base model's context: the samples it lets keep more tokens than the
    context (a model with learned positions cannot run them; one with rotary positions trains places it never
    answers from, and chat refuses prompts that long). The run refuses them too (`train.refuse_over_context`)."""
    longer = tokenized.longer_than(context)
    over = [_rid(getattr(data, split)[i]) for split in export_mod.SPLITS for i in longer.get(split, [])]
    return _check(
        "over_context",
        "fail",
        over,
        f"samples are longer than the base model's context of {context} tokens, which "
        f"maxSeqLength={tokenized.max_seq_length} lets them keep: chat refuses prompts that long; set maxSeqLength "
        f"to {context} or less (or shorten them)",
        f"no sample is longer than the base model's context of {context} tokens",
        context=context,
        maxSeqLength=tokenized.max_seq_length,
    )


def _val_check(n_val: int, ratio: float) -> Check:
    if ratio > 0 and n_val == 0:
        return Check(
            "val_too_small",
            "warn",
            0,
            [],
            f"the val split is empty although its ratio is {ratio}: "
            "no validation loss; add examples or raise ASSISTANT_TRAIN_VAL_RATIO",
            "check.val_too_small.empty",
            {"ratio": ratio},
        )
    if 0 < n_val < MIN_VAL:
        return Check(
            "val_too_small",
            "warn",
            n_val,
            [],
            f"only {counted(n_val, 'val sample')} (< {MIN_VAL}): the validation loss will be mostly noise",
            "check.val_too_small.few",
            {"count": n_val, "minimum": MIN_VAL},
        )
    return Check(
        "val_too_small", "info", n_val, [], counted(n_val, "val sample"), "check.val_too_small.ok", {"count": n_val}
    )


def _stats_check(tokenized: Any) -> Check:
    st = tokenized.stats.get("train", {})
    return Check(
        "token_stats",
        "info",
        st.get("count", 0),
        [],
        f"train tokens per sample min/median/p95/max = {st.get('minLength', 0)}/{st.get('medianLength', 0)}/"
        f"{st.get('p95Length', 0)}/{st.get('maxLength', 0)} (whole conversations); {st.get('supervisedTokens', 0)} "
        f"trained tokens of {st.get('tokens', 0)} (within maxSeqLength)",
        "check.token_stats.info",
        {
            k: st.get(k, 0)
            for k in ("minLength", "medianLength", "p95Length", "maxLength", "supervisedTokens", "tokens")
        },
    )


# --- estimate -----------------------------------------------------------------------------------


def optimizer_steps(n_samples: int, params: LoraParams, ranks: int = 1) -> int:
    """Optimizer steps of a run on `ranks` processes, as the training loop counts them (params.total_steps)."""
    return total_steps(n_samples, params, ranks)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _running_trainer_ranks(settings: Settings, device: str | None) -> int | None:
    """The processes the trainer running for this data root would start for a job on `device`, from its own
    settings and GPUs (its /health); None when none runs, or it does not say (an older trainer)."""
    from .service import client
    from .service.lock import trainer_lock_held
    from .service.spawn import job_ranks

    if not trainer_lock_held(settings):  # a local look first: no request when no trainer runs
        return None
    from .service.jobs import data_root_id

    try:
        health = client.health(settings, timeout=2.0)
    except LunaError:
        return None
    seen = health.device
    if health.data_root is None or health.data_root.id != data_root_id(settings.home) or seen.gpus is None:
        return None  # not this data root's trainer at that address, or one too old to say
    try:
        return job_ranks(settings.model_copy(update={"lora_gpus": seen.ranks_setting}), device, seen.gpus)
    except UsageError:  # more ranks than its GPUs: it refuses that job
        return 1


def estimate_run(settings: Settings, params: LoraParams, tokenized: Any, info: Any) -> dict[str, Any]:
    """Steps, tokens and seconds for training this tier: the measured speed of the last job on the same base
    model and device kind when there is one, else the FLOP-based estimate above."""
    from . import models
    from .service.spawn import job_ranks

    device = models.resolve_device(params.device)
    # The processes the trainer would start for this job (ASSISTANT_LORA_GPUS, else every visible GPU): each
    # takes its own micro-batches, so a step trains all of theirs. A trainer running for this data root says
    # its own (it may have been started with another ASSISTANT_LORA_GPUS than this command has).
    ranks = _running_trainer_ranks(settings, params.device)
    if ranks is None:
        gpus = _visible_gpus() if device == "cuda" else 0
        try:
            ranks = job_ranks(settings, params.device, gpus)
        except UsageError:  # more ranks than GPUs: the trainer refuses that job, a local run trains on one process
            ranks = 1
    train = [e for e in tokenized.train if e.n_supervised]  # the loop skips samples with nothing to learn
    steps = optimizer_steps(len(train), params, ranks)
    full = optimizer_steps(len(train), params.model_copy(update={"max_steps": None}), ranks)
    tokens = sum(len(e) for e in train) * params.epochs * (steps / full if full else 0.0)
    measured = _measured_speed(settings, info.fingerprint, device)
    if measured:
        tps, source = measured, "measured by the last job on this base model and device"
    else:
        # one device's speed; the ranks train side by side
        tps, source = _flops_speed(info, device) * ranks, "estimate from model size and device kind"
    return {
        "device": device,
        "ranks": ranks,
        "optimizerSteps": steps,
        "localSteps": optimizer_steps(len(train), params),  # a `--local` run's: one process
        "tokens": int(tokens),
        "tokensPerSecond": round(tps, 1),
        "seconds": round(tokens / tps, 1) if tps else None,
        "source": source,
    }


def _memory_check(
    params: LoraParams, tokenized: Any, info: Any, device: str, settings: Settings
) -> tuple[Check, dict[str, Any]]:
    """The memory plan for the largest micro-batch of this data: fails when the job cannot fit."""
    from . import memplan

    train = [e for e in tokenized.train if e.n_supervised]
    shape = memplan.model_shape(info, settings, params.target_modules)
    plan = memplan.plan(
        shape,
        params,
        memplan.device_memory(device),
        batch=memplan.largest_batch(train, params, shape) if train else None,
    )
    code, said = plan.coded()
    return Check(
        "memory_plan",
        "info" if plan.fits else "fail",
        # A count is of findings (the report's, the CLI's and the dashboard's count column): one job that does
        # not fit, or none. The bytes are in the plan (`memoryPlan`) and the message.
        0 if plan.fits else 1,
        [],
        plan.message,
        code,
        said,
    ), plan.to_dict()


def _measured_speed(settings: Settings, base_fingerprint: str, device: str) -> float | None:
    """tokens/s of the last finished job (lora-latest.json) when it ran on this base model and device kind."""
    try:
        last = read_json(settings.lora_latest_report)
    except ValueError:
        return None
    if not isinstance(last, dict) or last.get("status") != "succeeded":
        return None
    base, metrics, dev = last.get("baseModel") or {}, last.get("metrics") or {}, last.get("device") or {}
    tps = metrics.get("tokensPerSec")
    if base.get("fingerprint") == base_fingerprint and dev.get("used") == device and isinstance(tps, int | float):
        return float(tps) if tps > 0 else None
    return None


def _param_count(info: Any) -> int:
    """The base model's parameters, from its safetensors headers; a file that cannot be read is the base's
    damage, said as a run would say it (models.damaged_weights), never a traceback."""
    from safetensors import SafetensorError, safe_open

    total = 0
    try:
        for w in sorted(Path(info.path).glob("*.safetensors")):
            with safe_open(str(w), framework="pt") as fh:
                for k in fh.keys():
                    total += math.prod(fh.get_slice(k).get_shape())
    except (SafetensorError, OSError) as exc:
        from . import models

        raise models.damaged_weights(info, exc) from exc
    return total


def _flops_speed(info: Any, device: str) -> float:
    import torch

    n = max(_param_count(info), 1)
    if device == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        flops = _FLOPS["cuda_hopper"] if re.search(r"H100|H200|H800|GH200", name) else _FLOPS["cuda"]
        kind = "cuda"
    elif device == "mps":
        flops, kind = _FLOPS["mps"], "mps"
    else:
        flops, kind = _FLOPS["cpu_per_thread"] * torch.get_num_threads(), "cpu"
    return min(flops / (4.0 * n), _MAX_TOKENS_PER_S[kind])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if 0 < seconds <= 0.5:  # "0s" for half a second (rounded to even) would say it takes no time
        return "<1s"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"
