"""The `lunatrain` console script (and `python -m lunatrain`): the CLI, with Ctrl-C said in one sentence from the
first moment.

Importing the CLI takes about half a second (every command module is imported to register its commands), and
a KeyboardInterrupt there would end in a traceback: `cli.main` handles Ctrl-C only once it runs. So the
script imports the CLI here, where a Ctrl-C during the import is caught.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


# The services log to stderr or their log file: they may run with stdout closed, as daemon wrappers leave it.
_SERVICES = {"serve", "trainer"}


def main() -> None:
    if sys.stdout is None and not _SERVICES & set(sys.argv[1:2]):
        # `>&-`: Python has no stdout at all. Every other command answers there, so its output would be lost
        # (or it would end in a traceback at the first write): said before anything is done.
        if sys.stderr is not None:
            sys.stderr.write(
                "error: Standard output is closed, so this command's output would be lost; run it with stdout "
                "open (`> /dev/null` discards it).\n"
            )
        raise SystemExit(2)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: Interrupted (Ctrl-C) before the command started.\n")
        raise SystemExit(INTERRUPTED) from None
    cli_main()
