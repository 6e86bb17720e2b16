"""What the paused collector saves when a process imports the training stack (src/lunatrain/startup.py).

Each round starts two fresh interpreters that import what the warm worker imports (torch, transformers, PEFT
without bitsandbytes, and lunatrain's train/gate/flow modules), one with the collector running as Python
starts it (the baseline) and one inside `collector_paused()`, in alternating order; each reports its own CPU
time. Then each forks a child, as the warm worker forks a job: the child runs one full collection and
reports its CPU time and how much of the parent's memory it had to copy (private dirty pages).
Writes bench/results/startup.md. Run: `.venv/bin/python bench/startup.py [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from benchargs import at_least, confine_settings, description, out_file, run, versions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "startup.md"

CHILD = r"""
import gc, json, os, sys, time
from lunatrain.compat import without_bitsandbytes
from lunatrain.startup import collector_paused, import_training_stack

def load():
    import peft, transformers  # noqa: F401
    from lunatrain import evalgate, flow, train  # noqa: F401

without_bitsandbytes()
t = time.process_time()
if sys.argv[1] == "paused":
    with collector_paused():
        import_training_stack()
        load()
else:
    load()
imported = time.process_time() - t

def private_dirty_kb():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty"))

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    before = private_dirty_kb()
    t = time.process_time()
    gc.collect()
    took = time.process_time() - t
    os.write(w, json.dumps({"gc": took, "copied_kb": private_dirty_kb() - before}).encode())
    os._exit(0)
os.close(w)
child = json.loads(os.read(r, 4096))
os.waitpid(pid, 0)
print(json.dumps({"import": imported, **child}))
"""


def one(mode: str) -> dict[str, float]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the {mode} interpreter failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--rounds", type=at_least(1), default=5, help="pairs of interpreters, in alternating order")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the table's file (default: bench/results/startup.md)")
    args = ap.parse_args()
    out_file(ap, args.out)
    confine_settings()
    runs: dict[str, list[dict[str, float]]] = {"running": [], "paused": []}
    for i in range(args.rounds):
        for mode in ("running", "paused") if i % 2 == 0 else ("paused", "running"):
            runs[mode].append(one(mode))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    rows = [
        ("collector running (Python's default)", "running"),
        ("collector paused, then frozen (startup.py)", "paused"),
    ]
    table = "| start-up | import CPU s (median) | min | max | forked child: full collection CPU s | copied MiB |\n"
    table += "|---|---:|---:|---:|---:|---:|\n"
    for label, mode in rows:
        imports = [r["import"] for r in runs[mode]]
        table += (
            f"| {label} | {med(mode, 'import'):.2f} | {min(imports):.2f} | {max(imports):.2f} "
            f"| {med(mode, 'gc'):.3f} | {med(mode, 'copied_kb') / 1024:.0f} |\n"
        )
    ratio = med("paused", "import") / med("running", "import")
    text = (
        "# Start-up: importing the training stack with the collector paused\n\n"
        f"`bench/startup.py --rounds {args.rounds}` on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"{versions()}: each round two fresh interpreters, in alternating order, import "
        "torch, transformers, PEFT and lunatrain's train/gate/flow modules (what the warm worker preloads); "
        "then each forks a child that runs one full collection. Load average "
        f"{os.getloadavg()[0]:.1f} at the end (both rows ran under the same load).\n\n"
        f"{table}\nWith the collector paused the imports take {ratio:.2f}x the CPU time "
        f"({(1 - ratio) * 100:.0f} % less).\n"
    )
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    run(main)
