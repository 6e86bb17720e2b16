"""`lunatrain` command line: one thin command per stage, all calling the same entry functions as the API.

Each module in this package adds its commands to `app.app`; they are discovered here so that adding a
stage never means editing a central list.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..compat import without_bitsandbytes
from ..errors import LunaError
from ..startup import collector_paused
from .app import app, fail
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
    try:
        app()
    except LunaError as err:  # raised by an entry function outside a command's own handler
        raise SystemExit(fail(err).exit_code) from None


__all__ = ["app", "main"]
