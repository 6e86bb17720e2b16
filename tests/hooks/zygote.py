"""`python -m MODULE …` runs forked from one process that imported MODULE's code once (tests/faults.py,
`ForkedCli`). Started as `python zygote.py -m MODULE --preload PACKAGE`.

Each run is a real process of its own (its own pid, exit status, signals, file descriptors): a fork of this
one, which then sets the run's working directory, environment, stdout/stderr files and sys.argv, imports the
run's `sitecustomize` when its PYTHONPATH puts one first (as Python's start-up would), and runs MODULE as
`python -m` does. Only the start-up is skipped: the interpreter and the imports of PACKAGE, about 0.5
CPU-seconds a process, done here once instead of once a run.

Requests come on stdin, one JSON line each: {"args", "env", "cwd", "stdout", "stderr"} (the last two are
paths the run's output goes to); the answer, on stdout, is one JSON line {"returncode"} once the run ended,
negative for a signal as with subprocess. This process never touches a data root: nothing it holds (a
database connection, a lock, a cache of settings) can leak into a run.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import threading
from typing import Any


def serve(requests: Any, answers: Any) -> dict[str, Any] | None:
    """Answer requests until stdin closes (None); in a forked child, return its request."""
    for line in requests:
        run = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            return run
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        answers.flush()
    return None


def become(run: dict[str, Any], module: str, own_path: list[str]) -> None:
    """Turn this forked child into `python -m module *args` started with the run's cwd and environment."""
    os.chdir(run["cwd"])
    os.environ.clear()
    os.environ.update(run["env"])
    for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    # sys.path as `python -m` builds it: the working directory, then PYTHONPATH (whose extra folders, a fault
    # hook's, come before this process's own), then the rest
    added = [p for p in run["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in own_path]
    sys.path[:0] = [os.getcwd(), *added]
    if added:
        sys.modules.pop("sitecustomize", None)
        try:
            importlib.import_module("sitecustomize")
        except ImportError:
            pass
    sys.argv = [sys.argv[0], *run["args"]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main() -> None:
    if len(sys.argv) != 5 or sys.argv[1] != "-m" or sys.argv[3] != "--preload":
        raise SystemExit("usage: zygote.py -m MODULE --preload PACKAGE")
    module, preload = sys.argv[2], sys.argv[4]
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] == here:  # a run sees only its own PYTHONPATH, not this folder
        sys.path.pop(0)
    own_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    importlib.import_module(preload)
    if threading.active_count() != 1:  # a fork copies only the forking thread
        raise SystemExit(f"zygote: importing {preload} started threads; forking would be unsafe")
    # the protocol gets its own descriptors; 0 and 1 are the runs' (reset in each child)
    requests, answers = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    run = serve(requests, answers)
    if run is not None:
        become(run, module, own_path)


if __name__ == "__main__":
    main()
