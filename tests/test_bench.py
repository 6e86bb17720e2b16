"""The training benchmarks keep working: the GPU benchmark's tiny preset runs on CPU end to end (the same
contenders and table code as bench/train_cpu.py) and reports a rate for every contender."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "train_gpu.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_gpu.py"),
            "--presets",
            "tiny",
            "--device",
            "cpu",
            # the least that still times a step of every contender: one warm-up step and one timed, four
            # short samples of different lengths a step (so pad-to-longest still pads)
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--min-len",
            "16",
            "--max-len",
            "64",
            "--rounds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| tiny / ")]
    assert [ln.split("|")[1].strip() for ln in rows] == [
        "tiny / trainer-pad",
        "tiny / trainer-flatten",
        "tiny / lunatrain",
    ]
    for ln in rows:
        rate = ln.split("|")[2].strip()
        assert re.fullmatch(r"[\d,]+", rate) and int(rate.replace(",", "")) > 0, ln
    assert "Attention in lunatrain's loop: varlen-sdpa" in out.read_text()


@pytest.mark.slow
def test_inference_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "infer.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "infer.py"),
            "--prompts",
            "2",
            "--max-tokens",
            "4",
            "--concurrency",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in out.read_text().splitlines() if ln.startswith(("| endpoint", "| generate"))]
    assert [r[0].strip() for r in rows] == [
        "endpoint, 1 stream",
        "endpoint, 2 concurrent streams",
        "generate(), 1 at a time",
        "generate(), batch of 2",
    ]
    for row in rows:
        assert int(row[1].strip().replace(",", "")) > 0 and float(row[3].strip().replace(",", "")) > 0, row
