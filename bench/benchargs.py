"""What the benchmarks' command lines share: a count below its least is refused by argparse in one sentence
(exit 2) before any work, not by a traceback minutes later; a work folder is deleted only when a benchmark
made it; a temporary data root goes away with its run, also a failed one."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# The file a benchmark leaves in a work folder it made: only such a folder is emptied for the next run.
MARK = ".lunatrain-bench"


def at_least(least: int) -> Callable[[str], int]:
    """An argparse `type` for a whole number of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is too small; give {least} or more")
        return value

    return parse


def fresh_work_dir(ap: argparse.ArgumentParser, path: Path) -> Path:
    """Empty `path` for a run and mark it as a benchmark's; a folder that holds files no benchmark wrote is
    refused (exit 2), so `--workdir ~` cannot wipe a home folder."""
    if path.is_dir() and any(path.iterdir()) and not (path / MARK).is_file():
        ap.error(f"{path} holds files no benchmark wrote; name a new or empty folder")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / MARK).write_text("a benchmark's work folder: the next run empties it\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def scratch_home(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A temporary data root for one run (under $TMPDIR), removed at its end unless `keep`."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield home
    finally:
        if keep:
            print(f"kept {home}", flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)
