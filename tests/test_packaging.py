"""What a built package holds: the sdist is the whole project (a test suite that runs, its docs, the licence
the metadata declares), the wheel the package with its licence. Built from the tracked files, as a fresh
clone has them. Run: `.venv/bin/python -m pytest tests/test_packaging.py -q`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_copy(dest: Path) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are not known")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _build(tree: Path, kind: str) -> Path:
    out = tree / "dist"
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_sdist_holds_a_runnable_suite_the_docs_and_the_licence(tmp_path):
    """Packaging repro: the sdist held the test modules (setuptools' default) but not conftest.py or the
    helpers 28 of them import, none of docs/ that README links, and no licence text for `license = "MIT"`."""
    tree = _tracked_copy(tmp_path / "tree")
    with tarfile.open(_build(tree, "sdist")) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    tracked = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file() and "dist" not in p.parts}
    for needed in ("tests/conftest.py", "tests/helpers.py", "tests/trainer_helpers.py", "docs/api.md", "LICENSE"):
        assert needed in names, needed
    missing = sorted(n for n in tracked if n.startswith(("tests/", "docs/", "src/")) and n not in names)
    assert missing == [], missing
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_carries_the_licence(tmp_path):
    tree = _tracked_copy(tmp_path / "tree")
    with zipfile.ZipFile(_build(tree, "wheel")) as wheel:
        names = wheel.namelist()
        meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: MIT" in meta and "License-File: LICENSE" in meta
