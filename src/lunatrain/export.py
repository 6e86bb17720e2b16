"""Export: the store → JSONL tiers with deterministic splits and a summary, in `data/training/`.

Tiers and files (the guide's names):

- curated: approved examples with source=curated → `assistant-sft-curated.jsonl` and its split files
  `assistant-sft-curated-{train,val,test}.jsonl`
- memory: approved memory items plus approved examples with source=memory → `assistant-sft-memory.jsonl`
- merged: every approved example (curated, memory and conversation sources) ∪ approved memory items,
  deduplicated by content hash → `assistant-sft.jsonl`. Approved conversation-source examples are trained
  only in the merged tier: they come from live chats and are not hand-curated.

Split: u = int(sha256(key)[:16], 16) / 2**64 with key "conv:<conversation_id>" when there is one, else the
content hash; test if u < test_ratio, val if u < test_ratio + val_ratio, else train. A memory item whose
content equals a stored example uses that example's key, so a hash has one split in every tier (val/test
never hold a hash that is train anywhere). Adding or removing other examples never moves a sample.

Records are sorted by hash and written as compact JSON with sorted keys: the same database gives
byte-identical files. Rows are streamed from the database (ordered by hash in SQL) and written
incrementally, so memory stays flat at any size.

All or nothing: each export is written whole (every file and the summary, fsynced) into its own directory
`data/training/.exports/<id>.partial/`, renamed to `.exports/<id>/`, and then made visible by one atomic
rename of the symlink `data/training/current -> .exports/<id>`. The guide's names
(`data/training/assistant-sft-*.jsonl`, the summary) are fixed symlinks into `current/`, so they switch
together with it. A crash at any point leaves either the previous export or the new one, never a mix;
readers resolve `current` once (`export_dir()`) and read every file from that one directory. A data root
from before this layout (plain files) is adopted first: hard links of its files become the first
`.exports/` entry, so the switch from old to new is the same single rename. The newest
`ASSISTANT_RETAIN_EXPORTS` export directories are kept (the current one always), older ones pruned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import filecmp
import functools
import hashlib
import heapq
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

import sqlalchemy as sa

from .errors import CheckFailed, DamagedFile, LunaError, NotFound, StorageError, UsageError
from .formats import content_hash_as_stored
from .fsio import dumps_json, file_lock, fsync_dir, read_json, remove_tree, storage_guard, tree_size
from .messages import Note
from .schema import examples_table, memory_table, state_table
from .settings import Settings
from .store import open_store
from .wire import STAMP_FORMAT, compact_stamp, now_iso, utc_now

Tier = Literal["curated", "memory", "merged"]
TIERS: tuple[str, ...] = get_args(Tier)
SPLITS = ("train", "val", "test")
CURATED_FILE = "assistant-sft-curated.jsonl"
SPLIT_FILES = {s: f"assistant-sft-curated-{s}.jsonl" for s in SPLITS}
MEMORY_FILE = "assistant-sft-memory.jsonl"
MERGED_FILE = "assistant-sft.jsonl"
SUMMARY_FILE = "assistant-sft-summary.json"
TIER_FILES = {"curated": CURATED_FILE, "memory": MEMORY_FILE, "merged": MERGED_FILE}
DATA_FILES = (CURATED_FILE, *SPLIT_FILES.values(), MEMORY_FILE, MERGED_FILE)
SUMMARY_FORMAT = "lunatrain-export/1"
CURRENT_LINK = "current"  # data/training/current -> .exports/<id>: the one pointer readers follow
EXPORTS_DIR = ".exports"

_FETCH = 5_000  # rows per database round trip
_FLUSH_BYTES = 1 << 20  # buffer per output file before a write
_PROGRESS_EVERY = 10_000

ProgressFn = Callable[[int, int], None]  # (records done, records total)


def split_of(key: str, val_ratio: float, test_ratio: float) -> str:
    # == int(sha256(key).hexdigest()[:16], 16) / 2**64, without the hex round trip
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_ratio:
        return "test"
    if u < test_ratio + val_ratio:
        return "val"
    return "train"


def split_key(pair_hash: str, conversation_id: str | None) -> str:
    return f"conv:{conversation_id}" if conversation_id else pair_hash


def pair_hash(kind: int, row: Any, content_hash: str) -> str:
    """What the split hashes without a conversation: prompt and response only (SPEC, the guide), so the same
    exchange told with another system prompt or after other turns lands in the same split instead of in train
    and val at once. For a sample without system prompt and turns (and every memory item) that is its content
    hash, so their splits are those of the content hash."""
    turns = row.turns if kind == 0 else None
    if kind == 1 or (not row.system and (not turns or turns == "null" or turns == "[]")):
        return content_hash
    return content_hash_as_stored(None, (), row.prompt, row.response)


def check_ratios(
    val_ratio: float, test_ratio: float, sources: tuple[str, str] = ("valRatio", "testRatio")
) -> tuple[float, float]:
    """The split ratios, checked; `sources` name where each came from (a flag or an environment variable), so
    that a refusal says what to change."""
    names = (f"val ratio ({sources[0]})", f"test ratio ({sources[1]})")
    for name, value in zip(names, (val_ratio, test_ratio), strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UsageError(f"The {name} must be a finite number, got {value!r}.")
        if not 0.0 <= value < 1.0:
            raise UsageError(f"The {name} must be at least 0 and below 1, got {value}.")
    if val_ratio + test_ratio >= 1.0:
        raise UsageError(
            f"The {names[0]} and the {names[1]} must add up to less than 1 so that something is left to train "
            f"on, got {val_ratio} + {test_ratio}."
        )
    return float(val_ratio) + 0.0, float(test_ratio) + 0.0  # + 0.0: -0.0 is 0.0 (never echoed as "-0.0")


@dataclass(frozen=True)
class ExportSummary:
    """What `export()` wrote; `to_dict()` is the content of assistant-sft-summary.json."""

    directory: Path
    exported_at: str
    store_revision: str
    ratios: dict[str, float]
    counts: dict[str, dict[str, int]]
    files: dict[str, dict[str, Any]]
    fingerprint: str
    # guide names a person had saved over (`replaced_names`), each kept under another name by this export:
    # (name, the name it is kept as), both relative to data/training; not part of the summary file
    kept_aside: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def answer(self) -> dict[str, Any]:
        """What an export answers (POST /export, the export a quick start or an example adapter makes): the
        summary and the files it kept aside."""
        notes = self.notes()
        return self.to_dict() | {
            "kept_aside": [{"name": n, "kept_as": a} for n, a in self.kept_aside],
            "notes": [str(n) for n in notes],
            "note_codes": [n.coded for n in notes],
        }

    def notes(self) -> list[Note]:
        """A tier with samples of which none fell into train (ratios near 1, or a few samples): said when it is
        written, not first when a run on it fails its preflight."""
        return [
            nothing_to_train(tier, c["total"], self.ratios)
            for tier, c in self.counts.items()
            if c["total"] and not c["train"]
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SUMMARY_FORMAT,
            "exported_at": self.exported_at,
            "store_revision": self.store_revision,
            "ratios": self.ratios,
            "counts": self.counts,
            "files": self.files,
            "fingerprint": self.fingerprint,
        }


def nothing_to_train(tier: str, total: int, ratios: dict[str, float]) -> Note:
    """The export's note on a tier whose `total` samples all fell into val/test; also the refusal of a run on it."""
    val, test = ratios["val"], ratios["test"]
    return Note(
        "export.nothing_to_train",
        f"{_all_of(total)} of the {tier} tier fell into val/test (val ratio {val}, test ratio {test}), so "
        "a run on it has nothing to train on: add samples, or lower the ratios.",
        tier=tier,
        count=total,
        valRatio=val,
        testRatio=test,
    )


def refuse_nothing_to_train(settings: Settings, tier: Tier) -> None:
    """CheckFailed before a job is queued when the current export's `tier` has samples and none in train: the
    job could only fail (and its message would say the tier has none). An empty tier is the volume checks'."""
    summary = read_summary(settings)
    counts = ((summary or {}).get("counts") or {}).get(tier) or {}
    if counts.get("total") and not counts.get("train"):
        note = nothing_to_train(tier, counts["total"], summary["ratios"])
        raise CheckFailed(str(note), code=note.coded["code"], params=note.coded["params"])


def _all_of(n: int) -> str:
    return "The one sample" if n == 1 else f"All {n} samples"


class _Sink:
    """One output file under a temp name: buffered writes, running sha256, record and byte counts."""

    def __init__(self, directory: Path, name: str) -> None:
        # The whole directory is the temp name (see the module docstring): files get their final names.
        self.name = name
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as a plain open
        self.fh: BinaryIO = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.records = 0
        self.bytes = 0
        self._buf: list[bytes] = []
        self._buf_len = 0

    def write(self, line: bytes) -> None:
        self._buf.append(line)
        self._buf_len += len(line)
        self.records += 1
        if self._buf_len >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        chunk = b"".join(self._buf)
        self.fh.write(chunk)
        self.sha.update(chunk)
        self.bytes += len(chunk)
        self._buf, self._buf_len = [], 0

    def finish(self) -> dict[str, Any]:
        self._flush()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"sha256": self.sha.hexdigest(), "records": self.records, "bytes": self.bytes}

    def close(self) -> None:
        if not self.fh.closed:
            with contextlib.suppress(OSError):  # a failed flush of a discarded file is of no interest
                self.fh.close()


# Records are assembled as text from pre-encoded pieces instead of json.dumps(sort_keys=True) per record:
# about three times faster at 1M rows. `encode_basestring` is the exact string encoder json.dumps uses with
# ensure_ascii=False, keys are written in sorted order, and a test compares every line with json.dumps.
_enc = json.encoder.encode_basestring  # type: ignore[attr-defined]
# JSON allows these raw inside strings, but str.splitlines() and some editors break lines at them; escaped,
# every reader sees exactly one record per "\n"-terminated line.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _message(role: str, content: str, weight: int | None = None) -> str:
    # Keys in sorted order, as json.dumps(sort_keys=True) writes them; `weight` only on a turn kept as context.
    tail = ',"weight":0}' if weight == 0 else "}"
    return '{"content":' + _enc(content) + ',"role":"' + role + '"' + tail


@functools.lru_cache(maxsize=4096)
def _tags_json(raw: str | None) -> str:
    # Few distinct tag sets exist, so the decoded-and-encoded form is cached by the stored text.
    return "[" + ",".join(_enc(t) for t in (json.loads(raw) if raw else None) or ()) + "]"


def _line(
    *,
    rid: str,
    content_hash: str,
    source: str,
    split: str,
    conversation_id: str | None,
    rating: int | None,
    tags_raw: str | None,
    messages: list[str],
) -> bytes:
    text = (
        '{"conversation_id":'
        + ("null" if conversation_id is None else _enc(conversation_id))
        + ',"hash":"'
        + content_hash
        + '","id":"'
        + rid
        + '","messages":['
        + ",".join(messages)
        + '],"rating":'
        + ("null" if rating is None else str(rating))
        + ',"source":"'
        + source
        + '","split":"'
        + split
        + '","tags":'
        + _tags_json(tags_raw)
        + "}"
    )
    if not text.isascii():
        text = text.translate(_LINE_BREAKS)
    return (text + "\n").encode("utf-8")


def _example_rows(conn: sa.Connection) -> Iterator[tuple[str, int, Any]]:
    ex = examples_table
    query = (
        sa.select(
            ex.c.id,
            ex.c.hash,
            ex.c.prompt,
            ex.c.response,
            ex.c.system,
            # JSON columns as their stored text: decoded only when present (turns) or cached (tags).
            sa.cast(ex.c.turns, sa.Text).label("turns"),
            ex.c.source,
            ex.c.rating,
            sa.cast(ex.c.tags, sa.Text).label("tags"),
            ex.c.conversation_id,
        )
        .where(ex.c.status == "approved")
        .order_by(ex.c.hash)
    )
    for row in conn.execution_options(yield_per=_FETCH).execute(query):
        yield row.hash, 0, row  # 0: an example wins over a memory item with the same hash


def _memory_rows(conn: sa.Connection) -> Iterator[tuple[str, int, Any]]:
    m, ex = memory_table, examples_table
    query = (
        sa.select(
            m.c.id, m.c.hash, m.c.question, m.c.answer, sa.cast(m.c.tags, sa.Text).label("tags"), ex.c.conversation_id
        )
        # The conversation of an exported example with the same content (the merged tier's one sample stays
        # with its conversation); an example that is not exported (pending, rejected) must move nothing.
        .select_from(m.outerjoin(ex, sa.and_(ex.c.hash == m.c.hash, ex.c.status == "approved")))
        .where(m.c.status == "approved")
        .order_by(m.c.hash)
    )
    for row in conn.execution_options(yield_per=_FETCH).execute(query):
        yield row.hash, 1, row


def _record_line(kind: int, row: Any, split: str) -> bytes:
    if kind == 0:
        messages = [_message("system", row.system)] if row.system else []
        if row.turns and row.turns != "null":
            messages += [_message(t["role"], t["content"], t.get("weight")) for t in json.loads(row.turns)]
        messages += [_message("user", row.prompt), _message("assistant", row.response)]
        return _line(
            rid=f"ex-{row.id}",
            content_hash=row.hash,
            source=row.source,
            split=split,
            conversation_id=row.conversation_id,
            rating=row.rating,
            tags_raw=row.tags,
            messages=messages,
        )
    return _line(
        rid=f"mem-{row.id}",
        content_hash=row.hash,
        source="memory",
        split=split,
        conversation_id=None,
        rating=None,
        tags_raw=row.tags,
        messages=[_message("user", row.question), _message("assistant", row.answer)],
    )


def export(
    settings: Settings,
    *,
    val_ratio: float | None = None,
    test_ratio: float | None = None,
    on_progress: ProgressFn | None = None,
) -> ExportSummary:
    """Write all tiers, split files and the summary as a new export in `settings.training_dir` and switch to
    it in one step (see module docstring). Invalid ratios raise UsageError before anything is written; a
    failed write (full disk, I/O error) raises DiskFull / StorageError and leaves the previous export."""
    val, test = check_ratios(
        settings.train_val_ratio if val_ratio is None else val_ratio,
        settings.train_test_ratio if test_ratio is None else test_ratio,
        (
            "ASSISTANT_TRAIN_VAL_RATIO" if val_ratio is None else "valRatio",
            "ASSISTANT_TRAIN_TEST_RATIO" if test_ratio is None else "testRatio",
        ),
    )
    store = open_store(settings)
    out = settings.training_dir
    with storage_guard(out):
        (out / EXPORTS_DIR).mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".export.lock"):
        with storage_guard(f"the export in {out}"):
            _remove_leftovers(out)
            _adopt_flat_files(out)
            replaced = replaced_names(settings)
            export_id = _new_id(export_ids(settings))
            work = out / EXPORTS_DIR / f"{export_id}.partial"
            work.mkdir()
        final = work.with_name(export_id)
        try:
            with storage_guard(f"the export in {out}"):
                summary, done, total = _write_export(store, work, (val, test), on_progress)
                os.replace(work, final)
                fsync_dir(final.parent)
                _switch_current(out, export_id)
                kept = _keep_aside(out, replaced, export_id)
                _link_names(out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            # Renamed but never made current: nothing names it, and newer than the real exports it would count
            # among those kept. Once current, it stays (`current` names it).
            with contextlib.suppress(OSError):
                if final.is_dir() and current_id(settings) != export_id:
                    shutil.rmtree(final, ignore_errors=True)
            raise
        # Pruning is housekeeping: the export is complete and visible, a failure here must not undo that (what
        # cannot be removed stays for `gc` to name).
        with contextlib.suppress(OSError):
            _prune(settings, settings.retain_exports, False, None, {})  # the lock is already held
    if on_progress:
        on_progress(done, total)
    return dataclasses.replace(summary, directory=out, kept_aside=kept)


def _write_export(
    store: Any, work: Path, ratios: tuple[float, float], on_progress: ProgressFn | None
) -> tuple[ExportSummary, int, int]:
    """Every data file and the summary, fsynced, into the fresh directory `work`."""
    val, test = ratios
    counts = {t: {"total": 0, **{s: 0 for s in SPLITS}} for t in TIERS}
    sinks: dict[str, _Sink] = {}
    try:
        sinks.update((name, _Sink(work, name)) for name in DATA_FILES)
        # One read transaction: examples, memory and revision come from the same snapshot.
        with store.read() as conn:
            state = conn.execute(sa.select(state_table.c.instance, state_table.c.counter)).one()
            store_rev = f"{state.instance[:12]}-{state.counter}"
            total = conn.scalar(
                sa.select(sa.func.count()).select_from(examples_table).where(examples_table.c.status == "approved")
            ) + conn.scalar(
                sa.select(sa.func.count()).select_from(memory_table).where(memory_table.c.status == "approved")
            )
            done = 0
            last_memory = last_merged = None
            # (hash, kind, row) tuples: kind breaks hash ties, so rows themselves are never compared.
            rows = heapq.merge(_example_rows(conn), _memory_rows(conn))
            for content_hash, kind, row in rows:
                split = split_of(split_key(pair_hash(kind, row, content_hash), row.conversation_id), val, test)
                line = _record_line(kind, row, split)
                source = row.source if kind == 0 else "memory"
                if source == "curated":
                    sinks[CURATED_FILE].write(line)
                    sinks[SPLIT_FILES[split]].write(line)
                    counts["curated"]["total"] += 1
                    counts["curated"][split] += 1
                if source == "memory" and content_hash != last_memory:
                    sinks[MEMORY_FILE].write(line)
                    counts["memory"]["total"] += 1
                    counts["memory"][split] += 1
                    last_memory = content_hash
                if content_hash != last_merged:
                    sinks[MERGED_FILE].write(line)
                    counts["merged"]["total"] += 1
                    counts["merged"][split] += 1
                    last_merged = content_hash
                done += 1
                if on_progress and done % _PROGRESS_EVERY == 0:
                    on_progress(done, total)
        files = {name: sinks[name].finish() for name in DATA_FILES}
    finally:
        for sink in sinks.values():
            sink.close()
    summary = ExportSummary(
        directory=work,
        exported_at=now_iso(),
        store_revision=store_rev,
        ratios={"train": round(1.0 - val - test, 10), "val": val, "test": test},
        counts=counts,
        files=files,
        fingerprint=dataset_fingerprint({name: files[name]["sha256"] for name in DATA_FILES}),
    )
    _write_durable(work / SUMMARY_FILE, dumps_json(summary.to_dict()).encode("utf-8"))
    (work / READERS_LOCK).touch()  # made by the writer: a reader (`pinned`) never writes into the data root
    fsync_dir(work)
    return summary, done, total


def _write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as a plain open
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_leftovers(out: Path) -> None:
    """Temp names a crashed export left beside the names: link temps (killed between symlink and rename)
    and the per-file temps of the layout before .exports/. Partial directories go with pruning."""
    for pattern in (".assistant-sft*.tmp", ".assistant-sft*.link", f".{CURRENT_LINK}.*"):
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)


def _new_id(existing: list[str]) -> str:
    """Sortable by time (pruning keeps the newest by name), unique across concurrent machines sharing a
    directory. Never before the `existing` ids, though: after the clock stepped back (an NTP correction) a
    name by the clock alone would sort first, and pruning would drop the newest exports and keep the oldest.
    Then it takes the newest one's time plus a microsecond."""
    stamp = compact_stamp()
    # not a folder someone else named (`backup`), nor a partial one
    ours = [when for when in map(_export_time, existing) if when is not None]
    if ours and stamp <= max(ours).strftime(STAMP_FORMAT):
        stamp = (max(ours) + timedelta(microseconds=1)).strftime(STAMP_FORMAT)
    return stamp + "-" + uuid.uuid4().hex[:6]


def _switch_current(out: Path, export_id: str) -> None:
    """Point `current` at `.exports/<export_id>` with one rename: the single step that makes it visible."""
    tmp = out / f".{CURRENT_LINK}.{uuid.uuid4().hex[:8]}"
    os.symlink(Path(EXPORTS_DIR, export_id), tmp)
    os.replace(tmp, out / CURRENT_LINK)
    fsync_dir(out)


def replaced_names(settings: Settings, names: Iterable[str] = (*DATA_FILES, SUMMARY_FILE)) -> list[str]:
    """Those of the guide's `names` in data/training that are no longer links into `current/` but files with
    other content: an editor or `sed -i` saving one writes a new file over the link. What the person sees
    there is then not what a run trains on (runs read the export), and the next export would put the link
    back: a run refuses them (`refuse_replaced`), an export keeps them aside."""
    out = settings.training_dir
    if not (out / CURRENT_LINK).is_symlink():  # an earlier release's flat layout: the files are the export
        return []
    found = []
    for name in names:
        path = out / name
        if path.is_symlink() or not path.is_file():
            continue
        try:
            same = filecmp.cmp(path, out / CURRENT_LINK / name, shallow=False)
        except OSError:  # nothing exported under that name to compare with
            same = False
        if not same:
            found.append(name)
    return found


def replaced_sentence(names: list[str]) -> str:
    """What `replaced_names` found, and what to do: the edit goes into the database."""
    first = f"data/training/{names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
    return (
        f"{first} is no longer the exported file: it was saved over (an editor, `sed -i`), and runs train on "
        "the export, not on it. Make the change in the database (`lunatrain examples …`) and run "
        "`lunatrain export`, which keeps your file under another name."
    )


def refuse_replaced(settings: Settings, tier: Tier) -> None:
    """CheckFailed when a file of `tier` under the guide's names was saved over (`replaced_names`)."""
    names = replaced_names(settings, tier_names(tier))
    if names:
        raise CheckFailed(replaced_sentence(names))


def tier_names(tier: Tier) -> tuple[str, ...]:
    """The guide's file names that show `tier`: the curated tier's file and its split files, or the one file."""
    return (CURATED_FILE, *SPLIT_FILES.values()) if tier == "curated" else (TIER_FILES[tier],)


def _keep_aside(out: Path, names: list[str], export_id: str) -> list[tuple[str, str]]:
    """Rename each of `names` (files a person saved over the links) to `<stem>.edited-<export id><suffix>`,
    so that linking the names again loses no edit."""
    kept = []
    for name in names:
        stem, dot, suffix = name.rpartition(".")
        aside = f"{stem}.edited-{export_id}.{suffix}" if dot else f"{name}.edited-{export_id}"
        os.replace(out / name, out / aside)
        kept.append((name, aside))
    return kept


def _link_names(out: Path) -> None:
    """Make each guide name a symlink into `current/` (a no-op once done: the links never change)."""
    for name in (*DATA_FILES, SUMMARY_FILE):
        path, want = out / name, Path(CURRENT_LINK, name)
        if path.is_symlink() and Path(os.readlink(path)) == want:
            continue
        tmp = out / f".{name}.{uuid.uuid4().hex[:8]}.link"
        os.symlink(want, tmp)
        os.replace(tmp, path)
    fsync_dir(out)


def _adopt_flat_files(out: Path) -> None:
    """A data root exported before `.exports/` existed holds plain files: hard-link them into an export
    directory and point `current` at it, then turn the names into links (each one content-identical), so
    the later switch to the new export is again one rename. A `current` that is a folder (a copy that
    followed links) becomes an export directory itself."""
    current = out / CURRENT_LINK
    if current.is_symlink():
        return
    if current.is_dir():  # a copy that followed the links (`cp -rL`, `rsync -rL`): `current` holds the export
        export_id = _new_id([p.name for p in (out / EXPORTS_DIR).iterdir()])
        os.replace(current, out / EXPORTS_DIR / export_id)
        fsync_dir(out / EXPORTS_DIR)
        _switch_current(out, export_id)
        return  # the names are plain copies now: the export links them again, and keeps an edited one aside
    flat = [name for name in (*DATA_FILES, SUMMARY_FILE) if (out / name).is_file() and not (out / name).is_symlink()]
    if not flat:
        return
    export_id = _new_id([p.name for p in (out / EXPORTS_DIR).iterdir()])
    work = out / EXPORTS_DIR / f"{export_id}.partial"
    work.mkdir()
    for name in flat:
        try:
            os.link(out / name, work / name)
        except OSError:  # a file system without hard links
            shutil.copy2(out / name, work / name)
    fsync_dir(work)
    os.replace(work, work.with_name(export_id))
    fsync_dir(work.parent)
    _switch_current(out, export_id)
    _link_names(out)


# An export's folder name (`_new_id`); a folder named otherwise (a copy someone keeps there) is not ours to prune.
_EXPORT_ID = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{6}")


def _export_time(name: str) -> datetime | None:
    """When the export `name` was made, by its name; None for a name that is not an export's (not `_EXPORT_ID`,
    a day that does not exist, or one more than a year ahead: a clock stepped back leaves exports some time
    ahead of it, but a folder of 2099 or 9999 is nobody's export, and new ids must not follow it)."""
    if not _EXPORT_ID.fullmatch(name):
        return None
    try:
        when = datetime.strptime(name.split("-", 1)[0], STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
    return when if when <= utc_now() + timedelta(days=366) else None


def export_ids(settings: Settings) -> list[str]:
    """The complete export directories, oldest first."""
    root = settings.training_dir / EXPORTS_DIR
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and _export_time(p.name))
    except FileNotFoundError:
        return []


def tier_sha_at(settings: Settings, tier: Tier, when: datetime | None = None) -> str | None:
    """The sha256 of `tier`'s file in the export current at `when` (the last one made by then, while it is
    kept; default: the current one), None when none is known: what a job that started then read."""
    if when is None:
        summary = read_summary(settings)
    else:
        made = [name for name in export_ids(settings) if (at := _export_time(name)) is not None and at <= when]
        summary = read_summary(settings, settings.training_dir / EXPORTS_DIR / made[-1]) if made else None
    entry = ((summary or {}).get("files") or {}).get(TIER_FILES[tier]) or {}
    return str(entry["sha256"]) if entry.get("sha256") else None


def current_id(settings: Settings) -> str | None:
    link = settings.training_dir / CURRENT_LINK
    return Path(os.readlink(link)).name if link.is_symlink() else None


def prune_exports(
    settings: Settings,
    keep: int,
    *,
    dry_run: bool = False,
    sizes: dict[Path, int] | None = None,
    failed: dict[Path, OSError] | None = None,
) -> list[Path]:
    """Export directories beyond the `keep` newest (the current one always stays) and partial ones left by
    a crash; removed unless `dry_run`. Returns them; `sizes` gets the bytes of each, measured before it goes,
    and `failed` each that could not be removed (not returned: it stays), the others going on past it.
    Takes the export lock, so it never races an export or another prune (a dry run only reads: a shared
    one, which a read-only data root does not refuse)."""
    out = settings.training_dir
    if not (out / EXPORTS_DIR).is_dir():
        return []
    with file_lock(out / ".export.lock", shared=dry_run):
        return _prune(settings, keep, dry_run, sizes, failed)


def _prune(settings: Settings, keep: int, dry_run: bool, sizes: dict | None, failed: dict | None) -> list[Path]:
    """`prune_exports` with the export lock held (by it, or by an export that prunes after itself)."""
    root = settings.training_dir / EXPORTS_DIR
    current = current_id(settings)
    ids = export_ids(settings)
    kept = {current} | set(ids[-max(keep, 1) :])
    doomed = [root / i for i in ids if i not in kept]
    doomed += sorted(p for p in root.iterdir() if p.suffix == ".partial" and _export_time(p.stem))
    removed = []
    for path in doomed:
        with _unread(path) as free:
            if not free:  # a reader pinned it (`pinned`): the next prune takes it
                continue
            if sizes is not None:
                sizes[path] = tree_size(path)
            if not dry_run:
                try:
                    remove_tree(path)
                except OSError as exc:  # another user's folder, a read-only mount: it stays, the rest goes
                    if failed is not None:
                        failed[path] = exc
                    continue
            removed.append(path)
    return removed


READERS_LOCK = ".readers.lock"  # in an export's folder, made with it: readers hold it shared, a prune exclusively


@contextlib.contextmanager
def _unread(path: Path) -> Iterator[bool]:
    """Whether no reader holds the export in `path`; while True, none can pin it (it waits, then finds it
    gone)."""
    try:
        fd = os.open(path / READERS_LOCK, os.O_RDONLY)
    except OSError:  # never read through `pinned` (or not a folder): nothing holds it
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def pinned(settings: Settings) -> Iterator[Path]:
    """The current export's directory (`export_dir`), kept from pruning while the block reads it: an export
    that finishes meanwhile makes another one current, and its retention would otherwise remove the folder
    being read (prepare then found every file "differing from the summary"). A shared flock on the folder's
    READERS_LOCK, which `_prune` asks for without waiting and skips a folder that holds it."""
    for _ in range(8):
        directory = export_dir(settings)
        if directory == settings.training_dir:  # read in place (no .exports/): nothing prunes it
            yield directory
            return
        try:
            fd = os.open(directory / READERS_LOCK, os.O_RDONLY)  # flock takes a read-only descriptor too
        except FileNotFoundError:
            fd = None
            if not directory.is_dir():
                continue  # pruned since it was resolved: the one current now
        except OSError:
            fd = None
        if fd is None:  # nothing to pin by: an export from before READERS_LOCK, or one without its summary
            yield directory
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if directory.is_dir():  # still there (a summary missing from it is the reader's to say)
                yield directory
                return
        finally:
            os.close(fd)
    raise StorageError(
        f"The export in {settings.training_dir} was replaced again and again while it was being read; try again."
    )


# --- reading an export back ---------------------------------------------------------------------


@dataclass(frozen=True)
class TierData:
    """One tier of the last export, split by each record's "split" field."""

    tier: str
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    fingerprint: str
    summary: dict[str, Any] = field(repr=False)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.train + self.val + self.test

    @property
    def sha256(self) -> str | None:
        """The tier file's own sha256 (the whole export's `fingerprint` changes with the other tiers too); None
        when the summary does not list it (prepare's export_summary check says so)."""
        entry = (self.summary.get("files") or {}).get(TIER_FILES[self.tier]) or {}
        return str(entry["sha256"]) if entry.get("sha256") else None

    @functools.cached_property
    def trained_sha256(self) -> str:
        """A sha256 of what a run reads of the tier: each split's records in order, by their content hash and
        messages. Ids, tags, ratings and sources are left out: new tags on an example (deleted and added again,
        so a new id) change the file, not the weights a run would train (`flow.unchanged_version`)."""
        digest = hashlib.sha256()
        for split, records in (("train", self.train), ("val", self.val), ("test", self.test)):
            for rec in records:
                line = [split, rec.get("hash"), rec.get("messages")]
                digest.update(json.dumps(line, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        return digest.hexdigest()


def export_dir(settings: Settings) -> Path:
    """The directory of the current export, resolved once: read every file of one export from here, so a
    new export switching in meanwhile can never mix two. A data root without `current` (no export yet, or
    one written before `.exports/`) is read in place."""
    out = settings.training_dir
    link = out / CURRENT_LINK
    if not link.is_symlink():
        return out
    target = out / os.readlink(link)
    if not target.is_dir():
        raise CheckFailed(f"{link} points to a missing export ({target.name}); run `lunatrain export` again.")
    return target


def kept_ratios(
    settings: Settings, val_ratio: float | None = None, test_ratio: float | None = None
) -> dict[str, float | None]:
    """The ratios an export that names one or none (`lunatrain export`, the dashboard's Export, a flow's export)
    takes, as `export`'s keyword arguments: those it names, else the current export's where the environment
    sets none. A split chosen with `export --valRatio 0.3` would otherwise go back to the defaults at the next
    `luna`: samples of val/test trained on, and earlier versions' val losses measured on other data. A kept ratio
    that does not fit with one named or set (together 1 or more) is left to the settings."""
    try:
        ratios = (read_summary(settings) or {}).get("ratios") or {}
    except CheckFailed:
        ratios = {}
    out: dict[str, float | None] = {"val_ratio": val_ratio, "test_ratio": test_ratio}
    for split, setting in (("val", "train_val_ratio"), ("test", "train_test_ratio")):
        value = ratios.get(split)
        usable = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1
        if out[f"{split}_ratio"] is None and setting not in settings.model_fields_set and usable:
            out[f"{split}_ratio"] = float(value)
    val = settings.train_val_ratio if out["val_ratio"] is None else out["val_ratio"]
    test = settings.train_test_ratio if out["test_ratio"] is None else out["test_ratio"]
    if val + test >= 1:  # a kept one beside another named or set: what was named or set is said, as before
        return {"val_ratio": val_ratio, "test_ratio": test_ratio}
    return out


def read_summary(settings: Settings, directory: Path | None = None) -> dict[str, Any] | None:
    """The summary of the export in `directory` (default: the current one), or None when there is none."""
    path = (directory or export_dir(settings)) / SUMMARY_FILE
    try:
        summary = read_json(path)
    except DamagedFile as err:
        raise _unreadable(f"{path} is not valid JSON; run `lunatrain export` again.", path, err.why) from None
    except StorageError as err:
        # The reason alone (its OSError's), so that a reader in another language gets it without the sentence.
        cause = err.__context__
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else err.message.rstrip(".")
        raise _unreadable(f"{err.message} Run `lunatrain export` again.", path, why) from None
    if summary is not None and (
        not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT or not _summary_shaped(summary)
    ):
        raise _unreadable(
            f"{path} is not a lunatrain export summary; run `lunatrain export` again.",
            path,
            "not a lunatrain export summary",
        )
    return summary


def _unreadable(sentence: str, path: Path, why: str) -> CheckFailed:
    """A summary that cannot be read, coded with its path and the reason alone (`status` says it among its
    problems in the reader's language)."""
    return CheckFailed(sentence, code="export.summary_unreadable", params={"path": str(path), "reason": why})


def _summary_shaped(summary: dict[str, Any]) -> bool:
    """Whether a summary holds what its readers take from it without checking: an object per data file and per
    tier, the ratios as an object and the fingerprint as a string (a summary edited by hand may not)."""
    files, counts = summary.get("files", {}), summary.get("counts", {})
    return (
        isinstance(files, dict)
        and all(isinstance(f, dict) for f in files.values())
        and isinstance(counts, dict)
        and all(isinstance(c, dict) for c in counts.values())
        and isinstance(summary.get("ratios", {}), dict)
        and isinstance(summary.get("fingerprint"), str)
    )


def dataset_fingerprint(shas: dict[str, str]) -> str:
    """The dataset fingerprint from each data file's sha256: independent of the export time."""
    return hashlib.sha256("".join(f"{name} {shas[name]}\n" for name in sorted(shas)).encode()).hexdigest()


def no_export(settings: Settings) -> NotFound:
    """The one refusal of every step that needs an export when there is none (coded: the dashboard says it
    in the reader's language)."""
    return NotFound(
        f"No export found in {settings.training_dir}; run `lunatrain export` first.",
        code="export.missing",
        params={"dir": str(settings.training_dir)},
    )


def withdrawn(settings: Settings, records: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(deleted, rejected): the ids of an export's `records` whose content was deleted from the store since,
    and of those rejected since (`store.rejected_since`). Both are what the user said not to train on."""
    from . import store

    records = list(records)
    gone = store.deleted_hashes(settings).keys()
    deleted = sorted({str(r.get("id")) for r in records if r.get("hash") in gone})
    return deleted, sorted(store.rejected_since(settings, records) - set(deleted))


def refuse_withdrawn(settings: Settings, tier: Tier, data: TierData | None = None) -> None:
    """CheckFailed when `tier` of the last export (`data`, when the caller read it already) holds content
    deleted from the store or rejected since (`withdrawn`): no run trains on it. Before a job is queued (as
    minCurated is checked) and again by the run. The tier is read only when the store changed since the
    export (its revision). No export, one that cannot be read, or a store that cannot be read refuses nothing
    here: the run says what is wrong with the export, and a run needs only the export (a version trained
    meanwhile is marked stale when the store is read next, at a delete or a repair)."""
    from . import store

    try:
        summary = data.summary if data is not None else read_summary(settings)
        if summary is None or not store.has_database(settings):
            return
        if store.revision(settings) == summary.get("store_revision"):
            return
        data = data or read_tier(settings, tier)
        deleted, rejected = withdrawn(settings, data.records)
    except LunaError:
        return
    if deleted or rejected:
        what = "deleted or rejected" if deleted and rejected else "deleted" if deleted else "rejected"
        n = len(deleted) or len(rejected)
        held = f"{n} sample{'s' if n != 1 else ''} {'deleted' if deleted else 'rejected'}"
        if deleted and rejected:
            held += f" and {len(rejected)} rejected"
        kind = "withdrawn" if deleted and rejected else "deleted" if deleted else "rejected"
        raise CheckFailed(
            f"The export holds {held} since it was written; run `lunatrain export` first, "
            f"so that {what} content is not trained on.",
            # prepare's check, for a reader in another language (the dashboard says it as its preflight does)
            params={
                "check": f"check.export_stale.{kind}",
                "count": len(deleted) + len(rejected),
                "deleted": len(deleted),
                "rejected": len(rejected),
            },
        )


def read_tier(settings: Settings, tier: Tier) -> TierData:
    """Load one tier (curated | memory | merged) of the last export, verified against its summary."""
    if tier not in TIERS:
        raise UsageError(f"Unknown dataset tier {tier!r}: use one of {', '.join(TIERS)}.")
    directory = export_dir(settings)
    summary = read_summary(settings, directory)
    if summary is None:
        raise no_export(settings)
    name = TIER_FILES[tier]
    path = directory / name
    expected = summary.get("files", {}).get(name, {}).get("sha256")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckFailed(f"{path} is missing; run `lunatrain export` again.") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckFailed(f"{path} does not match the export summary (changed or torn); run `lunatrain export` again.")
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for line in data.decode("utf-8").split("\n"):
        if not line:
            continue
        record = json.loads(line)
        by_split[record["split"]].append(record)
    return TierData(tier, by_split["train"], by_split["val"], by_split["test"], summary["fingerprint"], summary)
