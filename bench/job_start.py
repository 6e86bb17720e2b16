"""How long a short job takes in the trainer service, from submit to `succeeded`, with the warm worker (each
job forked from a process that imported torch, transformers and PEFT once) and without it (a fresh
interpreter per job): the same jobs on the same data root, both trainers started by this command.

Each trainer runs one job first (not counted: the warm worker's own start-up is part of the trainer's),
then `--jobs` timed ones (luna-tiny, memory tier, 3 steps, no gate), in a temporary data root removed at the
end. Writes bench/results/job_start.md (`--out`).
Run: `.venv/bin/python bench/job_start.py [--jobs 5]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchargs import at_least, confine_settings, description, out_file, run, scratch_home, versions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "job_start.md"
PARAMS = {"datasetTier": "memory", "epochs": 1, "maxSteps": 3, "batchSize": 4, "baseModel": "luna-tiny"}


def timed_jobs(home: Path, warm: bool, jobs: int) -> list[float]:
    from lunatrain.params import FlowOptions, parse_params
    from lunatrain.service import client
    from lunatrain.settings import load_settings

    record = load_settings(home=home).trainer_url_file
    record.unlink(missing_ok=True)
    env = os.environ | {"ASSISTANT_HOME": str(home), "ASSISTANT_LORA_WARM_WORKER": str(warm).lower()}
    log = open(home / f"trainer-warm-{warm}.log", "wb")  # the child holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunatrain", "trainer", "--port", "0"], cwd=home, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 120  # bounded polls: a trainer that never comes up fails the benchmark
        while not record.exists():
            assert time.monotonic() < deadline and proc.poll() is None, f"the trainer did not start; see {log.name}"
            time.sleep(0.1)
        settings = load_settings(home=home, lora_trainer_url=record.read_text().strip())
        while client.probe(settings) is None:
            assert time.monotonic() < deadline, f"the trainer at {settings.lora_trainer_url} never answered"
            time.sleep(0.1)
        took = []
        for i in range(jobs + 1):
            params = parse_params(PARAMS | {"adapterName": f"start-{'warm' if warm else 'fresh'}-{i}"})
            t0 = time.perf_counter()
            job = client.submit(settings, params, FlowOptions(gate=False))
            job_deadline = time.monotonic() + 600  # a job of 3 steps; a hung one fails the benchmark
            while (job := client.get_job(settings, job.id)).status not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < job_deadline, f"job {job.id} still {job.status} after 600 s"
                time.sleep(0.05)
            assert job.status == "succeeded", job
            if i:  # the first job of each trainer is not counted
                took.append(time.perf_counter() - t0)
        return took
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--jobs", type=at_least(1), default=5, help="timed jobs per trainer")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the table's file (default: bench/results/job_start.md)")
    args = ap.parse_args()
    out_file(ap, args.out)
    confine_settings()
    from lunatrain import export, store
    from lunatrain.models import ensure_tiny
    from lunatrain.settings import load_settings

    with scratch_home("lunatrain-job-start-") as home:
        settings = load_settings(home=home)
        store.load_seed(settings)
        export.export(settings)
        ensure_tiny(settings)
        fresh = timed_jobs(home, warm=False, jobs=args.jobs)
        warm = timed_jobs(home, warm=True, jobs=args.jobs)
    f, w = statistics.median(fresh), statistics.median(warm)
    table = (
        "| worker | jobs | median s (submit -> succeeded) | min s | max s |\n|---|---:|---:|---:|---:|\n"
        f"| fresh interpreter per job | {len(fresh)} | {f:.2f} | {min(fresh):.2f} | {max(fresh):.2f} |\n"
        f"| forked from the warm worker | {len(warm)} | {w:.2f} | {min(warm):.2f} | {max(warm):.2f} |\n"
    )
    text = (
        "# Job start: warm worker vs a fresh process\n\n"
        f"`bench/job_start.py --jobs {args.jobs}` on {platform.machine()} with {os.cpu_count()} CPU cores: "
        "luna-tiny, memory tier, 3 steps, no gate; the first job of each trainer not counted; load average "
        f"{os.getloadavg()[0]:.1f} at the end (both columns ran under the same load); {versions()}.\n\n"
        f"{table}\nA forked job takes {w / f:.2f}x the time of a fresh one ({f / w:.1f}x faster).\n"
    )
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    run(main)
