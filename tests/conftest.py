"""Shared fixtures: every test gets its own empty data root (ASSISTANT_HOME) so nothing leaks between tests.

Run all tests: `make test`; the quick subset without end-to-end flows: `make test-fast`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.testing
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from lunatrain.settings import Settings, load_settings
from lunatrain.startup import collector_paused

from trainer_helpers import bound_port

# Keep torch small and predictable on the 2-core machines: two intra-op threads, or one per worker when
# `make test` runs two pytest-xdist workers side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# luna-tiny is built once per machine and copied into each test's data root (models.ensure_tiny keeps the
# build in the user cache); tests use a cache of their own, never the user's.
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(tempfile.gettempdir(), "lunatrain-test-cache"))

OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"

# typer's CliRunner builds the click command tree from the app's function signatures on every invoke (about
# 70 ms for lunatrain's app, evaluating each annotation), which hundreds of in-process CLI tests repeat. The
# tree depends only on the code, not on the environment or the arguments: build it once per app.
_typer_command = typer.testing._get_command  # type: ignore[attr-defined]
typer.testing._get_command = functools.cache(_typer_command)  # type: ignore[attr-defined]

# Property tests draw the same examples on every run (derived from each test's name), so that no run fails on
# an example the runs before it never drew. `HYPOTHESIS_PROFILE=explore` draws new ones each run, to look for
# bugs; a failure it finds then belongs in the test as an @example. Neither fails a test for being slow to
# generate its examples (a wall-clock check, which a loaded machine can trip).
_quiet = [HealthCheck.too_slow]
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None, suppress_health_check=_quiet)
hypothesis_settings.register_profile("explore", derandomize=False, suppress_health_check=_quiet)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _bitsandbytes_as_found() -> Iterator[None]:
    """A test that runs the console script in-process (`cli.main()`) hides bitsandbytes from the imports after it,
    as a command that will not quantize does (compat.without_bitsandbytes). The hiding ends with that test: a
    later test in the same worker that imports PEFT and then starts `serve` in-process would otherwise be told
    that this process cannot quantize, depending on which tests xdist gave that worker."""
    hidden_before = "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None
    yield
    if not hidden_before and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session):
    """Collecting imports torch, transformers and PEFT with the test modules: as in the processes that train,
    no cyclic collection while they load, and what they made is frozen, so that the collections during the
    run do not walk it again and again (startup.py)."""
    with collector_paused():
        yield


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data root; the process works inside it as a user would."""
    root = tmp_path / "home"
    root.mkdir()
    for var in list(os.environ):
        if var.startswith("ASSISTANT_") and var != "ASSISTANT_TEST_PG_URL":
            monkeypatch.delenv(var)
    monkeypatch.setenv("ASSISTANT_HOME", str(root))
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def settings(home: Path) -> Settings:
    return load_settings()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound, never listening: connections are refused and nobody else can take it meanwhile."""
    with bound_port() as port:
        yield port


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process sees no CUDA GPU, also on a machine that has one: for tests of what happens without one
    (device `auto` is the CPU, `cuda` is refused), which the GPU checks run too."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """A folder under test-output/ for screenshots and other artifacts a person may want to look at."""
    path = OUTPUT_DIR / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """luna-tiny, built (or taken from the machine cache) once per session; read-only: copy it to change it."""
    from lunatrain.models import ensure_tiny

    return ensure_tiny(load_settings(home=tmp_path_factory.mktemp("tiny-home")))


@pytest.fixture
def tiny(settings: Settings, tiny_dir: Path) -> Path:
    """luna-tiny in this test's data root (a copy of the session's)."""
    from lunatrain.models import TINY_ID

    target = settings.models_dir / TINY_ID
    shutil.copytree(tiny_dir, target)
    return target


TRAINED_PARAMS = {"epochs": 1, "maxSteps": 4, "batchSize": 4, "rank": 4, "learningRate": 1e-2, "maxSeqLength": 128}


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """One data root for the session: the bundled examples seeded and exported, and luna-adapter@v1 trained
    on them (TRAINED_PARAMS: a few steps at a high learning rate, so the adapter visibly changes the model).
    Read-only: tests that change anything use `trained_home`, a copy in their own data root."""
    from lunatrain import export, store
    from lunatrain.models import TINY_ID
    from lunatrain.train import run_lora

    root = tmp_path_factory.mktemp("trained") / "home"
    settings = load_settings(home=root, db_url=None)
    shutil.copytree(tiny_dir, settings.models_dir / TINY_ID)
    store.load_seed(settings)
    export.export(settings)
    result = run_lora(TRAINED_PARAMS, settings)
    assert result.ok and result.version == "v1", result.error
    store.dispose_stores()  # the copies get engines of their own
    return root


@pytest.fixture
def trained_home(home: Path, trained_root: Path) -> Path:
    """This test's data root as a copy of `trained_root` (examples, export, luna-tiny, luna-adapter@v1)."""
    shutil.copytree(trained_root, home, dirs_exist_ok=True, symlinks=True)
    return home


# The files that take longest, with their seconds in a whole-suite run (bench/results/test_suite.md). They start
# first, spread over the workers: `make test` runs `--dist worksteal`, which hands each worker an equal,
# contiguous share of the collection and lets an idle worker take tests from the end of another's share. So
# each share is one worker's long files (balanced by these seconds, longest first) followed by short tests,
# and what is left to take at the end is short. (A long file's module fixtures are built once, by one worker.)
LONGEST = {
    "test_service_dataparallel.py": 54,
    "test_dashboard_data.py": 48,
    "test_faults_trainer_resume.py": 48,
    "test_faults_trainer.py": 35,
    "test_dashboard.py": 33,
    "test_trainer_service.py": 28,
    "test_luna_flow.py": 22,
    "test_faults_worker.py": 21,
    "test_api_schema.py": 18,
    "test_qlora.py": 16,
    "test_dashboard_chat.py": 15,
    "test_bench.py": 15,
    "test_api_e2e.py": 13,
    "test_chat_e2e.py": 12,
    "test_flow_entry.py": 12,
    "test_ensure.py": 11,
    "test_evalgate.py": 11,
    "test_warm.py": 10,
}


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected: the shares are counted on what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    by_file: dict[str, list[pytest.Item]] = {}
    rest = []
    for item in items:
        (by_file.setdefault(item.path.name, []) if item.path.name in LONGEST else rest).append(item)
    shares: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0] * workers
    for name in sorted(by_file, key=LONGEST.__getitem__, reverse=True):
        k = load.index(min(load))  # longest processing time first: each file to the least loaded worker
        shares[k] += by_file[name]
        load[k] += LONGEST[name]
    ordered, left = [], len(items)
    for k, share in enumerate(shares):
        size = left // (workers - k)  # how worksteal sizes the k-th worker's share
        fill = max(0, size - len(share))
        ordered += share + rest[:fill]
        rest = rest[fill:]
        left -= size
    items[:] = ordered + rest


# The fast tier (`make test-fast`, "not slow") stays fast only while no test in it starts our services,
# commands, jobs or torchrun: each such process imports torch, transformers and PEFT or starts a server.
# A test that does must carry the slow mark; one without it fails here, naming the process it started.
# (Stand-in processes such as `python -c "import time; ..."` are fine in the fast tier.)
_running: dict[str, pytest.Item | None] = {"item": None}
_popen_init = subprocess.Popen.__init__


def _heavy(args: object) -> bool:
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else str(args).split()
    if argv and Path(argv[0]).name == "lunatrain":
        return True
    modules = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"]
    return any(m.split(".")[0] == "lunatrain" or m.startswith("torch.distributed") for m in modules)


def _guarded_popen_init(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
    item = _running["item"]
    if item is not None and item.get_closest_marker("slow") is None and _heavy(args):
        raise AssertionError(f"{item.nodeid} starts {args!r} but is not marked slow (pytest.mark.slow)")
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _guarded_popen_init  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running["item"] = item
    try:
        yield
    finally:
        _running["item"] = None


def _trainer_logs(item: pytest.Item) -> list[Path]:
    """The trainer logs of the data roots a test used: a fixture holding `settings` (a trainer, a service)
    or Settings itself."""
    homes = set()
    for value in getattr(item, "funcargs", {}).values():
        settings = value if isinstance(value, Settings) else getattr(value, "settings", None)
        if isinstance(settings, Settings):
            homes.add(settings.home)
    logs: list[Path] = []
    for home in sorted(homes):
        logs += sorted(home.glob("trainer-*.log"))
        logs += [p for p in (home / "reports" / "training" / "trainer.log",) if p.is_file()]
    return logs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A failure that happened inside a trainer (a job "failed" with "see trainer.log") is explained by that
    # log, which lives in a temporary data root gone by the time anyone reads the report: attach its end.
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for log in _trainer_logs(item):
            report.sections.append((f"trainer log {log.name}", log.read_text(errors="replace")[-4000:]))
