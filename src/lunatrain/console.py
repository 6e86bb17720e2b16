"""The `lunatrain` console script (and `python -m lunatrain`): the CLI, with Ctrl-C said in one sentence from the
first moment.

Importing the CLI takes about half a second (every command module is imported to register its commands), and
a KeyboardInterrupt there would end in a traceback: `cli.main` handles Ctrl-C only once it runs. So the
script imports the CLI here, where a Ctrl-C during the import is caught.
"""

from __future__ import annotations

import os
import sys
from typing import Any

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C
OUTPUT_LOST = 74  # sysexits' EX_IOERR: the command's output could not be written
PIPE_CLOSED = 128 + 13  # 128 + SIGPIPE, as the shell reports a process that signal ended


class OutputLost(Exception):
    """stdout refused a write: a full disk, /dev/full, an I/O error. No OSError, so that no handler of the
    command's own file errors takes it for a fault of the data root; `main` says it."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or str(cause))
        self.cause = cause


class _Guarded:
    """A standard stream whose failed writes are the command's to say. stdout's raise OutputLost, then and at
    every later write (a caller may swallow the first: click probes a stream with an empty write), but a
    closed pipe (`| head`) stays BrokenPipeError: the pipeline's own ending, which the CLI says as 141.
    stderr's are dropped from then on: diagnostics that cannot be written change no outcome or exit status."""

    def __init__(self, stream: Any, *, drop: bool) -> None:
        self._stream, self._drop = stream, drop
        self.failure: OSError | None = None

    def write(self, text: str) -> int:
        self._check()
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._failed(exc)
        return len(text)

    def flush(self) -> None:
        self._check()
        try:
            self._stream.flush()
        except OSError as exc:
            self._failed(exc)

    def _check(self) -> None:
        if self.failure is not None and not self._drop:
            raise OutputLost(self.failure)

    def _failed(self, exc: OSError) -> None:
        if not self._drop and isinstance(exc, BrokenPipeError):
            raise exc
        self.failure = exc
        # What the stream still buffers goes nowhere: the interpreter's own flush at exit would fail on it again
        # ("Exception ignored", exit 120).
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        self._check()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# The services log to stderr or their log file: they may run with stdout closed, as daemon wrappers leave it.
_SERVICES = {"serve", "trainer"}


def main() -> None:
    _hold_closed_standard_fds()
    serves = _SERVICES & set(sys.argv[1:2]) and not {"--help", "-h"} & set(sys.argv[2:])
    if sys.stdout is None and not serves:
        # `>&-`: Python has no stdout at all. Every other command answers there, so its output would be lost
        # (or it would end in a traceback at the first write): said before anything is done.
        if sys.stderr is not None:
            sys.stderr.write(
                "error: Standard output is closed, so this command's output would be lost; run it with stdout "
                "open (`> /dev/null` discards it).\n"
            )
        raise SystemExit(2)
    if sys.stdout is not None:
        sys.stdout = _Guarded(sys.stdout, drop=False)  # type: ignore[assignment]
    if sys.stderr is not None:
        sys.stderr = _Guarded(sys.stderr, drop=True)  # type: ignore[assignment]
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: Interrupted (Ctrl-C) before the command started.\n")
        raise SystemExit(INTERRUPTED) from None
    try:
        cli_main()
    except OutputLost as lost:
        _say_lost(lost)
        raise SystemExit(OUTPUT_LOST) from None
    except SystemExit as done:
        _no_wrapped_none()
        raise SystemExit(_flushed(done.code)) from None


def _hold_closed_standard_fds() -> None:
    """A standard descriptor closed at start (`<&- >&- 2>&-`, as some daemon wrappers leave them) would be the
    next file this process opens: a service's listening socket, its data root's lock, its log file. The trainer
    then put its log pipe over descriptors 1 and 2 (`stream_into_log`), which closed the lock (a second trainer
    started on the same root) or the socket; a child would inherit the file as its own output. Each one closed
    is held open on /dev/null instead (Python's `sys.stdout` stays None: what that means is decided below)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one, as those below it are open


def _no_wrapped_none() -> None:
    """After a closed output pipe the command line's parser wraps both streams to swallow the rest (compat.
    stdout_was_closed), a closed stderr (`2>&-`: None) too, whose flush at exit then fails (exit 120)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if type(stream).__name__.endswith("PacifyFlushWrapper") and getattr(stream, "wrapped", stream) is None:
            setattr(sys, name, None)


def _flushed(code: Any) -> Any:
    """`code`, or the status of output that could not be written after all: stdout may hold what the command
    printed last, written only now (a file or pipe is block-buffered)."""
    try:
        if sys.stdout is not None:  # a service started with stdout closed
            sys.stdout.flush()
    except OutputLost as lost:
        _say_lost(lost)
        return OUTPUT_LOST
    except BrokenPipeError:
        return PIPE_CLOSED
    return code


def _say_lost(lost: OutputLost) -> None:
    if isinstance(sys.stdout, _Guarded):  # said once: the interpreter's flush at exit goes where the rest went
        sys.stdout = sys.stdout._stream
    sys.stderr.write(
        f"error: The command's output could not be written to stdout ({lost}); what it did up to then is done.\n"
    )
