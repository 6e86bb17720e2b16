"""Starting a process that trains, gates or merges: importing torch, transformers and PEFT at its least cost.

Those imports create about 700,000 objects that live as long as the process. While they load, Python's
cyclic garbage collector runs every few hundred allocations and, every so often, walks all of them again:
about 0.7 of the 5.8 CPU-seconds the imports take on a 2-core machine (bench/results/startup.md). So the
collector is paused while they load, and what they created is then frozen (`gc.freeze`): later collections
skip it, and a job forked from the warm worker does not touch those objects' headers (its collections would
otherwise copy their memory pages on write). The price: the imports' own garbage (about 11,000 objects, in
cycles) is frozen with the rest and kept; a full collection to free it first would cost about 0.5 s.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside; everything alive at the end is frozen (never collected, never walked).
    For start-up only: whatever a process creates here, it keeps."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def import_training_stack() -> None:
    """Import torch, transformers and PEFT now, with the collector paused (nothing to do when PEFT is loaded
    already, e.g. in a job forked from the warm worker). Whether bitsandbytes comes with PEFT is the caller's
    choice (`compat.without_bitsandbytes`), made before this."""
    from .compat import IMPORTING

    # One thread at a time (compat.import_transformers says why: a chat request and a gate may start
    # together); one that waited finds PEFT imported whole.
    with IMPORTING:
        if "peft" in sys.modules:
            return
        with collector_paused():
            import peft  # noqa: F401 - imports torch and transformers' model machinery with it
            import transformers  # noqa: F401
