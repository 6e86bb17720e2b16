"""The warm worker: the trainer's first child measures the device (for /health) and, on a machine without
CUDA, stays, so that each single-process job starts by fork() from a process that has imported torch,
transformers and PEFT once. A fresh interpreter spends 2.5 to 6 s of CPU on those imports, depending on the
CPU, which is most of a short job; a fork takes milliseconds and shares the imported pages.

Protocol, over a SOCK_SEQPACKET socketpair (one message per JSON object; the child's end is `--warm FD`):
  child -> trainer  {"device": {...}, "forks": bool}   first, the device facts; forks=false: it exits now
  trainer -> child  {"argv": [...]} + two fds          run `worker.main(argv)` with fd 1 = the job's event
                                                       pipe and fd 2 = its log file, in a new session
  child -> trainer  {"pid": N} | {"error": "..."}      the job's process (or why no fork was possible)
  child -> trainer  {"exit": N, "code": C}             a job process ended (C as Popen reports it)

The job process is the same `worker.main` a fresh `python -m lunatrain.service.worker` runs, titled like
one (`--job ID` in its command line). It sees the warm worker as its parent, which dies with the trainer
(PR_SET_PDEATHSIG), so an orphaned job stops exactly as before. Never forked: jobs on CUDA machines (the
probe created a CUDA context, which a forked child cannot use), jobs under torchrun, and any job when
ASSISTANT_LORA_WARM_WORKER=false; they start a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import IO, Any

import psutil

from .. import procs
from ..compat import without_bitsandbytes
from ..settings import Settings
from ..startup import collector_paused, import_training_stack
from .spawn import child_env, worker_argv

log = logging.getLogger("lunatrain.trainer")

_MAX_MESSAGE = 1 << 20


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


class Forked:
    """A job process forked by the warm worker, with the part of `subprocess.Popen` the runner uses: `pid`,
    `stdout` (the event pipe), `poll()` and `wait()` (exit statuses arrive as messages from the warm worker)."""

    def __init__(self, warm: WarmWorker, pid: int, stdout: IO[bytes]) -> None:
        self.pid, self.stdout, self._warm = pid, stdout, warm
        self.returncode: int | None = None
        self._started = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            self._started = procs.started(pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            message = self._warm.receive()
            if message is None:
                # The warm worker died: nobody can report this process's status. It stops on its own once it
                # sees its parent gone (worker.py); wait for that, and report it as killed.
                self._wait_gone()
                self.returncode = -signal.SIGKILL
            elif message.get("exit") == self.pid:
                self.returncode = int(message["code"])
        return self.returncode

    def _wait_gone(self) -> None:
        # Unbounded on purpose, yet it ends: an orphaned job stops at its next step, and its watchdog exits
        # the process 30 s after noticing at the latest (worker.py).
        while True:
            try:
                if (
                    not procs.is_same(self.pid, self._started)
                    or psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
                ):
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.5)


class WarmWorker:
    """The trainer's side: starts the child, reads the device facts, forks jobs while the child lives."""

    def __init__(self, settings: Settings, answer_timeout: float = 300.0) -> None:
        self.settings = settings
        self.answer_timeout = answer_timeout  # for the device facts, and for the pid of a forked job
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def start(self) -> dict[str, Any]:
        """Start the child and return the device facts it measured; raises OSError or ValueError when it
        could not (the caller reports a failed probe)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = worker_argv("--warm", str(theirs.fileno()))
        # Nothing to fork when switched off, or when every job runs under torchrun (ASSISTANT_LORA_GPUS > 1):
        # then the child only measures the device, without the imports a job needs.
        if not self.settings.lora_warm_worker or (self.settings.lora_gpus or 1) > 1:
            argv.append("--no-forks")
        env = child_env(self.settings)
        # numpy's OpenBLAS starts a thread pool when torch imports it; with one thread it starts none, and
        # fork() needs a single-threaded process. Jobs do their math in torch (MKL on x86), not numpy's
        # BLAS; where torch uses OpenBLAS itself, the child does not fork (serve()).
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=env,
                cwd=self.settings.home,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(self.answer_timeout)
        try:
            first = self.receive()
        finally:
            ours.settimeout(None)
        if first is None or "device" not in first:
            self.close()
            raise ValueError(f"the device probe ended without an answer (exit {self._exit_code()})")
        if not first.get("forks"):
            self.close()
        return first["device"]

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._sock is not None and self._proc.poll() is None

    def spawn(self, argv: list[str], log_file: IO[bytes]) -> Forked | None:
        """Fork a job process running `worker.main(argv)`; None when the warm worker cannot (then the caller
        starts a fresh process)."""
        sock = self._sock
        if not self.alive or sock is None:
            return None
        read_end, write_end = os.pipe()
        # Bounded: a warm worker that never answers (stuck importing) must not hold up the queue; the job
        # then starts fresh.
        sock.settimeout(self.answer_timeout)
        try:
            _send(sock, {"argv": argv}, [write_end, log_file.fileno()])
            reply = self.receive()
            while reply is not None and "exit" in reply:  # a late status of an earlier job: not the answer
                reply = self.receive()
        except OSError as exc:
            log.warning("warm worker unusable (%s); starting jobs fresh", exc)
            reply = None
        finally:
            os.close(write_end)
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        if reply is None or not isinstance(reply.get("pid"), int):
            os.close(read_end)
            if reply is not None:
                log.warning("warm worker could not fork (%s); starting the job fresh", reply.get("error"))
            self.close(grace=10.0 if reply is not None else 0.0)  # no answer at all: it is not coming back
            return None
        return Forked(self, reply["pid"], os.fdopen(read_end, "rb"))

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None once the child is gone."""
        sock = self._sock  # close() may run on another thread (the trainer's shutdown)
        if sock is None:
            return None
        try:
            message = json.loads(sock.recv(_MAX_MESSAGE) or b"null")
        except (OSError, ValueError):  # gone, timed out, or not our protocol: all the same to the caller
            return None
        return message if isinstance(message, dict) else None

    def close(self, grace: float = 10.0) -> None:
        """Stop the child: it exits when its socket closes, else it is killed after `grace` seconds. (A job
        it forked is in a session of its own; it stops once it sees its parent gone.)"""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()


# --- the child ------------------------------------------------------------------------------------


def serve(fd: int, forks: bool = True) -> int:
    """The child's main loop (`python -m lunatrain.service.worker --warm FD`)."""
    from ..models import device_info
    from .worker import die_with_parent

    sock = socket.socket(fileno=fd)
    parent = os.getppid()
    die_with_parent()  # the trainer killed (even by SIGKILL): this process goes with it
    if os.getppid() != parent:
        return 0
    with collector_paused():  # the probe imports torch (startup.py says why)
        info = device_info()
    # A CUDA context (created by the probe) does not survive fork(): GPU jobs start fresh. So do jobs where
    # torch itself does its BLAS with OpenBLAS (some aarch64 builds): OPENBLAS_NUM_THREADS=1 (see start())
    # would make their matrix products single-threaded.
    forks = forks and info.get("type") == "cpu" and not _torch_uses_openblas()
    _send(sock, {"device": info, "forks": forks})
    if not forks:
        return 0
    # SIGCHLD wakes the loop through this pipe, so a job's exit status reaches the trainer at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    # Right away, not at the first job: the trainer already answers /health, and its first job then starts
    # as fast as every later one (a job that arrives meanwhile waits in the socket).
    _preload()
    while True:
        for key, _mask in selector.select(timeout=5.0):
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                return 0  # the trainer closed its end (shutdown) or died
            _send(sock, _fork(json.loads(data)["argv"], fds, close=[sock, selector, wake_r, wake_w]))
        _reap(sock)


def _torch_uses_openblas() -> bool:
    import torch

    return "BLAS_INFO=open" in torch.__config__.show()


def _preload() -> None:
    """Import what every job imports, once (module code only: no thread starts and no tensor is made, so
    the forked process starts from a clean torch). Not bitsandbytes: a quantized job starts fresh (runner)."""
    without_bitsandbytes()
    with collector_paused():
        import_training_stack()
        from .. import evalgate, flow, train  # noqa: F401


def _fork(argv: list[str], fds: list[int], close: list[Any]) -> dict[str, Any]:
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    if threads != 1 or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        # fork() copies only the calling thread; a lock held by another one would never be released.
        return {"error": f"{threads} threads in the warm worker" if threads != 1 else "bad request"}
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # Its own session first, before the trainer learns the pid: a cancel that signals the job's
        # process group right away must find that group.
        os.setsid()
        os.close(ready_r)
        os.close(ready_w)
        _job(argv, *fds, close=close)
    os.close(ready_w)
    os.read(ready_r, 1)  # EOF once the child closed its end, i.e. after setsid()
    os.close(ready_r)
    for fd in fds:
        os.close(fd)
    return {"pid": pid}


def _job(argv: list[str], events_fd: int, log_fd: int, close: list[Any]) -> None:
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for item in close:  # the warm worker's socket, selector and wake-up pipe are not the job's
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()
        os.dup2(events_fd, 1)
        os.dup2(log_fd, 2)
        os.close(events_fd)
        os.close(log_fd)
        _retitle(argv)
        from . import worker

        worker.PARENT_GONE[0] = worker.WARM_PARENT_GONE  # its parent is this warm worker, not the trainer
        code = worker.main(argv)
    except BaseException:  # this process must end here, never return into the fork loop
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _retitle(argv: list[str]) -> None:
    """Show the job in `ps` (and to anything that finds workers by command line) like a fresh worker."""
    try:
        import setproctitle
    except ImportError:
        return
    job = argv[argv.index("--job") + 1] if "--job" in argv else "?"
    setproctitle.setproctitle(f"{sys.executable} -m lunatrain.service.worker --job {job}")


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
