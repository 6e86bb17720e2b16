"""`lunatrain` command line: one thin command per stage, all calling the same entry functions as the API.

Each module in this package adds its commands to `app.app`; they are discovered here so that adding a
stage never means editing a central list.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import signal
import sys
from typing import Any

import typer

from ..compat import click_errors, stdout_was_closed, without_bitsandbytes
from ..console import INTERRUPTED, PIPE_CLOSED
from ..errors import LunaError
from ..startup import collector_paused
from .app import app, fail, interrupt_said, said_interrupted, takes_unicode
from .options import profile_help

with collector_paused():  # start-up of every command: 20 % less CPU (startup.py says why)
    for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if _mod != "app" and not _mod.startswith("_"):
            importlib.import_module(f"{__name__}.{_mod}")

# `--help` of commands with LoRA options shows their profile's values; `luna` always runs the luna profile.
profile_help(app, {"luna": "luna"})


def main() -> None:
    # The console script, not `app`: a test's in-process runner must keep its own imports. A command that
    # trains quantized lifts this before PEFT is imported (train.build).
    without_bitsandbytes()
    said_interrupted(False)
    for stream in (sys.stdout, sys.stderr):
        # An encoding without every character (PYTHONIOENCODING=latin-1): a stored emoji is printed as its
        # escape (`\U0001f319`) instead of ending the command in a traceback; --json escapes it itself.
        if stream is not None and not takes_unicode(stream) and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    errors = click_errors()
    try:
        _run(errors)
    finally:
        # The command has ended, whichever way: a Ctrl-C now would only garble its ending (a traceback from
        # the interpreter's shutdown, or exit 130 after the work was done and said).
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(errors: Any) -> None:
    try:
        # Not standalone: click's own usage errors (an unknown option, a value of the wrong type) come here
        # as exceptions, to be said in one sentence like every other failure instead of click's four lines.
        code = app(standalone_mode=False)
    except SystemExit:
        # Its reader stopped (`lunatrain … | head`): no failed check, and nothing to say; the status of a
        # Unix tool ended by SIGPIPE, so that a pipeline can tell the command was cut short.
        if stdout_was_closed():
            raise SystemExit(PIPE_CLOSED) from None
        raise
    except errors.NoArgsIsHelpError as err:  # bare `lunatrain` or a group: the help, as click does
        err.show()
        raise SystemExit(err.exit_code) from None
    except errors.UsageError as err:
        # Some parser errors come without their command's context (an option given a value it does not take):
        # the command is then the words before the first option.
        words = list(itertools.takewhile(lambda a: not a.startswith("-"), sys.argv[1:3]))
        command = err.ctx.command_path if err.ctx else " ".join(["lunatrain", *words])
        message = err.format_message().rstrip(".")
        typer.echo(f"error: {message} (`{command} --help` lists the options).", err=True)
        raise SystemExit(2) from None
    except errors.ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        raise SystemExit(err.exit_code) from None
    except typer.Abort:  # end of input where a command asked for some (typer turns Ctrl-C into exit 130)
        typer.echo("Aborted.", err=True)
        raise SystemExit(130) from None
    except LunaError as err:  # raised by an entry function outside a command's own handler
        raise SystemExit(fail(err).exit_code) from None
    except PermissionError as err:  # a data root of another user, met wherever a command first looks
        from ..fsio import no_access

        raise SystemExit(fail(no_access(err)).exit_code) from None
    if code == INTERRUPTED and not interrupt_said():
        # Ctrl-C in a command without its own handler: typer ends it with 130 and not a word.
        typer.echo("error: Interrupted (Ctrl-C) before the command finished.", err=True)
    raise SystemExit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
