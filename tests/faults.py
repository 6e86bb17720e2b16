"""Fault injection for child processes, and the fault table in bench/results/faults.md.

Production modules carry no fault hooks: `fault_env()` writes a `sitecustomize.py` into a temp folder put
first on the child's PYTHONPATH. Python imports it at start-up (a run of `ForkedCli`, forked from a process
that imported the CLI once, imports it before the command runs); it wraps `os.replace`/`os.rename` (kill
the process or raise before/after the k-th call), `os.fsync` and the `write` of files opened through
`os.fdopen` (raise ENOSPC or EIO at the k-th call), counting only calls on paths that contain `under`.

`small_disk(path, size)` mounts a tmpfs of that size there, a disk that fills up for real.

`read_only(path)` makes a folder and everything under it read-only for the block: by its modes for a
user, by a read-only bind mount for root (whom modes do not stop; the tests run as root here).

`record(section, rows)` prints a table and writes it as one section of bench/results/faults.md, leaving
the other sections (other suites' rows) as they are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import locale
import os
import re
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lunatrain.fsio import file_lock

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "hooks"  # sitecustomize.py there installs faulthooks.py and killpoints.py
TABLE = ROOT / "bench" / "results" / "faults.md"
KILLED = -9

_SITECUSTOMIZE = r"""
import errno as _errno, json as _json, os as _os, signal as _signal

_spec = _json.loads(_os.environ.get("LUNA_FAULT") or "{}")
_count = 0


def _act():
    if _spec["action"] == "kill":
        _os.kill(_os.getpid(), _signal.SIGKILL)
    code = getattr(_errno, _spec["action"])
    raise OSError(code, _os.strerror(code))


def _hit(path):
    global _count
    if _spec.get("under", "") not in str(path):
        return False
    _count += 1
    return _count == _spec["at"]


def _fd_path(fd):
    try:
        return _os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


if _spec.get("op") in ("replace", "rename"):
    for _name in ("replace", "rename"):
        def _wrap(real):
            def renamed(src, dst, *a, **k):
                hit = _hit(dst)
                if hit and _spec.get("when", "before") == "before":
                    _act()
                out = real(src, dst, *a, **k)
                if hit:
                    _act()
                return out
            return renamed
        setattr(_os, _name, _wrap(getattr(_os, _name)))

if _spec.get("op") == "fsync":
    _real_fsync = _os.fsync

    def _fsync(fd):
        if _hit(_fd_path(fd if isinstance(fd, int) else fd.fileno())):
            _act()
        return _real_fsync(fd)

    _os.fsync = _fsync

if _spec.get("op") == "write":
    _real_fdopen = _os.fdopen

    class _Failing:
        def __init__(self, fh):
            self._fh = fh
            self._path = _fd_path(fh.fileno())

        def write(self, data):
            if _hit(self._path):
                _act()
            return self._fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

        def __getattr__(self, name):
            return getattr(self._fh, name)

    def _fdopen(fd, *a, **k):
        fh = _real_fdopen(fd, *a, **k)
        return _Failing(fh) if "w" in (a[0] if a else k.get("mode", "r")) else fh

    _os.fdopen = _fdopen
"""


def with_hooks() -> str:
    """PYTHONPATH for a trainer (and through spawn.child_env its workers) with the hooks in tests/hooks first,
    then this checkout's src (not whichever lunatrain the interpreter has installed)."""
    return os.pathsep.join([str(HOOKS), str(ROOT / "src")])


def kill_env(markers: Path) -> dict[str, str]:
    """Environment for a trainer whose workers kill at the point their job's adapterName names (killpoints.py);
    `markers` gets one file per killed job."""
    return {"LUNA_KILL": str(markers), "PYTHONPATH": with_hooks()}


def cli_env(home: Path | None = None) -> dict[str, str]:
    """This process's environment without its ASSISTANT_ settings (the data root `home`, if given), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    if home is not None:
        env["ASSISTANT_HOME"] = str(home)
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    return env


def fault_env(tmp: Path, home: Path, **spec: object) -> dict[str, str]:
    """Environment for a `python -m lunatrain …` child with one fault: op (replace | fsync | write), at (the
    k-th matching call), action (kill | ENOSPC | EIO), when (before | after, for renames), under (a path
    fragment; only matching calls count)."""
    hook = tmp / "faulthook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = cli_env(home)
    env.update(LUNA_FAULT=json.dumps(spec), PYTHONPATH=os.pathsep.join([str(hook), env["PYTHONPATH"]]))
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lunatrain", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# What a run's environment may set beyond the zygote's own (pytest names the test phase in one): nothing
# lunatrain reads while it is imported.
_PER_RUN = ("ASSISTANT_", "LUNA_FAULT", "PYTHONPATH", "PYTEST_CURRENT_TEST")


class ForkedCli:
    """`run_cli` at a fraction of its CPU: each `python -m lunatrain …` is forked from one process that
    imported the CLI once (tests/hooks/zygote.py) instead of starting an interpreter and importing it anew,
    about 0.5 CPU-seconds a run. Every run is still a process of its own, killed for real by a fault hook's
    SIGKILL, with its own exit status and output; its fault hook (a sitecustomize.py first on its PYTHONPATH)
    is imported before the command runs. `tmp` holds the runs' output files and the zygote's own log."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp, self.base, self.runs = tmp, cli_env(), itertools.count()
        self.zygote: subprocess.Popen | None = None

    def __call__(
        self, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        own = {k: v for k, v in env.items() if not k.startswith(_PER_RUN)}
        assert own == {k: v for k, v in self.base.items() if not k.startswith(_PER_RUN)}, "not the zygote's env"
        assert env.get("PYTHONPATH", "").endswith(self.base["PYTHONPATH"]), env.get("PYTHONPATH")
        k = next(self.runs)
        out, err = self.tmp / f"{k}.out", self.tmp / f"{k}.err"
        request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        zygote = self._started()
        assert zygote.stdin is not None and zygote.stdout is not None
        with contextlib.suppress(BrokenPipeError):  # it died: said below
            zygote.stdin.write(json.dumps(request).encode() + b"\n")
            zygote.stdin.flush()
        ready, _, _ = select.select([zygote.stdout], [], [], timeout)
        answer = zygote.stdout.readline() if ready else b""
        if not answer:  # the run hangs (it and the zygote are ended) or the zygote died (its log says why)
            self.close()
            if not ready:
                raise subprocess.TimeoutExpired(args, timeout)
            raise AssertionError((self.tmp / "zygote.log").read_text(errors="replace"))
        result = subprocess.CompletedProcess(args, json.loads(answer)["returncode"], _text(out), _text(err))
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return result

    def _started(self) -> subprocess.Popen:
        if self.zygote is None:  # the first run, or the first after one that failed
            with (self.tmp / "zygote.log").open("wb") as log:
                self.zygote = subprocess.Popen(
                    [sys.executable, str(HOOKS / "zygote.py"), "-m", "lunatrain", "--preload", "lunatrain.cli"],
                    env=self.base,
                    cwd=self.tmp,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,  # so that ending it ends a run still going too
                )
        return self.zygote

    def close(self) -> None:
        if self.zygote is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.zygote.pid, signal.SIGKILL)
            self.zygote.communicate()
            self.zygote = None


def _text(path: Path) -> str:
    """A run's output as subprocess.run(text=True) gives it: locale encoding, universal newlines."""
    data = path.read_bytes() if path.exists() else b""
    text = data.decode("utf-8" if sys.flags.utf8_mode else locale.getencoding())
    return text.replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` (created if missing) and everything under it read-only for the block, then as before. Skips the
    test where neither way is open (root without the right to mount)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        modes = {p: stat.S_IMODE(p.lstat().st_mode) for p in [path, *path.rglob("*")] if not p.is_symlink()}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make {path} read-only for root: {mounted.stderr.strip()}")
    try:
        if os.access(path, os.W_OK):  # an old mount(8) binds first and ignores `ro`
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True, capture_output=True)
        yield
    finally:
        # lazy: a file the code under test left open must not keep the folder read-only for the tests after it
        subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[None]:
    """`source` seen read-only at `view` for the block while it stays writable where it is (a `:ro` container
    volume, a read-only NFS export of a folder someone writes). Root only; the test skips otherwise."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only view")
    view.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a view of {source}: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(view)], check=True, capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` ("2m") mounted on `path` (created if missing) for the block: writes past it fail
    with ENOSPC, as on a full disk. Skips the test where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small disk on {path}: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True)


@dataclass
class Row:
    fault: str
    target: str
    injected: int
    held: int
    checked: str

    @property
    def ok(self) -> bool:
        return self.injected == self.held


def render(rows: list[Row]) -> str:
    lines = ["| fault | target | injected | invariants held | checked after each |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.fault} | {r.target} | {r.injected} | {r.held} | {r.checked} |" for r in rows]
    return "\n".join(lines) + "\n"


def _rows(section_text: str) -> list[Row]:
    out = []
    for line in section_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].isdigit():
            out.append(Row(cells[0], cells[1], int(cells[2]), int(cells[3]), cells[4]))
    return out


def record(section: str, rows: list[Row], note: str = "") -> str:
    """Print the rows and put them into bench/results/faults.md under `## section`: a row with the same
    fault and target is replaced, other rows and sections stay (a run of a few tests updates just those).
    Returns the rendered table."""
    print(f"\n{section}\n{render(rows)}")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(TABLE.with_name(".faults.md.lock")):  # two xdist workers may record sections at once
        return _record(section, rows, note)


def _record(section: str, rows: list[Row], note: str) -> str:
    text = (
        TABLE.read_text(encoding="utf-8")
        if TABLE.exists()
        else (
            "# Fault injection\n\nWritten by the slow fault-injection tests (`pytest -m slow tests/test_faults_*.py`); "
            "each row is updated by the last run of its test.\n"
        )
    )
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.M | re.S)
    found = pattern.search(text)
    merged = {(r.fault, r.target): r for r in (_rows(found.group(0)) if found else [])}
    merged.update({(r.fault, r.target): r for r in rows})
    table = render(list(merged.values()))
    body = f"## {section}\n\n{note.strip() + chr(10) + chr(10) if note else ''}{table}"
    text = pattern.sub(lambda _: body + "\n", text) if found else text.rstrip("\n") + "\n\n" + body
    TABLE.write_text(text.rstrip("\n") + "\n", encoding="utf-8")  # a rerun leaves the file as it was
    return table


def as_user(uid: int, gid: int, umask: int, action: Callable[[], object], groups: tuple[int, ...] = ()) -> str:
    """Runs `action` in a forked child under another user id, primary group `gid` and supplementary `groups`
    (root only; the test skips otherwise) and returns what it returned, or raised, as text: a second user of a
    group-shared data root without a second account or interpreter."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            try:
                text = repr(action())
            except Exception as exc:  # the test asserts on it
                text = f"{type(exc).__name__}: {exc}"
            os.write(write_end, text.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text
