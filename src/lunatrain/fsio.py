"""Crash-safe file writes and inter-process locks shared by export, registry, reports and jobs, and the way
every SQLite file of ours is opened by several processes at once.

Storage faults become one sentence: a write that fails with ENOSPC raises DiskFull, any other OSError of a
write StorageError (both leave the previous file in place); a JSON file that cannot be decoded raises
DamagedFile naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import JSON_FAULTS, DamagedFile, DiskFull, StorageError, UsageError, json_fault
from .wire import finite

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
OUT_OF_FILES = {errno.EMFILE, errno.ENFILE}  # no file descriptor left (this process, or the system)


def storage_error(exc: OSError, what: object) -> StorageError:
    """The one sentence for a failed write of `what` (a path or a description); the caller guarantees that
    the previous data is still intact (every write here goes to a temp name first)."""
    reason = exc.strerror or str(exc)
    if exc.errno in OUT_OF_FILES:
        return out_of_files(what)
    if exc.errno in _FULL:
        return DiskFull(
            f"The disk is full: writing {what} failed ({reason}) and the previous data is intact; free some "
            "space (`lunatrain gc` removes what the retention policy allows) and try again."
        )
    if exc.errno == errno.EISDIR:  # nothing wrong with the disk either, and trying again never helps
        folder = next((f for f in (exc.filename2, exc.filename) if f and os.path.isdir(f)), None)
        where = f"{folder} is a folder" if folder else "a folder stands"
        return StorageError(
            f"Writing {what} failed: {where} where a file belongs, and the previous data is intact; remove or "
            "rename that folder and try again.",
            code="storage_folder_in_place",
            params={"path": str(folder or what)},
        )
    if exc.errno in _DENIED:  # nothing wrong with the disk: a read-only mount, or another user's files
        return StorageError(
            f"Writing {what} failed: {reason}, and the previous data is intact; make it writable for this user "
            "or point ASSISTANT_HOME at another data root."
        )
    return StorageError(
        f"Writing {what} failed: {reason}, and the previous data is intact; check the disk and try again."
    )


def out_of_files(what: object) -> StorageError:
    """The one sentence for a process that can open no further file (EMFILE, ENFILE: many requests at once
    under a low `ulimit -n`): nothing is wrong with the data, and the advice for a damaged file would lose it."""
    return StorageError(
        f"This process has too many files open, so {what} could not be opened and nothing was changed; try again "
        "when fewer requests run at once, or raise the open-files limit (`ulimit -n`).",
        code="storage_out_of_files",
        params={"path": str(what)},
    )


def nearly_full(path: Path) -> bool:
    """Whether the file system holding `path` has (next to) no room left: under 1 MiB. SQLite says a full disk
    only as "disk I/O error" where it cannot grow its index file."""
    try:
        return shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


def files_exhausted() -> bool:
    """Whether this process can open no further file now: SQLite then says only "unable to open database
    file", the words it also has for a missing folder or a damaged path."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as exc:
        return exc.errno in OUT_OF_FILES
    os.close(fd)
    return False


def no_access(exc: PermissionError) -> StorageError:
    """The one sentence for a file or folder of the data root that this user may not read or search (another
    user's root made under umask 077, a root inside another user's 0700 home): Python raises it from a mere
    `exists()`, wherever a command first looks."""
    what = exc.filename if exc.filename is not None else "a file of the data root"
    user = f"user {os.geteuid()}" if hasattr(os, "geteuid") else "this user"
    return StorageError(
        f"Permission denied: {what} cannot be read by {user}, who therefore cannot use this data root; give "
        "this user access to it (chmod/chown) or run the command as the data root's owner.",
        code="storage_no_access",
        params={"path": str(what)},
    )


# How a Rust writer (safetensors' SafetensorError, tokenizers' Exception) reports the OS error it met: only
# in its message, as "I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, the first one `shutil.copytree` gathered (its Error holds each file's
    error as text, with no errno of its own), or the one a Rust-backed writer named in its message; None if
    none."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        for item in exc.args[0]:
            if isinstance(item, tuple) and (found := _ERRNO_IN_TEXT.search(str(item[-1]))):
                code = int(found.group(1))
                return OSError(code, os.strerror(code), str(item[1]))
    if isinstance(exc, OSError):
        return exc
    found = _RUST_OS_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


@contextlib.contextmanager
def storage_guard(what: object) -> Iterator[None]:
    """Turn an OSError raised by the block's writes (or one a Rust-backed writer such as safetensors reported
    in its own exception type) into storage_error(…, what); anything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        os_exc = os_error_of(exc)
        if os_exc is None:
            raise
        raise storage_error(os_exc, what) from exc


def probe_writable(folder: Path) -> None:
    """Raise the OSError a write in `folder` would meet, by creating and removing a file there, or, where
    `folder` does not exist yet, in the nearest folder above it (where it would be made). Creates nothing."""
    here = folder
    while not here.exists() and here != here.parent:
        here = here.parent
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=here)
    os.close(fd)
    os.unlink(probe)


def check_writable(folders: Iterable[Path], doing: str) -> None:
    """Refuse to start `doing` ("train luna-adapter") when one of `folders` cannot be written: one sentence
    before the work, not an OSError once it is done (a whole epoch of training, a merge). StorageError, exit 1
    and 503; DiskFull where the disk is full."""
    for folder in folders:
        try:
            probe_writable(folder)
        except OSError as exc:
            full = exc.errno in _FULL
            fix = (
                "free some space (`lunatrain gc` removes what the retention policy allows)"
                if full
                else "make it writable or point ASSISTANT_HOME at another data root"
            )
            raise (DiskFull if full else StorageError)(
                f"Cannot {doing}: nothing can be written in {folder} ({exc.strerror or exc}); nothing was "
                f"changed. To go on, {fix}."
            ) from None


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what is at `path`, None when nothing is: a folder moved aside and made again at the
    same path is another one (a data root replaced under a running server)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it: os.umask can only be read by setting it, which would
    race with threads creating files meanwhile. (Linux: /proc; elsewhere the common 022.)"""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def _this_host() -> str:
    """This machine and process id namespace: a pid means one process only within both (a container on the
    same host, sharing the data root, has its own pids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\n{namespace}".encode()).hexdigest()[:8]


def staging_dir(parent: Path, name: str) -> Path:
    """A new empty folder in `parent` to build `name` in before replace_dir moves it into place. mkdtemp
    makes it 0700, which a rename keeps: it gets the mode a plain mkdir would (0777 less the umask).

    Its name says which process made it (`.NAME.HOST-PID.XXXXXXXX`), so that what a killed process left (a
    merge killed while writing leaves a whole model) can be told from the folder of one still writing
    (`abandoned_staging`)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{_this_host()}-{os.getpid()}.", dir=parent))
    _plain_mode(path, 0o777 & ~current_umask())
    return path


def _plain_mode(path: Path, mode: int) -> None:
    """chmod to `mode`, keeping a folder's setgid bit: in a data root a group shares (a setgid folder), what
    is made inside must stay the group's, and a chmod without the bit clears it."""
    if path.is_dir():
        mode |= path.stat().st_mode & stat.S_ISGID
    path.chmod(mode)


# SQLite's Unix file layer opens paths of at most 512 bytes with room for its "-journal" and "-wal" names:
# a database path longer than this fails as "unable to open database file", which names no cause.
SQLITE_PATH_MAX = 504


def check_sqlite_path(path: Path, what: str) -> None:
    """Refuse (UsageError) a SQLite database path longer than SQLite opens, before anything is created."""
    size = len(os.fsencode(path))
    if size > SQLITE_PATH_MAX:
        raise UsageError(
            f"Cannot open {what} {path}: its path is {size} bytes long; SQLite opens paths of at most "
            f"{SQLITE_PATH_MAX}: use a shorter ASSISTANT_HOME (or ASSISTANT_DB_URL)."
        )


def create_plain(path: Path) -> None:
    """Create `path` empty, unless it exists, with the mode a plain open gives (0666 less the umask). SQLite
    creates its database 0644 whatever the umask, and its -wal/-shm files take the database's mode: in a root a
    group shares (umask 002), another member's first read would leave files the owner can no longer write to.
    A failure is left to SQLite's own open, which says it."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def writable_beside(path: Path) -> None:
    """A reader that may not write the database but may write its folder (a root a group shares, the file
    0644 as its owner's umask made it) makes the -wal/-shm files SQLite needs even to read, as its own and with
    the database's mode. They outlive a read-only connection, and the owner, who could no longer write them,
    could change nothing from then on. So they get the write access the folder gives: its group (a folder
    without the setgid bit gives them the reader's own group, which the owner may not be in) and its write
    bits, and their owner's (the reader's, who may write the folder: a database its owner made read-only
    for a while gave them 0444, and every write after it was made writable again was refused). Whoever may
    write the folder may write them."""
    folder = path.parent.stat()
    shared = stat.S_IMODE(folder.st_mode) & 0o022 | 0o200
    for beside in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):  # not there (immutable, a read-only mount), or gone meanwhile
            st = beside.stat()
            if st.st_uid != os.geteuid():
                continue
            if shared & 0o020 and st.st_gid != folder.st_gid:
                with contextlib.suppress(OSError):  # only a member of the folder's group may give it
                    os.chown(beside, -1, folder.st_gid)
            if st.st_mode & shared != shared:
                beside.chmod(stat.S_IMODE(st.st_mode) | shared)


# mkdtemp's suffix is 8 of [a-z0-9_]. The HOST-PID part is required: `.NAME.XXXXXXXX` alone is also how a
# person names a copy kept aside (`.my-base.original`, `.luna-adapter-v1.previous`), never ours to remove.
_STAGING = re.compile(r"\.(?P<name>.+?)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[a-z0-9_]{8}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process: alive; an impossible pid: not ours to judge
    return True


def abandoned_staging(parent: Path, *, idle_after_s: float = 86400) -> list[tuple[Path, str]]:
    """The staging folders in `parent` that no process will finish, each with the reason: those whose process
    has ended on this machine, and those of another machine (a data root on shared storage) once nothing in
    them changed for `idle_after_s`. Only folders named as `staging_dir` names them."""
    if not parent.is_dir():
        return []
    found = []
    for path in sorted(parent.iterdir()):
        m = _STAGING.fullmatch(path.name)
        if m is None or not (path.is_dir() or path.is_symlink()):
            continue
        if path.is_symlink() and m["host"] != _this_host():  # a link's age says nothing; its host's gc removes it
            continue
        if m["host"] == _this_host():
            if not _alive(int(m["pid"])):
                found.append((path, f"left by process {m['pid']}, which has ended"))
            continue
        newest = max([p.lstat().st_mtime for p in path.rglob("*")] + [path.lstat().st_mtime])
        idle = time.time() - newest
        if idle >= idle_after_s:
            found.append((path, f"unchanged for {idle / 86400:.0f} days, its process unknown on this machine"))
    return found


def give_umask_modes(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a plain open/mkdir would (0666/0777 less the
    umask). safetensors creates its files 0600 whatever the umask, so weights written by a library into a
    folder we publish would be the one thing in it another user (a server, a backup) cannot read."""
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = (0o777 if path.is_dir() else 0o666) & ~umask
        if path.is_dir() and path.parent.stat().st_mode & stat.S_ISGID:
            # as mkdir gives a folder inside a setgid folder: a copy (copytree's copystat) took its source's mode
            mode |= stat.S_ISGID
        _plain_mode(path, mode)


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`; fsync and rename over it only if the block succeeds. The file gets
    the mode a plain open would give it (0666 less the umask), not mkstemp's 0600."""
    with storage_guard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from exc
        raise


def _load_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2  # glibc 2.28 and later
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_RENAMEAT2 = _load_renameat2() if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap what `a` and `b` name in one step (Linux renameat2 RENAME_EXCHANGE): there is no moment at which
    either is missing, which two renames cannot promise (a kill between them leaves nothing at the target).
    False where the system or file system cannot (then nothing was changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(finished: Path, target: Path) -> bool:
    """Move a fully written directory into place, replacing an older one at `target`; returns whether one
    was replaced. The two are exchanged in one step where the system can (`exchange`); else the old copy is
    first renamed aside, so `target` is never a half-removed tree."""
    if not target.exists():
        _remove(target)  # a dangling link (a folder moved away and gone): a directory cannot replace a link
        os.replace(finished, target)
        return False
    if exchange(finished, target):
        _remove(finished)  # the old copy, now where the new one was built
        return True
    old = target.with_name(f".{target.name}.old")
    _remove(old)
    os.replace(target, old)
    os.replace(finished, target)
    _remove(old)
    return True


@contextlib.contextmanager
def swapped_dir(finished: Path, target: Path) -> Iterator[bool]:
    """`replace_dir`, undone when the block raises: the older folder waits aside until the block is done (it
    records what was moved in), and goes back in place if it fails, the new one taken away. Yields whether
    one was replaced. Aside, it is named as a staging folder of this process: one a killed process left (a
    whole earlier model) is found and removed by `gc` (`abandoned_staging`)."""
    replaced = target.exists()
    if replaced:
        old = staging_dir(target.parent, f"{target.name}.old")
        if target.is_symlink():  # a link (a merge moved elsewhere and linked back) moves aside as a link
            old.rmdir()
        if exchange(finished, target):  # the new one in place at once; the old one where it was built
            os.replace(finished, old)  # a folder renamed over the empty staging folder
        else:
            os.replace(target, old)
            os.replace(finished, target)
        # changed now, as far as another machine's gc can tell (it judges a staging folder by its age there)
        os.utime(old, follow_symlinks=False)
    else:
        _remove(target)  # a dangling link (a folder moved away and gone): a directory cannot replace a link
        os.replace(finished, target)
    try:
        yield replaced
    except BaseException:
        _remove(target)
        if replaced:
            os.replace(old, target)
        raise
    if replaced:
        _remove(old)


def _remove(path: Path) -> None:
    """Remove what is at `path`: a link (a folder the user moved to another disk and linked back) as a link,
    never what it points to; a folder with everything in it. Nothing there is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """The one JSON style for reports: sorted keys, UTF-8, trailing newline (stable diffs); a non-finite number
    (a diverged loss) is null, since NaN and Infinity are not JSON and strict readers refuse the file."""
    return json.dumps(finite(obj), ensure_ascii=False, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def read_json(path: Path, default: Any = None) -> Any:
    """The decoded file, `default` when it does not exist, DamagedFile when it is not JSON (cut short, not
    UTF-8, garbage) and StorageError when it cannot be read at all."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except JSON_FAULTS as exc:
        damaged = DamagedFile(f"{path} is damaged ({_why(exc)}).")
        damaged.why = _why(exc)
        raise damaged from None
    except OSError as exc:
        raise StorageError(f"Cannot read {path}: {exc.strerror or exc}.") from None


def _why(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return json_fault(exc)
    return f"not valid JSON: {json_fault(exc)}"


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Advisory lock (flock) held for the block; works across processes on one machine. Exclusive, for a
    writer: a lock file that cannot be created or opened (a read-only folder, a full disk) is a StorageError,
    since the writes it guards could not happen either, and nothing has changed yet. `shared`, for a reader
    that only looks: where the lock file cannot be written (a read-only data root: a backup, a mounted
    snapshot) it is taken as it is, read-only, and where there is none the block runs without it, so that a
    read never fails for want of a write it does not need."""
    fh = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")  # closed below, after the block
    except OSError as exc:
        if not shared:
            raise storage_error(exc, f"the lock file {path}") from exc
        with contextlib.suppress(OSError):
            fh = open(path, "rb")  # flock works on a read-only descriptor too
    if fh is None:
        yield
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def tree_size(path: Path) -> int:
    """Bytes under `path` (a file, a link, or a folder with everything in it), links not followed. What
    another program removes meanwhile is gone, not an error: it counts with what was seen of it."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except FileNotFoundError:
        return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):  # os.walk passes over a folder that vanished under it
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def remove_tree(path: Path) -> None:
    """`path` gone, whatever it is: a folder with everything in it, or a link (only the link: what it names,
    perhaps outside the data root, is never touched; rmtree refuses a link, and its error would be lost)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    # What another process removes meanwhile is gone, not an error. What this user may not remove (another
    # user's files, a read-only mount) raises, once all else has gone: said removed, it would stay for good.
    failed: list[OSError] = []

    def note(_func: object, where: str, exc_info: Any) -> None:
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if not isinstance(exc, FileNotFoundError):  # named by its whole path (rmtree's own is relative)
            failed.append(OSError(exc.errno, exc.strerror, where) if isinstance(exc, OSError) else OSError(str(exc)))

    shutil.rmtree(path, onerror=note)  # Python 3.11's name for it; 3.12 calls it onexc
    if failed and path.exists():
        raise failed[0]


@contextlib.contextmanager
def holding(folder: Path, *, alone: bool = False, patience: float = 0.0) -> Iterator[None]:
    """`folder` (made if missing) marked in use for the block: a shared flock on the folder itself, which
    ends with the process however it ends, so a killed holder never leaves a stale mark. `in_use` tells.
    `alone`: an exclusive one, BlockingIOError when another process still holds the folder after `patience`
    seconds (`in_use` itself holds it for an instant)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise storage_error(exc, f"the folder {folder}") from exc
    try:
        if alone:
            _exclusive(fd, patience)
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _exclusive(fd: int, patience: float) -> None:
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # flock has no timeout of its own: ask again until `patience` is spent


def in_use(folder: Path) -> bool:
    """Whether a process (this one included) holds `folder` (`holding`)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- SQLite files shared by processes ---------------------------------------------------------------

SQLITE_BUSY_TIMEOUT_S = 30  # how long a statement waits for another process's lock before it fails


def sqlite_wal(db: Any) -> None:
    """`PRAGMA journal_mode = WAL` on a sqlite3 connection or cursor, waiting out other processes that are
    opening the same file.

    While one connection turns a new file to WAL (or the last one to close a WAL file cleans up after it),
    another one's switch fails at once with "database is locked": SQLite does not call the busy handler
    there (sqlite.org/wal.html, "Sometimes queries return SQLITE_BUSY in WAL mode"). Commands started
    together on a new data root hit it, and so does a status read while the trainer starts; the switch is
    retried here, for as long as the busy timeout would have waited."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    pause = 0.002
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)  # SQLite did not wait here itself: back off (2 ms doubling to 100 ms) and try again
        pause = min(pause * 2, 0.1)
