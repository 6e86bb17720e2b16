"""`lunatrain examples …` and `lunatrain memory …`: ingest, list and curate the training data."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import formats, registry, store
from ..api.schemas import ExampleOut, ImportResult, MemoryOut
from ..errors import LunaError, UsageError
from ..messages import counted
from ..settings import load_settings
from ..wire import INT_MAX
from .app import app, as_written, fail, fail_listing, is_tty, json_text, list_problems, tables_fit, visible

examples_app = typer.Typer(help="Add, import, list and curate training examples.", no_args_is_help=True)
memory_app = typer.Typer(help="Facts Luna remembers; exported as question/answer samples.", no_args_is_help=True)
app.add_typer(examples_app, name="examples")
app.add_typer(memory_app, name="memory")

SourceOpt = Annotated[str | None, typer.Option("--source", help="curated | memory | conversation")]
StatusOpt = Annotated[str | None, typer.Option("--status", help="approved | pending | rejected")]
LimitOpt = Annotated[int, typer.Option("--limit", help="at most this many")]
OffsetOpt = Annotated[int, typer.Option("--offset", help="skip this many first (pages with --limit)")]
SearchOpt = Annotated[
    str | None,
    typer.Option("--search", metavar="TEXT", help="only those with TEXT in any of their texts or tags (any case)"),
]

IdsArg = Annotated[list[str], typer.Argument(metavar="IDS", help="example ids (12 or ex-12)")]
MemIdsArg = Annotated[list[str], typer.Argument(metavar="IDS", help="memory ids (3 or mem-3)")]


def _ids(raw: list[str], prefix: str, verb: str) -> list[int]:
    """Accept the plain id and the prefixed form used in export records (ex-12, mem-3). The other kind's
    (`mem-3` to an examples command, as prepare's report names memory items) names the command that takes it."""
    ids = []
    for value in raw:
        if (other := formats.other_kind(value, prefix)) is not None:
            what, group = formats.ID_KINDS[other]
            raise UsageError(
                f"{value!r} is {what}'s id: `lunatrain {group} {verb} {value}` {verb}s it (this command takes "
                f"ids such as 12 or {prefix}-12)."
            )
        number = formats.record_number(value, prefix)
        if number is None or not 1 <= number <= INT_MAX:
            raise UsageError(f"Invalid id {value!r}: use a number such as 12 or {prefix}-12.")
        ids.append(number)
    return ids


def _typed(**given: Any) -> dict[str, Any]:
    """The text arguments as typed. Python hands a byte its locale cannot read over as a lone surrogate
    (U+DC80..U+DCFF): under an ASCII locale (`LC_ALL=C` without Python's UTF-8 mode) UTF-8 text arrives so,
    and is read as UTF-8 here; a byte that is not UTF-8 (a terminal in Latin-1 under a UTF-8 locale) is refused,
    naming the byte and the flag, where the store would refuse it as "not valid Unicode text", a thing nobody
    typed. Only here: in a JSON file or body the same surrogate is an escape (`\\udce9`), no byte at all."""
    return {
        flag: [_text(flag, t) for t in value] if isinstance(value, list) else _text(flag, value)
        for flag, value in given.items()
    }


def _text(flag: str, text: str | None) -> str | None:
    bad = next((ord(c) for c in text or "" if 0xDC80 <= ord(c) <= 0xDCFF), None)
    if text is None or bad is None:
        return text
    with contextlib.suppress(UnicodeError):
        return os.fsencode(text).decode("utf-8")
    raise fail(
        UsageError(
            f"--{flag} holds the byte 0x{bad - 0xDC00:02X}, which is not UTF-8: set the terminal to UTF-8 (LANG, "
            "LC_ALL) or type the text again."
        )
    )


def _tags(given: list[str] | None) -> list[str]:
    """--tag values as given; an empty one is refused, as the API refuses it, rather than dropped unseen."""
    if any(not t.strip() for t in given or []):
        raise fail(UsageError("--tag must not be empty: give a word such as --tag greeting, or leave --tag out."))
    return given or []


def _table(title: str, columns: list[str], rows: Iterable[list[str]], *, limit: int, offset: int) -> None:
    """A rich table on a terminal; else tab-separated lines, written as the rows come (a listing of the whole
    store streams). A page as long as `limit` may not be all: the next page's `--offset` is said on stderr."""
    shown = 0
    if tables_fit(is_tty()):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(as_written(cell) for cell in row))
            shown += 1
        Console().print(table)
    else:
        for row in rows:
            typer.echo("\t".join(visible(cell) for cell in row))
            shown += 1
    _more_may_follow(shown, limit, offset)


def _more_may_follow(shown: int, limit: int, offset: int) -> None:
    """A listing cut at its limit says so on stderr, with JSON too: `list --json > all.json` is a page."""
    if shown == limit:
        typer.echo(f"{shown} listed; more may follow: --offset {offset + limit} lists the next ones.", err=True)


def _json_array(items: Iterable[dict[str, Any]]) -> int:
    """What `json.dumps(list(items), indent=2)` prints, written item by item: a listing of the whole store
    never holds it all (nor its JSON) in memory."""
    out = sys.stdout
    first, written = True, 0
    for item in items:
        written += 1
        # Indented at the layout's own line breaks only: json.dumps escapes "\n" in strings, but not U+2028 or
        # U+0085, at which str.splitlines (and so textwrap.indent) would break inside a value.
        text = json_text(item).replace("\n", "\n  ")
        out.write(("[\n  " if first else ",\n  ") + text)
        first = False
    out.write("[]\n" if first else "\n]\n")
    out.flush()
    return written


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@examples_app.command("add")
def add_cmd(
    prompt: Annotated[str, typer.Option("--prompt", help="the user's message")],
    response: Annotated[str, typer.Option("--response", help="Luna's answer")],
    system: Annotated[str | None, typer.Option("--system", help="optional system prompt")] = None,
    source: Annotated[str, typer.Option("--source", help="curated | memory | conversation")] = "curated",
    status: StatusOpt = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="a tag (repeatable)")] = None,
    conversation_id: Annotated[
        str | None, typer.Option("--conversation-id", "--conversationId", help="the conversation it comes from")
    ] = None,
    rating: Annotated[int | None, typer.Option("--rating", help="1-5")] = None,
) -> None:
    """Add one example (approved by default; pending for source=conversation)."""
    typed = _typed(prompt=prompt, response=response, system=system, tag=tag, conversationId=conversation_id)
    prompt, response, system, tag = typed["prompt"], typed["response"], typed["system"], typed["tag"]
    conversation_id = typed["conversationId"]
    tags = _tags(tag)
    try:
        ex = store.add_example(
            load_settings(),
            prompt=prompt,
            response=response,
            system=system,
            source=source,  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            tags=tags,
            conversation_id=conversation_id,
            rating=rating,
        )
    except LunaError as err:
        raise fail(err) from None
    typer.echo(f"Added example {ex.id} ({ex.source}, {ex.status}).")


@examples_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=".jsonl, .json or .csv")],
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="curated | memory | conversation for every record; unset: a record's own `source` when it is one "
            "of these (as lunatrain's export writes it), else curated",
        ),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            help="approved | pending | rejected for every record; unset: a record's own `status` (another value "
            "is a bad record), else approved (pending with --source conversation)",
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto | openai | sharegpt | alpaca | prompt-response")] = "auto",
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            "--skipBad",
            help="import the good records and list the bad ones (without it a bad record imports nothing)",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print the result as JSON, with every record left out (`leftOut`); a refused import prints "
            "its error and every problem",
        ),
    ] = False,
) -> None:
    """Import a file in one transaction: a bad record imports nothing (unless --skip-bad); known content is
    skipped. A conversation's answer is its last assistant turn; turns after it are left out."""
    try:
        res = store.import_file(
            load_settings(),
            file,
            source=source,  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            fmt=fmt,
            skip_bad=skip_bad,
        )
    except LunaError as err:  # every problem, as the API's 422 names them; the sentence on stderr
        raise fail_listing(err, as_json) from None
    if as_json:
        out = ImportResult(
            records=res.records,
            added=res.added,
            duplicates=res.skipped_duplicates,
            formats=res.formats,
            kept_beside=ImportResult.kept(res.kept_beside),
        ).wire()  # the API's import answer, plus what only a file import has
        out = {"file": file.name, **out, "storeRevision": res.revision, "leftOut": list(res.bad)}
        out["notApproved"] = [{"id": f"ex-{n}", "status": st} for n, st in res.not_approved]
        typer.echo(json_text(out))
        return
    shapes = ", ".join(f"{n} {k}" for k, n in sorted(res.formats.items()))
    left_out = f"; {counted(len(res.bad), 'bad record')} left out:" if res.bad else "."
    typer.echo(
        f"Imported {file.name}: {res.added} added, {res.skipped_duplicates} already present ({shapes}){left_out}"
    )
    list_problems(list(res.bad))
    if res.not_approved:
        # as `examples add` says of one: the user meant them trained, and they stay out of every export
        held, shown = res.not_approved, res.not_approved[:10]  # a large import's: the first few, and where the rest are
        which = ", ".join(f"ex-{n} {st}" for n, st in shown) + (
            f", and {len(held) - len(shown)} more" if held[10:] else ""
        )
        statuses = sorted({st for _, st in held})
        how = (
            f"`lunatrain examples approve {' '.join(str(n) for n, _ in held)}` makes {'it' if len(held) == 1 else 'them'} trained"
            if not held[10:]
            else " and ".join(f"`lunatrain examples list --status {st}`" for st in statuses) + " list them"
        )
        typer.echo(
            f"Note: {len(held)} of the records already present "
            + ("is not approved, and keeps its status" if len(held) == 1 else "are not approved, and keep their status")
            + f" ({which}): {how}."
        )
    for old, new in res.kept_beside:
        typer.echo(
            f"Note: ex-{old} was edited in the file: the edit is ex-{new}, and ex-{old} keeps its old content, still "
            f"approved and exported; `lunatrain examples delete {old}` if the edit replaces it."
        )


@examples_app.command("list")
def list_cmd(
    source: SourceOpt = None,
    status: StatusOpt = None,
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    search: SearchOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: one array of the API's Example")] = False,
) -> None:
    """List examples in the order they were added."""
    try:
        items = store.iter_examples(
            load_settings(),
            source=source,  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            limit=limit,
            offset=offset,
            search=search,
        )
        if as_json:
            _more_may_follow(_json_array(ExampleOut.of(e).wire() for e in items), limit, offset)
            return
        rows = ([str(e.id), e.source, e.status, _short(e.prompt, 40), _short(e.response)] for e in items)
        _table("examples", ["id", "source", "status", "prompt", "response"], rows, limit=limit, offset=offset)
    except LunaError as err:  # the arguments at once, a storage fault while reading
        raise fail(err) from None


def _curate(set_status: Callable[..., int], ids: list[str], prefix: str, what: str, status: store.Status) -> None:
    """Set the curation status of examples or memory items: all ids or none (an unknown one changes nothing)."""
    try:
        changed = set_status(
            load_settings(), _ids(ids, prefix, {"approved": "approve", "rejected": "reject"}[status]), status
        )
    except LunaError as err:
        raise fail(err) from None
    typer.echo(f"{counted(changed, what)} set to {status}.")


@examples_app.command("approve")
def approve_cmd(ids: IdsArg) -> None:
    """Approve examples: they are exported for training."""
    _curate(store.set_status, ids, "ex", "example", "approved")


@examples_app.command("reject")
def reject_cmd(ids: IdsArg) -> None:
    """Reject examples: they stay stored but are never exported."""
    _curate(store.set_status, ids, "ex", "example", "rejected")


@examples_app.command("delete")
def delete_cmd(ids: IdsArg) -> None:
    """Delete examples; adapter versions trained on them are marked stale (retrain needed)."""
    _delete(store.delete_examples, ids, "ex", "example")


def _delete(delete: Callable[..., store.Deletion], ids: list[str], prefix: str, what: str) -> None:
    """Delete, then mark the adapter versions trained on the deleted content stale, and say which."""
    try:
        settings = load_settings()
        deletion = delete(settings, _ids(ids, prefix, "delete"))
        stale = registry.refresh_stale(settings, deletion.hashes)
    except LunaError as err:
        raise fail(err) from None
    held = ""
    if deletion.still_held:  # the same content as the other kind, approved: exported and trained on all the same
        ids = ", ".join(deletion.still_held)
        held = (
            f" Its content is still held, approved, as {ids}: the tiers that export "
            f"{'it' if len(deletion.still_held) == 1 else 'them'} keep it, and so do the adapters trained on it; delete "
            f"{'that' if len(deletion.still_held) == 1 else 'those'} too to forget it."
        )
    typer.echo(
        f"Deleted {counted(deletion.count, what)}."
        + held
        + (f" Retrain needed: {', '.join(stale)} (trained on them)." if stale else "")
    )


@examples_app.command("seed")
def seed_cmd() -> None:
    """Load the bundled Luna dataset: adds each of its examples and memory items the store lacks (one you
    deleted comes back, with its bundled status); running it again adds nothing."""
    try:
        res = store.load_seed(load_settings())
    except LunaError as err:
        raise fail(err) from None
    typer.echo(
        f"Seed dataset: {counted(res.examples_added, 'example')} added ({res.examples_skipped} already present), "
        f"{counted(res.memory_added, 'memory item')} added ({res.memory_skipped} already present)."
    )


@memory_app.command("add")
def memory_add_cmd(
    question: Annotated[str, typer.Option("--question", help="how the fact is asked")],
    answer: Annotated[str, typer.Option("--answer", help="Luna's answer")],
    topic: Annotated[str | None, typer.Option("--topic", help="what the fact is about, to find it again")] = None,
    status: Annotated[str, typer.Option("--status", help="approved | pending | rejected")] = "approved",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="a tag (repeatable)")] = None,
) -> None:
    """Remember a fact."""
    typed = _typed(question=question, answer=answer, topic=topic, tag=tag)
    question, answer, topic, tag = typed["question"], typed["answer"], typed["topic"], typed["tag"]
    tags = _tags(tag)
    try:
        settings = load_settings()
        item = store.add_memory(settings, question=question, answer=answer, topic=topic, status=status, tags=tags)  # type: ignore[arg-type]
    except LunaError as err:
        raise fail(err) from None
    if item.status != "approved":
        typer.echo(f"Added memory item {item.id} ({item.status}).")
        return
    typer.echo(f"Added memory item {item.id}." + _memory_tier_hint(settings))


def _memory_tier_hint(settings: Any) -> str:
    """Where the fact is trained, when the Luna profile (what `lunatrain luna` trains) leaves it out: memory
    items are exported to the memory and merged tiers, and the shipped profile trains curated."""
    from ..profiles import load_profile

    try:  # the values a run on the configured base gets: [lora], then that base's [bases."…"] table
        tier = load_profile(settings, "luna").params().dataset_tier
    except (LunaError, OSError):  # a profile of the user's that does not load: its own commands say so
        return ""
    if tier != "curated":
        return ""
    return (
        " Memory items are trained in the memory and merged tiers; the luna profile trains curated, so train "
        "with `--datasetTier=merged` for Luna to learn it."
    )


@memory_app.command("import")
def memory_import_cmd(
    file: Annotated[Path, typer.Argument(help="what `memory list --json` writes, or JSON Lines/CSV of memory items")],
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print the result as JSON; a refused import prints the error with every problem"),
    ] = False,
) -> None:
    """Import memory items in one transaction (to move them to another database): a bad record imports nothing;
    items stored already are skipped."""
    try:
        res = store.import_memory_file(load_settings(), file)
    except LunaError as err:
        raise fail_listing(err, as_json) from None
    if as_json:
        out = {"file": file.name, "records": res.records, "added": res.added, "duplicates": res.skipped_duplicates}
        typer.echo(json_text(out | {"storeRevision": res.revision}))
        return
    typer.echo(f"Imported {file.name}: {res.added} added, {res.skipped_duplicates} already present.")


@memory_app.command("list")
def memory_list_cmd(
    status: StatusOpt = None,
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    search: SearchOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: one array of the API's MemoryItem")] = False,
) -> None:
    """List memory items."""
    try:
        items = store.iter_memory(load_settings(), status=status, limit=limit, offset=offset, search=search)  # type: ignore[arg-type]
        if as_json:
            _more_may_follow(_json_array(MemoryOut.of(m).wire() for m in items), limit, offset)
            return
        rows = (
            [str(m.id), m.status, " ".join((m.topic or "").split()), _short(m.question, 40), _short(m.answer)]
            for m in items
        )
        _table("memory", ["id", "status", "topic", "question", "answer"], rows, limit=limit, offset=offset)
    except LunaError as err:
        raise fail(err) from None


@memory_app.command("approve")
def memory_approve_cmd(ids: MemIdsArg) -> None:
    """Approve memory items: they are exported for training."""
    _curate(store.set_memory_status, ids, "mem", "memory item", "approved")


@memory_app.command("reject")
def memory_reject_cmd(ids: MemIdsArg) -> None:
    """Reject memory items: they stay stored but are never exported."""
    _curate(store.set_memory_status, ids, "mem", "memory item", "rejected")


@memory_app.command("delete")
def memory_delete_cmd(ids: MemIdsArg) -> None:
    """Forget memory items; adapter versions trained on them are marked stale (retrain needed)."""
    _delete(store.delete_memory, ids, "mem", "memory item")
