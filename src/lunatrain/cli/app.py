"""The Typer app every `cli/<stage>.py` module adds its commands to, and the error boundary.

Options are declared with both spellings, kebab-case first and the guide's camelCase second
(`typer.Option("--min-curated", "--minCurated")`); click accepts `--x=v` and `--x v` for both.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import typer
import typer.core

from ..errors import LunaError, UsageError
from ..wire import finite

if TYPE_CHECKING:  # rich is imported where a terminal draws, not at every command's start
    from rich.text import Text

# `lunatrain --help` lists the commands in the order the data goes (curate, export, check, train, judge, the
# flows), then those that look after what was made; a command missing here follows them by name.
COMMAND_ORDER = (
    "examples", "memory", "export", "prepare", "lora", "eval-gate", "auto", "luna",
    "adapters", "merge", "jobs", "status", "serve", "trainer", "health", "gc",
)  # fmt: skip


class _Ordered(typer.core.TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        known = [n for n in COMMAND_ORDER if n in names]
        return known + sorted(n for n in names if n not in known)


app = typer.Typer(
    cls=_Ordered,
    name="lunatrain",
    help="Reproducible LoRA adapter training for a personal assistant (the Luna training guide's steps).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: rich's option table cuts long option names at 80 columns (`--adapterName` became
    # `--ad…`); the plain layout wraps the help text instead and shows both spellings in full.
    rich_markup_mode=None,
)


_interrupt = {"said": False}


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP taken as Ctrl-C is, where a command says what became of its work when interrupted:
    it says the same for these, ending with that signal's status (143, 129)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signal.Signals(signum)


@contextlib.contextmanager
def stops_as_interrupts() -> Iterator[None]:
    """SIGTERM (`timeout`, a service manager's stop) and SIGHUP (a closed terminal) raise `Signalled` in the
    block, as Ctrl-C raises KeyboardInterrupt. One ignored when the command started stays ignored (`nohup`).
    Signal handlers live in the main thread: elsewhere the block runs as it is."""
    previous: dict[int, Any] = {}

    def _raise(signum: int, _frame: Any) -> None:
        raise Signalled(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def said_interrupted(said: bool = True) -> None:
    """A command that stopped on Ctrl-C and said what became of its work (how to resume, how to follow the job
    it detached from): `main` adds nothing to it. (`main` starts each command with False.)"""
    _interrupt["said"] = said


def interrupt_said() -> bool:
    return _interrupt["said"]


def fail(err: LunaError) -> typer.Exit:
    """Print the error's one sentence and return the Exit to raise (exit 1 for checks, 2 for usage)."""
    typer.echo(f"error: {err.message}", err=True)
    return typer.Exit(err.exit_code)


LISTED = 20  # problems of a refusal listed one per line


def fail_listing(err: LunaError, as_json: bool = False) -> typer.Exit:
    """`fail`, for a refusal that names many problems (a file of records, a golden suite): the sentence names the
    first few, so each is also on a line of its own before it (stderr; the first LISTED and how many more), or
    with `as_json` all of them in the API's error document on stdout, for a script to act on."""
    problems = err.details if isinstance(err.details, list) else []
    if as_json:
        typer.echo(json_text({"error": {"code": err.code, "message": err.message, "details": problems}}))
    elif len(problems) > 1:
        # details may be cut (the API's answer stays short): the count, where given, is of them all
        list_problems(problems, (err.params or {}).get("count", len(problems)))
    return fail(err)


def list_problems(problems: list[str], total: int | None = None) -> None:
    """The first problems, each on a line (stderr); thousands say how many more (of `total`, when `problems`
    is the first part of them)."""
    for problem in problems[:LISTED]:
        typer.echo(f"  {problem}", err=True)
    total = len(problems) if total is None else total
    if total > LISTED:
        typer.echo(f"  … and {total - LISTED} more", err=True)


def given(value: str | None, option: str, what: str) -> str | None:
    """A text option as given, None when left out; UsageError when it is given empty or blank (`--adapter=`
    would otherwise read as left out, and the command run on the default)."""
    if value is not None and not value.strip():
        raise UsageError(f"{option} is empty: name {what}, or leave it out.")
    return value


def is_tty(err: bool = False) -> bool:
    """Whether stdout (stderr with `err`) is a terminal; not so when it is closed (`2>&-`: Python has none)."""
    stream = sys.stderr if err else sys.stdout
    return stream is not None and stream.isatty()


# Characters that act on a terminal instead of showing: C0 and C1 controls but tab and newline (ESC starts the
# sequences that clear the screen, recolour or retitle it; BEL ends a title), DEL, and the bidi controls that
# reorder what follows them. Stored text keeps them; what the CLI prints shows them escaped ("\x1b").
_UNSEEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """`text` with every character that would act on the terminal written as its escape (`\\x1b`, `\\u202e`)."""
    return _UNSEEN.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


MIN_TABLE_WIDTH = 60  # columns: below it rich gives a table's widest column no room at all


def tables_fit(tty: bool) -> bool:
    """Whether a terminal (`tty`, as the caller's `is_tty()` says) takes rich's tables: one wide enough (at
    COLUMNS=20 the prompt column got no room and the prompt went missing) whose encoding writes the borders
    and the `…` (written as escapes, they pushed the borders out). Otherwise the plain tab-separated lines."""
    return tty and takes_unicode(sys.stdout) and shutil.get_terminal_size().columns >= MIN_TABLE_WIDTH


def takes_unicode(stream: Any) -> bool:
    """Whether `stream` can write every character: not so under PYTHONIOENCODING=latin-1 or a legacy locale's
    codec, where the first emoji of a stored example would end the command in a UnicodeEncodeError."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name.startswith("utf")
    except LookupError:
        return False


def json_text(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """`value` as the JSON a `--json` option prints: non-ASCII text stays readable (`\\uXXXX` where stdout's
    encoding lacks it), but what would act on a
    terminal is escaped (`\\u202e`). `json.dumps` escapes only C0 controls; DEL, C1 controls and the bidi
    controls pass raw otherwise. They can only stand inside strings, where `\\uXXXX` reads back the same."""
    # NaN and Infinity are not JSON (a registry restored by hand may hold them): null, as the API says them.
    text = json.dumps(finite(value), ensure_ascii=not takes_unicode(sys.stdout), indent=indent, sort_keys=sort_keys)
    return _UNSEEN.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def as_written(value: object, style: str = "") -> Text:
    """`value` for a rich table cell, title or line: text a user wrote ("[/]", "[b]bold[/b]", a path ending
    in a backslash) shows as written, never read as rich markup (a stray closing tag would raise MarkupError),
    its control characters escaped. A Text, not escaped markup: escaping doubles a trailing backslash (for a
    tag that might follow), and in a cell nothing follows, so both showed."""
    from rich.text import Text

    return Text(visible(str(value)), style=style)


def print_report(report: Any, show: Callable[[Any], None], *, as_json: bool) -> None:
    """A stage report as JSON (`--json`) or as `show` draws it; then exit 1 if the report failed."""
    if as_json:
        typer.echo(json_text(report.to_dict(), sort_keys=True))
    else:
        show(report)
    report.raise_on_fail()
