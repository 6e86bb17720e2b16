"""Growth of a data root over many short jobs, and what the default retention policy removes.

Starts a real trainer on a free port for a fresh data root, submits N short LoRA jobs (tiny model, two
optimizer steps, no gate), waits for all of them, then measures the job store (rows, events, file size),
job logs, token caches, exports, adapter versions and the whole data root, before and after
`retention.collect()` with the default settings.

Run: `python bench/growth.py --jobs 50` (1324 s, about 22 minutes, on a shared 2-core CPU: see
bench/results/growth.md, written from its output); prints a table. The data root is temporary and goes at
the end, unless `--home` names a folder to keep it in.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from benchargs import at_least, confine_settings, description, fresh_work_dir, run, scratch_home, stop, versions

ROOT = Path(__file__).resolve().parent.parent


def _size(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def measure(settings) -> dict[str, int]:
    from lunatrain.service.jobs import jobs_db_path

    db_path = jobs_db_path(settings.data_dir)
    db = sqlite3.connect(db_path)
    jobs, events = (db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("jobs", "events"))
    db.close()
    logs = settings.data_dir / "trainer" / "logs"
    return {
        "jobs": jobs,
        "events": events,
        "jobs.db bytes": sum(_size(Path(f"{db_path}{s}")) for s in ("", "-wal", "-shm")),
        "logs": len(list(logs.glob("*.log"))),
        "logs bytes": _size(logs),
        "token caches": len(list((settings.cache_dir / "tokens").glob("*.safetensors"))),
        "token cache bytes": _size(settings.cache_dir / "tokens"),
        "exports": len(list((settings.training_dir / ".exports").iterdir())),
        "adapter bytes": _size(settings.adapters_dir),
        "data root bytes": _size(settings.home),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--jobs", type=at_least(1), default=50, help="short jobs to submit")
    parser.add_argument(
        "--home",
        type=Path,
        help="keep the data root in this folder, to look at afterwards: a new or empty one, or one an earlier "
        "run made (emptied first); default: a temporary one, removed at the end",
    )
    args = parser.parse_args()
    if args.home:
        fresh_work_dir(parser, args.home, "--home")
    with contextlib.nullcontext(args.home) if args.home else scratch_home("lunatrain-growth-") as home:
        grow(home, args.jobs, kept=args.home is not None)


def grow(home: Path, jobs: int, kept: bool) -> None:
    confine_settings(
        ASSISTANT_HOME=str(home),
        # Port 0: the trainer binds a free port and records it in data/trainer/trainer.url, where the
        # client looks when the configured port is 0.
        ASSISTANT_LORA_TRAINER_URL="http://127.0.0.1:0",
        ASSISTANT_LORA_ENSURE_ON_DEMAND="false",
    )
    from lunatrain import export, retention, store
    from lunatrain.params import parse_run
    from lunatrain.service import client as trainer_client
    from lunatrain.settings import load_settings

    settings = load_settings()
    store.load_seed(settings)
    for _ in range(4):  # a few exports, as a user re-exporting between runs would leave
        export.export(settings)
    log = open(home / "trainer.out", "wb")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "lunatrain", "trainer", "--port", "0"],
        cwd=home,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while trainer_client.probe(settings) is None:
            if time.monotonic() > deadline or trainer.poll() is not None:
                said = (home / "trainer.out").read_text(encoding="utf-8", errors="replace")[-2000:]
                raise SystemExit(f"the trainer did not start; its output:\n{said}")
            time.sleep(0.5)
        params, options = parse_run(
            {
                "adapterName": "growth",
                "epochs": 1,
                "maxSteps": 2,
                "rank": 4,
                "batchSize": 8,
                "maxSeqLength": 128,
                "gate": False,
                "device": "cpu",
                "baseModel": "luna-tiny",
            }
        )
        started = time.monotonic()
        ids = [trainer_client.submit(settings, params, options).id for _ in range(jobs)]
        while True:
            states = [trainer_client.get_job(settings, j).status for j in ids]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(2)
        seconds = time.monotonic() - started
    finally:
        # A trainer stops its job before it ends: waited for, so the data root is not removed under it.
        stop(trainer, grace=40)
        log.close()
    before = measure(settings)
    report = retention.collect(settings)
    after = measure(settings)
    where = f"data root kept in {home}" if kept else "temporary data root"
    print(f"{jobs} jobs in {seconds:.0f} s ({states.count('succeeded')} succeeded); {where}; {versions()}")
    print(f"| measure | after {jobs} jobs | after `lunatrain gc` (defaults) | per job |")
    print("|---|---:|---:|---:|")
    for key in before:
        print(f"| {key} | {before[key]:,} | {after[key]:,} | {before[key] / jobs:,.0f} |")
    print(
        f"gc removed: {', '.join(f'{n} {k} ({b:,} bytes)' for k, (n, b) in sorted(report.by_kind().items())) or 'nothing'}"
    )


if __name__ == "__main__":
    run(main)
