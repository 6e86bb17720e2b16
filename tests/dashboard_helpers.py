"""Real services for the dashboard's browser tests: `lunatrain serve` as a process on a port it binds itself
(`--port 0`, the address read from data/api/api.url) with its own data root; the trainer is started by the API
itself (ensure on demand, likewise on a port of its own), as a user's click would start it.

Also usable by hand to look at the page with live data:

    .venv/bin/python tests/dashboard_helpers.py      # prints the URL; Ctrl-C stops everything
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from trainer_helpers import ON_DEMAND_ENV, recorded_url

CHROMIUM = "/usr/bin/chromium"
# No sandbox (containers), no GPU, and nothing that phones home: the browser only talks to our server.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Services:
    home: Path
    api_url: str
    trainer_url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def tail(self, lines: int = 40) -> str:
        """The end of the server's log (and the trainer's), for a failing test's message."""
        out = []
        logs = [self.home / "reports" / "training" / "trainer.log", *sorted(self.home.glob("data/trainer/logs/*.log"))]
        for path in [self.log, *logs]:
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def start_services(home: Path, *, timeout: float = 60.0, **extra_env: str) -> Services:
    """Start `lunatrain serve` under `home` on a port it binds itself; the trainer's address is "any free
    port", so the trainer the API starts binds one too and records it under `home`. `extra_env`: more
    settings for the server (e.g. ASSISTANT_API_TOKEN)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    env |= (
        {
            "ASSISTANT_HOME": str(home),
            "ASSISTANT_LORA_TRAINER_URL": "http://127.0.0.1:0",
            # Two shared cores: one thread each for the API and the training child keeps the machine responsive.
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        | ON_DEMAND_ENV
        | extra_env
    )
    log = home / "serve.log"
    record = home / "data" / "api" / "api.url"
    record.unlink(missing_ok=True)  # an earlier server's address is not this one's
    services = Services(home, "", env["ASSISTANT_LORA_TRAINER_URL"], log, env=env)
    lunatrain = Path(sys.executable).with_name("lunatrain")
    with log.open("wb") as out:
        services.proc = subprocess.Popen(
            [str(lunatrain), "serve", "--port", "0", "--log-level", "warning"],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    services.api_url = recorded_url(record, services.proc, timeout) or ""
    while services.api_url and time.monotonic() < deadline:
        if services.proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(services.api_url + "/", timeout=2, trust_env=False).status_code == 200:
                return services
        time.sleep(0.3)
    stop_services(services)
    if services.proc.poll() is not None:
        raise RuntimeError(f"lunatrain serve exited with {services.proc.returncode}:\n{services.tail()}")
    raise RuntimeError(f"lunatrain serve did not answer within {timeout}s:\n{services.tail()}")


VIEWPORT = {"width": 1280, "height": 900}


class Tab:
    """The page a test gets: the module's one browser tab, lent to it. The listeners a test adds are removed
    when it gives the tab back, so the next test starts with none of them; everything else is the page's own."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self._added: list[tuple[str, Callable[..., Any]]] = []

    def on(self, event: str, handler: Callable[..., Any]) -> None:
        self._added.append((event, handler))
        self.page.on(event, handler)

    def forget_listeners(self) -> None:
        while self._added:
            self.page.remove_listener(*self._added.pop())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.page, name)


class Tabs:
    """One tab for a module's tests in turn, instead of a new browser context each: a new tab costs Chromium
    about 0.6 CPU-s more than a page load in a reused one (bench/results/test_suite.md). Between tests the tab
    is cleared of routes, listeners and the page's session storage and left on about:blank (the page's timers
    stop there); after a failed test, or when clearing fails, the next test gets a new one, so that a broken
    page never fails the tests after it."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self._context: Any = None
        self._tab: Tab | None = None

    def lend(self) -> Tab:
        if self._tab is None:
            self._context = self.browser.new_context(viewport=VIEWPORT)
            self._tab = Tab(self._context.new_page())
        return self._tab

    def give_back(self, tab: Tab, *, keep: bool) -> None:
        page = tab.page
        try:
            tab.forget_listeners()
            if keep:
                page.unroute_all(behavior="ignoreErrors")
                if page.url.startswith("http"):
                    page.evaluate("sessionStorage.clear()")
                page.goto("about:blank")
                page.set_viewport_size(VIEWPORT)
                return
        except Exception:  # a tab that cannot be cleared is replaced, like one after a failure
            pass
        self.close()

    def close(self) -> None:
        if self._context is not None:
            with contextlib.suppress(Exception):
                self._context.close()
        self._context, self._tab = None, None


def _ours(proc: psutil.Process, home: Path) -> bool:
    """A process we started: its environment names our temporary data root."""
    with contextlib.suppress(psutil.Error):
        return proc.environ().get("ASSISTANT_HOME") == str(home)
    return False


@contextlib.contextmanager
def running_services(home: Path, **extra_env: str) -> Iterator[Services]:
    """start_services for the block, stopped after it whatever happens (a module fixture's lifetime)."""
    svc = start_services(home, **extra_env)
    try:
        yield svc
    finally:
        stop_services(svc)


def stop_services(services: Services) -> None:
    """Stop the API, then every process that runs on this test's data root (the trainer the API started and
    its job children), each by its own pid."""
    if services.proc and services.proc.poll() is None:
        services.proc.send_signal(signal.SIGTERM)
        try:
            services.proc.wait(10)
        except subprocess.TimeoutExpired:
            services.proc.kill()
            services.proc.wait(5)
    leftovers = [p for p in psutil.process_iter() if p.pid != os.getpid() and _ours(p, services.home)]
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="lunatrain-dash-"))
    svc = start_services(root)
    print(f"{svc.api_url}/   (data root {root}; Ctrl-C stops)", flush=True)
    try:
        svc.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_services(svc)
