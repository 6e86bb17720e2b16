"""Shared fixtures: every test gets its own empty data root (ASSISTANT_HOME) so nothing leaks between tests.

Run all tests: `make test`; the quick subset without end-to-end flows: `make test-fast`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from lunatrain.settings import Settings, load_settings

# Keep torch small and predictable on the 2-core machines: two intra-op threads, or one per worker when
# `make test` runs two pytest-xdist workers side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# luna-tiny is built once per machine and copied into each test's data root (models.ensure_tiny keeps the
# build in the user cache); tests use a cache of their own, never the user's.
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(tempfile.gettempdir(), "lunatrain-test-cache"))

OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"


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
def output_dir(request: pytest.FixtureRequest) -> Path:
    """A folder under test-output/ for screenshots and other artifacts a person may want to look at."""
    path = OUTPUT_DIR / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path
