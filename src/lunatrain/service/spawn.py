"""The one way lunatrain starts its own processes (the trainer, a job's worker, the device probe): the same
Python, the same lunatrain (installed or run from a checkout), the data root passed explicitly."""

from __future__ import annotations

import hashlib
import os
import site
import stat
import sys
import sysconfig
from pathlib import Path

from ..errors import UsageError
from ..messages import counted
from ..settings import Settings

_SRC = str(Path(__file__).resolve().parents[2])  # the directory holding the `lunatrain` package


def child_env(settings: Settings, *, ours: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment with ASSISTANT_HOME set to `settings.home`. Run from a checkout, PYTHONPATH
    leads to the lunatrain this process runs, so a child never imports another copy; installed, the same
    interpreter finds it anyway, and a trainer start command running another environment must not be handed
    this one's site-packages (its torch, its transformers). `ours`: the child is one of our own commands
    (`lunatrain_argv`, `worker_argv`), not a user's ASSISTANT_LORA_TRAINER_START_CMD."""
    env = dict(os.environ, ASSISTANT_HOME=str(settings.home), **extra)
    # Our children run in the data root, and `python -m` would put their working directory first on the import
    # path: a `random.py` or `json.py` the user keeps there would shadow the standard library in every job. A
    # user's start command is left its own path (a script imports the modules beside it).
    if ours:
        env["PYTHONSAFEPATH"] = "1"
    if _SRC not in _site_dirs():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def code_signature() -> str:
    """What the lunatrain package on disk is now: a digest of every file's path, size and modification time
    (no __pycache__). A long-running process compares it with the one it took at start: an update (`pip
    install -U`, `git pull` in a checkout) changes it, and the process is running code that is no longer
    there. Stat only, about a hundred files: cheap enough to ask every few seconds."""
    package = Path(_SRC) / "lunatrain"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        try:
            st = path.stat()
        except OSError:  # removed while we looked: an update under way, which the next look sees whole
            digest.update(f"{path}:gone".encode())
            continue
        if not stat.S_ISDIR(st.st_mode):
            digest.update(f"{path.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _site_dirs() -> set[str]:
    """Where this interpreter finds installed packages by itself."""
    paths = sysconfig.get_paths()
    found = (paths["purelib"], paths["platlib"], *site.getsitepackages(), site.getusersitepackages())
    return {str(Path(p).resolve()) for p in found}


def lunatrain_argv(*args: str) -> list[str]:
    """`lunatrain ARGS…` run by this interpreter (no dependence on a console script being on PATH)."""
    return [sys.executable, "-m", "lunatrain", *args]


def worker_argv(*args: str, ranks: int = 1, log_dir: Path | None = None) -> list[str]:
    """A job's child process (internal protocol, see worker.py); with `ranks` > 1 the worker runs under
    torchrun, one process per rank (data parallel, see distributed.py). `--standalone` lets torchrun's
    agent bind a free loopback port itself and hand it to the ranks, so no port is picked here and raced
    for; `--max-restarts 0`: a failed rank fails the job, it is never silently rerun. `log_dir` is where
    torchrun keeps its per-rank files (a rank's error.json among them); without it torchrun makes a
    `torchelastic_*` folder in the system's temp folder for every job and never removes it."""
    worker = ["-m", "lunatrain.service.worker", *args]
    if ranks <= 1:
        return [sys.executable, *worker]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(ranks),
        "--max-restarts",
        "0",
        *(["--log-dir", str(log_dir)] if log_dir is not None else []),
        *worker,
    ]


def job_ranks(settings: Settings, device: str | None, gpus: int) -> int:
    """How many processes train one job: ASSISTANT_LORA_GPUS when set, else every visible GPU (`gpus`,
    from the device probe) for a job that may use CUDA, else one. More processes than GPUs for a CUDA job
    is a UsageError (NCCL cannot put two ranks on one GPU); on CPU any number runs (gloo)."""
    on_gpus = gpus >= 1 and device in (None, "auto", "cuda")
    if settings.lora_gpus is None:
        return gpus if on_gpus else 1
    if on_gpus and settings.lora_gpus > gpus:
        raise UsageError(
            f"ASSISTANT_LORA_GPUS={settings.lora_gpus} asks for more training processes than the "
            f"{counted(gpus, 'visible GPU')}; set it to {gpus} or less (or train with device=cpu)."
        )
    return settings.lora_gpus
