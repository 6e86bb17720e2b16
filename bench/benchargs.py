"""What the benchmarks share: a bad count, size or number is refused by argparse in one sentence (exit 2)
before any work, not by a traceback minutes later; a benchmark reads none of the user's ASSISTANT_* settings
and works in a scratch data root of its own, which goes away with its run, also a failed or interrupted one;
in a work folder it removes only what it made; its results header names the versions it ran with; Ctrl-C
ends it with one line and exit 130."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

# The file a benchmark leaves in a work folder: only a folder that holds it (or nothing) is emptied for the
# next run. Its text says whether a benchmark made the folder (removed at the end) or was lent it by the user
# (emptied at the end, kept).
MARK = ".lunatrain-bench"
_MADE = "a benchmark's work folder: the next run empties it\n"
_LENT = "a benchmark's work folder in a folder the user made: the next run empties it, the folder stays\n"


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


def number(*, least: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """An argparse `type` for a finite number of at least `least` or greater than `above` (nan and inf are
    refused: a comparison with nan is always false, so a limit of nan would pass every run)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"{value:g} is too small; give {least:g} or more")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{value:g} is too small; give more than {above:g}")
        return value

    return parse


def description(doc: str | None) -> str:
    """The first paragraph of a script's docstring, for its --help (argparse rewraps it)."""
    return (doc or "").split("\n\n")[0]


def out_file(ap: argparse.ArgumentParser, path: Path) -> Path:
    """`--out`'s folder made before any measuring, so a table is never lost at the end of a long run for want
    of a folder; a path that cannot be a file is refused (exit 2)."""
    if path.is_dir():
        ap.error(f"argument --out: {path} is a folder; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"argument --out: cannot make the folder {path.parent}: {exc.strerror or exc}")
    return path


def confined_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ASSISTANT_* variable but `settings`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | settings


def confine_settings(**settings: str) -> None:
    """Leave this process (and the children it starts) no ASSISTANT_* setting but `settings`: a benchmark
    works on its own scratch data root, and the user's other settings would reach past it (ASSISTANT_DB_URL:
    the bundled seed written into the user's real database)."""
    for name in [k for k in os.environ if k.startswith("ASSISTANT_")]:
        del os.environ[name]
    os.environ.update(settings)


def fresh_work_dir(ap: argparse.ArgumentParser, path: Path, option: str = "--workdir") -> Path:
    """Empty `path` for a run and mark it as a benchmark's; a folder that holds files no benchmark wrote is
    refused (exit 2), so `--workdir ~` cannot wipe a home folder, and so is a file."""
    if path.exists() and not path.is_dir():
        ap.error(f"argument {option}: {path} is a file; name a new or empty folder")
    mark = path / MARK
    if path.is_dir() and any(path.iterdir()) and not mark.is_file():
        ap.error(f"{path} holds files no benchmark wrote; name a new or empty folder")
    # A folder the user made stays theirs (only its contents go at the end), also over later runs.
    lent = path.is_dir() and ((mark.is_file() and mark.read_text(encoding="utf-8") == _LENT) or not mark.exists())
    try:
        if path.is_dir():
            _empty(path)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"argument {option}: cannot make {path}: {exc.strerror or exc}")
    mark.write_text(_LENT if lent else _MADE, encoding="utf-8")
    return path


def remove_work_dir(path: Path) -> None:
    """Remove what a benchmark made in `path` (see `fresh_work_dir`): the folder itself when a benchmark made
    it, else its contents."""
    mark = path / MARK
    if mark.is_file() and mark.read_text(encoding="utf-8") == _LENT:
        _empty(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def work_dir(ap: argparse.ArgumentParser, path: Path, *, keep: bool = False) -> Iterator[Path]:
    """`fresh_work_dir` for one run, and what it made removed at its end (also a failed one) unless `keep`."""
    fresh_work_dir(ap, path)
    try:
        yield path
    finally:
        if not keep:
            remove_work_dir(path)


def _empty(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


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


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `grace` seconds; returns once it has ended."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def versions() -> str:
    """Python's and the training stack's versions, for a results header: the baselines (Trainer, PEFT,
    generate()) and the loop's kernels move with them."""
    found = [f"Python {platform.python_version()}"]
    for dist, label in (("torch", "torch"), ("transformers", "transformers"), ("peft", "PEFT")):
        try:
            found.append(f"{label} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"no {label}")
    return ", ".join(found)


def run(main: Callable[[], object]) -> None:
    """Run a script's `main`; Ctrl-C ends it with one line and exit 130 (its cleanups have run by then)."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
