"""Export benchmark: wall time and peak memory of `lunatrain export` at 100k and 1M examples (SQLite).

Run:  .venv/bin/python bench/export.py            # 100k and 1M (about 5-10 minutes on 2 cores)
      .venv/bin/python bench/export.py --sizes 20000 100000 --workdir /tmp/b

For each size it builds a synthetic database through the store's own bulk path (`add_examples`: one
executemany per 50k rows), then runs every export in a fresh Python process that reports its own peak RSS
(ru_maxrss), so the peaks are independent. The baseline in the same run is a process that only imports
lunatrain and opens the store: export memory above that floor is what the streaming has to keep flat.
Targets: 1M in under 60 s; peak RSS at 1M at most 1.3x the peak at 100k. The table is printed and saved
to bench/results/export.md (`--out`); the work folder goes at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchargs import at_least, confine_settings, description, out_file, run, versions, work_dir
from words import EXPORT_WORDS as WORDS

CHILD = r"""
import json, resource, sys, time
from lunatrain.settings import load_settings
from lunatrain.store import open_store
settings = load_settings(home=sys.argv[1], db_url=None)
open_store(settings)
summary = None
if sys.argv[2] == "export":
    from lunatrain.export import export
# CPU and wall time of the export alone (not the interpreter's start and imports); the peak is the process's.
cpu = lambda: sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
c, t = cpu(), time.perf_counter()
if sys.argv[2] == "export":
    summary = export(settings)
wall = time.perf_counter() - t
print(json.dumps({
    "wall_s": wall,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "cpu_s": cpu() - c,
    "records": summary.counts["merged"]["total"] if summary else 0,
    "bytes": sum(f["bytes"] for f in summary.files.values()) if summary else 0,
}))
"""


def _build(home: Path, n: int, seed: int = 0) -> float:
    from lunatrain import store
    from lunatrain.formats import make_draft
    from lunatrain.settings import load_settings

    settings = load_settings(home=home, db_url=None)
    rng = random.Random(seed)
    t = time.perf_counter()
    # Realistic mix: mostly curated+approved, some memory/conversation sources, pending and rejected rows,
    # a third in conversations, a few with a system prompt and prior turns.
    groups = [
        ("curated", "approved", 0.80),
        ("conversation", "approved", 0.08),
        ("memory", "approved", 0.04),
        ("curated", "pending", 0.05),
        ("conversation", "rejected", 0.03),
    ]
    i = 0
    for source, status, share in groups:
        todo = int(n * share) if (source, status) != groups[-1][:2] else n - i
        while todo > 0:
            chunk = min(todo, 50_000)
            drafts = []
            for _ in range(chunk):
                words = " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
                turns = [("user", "Hallo Luna"), ("assistant", "Hallo! Was kann ich tun?")] if i % 10 == 0 else ()
                drafts.append(
                    make_draft(
                        prompt=f"{words} #{i}?",
                        response=" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + ".",
                        system="Du bist Luna." if i % 20 == 0 else None,
                        turns=turns,
                        conversation_id=f"conv-{rng.randrange(n // 5 + 1)}" if rng.random() < 0.33 else None,
                        tags=["bench"],
                    )
                )
                i += 1
            store.add_examples(settings, drafts, source=source, status=status)  # type: ignore[arg-type]
            todo -= chunk
    store.dispose_stores()
    return time.perf_counter() - t


def _child(home: Path, what: str) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(home), what], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument(
        "--sizes", type=at_least(1), nargs="+", default=[100_000, 1_000_000], help="database sizes, in examples"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lunatrain-bench-export"),
        help="where the databases are built: a new or empty folder, or one a benchmark made",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases and exports")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "export.md",
        help="the table's file (default: bench/results/export.md)",
    )
    parser.add_argument("--build", nargs=2, metavar=("HOME", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(_build(Path(args.build[0]), int(args.build[1])))
        return

    out_file(parser, args.out)
    confine_settings()
    with work_dir(parser, args.workdir, keep=args.keep):
        rows = [measure(args.workdir / f"n{n}", n, args.keep) for n in dict.fromkeys(args.sizes)]
    write_results(rows, args.out)


def measure(home: Path, n: int, keep: bool) -> tuple[int, float, float, float, dict]:
    """Build a database of `n` examples in `home`, then export it in a fresh process (and open it in
    another one, for the floor)."""
    home.mkdir(parents=True)
    # Built in its own process: Linux keeps ru_maxrss across fork+exec, so a parent that grew while
    # building would hand its size to every export child as a false "peak".
    build = subprocess.run(
        [sys.executable, __file__, "--build", str(home), str(n)], check=True, capture_output=True, text=True
    )
    build_s = float(build.stdout.strip().splitlines()[-1])
    db_mb = (home / "data" / "assistant.db").stat().st_size / 2**20
    floor = _child(home, "open")
    res = _child(home, "export")
    print(f"  built {n:,} rows in {build_s:.0f}s; exported in {res['wall_s']:.1f}s", file=sys.stderr, flush=True)
    if not keep:
        shutil.rmtree(home, ignore_errors=True)
    return n, build_s, db_mb, floor["peak_rss_mb"], res


def write_results(rows: list[tuple[int, float, float, float, dict]], out: Path) -> None:
    lines = [
        f"{'examples':>10} {'exported':>9} {'db MB':>6} {'wall s':>7} {'cpu s':>6} {'records/s':>10} "
        f"{'out MB':>7} {'peak RSS MB':>12} {'floor MB':>9} {'above floor':>12}"
    ]
    for n, _build_s, db_mb, floor_mb, res in rows:
        lines.append(
            f"{n:>10,} {res['records']:>9,} {db_mb:>6.0f} {res['wall_s']:>7.1f} {res['cpu_s']:>6.1f} "
            f"{res['records'] / res['wall_s']:>10,.0f} {res['bytes'] / 2**20:>7.0f} {res['peak_rss_mb']:>12.1f} "
            f"{floor_mb:>9.1f} {res['peak_rss_mb'] - floor_mb:>12.1f}"
        )
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        ratio = large[4]["peak_rss_mb"] / small[4]["peak_rss_mb"]
        lines.append(
            f"peak RSS {large[0]:,} / {small[0]:,}: {ratio:.2f}x (target <= 1.3x); "
            f"{large[0]:,} export {large[4]['wall_s']:.1f}s (target < 60s at 1M)"
        )
    print("\n".join(lines))
    text = (
        "# Export throughput and memory (SQLite)\n\n"
        f"`{' '.join(['bench/export.py', *sys.argv[1:]])}` on {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({time.strftime('%Y-%m-%d')}); {versions()}. Each export runs in a fresh child process; RSS is that "
        "child's peak, `cpu s` the CPU time of the export alone.\n\n```\n" + "\n".join(lines) + "\n```\n"
    )
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    run(main)
