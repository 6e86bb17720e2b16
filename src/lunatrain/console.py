"""The `lunatrain` console script (and `python -m lunatrain`): the CLI, with Ctrl-C said in one sentence from the
first moment.

Importing the CLI takes about half a second (every command module is imported to register its commands), and
a KeyboardInterrupt there would end in a traceback: `cli.main` handles Ctrl-C only once it runs. So the
script imports the CLI here, where a Ctrl-C during the import is caught.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: Interrupted (Ctrl-C) before the command started.\n")
        raise SystemExit(INTERRUPTED) from None
    cli_main()
