"""The benchmarks keep working: the GPU training benchmark's tiny preset runs on CPU end to end (the same
contenders and table code as bench/train_cpu.py), on a 4-bit base and in full precision, and reports a rate
for every contender, and the chat serving benchmark reports tokens and a rate for the endpoint and for
generate()."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The scripts run as __main__ with their own command lines, one after the other in one process: each
# would otherwise spend seconds of CPU importing torch, transformers and PEFT for itself. A script that fails
# does not keep the next one from running; each one's stderr ends with a line of its own (MARK). The 4-bit
# run goes first: PEFT must load with bitsandbytes for it, and a full-precision run does not mind (so here
# the full-precision run has bitsandbytes loaded, which a run of its own would spare itself).
MARK = "=== bench script ended: "
_RUN_ALL = """
import runpy, sys, traceback
sys.path.insert(0, sys.argv[1])  # the bench folder, as running a script there puts it first
failed = 0
for argv in ({gpu4!r}, {gpu!r}, {infer!r}):
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        failed += exc.code not in (0, None)
    except BaseException:
        traceback.print_exc()
        failed += 1
    print({mark!r} + argv[0], file=sys.stderr, flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_training_and_inference_benchmark_smoke_on_cpu(tmp_path: Path, subtests) -> None:
    gpu_out, gpu4_out, infer_out = tmp_path / "train_gpu.md", tmp_path / "train_gpu_4bit.md", tmp_path / "infer.md"
    gpu = [
        str(ROOT / "bench" / "train_gpu.py"),
        "--presets",
        "tiny",
        "--device",
        "cpu",
        # the least that still times a step of every contender: one warm-up step and one timed, four short
        # samples of different lengths a step (so pad-to-longest still pads)
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
        "--threads",  # tiny matmuls lose more CPU to thread sync than they gain, the more so under load
        "1",
        "--out",
        str(gpu_out),
    ]
    gpu4 = [*gpu[:-1], str(gpu4_out), "--quantize", "4bit"]
    infer = [
        str(ROOT / "bench" / "infer.py"),
        "--prompts",
        "2",
        "--max-tokens",
        "4",
        "--concurrency",
        "2",
        "--out",
        str(infer_out),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_ALL.format(gpu4=gpu4, gpu=gpu, infer=infer, mark=MARK), str(ROOT / "bench")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    # Each script's stderr, for its own subtest's message.
    err = dict(zip(("4bit", "none", infer[0]), done.stderr.split(MARK), strict=False))

    for quantize, out in (("4bit", gpu4_out), ("none", gpu_out)):
        with subtests.test(f"bench/train_gpu.py --quantize {quantize}"):
            assert out.is_file(), err.get(quantize, done.stderr)[-3000:]
            table = out.read_text()
            rows = [ln for ln in table.splitlines() if ln.startswith("| tiny / ")]
            assert [ln.split("|")[1].strip() for ln in rows] == [
                "tiny / trainer-pad",
                "tiny / trainer-flatten",
                "tiny / lunatrain",
            ]
            for ln in rows:
                rate = ln.split("|")[2].strip()
                assert re.fullmatch(r"[\d,]+", rate) and int(rate.replace(",", "")) > 0, ln
            assert "Attention in lunatrain's loop: varlen-sdpa" in table
            assert ("4-bit NF4 base" in table.splitlines()[0]) == (quantize == "4bit"), table.splitlines()[0]

    with subtests.test("bench/infer.py"):
        assert infer_out.is_file(), err.get(infer[0], done.stderr)[-3000:]
        rows = [
            ln.split("|")[1:-1]
            for ln in infer_out.read_text().splitlines()
            if ln.startswith(("| endpoint", "| generate"))
        ]
        assert [r[0].strip() for r in rows] == [
            "endpoint, 1 stream",
            "endpoint, 2 concurrent streams",
            "generate(), 1 at a time",
            "generate(), batch of 2",
        ]
        for row in rows:
            assert int(row[1].strip().replace(",", "")) > 0 and float(row[3].strip().replace(",", "")) > 0, row

    assert done.returncode == 0, done.stderr[-3000:]
