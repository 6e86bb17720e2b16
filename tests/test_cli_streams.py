"""The command line's standard streams when they take nothing, or not everything: stdout on a full disk
(`/dev/full`), stderr closed or full or a pipe nobody reads, a working directory that is gone, arguments a
locale could not decode. The output that cannot be written is said in one sentence with exit 74 (sysexits'
EX_IOERR), never a traceback, and never costs the work: a training run whose progress cannot be shown goes on
and is recorded; lost diagnostics change no outcome. Run: `pytest tests/test_cli_streams.py -q`."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lunatrain import store
from lunatrain.cli import app
from lunatrain.cli.app import is_tty
from lunatrain.console import OUTPUT_LOST, OutputLost
from lunatrain.progress import ProgressDisplay
from lunatrain.settings import Settings

EVENT = {"type": "progress", "epoch": 1, "epochs": 1, "step": 2, "totalSteps": 2, "loss": 1.5, "etaSeconds": 0}


def lunatrain(home: Path | None, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | kwargs.pop("env", {})
    if home is not None:
        env["ASSISTANT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "lunatrain", *args], env=env, **({"timeout": 300} | kwargs))


def one_error(stderr: bytes) -> str:
    said = stderr.decode()
    assert said.startswith("error: ") and said.count("\n") == 1 and "Traceback" not in said, said
    return said


class _Full(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_progress_display_that_cannot_write_ends_the_display_not_the_run() -> None:
    """Explore repro: `lora --local > /dev/full` lost its run at the first progress line (the training loop
    took the write's error for its own and failed, leaving no report); with stderr closed (`--json 2>&-`)
    the progress went to stdout ahead of the JSON document."""
    full = _Full()
    with ProgressDisplay(stream=full, tty=False, every=0) as display:
        display.on_event(EVENT)
        display.on_event({"type": "log", "message": "epoch 1 done"})
    assert display.stream is None
    lost = ProgressDisplay(stream=None)
    assert lost.tty is False
    with lost:
        lost.on_event(EVENT)  # nothing to show it on, nothing raised

    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise OutputLost(OSError(errno.EIO, "Input/output error"))

    with ProgressDisplay(stream=Gone(), tty=False, every=0) as display:
        display.on_event(EVENT)
    assert display.stream is None


def test_a_closed_stderr_is_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Explore repro: `lora --json 2>&-` through the trainer ended with exit 1 and nothing said while its job
    went on: asking whether stderr was a terminal raised on the missing stream."""
    monkeypatch.setattr(sys, "stderr", None)
    assert is_tty(err=True) is False


def test_utf8_text_a_locale_could_not_decode_is_taken_as_typed(settings: Settings) -> None:
    """Explore repro: under an ASCII locale without Python's UTF-8 mode (`LC_ALL=C PYTHONUTF8=0`) `--prompt
    "Grüß dich"` arrives as escaped bytes and was refused as "the byte 0xC3, which is not UTF-8". The bytes are
    UTF-8; it is the locale that is not. A byte that is no UTF-8 (Latin-1) is still refused."""
    escaped = "Gr\udcc3\udcbc\udcc3\udc9f dich"  # what Python makes of b"Gr\xc3\xbc\xc3\x9f dich" in ASCII
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", escaped, "--response", "Hallo", "--tag", escaped])
    assert r.exit_code == 0, r.output
    (example,) = store.list_examples(settings)
    assert example.prompt == "Grüß dich" and list(example.tags) == ["Grüß dich"], example
    r = CliRunner().invoke(app, ["memory", "add", "--question", escaped, "--answer", "Hallo"])
    assert r.exit_code == 0 and store.list_memory(settings)[0].question == "Grüß dich", r.output
    r = CliRunner().invoke(app, ["examples", "add", "--prompt", "j\udcfcrgen", "--response", "x"])
    assert r.exit_code == 2 and "--prompt holds the byte 0xFC, which is not UTF-8" in r.output, r.output
    store.dispose_stores()


@pytest.mark.slow
def test_output_that_cannot_be_written_is_one_sentence_and_exit_74(settings: Settings) -> None:
    """Explore repro: every command writing to a full disk (`> /dev/full`) ended in a 40-line traceback with
    exit 1 (a failed check), or 120 where stdout is block-buffered and only the interpreter's last flush found
    out. What the command did before stays done (the example is stored); the sentence says so."""
    with open("/dev/full", "w") as full:
        for buffered in (False, True):
            env = {"PYTHONUNBUFFERED": ""} if buffered else {"PYTHONUNBUFFERED": "1"}
            added = lunatrain(
                settings.home,
                "examples",
                "add",
                "--prompt",
                "a",
                "--response",
                f"{buffered}",
                stdout=full,
                stderr=subprocess.PIPE,
                env=env,
            )
            assert added.returncode == OUTPUT_LOST, added.stderr.decode()
            said = one_error(added.stderr)
            assert "could not be written to stdout (No space left on device)" in said, said
            shown = lunatrain(settings.home, "status", "--json", stdout=full, stderr=subprocess.PIPE, env=env)
            assert shown.returncode == OUTPUT_LOST and "Exception ignored" not in shown.stderr.decode()
            one_error(shown.stderr)
    assert len(store.list_examples(settings)) == 2
    store.dispose_stores()


@pytest.mark.slow
def test_diagnostics_that_cannot_be_written_change_no_outcome(settings: Settings) -> None:
    """Explore repro: `examples list 2>/dev/full` exited 1 though the listing was whole (only its "more may
    follow" line failed), and with stderr on a pipe nobody reads a refused duplicate exited 141, the status
    of a closed output pipe, instead of 1. Lost diagnostics are lost; the status is the command's."""
    for i in range(3):
        store.add_example(settings, prompt=f"p{i}", response="r")
    store.dispose_stores()
    with open("/dev/full", "w") as full:
        listed = lunatrain(settings.home, "examples", "list", "--limit", "1", stdout=subprocess.PIPE, stderr=full)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1, listed
    read, write = os.pipe()
    os.close(read)
    try:
        twice = lunatrain(
            settings.home, "examples", "add", "--prompt", "p0", "--response", "r", stdout=subprocess.PIPE, stderr=write
        )
        listed = lunatrain(settings.home, "examples", "list", stdout=subprocess.PIPE, stderr=write)
    finally:
        os.close(write)
    assert (twice.returncode, listed.returncode) == (1, 0) and len(listed.stdout.splitlines()) == 3
    # review repro: `| head` with stderr closed ended 120, the interpreter's failed flush of a wrapped None
    read, write = os.pipe()
    os.close(read)
    try:
        cut = lunatrain(settings.home, "examples", "list", "--json", stdout=write, preexec_fn=lambda: os.close(2))
    finally:
        os.close(write)
    assert cut.returncode == 141


@pytest.mark.slow
def test_a_working_directory_that_is_gone_is_one_sentence(tmp_path: Path) -> None:
    """Explore repro: in a working directory deleted under the shell, every command without an absolute
    ASSISTANT_HOME (the data root is the working directory, or relative to it) ended in a FileNotFoundError
    traceback."""
    gone = tmp_path / "gone"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    for home in ("", "ASSISTANT_HOME=rel "):
        gone.mkdir()
        done = subprocess.run(
            ["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && {home}exec "{sys.executable}" -m lunatrain status'],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr.decode()
        assert "The working directory no longer exists" in one_error(done.stderr)


@pytest.mark.slow
def test_help_with_stdout_closed_is_refused_for_the_services_too(tmp_path: Path) -> None:
    """Explore repro: `serve --help >&-` exited 0 with the help lost: the services may run with stdout closed,
    but their help is output like any other."""
    for service in ("serve", "trainer"):
        done = lunatrain(tmp_path, service, "--help", preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE)
        assert done.returncode == 2 and "Standard output is closed" in one_error(done.stderr), service


@pytest.mark.slow
def test_a_local_run_goes_on_and_is_recorded_when_its_output_cannot_be_written(settings: Settings) -> None:
    """Explore repro: `lora --local > /dev/full` threw the run away at its first progress line and left no
    report; `lora --local --json 2>&-` printed the progress ahead of its JSON document."""
    assert lunatrain(settings.home, "examples", "seed", stdout=subprocess.DEVNULL).returncode == 0
    assert lunatrain(settings.home, "export", stdout=subprocess.DEVNULL).returncode == 0
    run = ("lora", "--local", "--epochs", "1", "--maxSteps", "2", "--no-gate")
    with open("/dev/full", "w") as full:
        lost = lunatrain(settings.home, *run, stdout=full, stderr=subprocess.PIPE)
    assert lost.returncode == OUTPUT_LOST, lost.stderr.decode()[-2000:]
    one_error(lost.stderr)
    latest = json.loads(settings.lora_latest_report.read_text())
    assert latest["status"] == "succeeded" and latest["version"] == "v1", latest
    quiet = lunatrain(settings.home, *run, "--json", stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["adapter"]["version"] == "v2", quiet.stdout[:2000]


@pytest.mark.slow
def test_services_started_with_their_standard_descriptors_closed_keep_their_lock_log_and_exit_status(
    tmp_path: Path,
) -> None:
    """Explore repros (daemon wrappers): `trainer --log-file F <&- >&- 2>&-` put its socket, lock and log file on
    descriptors 0-2, then its log pipe over 1 and 2: the lock went (a second trainer started on the same data
    root) and the log stayed empty; with only stdout closed it died at once, saying nothing. And `serve` or
    `trainer` with stdout closed ended every orderly stop in a traceback and exit 1."""
    import signal

    from trainer_helpers import recorded_url, stop_group, trainer_env

    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "trainer.log"

    def closing(*fds: int):
        return lambda: [os.close(fd) for fd in fds]

    argv = [sys.executable, "-m", "lunatrain", "trainer", "--port", "0"]
    record = home / "data" / "trainer" / "trainer.url"
    first = subprocess.Popen(
        [*argv, "--log-file", str(log)], env=trainer_env(home), preexec_fn=closing(0, 1, 2), start_new_session=True
    )
    try:
        url = recorded_url(record, first, 120)
        assert url and wait_for_health(url), "the trainer with its descriptors closed did not serve"
        # refused at once while the first holds the data root (it ran for good when the lock had gone)
        second = lunatrain(home, "trainer", "--port", "0", capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        assert second.returncode != 0 and "already" in second.stderr.decode(), second.stderr.decode()[-500:]
        assert first.poll() is None and f"on {url}" in log.read_text(), log.read_text()[-500:]
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 128 + signal.SIGTERM
    finally:
        stop_group(first.pid)

    for service in ("serve", "trainer"):
        err = tmp_path / f"{service}.err"
        with open(err, "wb") as said:
            env = trainer_env(home) | {"ASSISTANT_API_PORT": "0"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "lunatrain", service, *(["--port", "0"] if service == "trainer" else [])],
                env=env, stderr=said, stdin=subprocess.DEVNULL, preexec_fn=closing(1), start_new_session=True,
            )  # fmt: skip
        try:
            where = home / "data" / ("api/api.url" if service == "serve" else "trainer/trainer.url")
            found = recorded_url(where, proc, 120)
            answers = found and wait_for_health(found, "/v1/models" if service == "serve" else "/health")
            assert answers, (service, err.read_text()[-1000:])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 128 + signal.SIGTERM, (service, err.read_text()[-1000:])
            assert "Traceback" not in err.read_text(), err.read_text()
        finally:
            stop_group(proc.pid)


def wait_for_health(url: str, path: str = "/health") -> bool:
    import httpx

    from trainer_helpers import wait_for

    def up() -> bool:
        try:
            return httpx.get(url + path, timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    return bool(wait_for(up, 120))


@pytest.mark.slow
def test_python_dash_m_lunatrain_cli_starts_as_the_console_script_does(tmp_path: Path) -> None:
    """Review repro: `python -m lunatrain.cli` (which the README calls the same as `lunatrain`) skipped the
    console script's start-up: `status >&-` exited 0 with its output lost, and a trainer started with its
    descriptors closed lost its data-root lock."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | {"ASSISTANT_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "lunatrain.cli", "status"],
        env=env, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Standard output is closed" in one_error(done.stderr)
