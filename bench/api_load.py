"""API under polling load while a job trains: latency and throughput of the status endpoints, and what the
polling costs the training job.

    .venv/bin/python bench/api_load.py [--clients 50] [--duration 30] [--interval 1.0] [--epochs 6]

One run, everything real: a fresh data root seeded with the bundled dataset, `lunatrain serve` as a
subprocess on a free port, its trainer started on demand on another free port. The same LoRA job (tiny model,
same seed and data) runs twice: first unpolled, then with N clients each polling `GET lora/status?jobId=…`
and `GET training/status?minCurated=30` every `--interval` seconds (a dashboard's rhythm; `--interval 0`
polls back to back) for `--duration` seconds once training has started. Training speed is compared over the
same optimizer steps in both runs (steps/s from the trainer's progress events × tokens per step from the
training report), so warm-up and evaluation do not blur it: the steps from the last progress event before
the polling to the first one after it. The table goes to stdout and to bench/results/api_load.md (`--out`);
the run fails (exit 1) on any error answer or a slowdown over `--limit` percent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from benchargs import at_least, confine_settings, confined_env, number, out_file, run, scratch_home, stop, versions

from lunatrain.service.jobs import TERMINAL
from lunatrain.service.lock import read_pid
from lunatrain.service.recovery import stop_orphan
from lunatrain.settings import load_settings
from lunatrain.wire import parse_iso

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "api_load.md"
# A stopping trainer gives its job up to 25 s to stop at a step (runner.CANCEL_GRACE_S + 10) before it ends.
TRAINER_GRACE_S = 40.0


def ts(iso: str) -> float:
    return parse_iso(iso).timestamp()


class Serve:
    """`lunatrain serve` on `home` for the length of a `with` block; on leaving it, also by an exception or
    Ctrl-C while the server starts, the server and the trainer it started have ended before the data root
    can be removed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = confined_env(
            ASSISTANT_HOME=str(home),
            # Port 0 everywhere: the servers bind free ports themselves and record them (no port to race for).
            ASSISTANT_LORA_TRAINER_URL="http://127.0.0.1:0",
            ASSISTANT_LORA_ENSURE_TIMEOUT="300",
        )
        self.url = ""

    @property
    def port(self) -> int:
        """The port the server bound (it picks a free one and records its URL)."""
        return int(urlsplit(self.url).port or 0)

    def __enter__(self) -> Serve:
        exe = str(Path(sys.executable).parent / "lunatrain")
        self.log = open(self.home / "serve.log", "wb")  # closed in _stop
        self.proc = subprocess.Popen(
            [exe, "serve", "--port", "0", "--log-level", "warning"],
            env=self.env,
            cwd=self.home,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        # __exit__ does not run when __enter__ raises: whatever ends the wait (Ctrl-C too) stops the server here.
        try:
            up = self._wait_until_up(timeout=180)
        except BaseException:
            self._stop()
            raise
        if not up:
            self._stop()
            said = (self.home / "serve.log").read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SystemExit(f"lunatrain serve did not start within 180 s; its log:\n{said}")
        return self

    def _wait_until_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        record = self.home / "data" / "api" / "api.url"
        while time.monotonic() < deadline:
            if not self.url and record.exists():
                self.url = record.read_text().strip()
            with contextlib.suppress(httpx.TransportError, httpx.UnsupportedProtocol):
                if httpx.get(self.url + "/openapi.json", timeout=5, trust_env=False).status_code == 200:
                    return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        stop(self.proc)
        self.log.close()
        # The trainer the API started on demand outlives it (its own session): stopped and waited for, since
        # it stops its job, which still writes its report into the data root about to be removed.
        pid = read_pid(load_settings(home=self.home))
        if pid is not None:
            stop_orphan(pid, None, grace=TRAINER_GRACE_S)


def submit(client: httpx.Client, name: str, epochs: int) -> str:
    params = {
        "adapterName": name,
        "epochs": epochs,
        "baseModel": "luna-tiny",
        "datasetTier": "curated",
        "gate": False,
        "seed": 7,
        "minCurated": 0,
        "learningRate": 1e-3,
        "maxSeqLength": 512,
    }
    r = client.post("/assistant/training/lora/start", json=params)
    r.raise_for_status()
    return r.json()["jobId"]


def job_of(client: httpx.Client, job_id: str) -> dict:
    return client.get("/assistant/training/lora/status", params={"jobId": job_id}).json()


def wait(client: httpx.Client, job_id: str, until: set[str], every: float = 2.0) -> dict:
    while True:
        job = job_of(client, job_id)
        if job["status"] in until or job["status"] in TERMINAL:
            return job
        time.sleep(every)


def progress_events(client: httpx.Client, job_id: str) -> list[dict]:
    out, after = [], 0
    while True:
        r = client.get(f"/assistant/training/lora/jobs/{job_id}/events", params={"after": after, "limit": 1000})
        r.raise_for_status()
        page = r.json()
        out += [e for e in page["data"] if e["type"] == "progress"]
        if not page["hasMore"]:
            return out
        after = page["lastSeq"]


def tokens_per_step(client: httpx.Client, job: dict) -> float:
    a = job["adapter"]
    report = client.get(f"/assistant/training/adapters/{a['name']}/versions/{a['version']}/report").json()
    return report["metrics"]["tokensTrained"] / report["metrics"]["steps"]


def compared_steps(events: list[dict], start: float, end: float) -> tuple[int, int]:
    """The steps whose progress events enclose the polling window [start, end]: the last event before it
    (else the first) and the first after it (else the last), so a short window still spans two events."""
    timed = sorted((ts(e["createdAt"]), e["step"]) for e in events)
    lo = max((s for t, s in timed if t <= start), default=timed[0][1])
    hi = min((s for t, s in timed if t >= end), default=timed[-1][1])
    if hi <= lo:
        lo, hi = timed[0][1], timed[-1][1]
    if hi <= lo:
        raise SystemExit("the polled job reported fewer than two steps; give it more --epochs")
    return lo, hi


def steps_per_s(events: list[dict], lo: int, hi: int) -> float:
    """Optimizer steps per second between the events of step `lo` and step `hi`."""
    by_step = {e["step"]: ts(e["createdAt"]) for e in events}
    return (hi - lo) / (by_step[hi] - by_step[lo])


class Conn:
    """A minimal keep-alive HTTP/1.1 GET client: the load generator shares the 2 cores with the server and
    the job, so it should cost as little CPU as possible (httpx costs several times more per request)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.lower() == b"content-length")
        await self.reader.readexactly(length)
        if any(ln.lower() == b"connection: close" for ln in lines):
            self.close()
        return int(lines[0].split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def poll(port: int, job_id: str, clients: int, duration: float, interval: float) -> dict:
    latencies: dict[str, list[float]] = {"lora/status": [], "training/status": []}
    errors: list[str] = []
    stop = time.monotonic() + duration
    targets = (
        ("lora/status", f"/assistant/training/lora/status?jobId={job_id}"),
        ("training/status", "/assistant/training/status?minCurated=30"),
    )

    async def one(i: int) -> None:
        conn = Conn(port)
        await asyncio.sleep(interval * i / clients)  # spread the clients over one interval
        while time.monotonic() < stop:
            started = time.perf_counter()
            for key, target in targets:
                t = time.perf_counter()
                try:
                    status = await conn.get(target)
                    if status != 200:
                        errors.append(f"{key}: HTTP {status}")
                except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
                    errors.append(f"{key}: {type(exc).__name__}")
                    conn.close()
                latencies[key].append(time.perf_counter() - t)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))
        conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.monotonic() - t0
    return {
        "latencies": latencies,
        "errors": errors,
        "elapsed": elapsed,
        "window": (time.time() - elapsed, time.time()),
    }


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=at_least(1), default=50, help="polling clients at once")
    ap.add_argument("--duration", type=number(above=0), default=30.0, help="seconds of polling")
    ap.add_argument(
        "--interval", type=number(least=0), default=1.0, help="seconds between one client's polls (0: no pause)"
    )
    ap.add_argument("--epochs", type=at_least(1), default=6, help="job length; the polled job must outlast --duration")
    ap.add_argument(
        "--limit", type=number(least=0), default=10.0, help="largest training slowdown in percent that passes"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary data root")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the table's file (default: bench/results/api_load.md)")
    args = ap.parse_args()
    out_file(ap, args.out)
    confine_settings()

    with scratch_home("lunatrain-apiload-", keep=args.keep) as home:
        load, quiet, lo, hi, quiet_tps, busy_tps, device = measure(home, args)
    report(args, load, quiet, lo, hi, quiet_tps, busy_tps, device)


def measure(home: Path, args: argparse.Namespace) -> tuple:
    """The unpolled run, then the polled one, on a fresh data root served by `lunatrain serve`."""
    confine_settings(ASSISTANT_HOME=str(home))
    from lunatrain import export, store
    from lunatrain.settings import load_settings

    settings = load_settings(home=home)
    store.load_seed(settings)
    export.export(settings)
    store.dispose_stores()
    with Serve(home) as serve, httpx.Client(base_url=serve.url, timeout=600, trust_env=False) as client:
        print("unpolled run …", flush=True)
        quiet_id = submit(client, "bench-unpolled", args.epochs)
        quiet = wait(client, quiet_id, TERMINAL)
        if quiet["status"] != "succeeded":
            raise SystemExit(f"the unpolled job ended {quiet['status']}: {quiet.get('error')}")
        print("polled run …", flush=True)
        busy_id = submit(client, "bench-polled", args.epochs)
        # Polling starts once training has (model loaded, data tokenized); a job that ends first says why.
        while not progress_events(client, busy_id):
            if (early := job_of(client, busy_id))["status"] in TERMINAL:
                raise SystemExit(f"the polled job ended {early['status']} before its first step: {early.get('error')}")
            time.sleep(0.5)  # a paced look, not a timing: the job is waited for as long as it takes
        load = asyncio.run(poll(serve.port, busy_id, args.clients, args.duration, args.interval))
        busy = wait(client, busy_id, TERMINAL)
        if busy["status"] != "succeeded":
            raise SystemExit(f"the polled job ended {busy['status']}: {busy.get('error')}")

        quiet_ev, busy_ev = progress_events(client, quiet_id), progress_events(client, busy_id)
        lo, hi = compared_steps(busy_ev, *load["window"])
        quiet_tps = steps_per_s(quiet_ev, lo, hi) * tokens_per_step(client, quiet)
        busy_tps = steps_per_s(busy_ev, lo, hi) * tokens_per_step(client, busy)
        device = client.get("/assistant/training/lora/provider-health").json()
    return load, quiet, lo, hi, quiet_tps, busy_tps, device


def report(
    args: argparse.Namespace, load: dict, quiet: dict, lo: int, hi: int, quiet_tps: float, busy_tps: float, device: dict
) -> None:
    lat = load["latencies"]
    n = sum(len(v) for v in lat.values())
    if n == 0:  # a table of nan would read as a result
        raise SystemExit("no request was answered while the job trained; give a longer --duration")
    slowdown = 100.0 * (1 - busy_tps / quiet_tps)
    rows = [
        "| endpoint | requests | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *(f"| GET {k} | {len(v)} | {pct(v, 50):.1f} | {pct(v, 99):.1f} |" for k, v in lat.items()),
        f"| **all** | {n} | {pct(sum(lat.values(), []), 50):.1f} | {pct(sum(lat.values(), []), 99):.1f} |",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| clients × interval | {args.clients} × {args.interval:g} s |",
        f"| polling time | {load['elapsed']:.1f} s |",
        f"| requests/s | {n / load['elapsed']:.1f} |",
        f"| errors | {len(load['errors'])} |",
        f"| training steps compared | {lo}–{hi} (of {quiet['progress']['totalSteps']}) |",
        f"| tokens/s unpolled | {quiet_tps:,.0f} |",
        f"| tokens/s polled | {busy_tps:,.0f} |",
        f"| training slowdown under polling | {slowdown:+.1f}% (limit {args.limit:g}%) |",
    ]
    header = (
        f"# API under polling load ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"`{' '.join(['bench/api_load.py', *sys.argv[1:]])}` on {platform.machine()} with {os.cpu_count()} CPU cores "
        f"(shared with other work: noisy), trainer device `{(device.get('device') or {}).get('type', '?')}` "
        f"({device.get('label')}); load generator, API, trainer and job all on this machine; "
        f"tiny model, {args.epochs} epochs; {versions()}.\n\n"
    )
    table = header + "\n".join(rows) + "\n"
    if load["errors"]:
        table += "\nErrors (first 10): " + "; ".join(load["errors"][:10]) + "\n"
    print(table)
    args.out.write_text(table, encoding="utf-8")
    if load["errors"] or slowdown > args.limit:
        raise SystemExit(1)


if __name__ == "__main__":
    run(main)
